# Minimal image for the tiny CPU pipeline. The cluster work (pinned CUDA base by digest, hashed lock file,
# Apptainer/Pyxis launch) builds on this; until then BASE defaults to a plain Python image.
ARG BASE=python:3.11-slim
FROM ${BASE}
WORKDIR /opt/repro
COPY requirements.txt pyproject.toml README.md ./
COPY repro ./repro
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --create-home repro
USER repro
WORKDIR /work
ENTRYPOINT ["repro"]
CMD ["--help"]
