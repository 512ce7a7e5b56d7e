# syntax=docker/dockerfile:1
# The image the cluster runs: `repro <stage>` under Docker/Podman, or converted to Apptainer (README "Container").
#
# Base: CUDA 12.8.1 + cuDNN 9 runtime on Ubuntu 22.04, pinned by digest (the linux/amd64 image manifest). That digest was
# taken from public code, starsnap/starsnap-ai-backend, file `dockerfile` (commit 880a237), which pins the same tag
# to it as "the amd64 manifest"; this machine has no registry access, so it was NOT checked here. Re-verify where there
# is internet, before relying on it:
#   docker buildx imagetools inspect nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
# and compare with the linux/amd64 entry (or the index digest, which pins the same image for every platform).
# Base image licence: NVIDIA Deep Learning Container License (https://developer.nvidia.com/ngc/nvidia-deep-learning-container-license).
#
# A locally made image can stand in for the base (it needs apt and a distribution that ships python3.11, e.g. Debian
# bookworm or Ubuntu 22.04): `--build-arg BASE_IMAGE=localhost/...`; scripts/container-smoke.sh does that here.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04@sha256:59e0e4376a0f16d10b03d3a14344b80a866a1674cb4948cb318291387ac05010

FROM ${BASE_IMAGE}

ARG BASE_IMAGE
# The hashed lock file to install (path in the build context). It pins torch 2.14.1 from PyPI, whose Linux x86_64
# wheel is the CUDA 13.0 build: it brings its own CUDA runtime, cuDNN and NCCL as nvidia-* wheels (all locked with
# hashes), so the base's CUDA 12.8 libraries are not what torch loads. NVIDIA_REQUIRE_CUDA below makes the NVIDIA
# container runtime refuse a driver too old for CUDA 13.0 (driver >= 580) instead of failing later inside torch.
ARG REQUIREMENTS=requirements.lock
# Optional: an extra CA bundle for pip behind a TLS-intercepting proxy. Give a path that is mounted at build time
# (`podman build -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt`);
# nothing of it is copied into the image. pip reads the build arg as $PIP_CERT; empty means pip's own bundle.
ARG PIP_CERT=
ARG SOURCE_URL=
ARG REVISION=

LABEL org.opencontainers.image.title="repro" \
      org.opencontainers.image.description="Discriminator-based refinement of pretrained image generators (DDO, DG, ...): the repro CLI and its pinned dependencies" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Python 3.11 from the distribution (Ubuntu 22.04 universe; Debian bookworm main), git for DVC.
# Package versions are not pinned: the archive drops superseded versions, so pins would break rebuilds; the base
# digest fixes the OS snapshot, and the Python side is fixed by the hashed lock file.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    DVC_NO_ANALYTICS=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# Dependencies first, every file checked against its hash, in three layers from the one lock: the CUDA libraries
# (nvidia-*, cuda-*: about 3.2 GB installed), then torch and triton (about 2.1 GB), then the rest (about 1.4 GB).
# The big layers change only with the torch pin, so a site's registry and nodes reuse them across rebuilds; and
# committing a layer briefly needs a few times its size on disk, so smaller layers let the image build on a disk
# with about 13 GB free instead of about 28 GB (measured with scripts/container-smoke.sh).
# The first two install exact pins from the lock without resolving (--no-deps); the last installs the whole lock,
# which resolves every package against those already there.
COPY ${REQUIREMENTS} /tmp/requirements.lock
RUN python3.11 -m venv "$VIRTUAL_ENV" \
    && awk '/^[a-z0-9]/ { keep = /^(nvidia-|cuda-)/ } keep' /tmp/requirements.lock > /tmp/cuda.lock \
    && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/cuda.lock \
    && rm /tmp/cuda.lock
RUN awk '/^[a-z0-9]/ { keep = /^(torch|triton)==/ } keep' /tmp/requirements.lock > /tmp/torch.lock \
    && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/torch.lock \
    && rm /tmp/torch.lock
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# The package itself, without dependencies (they are all in the lock) and without build isolation (setuptools is in the lock).
WORKDIR /opt/repro-src
COPY pyproject.toml README.md ./
COPY repro ./repro
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf /opt/repro-src \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin repro

# The project checkout (params.yaml, dvc.yaml, data/, results/) is mounted here; stages write their outputs here.
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["repro"]
CMD ["--help"]
