"""End to end through `dvc repro`: the micro preset with closed-form kernel guidance and DCD beside the base, measured
in one run on the same seeds; then a change of the kernel's weight reruns only the guided sampling and what follows."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repro.config import preset_dict
from repro.evaluation.tables.data import read_result

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def test_dvc_repro_measures_kernel_and_dcd_beside_the_base_and_a_new_weight_reruns_only_guided(tmp_path):
    d = tmp_path
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
    params = preset_dict("micro")
    params["ddo"].update(rounds=0, control=False, sweep_alpha=[], sweep_beta=[])
    params["sample"].update(n_samples=16)
    params["guidance"] = {"evaluate": ["base+kernel", "base+dcd"], "fakes": 32}
    params["kernel"] = {"w": 0.3, "max_bank": 32}
    params["dcd"] = {"critic_steps": 4, "batch": 8, "steps": 5, "step_size": 0.05}
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "REPRO_TRACKING": "off", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], d, env)
    (d / ".gitignore").write_text("/runs/\n")
    _run(["dvc", "init", "-q"], d, env)
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "init"], d, env)
    out = _run(["dvc", "repro"], d, env)
    for stage in ("fakes", "discriminator", "guided", "fid", "table"):
        assert f"Running stage '{stage}'" in out
    before = {m["name"]: m for m in read_result(d / "results/micro")["models"]}
    assert list(before) == ["base", "base+kernel", "base+dcd"]
    assert all(len(m["values"]) == 2 and m["value"] > 0 for m in before.values())
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "first run"], d, env)
    out = _run(["dvc", "exp", "run", "-S", "kernel.w=0.1"], d, env)
    for stage in ("data", "extractor", "pretrain", "ddo", "sample", "fakes", "discriminator"):
        assert f"Running stage '{stage}'" not in out
    for stage in ("guided", "fid", "table"):
        assert f"Running stage '{stage}'" in out
    after = {m["name"]: m for m in read_result(d / "results/micro")["models"]}
    assert after["base"]["values"] == before["base"]["values"]
    assert after["base+dcd"]["values"] == before["base+dcd"]["values"]       # its own section did not change
    assert after["base+kernel"]["values"] != before["base+kernel"]["values"]
    assert after["base+kernel"]["guided"]["guidance"]["w"] == 0.1
