"""End to end: the embedded default with discriminator guidance (the dg-tiny preset's guided models on a micro
stand-in) through `dvc repro`: base, DG, improved DG, the DDO rounds, DDO + DG and the MLE control in one table,
measured in the same run on the same seeds; then a no-op rerun, and a change of DG's weight that reruns only the
guided sampling and what follows it."""

import json
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


def _run(cmd, cwd, env, timeout=900):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
    params = preset_dict("micro")
    params["guidance"] = {**preset_dict("dg-tiny")["guidance"], "fakes": 128}   # dg-tiny's guided models
    assert params["guidance"]["evaluate"] == ["base+dg", "base+dg-improved", "last+dg"]
    params["discriminator"].update(epochs=1, batch=32)
    params["paper"] = {"name": "dg", "cells": {"base": "cifar10/edm-uncond:fid_base",
                                               "base+dg": "cifar10/edm-uncond:fid_dg"}}
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("REPRO_TRACKING", None)
    _run(["git", "init", "-q"], d, env)
    (d / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/runs/\n")
    _run(["dvc", "init", "-q"], d, env)
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "init"], d, env)
    out = _run(["dvc", "repro"], d, env)
    return d, env, out


def test_one_table_holds_base_dg_improved_dg_ddo_and_ddo_plus_dg_on_the_same_seeds(project):
    d, env, out = project
    for stage in ("fakes", "discriminator", "guided", "fid", "table"):
        assert f"Running stage '{stage}'" in out
    result = read_result(d / "results/micro")
    names = [m["name"] for m in result["models"]]
    assert names == ["base", "ddo-round1", "ddo-round2", "control-round2", "base+dg", "base+dg-improved",
                     "ddo-round2+dg"]
    ranges = result["protocol"]["seed_ranges"]
    assert ranges == [[0, 96], [96, 192]]
    for m in result["models"]:
        assert len(m["values"]) == 2 and m["value"] > 0 and m["sample_devices"] == ["cpu"]
    by = {m["name"]: m for m in result["models"]}
    assert by["base+dg"]["guided"]["model"] == "base" and by["ddo-round2+dg"]["guided"]["model"] == "ddo-round2"
    assert by["base+dg-improved"]["guided"]["discriminator"]["objective"] == "mse"
    assert by["base+dg"]["guided"]["guidance"] == {"variant": "dg", "method": "dg", "w": 2.0, "w2": 0.0,
                                                    "tau_min": 0.01, "tau_max": 1.0, "d_clip": 1e-5,
                                                    "boosting": False}
    assert by["ddo-round2+dg"]["round"] == 2 and "selection_score" not in by["ddo-round2+dg"]
    # the guided shards hold the unguided ones' seeds and labels
    import numpy as np

    for name in ("base+dg", "ddo-round2+dg"):
        for f in sorted((d / "samples" / name.split("+")[0]).iterdir()):
            g = np.load(d / "samples-guided" / name / f.name)
            u = np.load(f)
            assert np.array_equal(g["seeds"], u["seeds"]) and np.array_equal(g["labels"], u["labels"])
            assert not np.array_equal(g["images"], u["images"])
    # one discriminator per guided model; the two DG ones on their own model's fake bank
    index = json.loads((d / "models/guidance/discriminators.json").read_text())["discriminators"]
    assert {k: v["fakes"] for k, v in index.items()} == {"base+dg": "fakes/base", "base+dg-improved": None,
                                                        "ddo-round2+dg": "fakes/ddo-round2"}
    banks = json.loads((d / "fakes/banks.json").read_text())["banks"]
    assert banks["base"]["seeds"] == [200000000, 200000128] == banks["ddo-round2"]["seeds"]
    table = (d / "results/micro/table.md").read_text()
    assert any(line.startswith("| model |") and "| Δ vs unguided |" in line for line in table.splitlines())
    row = next(line for line in table.splitlines() if line.startswith("| ddo-round2+dg |"))
    assert "DG on ddo-round2 (w = 2)" in row
    # the DG paper's table: our micro numbers in the cells the run names, marked (another metric and protocol)
    paper = (d / "results/dg_tables.md").read_text()
    row = next(line for line in paper.splitlines() if line.startswith("| EDM (VP), unconditional |"))
    ours = f"({by['base']['value']:.2f}) (base); ({by['base+dg']['value']:.2f}) (+DG)"
    assert ours in row and "NOT the paper's protocol: metric fd_digits (paper fid)" in row


def test_mlflow_has_a_run_per_guidance_stage_and_one_child_per_trained_discriminator(project):
    d, env, _ = project
    from repro.pipeline.tracking import find_runs

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        runs = find_runs(d, "micro")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    assert {"fakes", "discriminator", "guided"} <= {r["stage"] for r in runs if r["parent"] is None}
    disc = next(r for r in runs if r["stage"] == "discriminator" and r["parent"] is None)
    children = sorted((r["name"], r["status"]) for r in runs if r["parent"] == disc["run_id"])
    assert children == [("base+dg", "FINISHED"), ("base+dg-improved", "FINISHED"), ("ddo-round2+dg", "FINISHED")]
    for r in runs:
        if r["parent"] == disc["run_id"]:
            assert "epoch_loss" in r["metrics"]
    guided = next(r for r in runs if r["stage"] == "guided")
    assert sorted(a for a in guided["artifacts"] if a.endswith(".png")) == [
        "images/base_dg-improved.png", "images/base_dg.png", "images/ddo-round2_dg.png"]


def test_a_second_dvc_repro_does_nothing(project):
    d, env, _ = project
    out = _run(["dvc", "repro"], d, env)
    assert "Running stage" not in out and "up to date" in out


def test_a_new_dg_weight_reruns_only_guided_sampling_and_what_follows(project):
    d, env, _ = project
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "first run"], d, env)
    before = read_result(d / "results/micro")
    out = _run(["dvc", "exp", "run", "-S", "dg.w=0.5"], d, env)
    for stage in ("data", "extractor", "pretrain", "ddo", "sample", "fakes", "discriminator"):
        assert f"Running stage '{stage}'" not in out
    for stage in ("guided", "fid", "table"):
        assert f"Running stage '{stage}'" in out
    after = {m["name"]: m for m in read_result(d / "results/micro")["models"]}
    for m in before["models"]:  # the unguided models' and improved DG's (own section) are the same; DG's moved
        same = m["values"] == after[m["name"]]["values"]
        assert same == (m.get("guided", {}).get("variant", "dg-improved") == "dg-improved"), m["name"]
    assert after["base+dg"]["guided"]["guidance"]["w"] == 0.5
    assert after["base+dg-improved"]["guided"]["guidance"]["w"] == 2.0  # dg_improved.w, not dg.w
