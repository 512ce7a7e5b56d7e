"""End to end: the micro preset through `dvc repro` (all stages, MLflow runs), then a no-op rerun and a param change."""

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


def _run(cmd, cwd, env, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git + DVC project with the repo's dvc.yaml and the micro preset as params.yaml."""
    d = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    # the stages' code dependencies (dvc.yaml lists the modules each stage runs)
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
    (d / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("REPRO_TRACKING", None)
    _run(["git", "init", "-q"], d, env)
    (d / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/runs/\n/samples\n")
    _run(["dvc", "init", "-q"], d, env)
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "init"], d, env)
    out = _run(["dvc", "repro"], d, env)
    return d, env, out



def test_dvc_repro_runs_every_stage_and_writes_the_outputs(project):
    d, env, out = project
    for stage in ("data", "extractor", "pretrain", "ddo", "sample", "fid", "table"):
        assert f"Running stage '{stage}'" in out
    manifest = json.loads((d / "data/manifest.json").read_text())
    assert manifest["n"] == 1797 and len(manifest["sha256"]) == 64
    assert manifest["split"]["n_heldout"] == 359 and manifest["split"]["n_train"] == 1438  # micro = tiny's split
    metrics = read_result(d / "results/micro")
    names = [m["name"] for m in metrics["models"]]
    assert names == ["base", "ddo-round1", "ddo-round2", "control-round2"]
    for m in metrics["models"]:
        assert len(m["values"]) == 2 and m["value"] > 0 and m["sample_devices"] == ["cpu"]
    p = metrics["protocol"]
    assert p["n_samples"] == 96 and p["seed_ranges"] == [[0, 96], [96, 192]] and p["extractor"] == "digits-classifier"
    assert len(p["extractor_sha256"]) == 64 and len(p["reference_sha256"]) == 64
    assert (d / "results/micro/rounds.tsv").read_text().startswith("round\tddo\tcontrol\n0\t")
    # the held-out part: its own distance and the copy rate per model, the split and the floor in the protocol
    for m in metrics["models"]:
        assert m["extra"]["fd_digits_heldout"]["value"] > 0 and len(m["extra"]["fd_digits_heldout"]["values"]) == 2
        assert 0 <= m["extra"]["copy_rate"]["value"] <= 1
        assert set(m["extra"]) >= {"kid_train", "kid_heldout"}
    held = p["heldout"]
    assert held["n_heldout"] == 359 and held["floor"] > 0 and held["copy_check"]["percentile"] == 5.0
    assert len(held["floor_same_size"]) == 5 and "kid_floor" in held
    assert "the training part, 1438 images" in p["reference"]
    table = (d / "results/micro/table.md").read_text()
    assert "ddo-round2" in table and "FD-digits" in table and "; sampled on cpu;" in table
    assert "vs held-out (mean)" in table and "KID×10³ held-out" in table and "| copies |" in table and "held-out part 359 images" in table
    assert "Table 1" in (d / "results/ddo_tables.md").read_text()
    rounds = json.loads((d / "models/ddo/rounds.json").read_text())
    assert len(rounds["history"]["ddo"]) == 2 and len(rounds["history"]["control"]) == 2
    for h in rounds["history"]["ddo"]:
        # the best checkpoint was kept; the reference is a candidate of its own round
        assert h["best_score"] == min([h["reference_score"]] + [e["score"] for e in h["evals"]])
    assert sorted(f.name for f in (d / "samples/base").iterdir()) == ["seeds-000000000-000000096.npz",
                                                                      "seeds-000000096-000000192.npz"]


def test_mlflow_holds_a_run_per_stage_with_nested_rounds_and_artifacts(project):
    d, env, _ = project
    from repro.pipeline.tracking import find_runs

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        runs = find_runs(d, "micro")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    stages = {r["stage"] for r in runs if r["parent"] is None}
    assert stages == {"data", "extractor", "pretrain", "ddo", "sample", "fid", "table"}
    for r in runs:
        assert r["status"] == "FINISHED" and r["tags"]["config_hash"] and r["tags"]["git_commit"] != "unknown"
        if r["parent"] is None:  # cost accounting: every stage's wall and device seconds, and its device
            assert {"wall_seconds", "device_seconds"} <= set(r["metrics"]) and r["tags"]["device"]
    ddo = next(r for r in runs if r["stage"] == "ddo" and r["parent"] is None)
    children = [r for r in runs if r["parent"] == ddo["run_id"]]
    assert sorted(r["name"] for r in children) == ["control-round1", "control-round2", "ddo-round1", "ddo-round2"]
    for c in children:
        assert "selection_score" in c["metrics"] and "loss" in c["metrics"]
        assert any(a.endswith("_samples.png") for a in c["artifacts"])
    fid = next(r for r in runs if r["stage"] == "fid")
    assert "plots/metric_per_round.png" in fid["artifacts"]
    pretrain = next(r for r in runs if r["stage"] == "pretrain")
    assert "loss" in pretrain["metrics"]
    # The UI opens the experiment on its training runs; the runs that train or evaluate on the data name it.
    assert runs[0]["experiment_tags"]["mlflow.experimentKind"] == "custom_model_development"
    sha = json.loads((d / "data/manifest.json").read_text())["sha256"]
    for r in (pretrain, ddo, next(r for r in runs if r["stage"] == "extractor")):
        assert r["inputs"] == [("digits", sha[:16])]


def test_second_dvc_repro_does_nothing(project):
    d, env, _ = project
    out = _run(["dvc", "repro"], d, env)
    assert "Running stage" not in out
    assert "up to date" in out


def test_ddo_rerun_from_scratch_gives_the_same_bytes_so_nothing_downstream_is_stale(project):
    """Rounds retrained from nothing (run dirs gone) must write byte-identical outputs: no timings, no hash-map
    ordering in them; otherwise DVC would see models/ddo changed and rerun sampling and FID for nothing."""
    d, env, _ = project
    before = (d / "dvc.lock").read_text()
    for run_dir in (d / "runs").glob("ddo-*"):
        shutil.rmtree(run_dir)
    out = _run(["dvc", "repro", "--force", "--single-item", "ddo"], d, env)
    assert "Running stage 'ddo'" in out
    assert (d / "dvc.lock").read_text() == before
    status = _run(["dvc", "status"], d, env)
    assert "up to date" in status, status


def test_dvc_exp_run_with_a_new_beta_reruns_only_what_depends_on_it(project):
    d, env, _ = project
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "first run"], d, env)
    out = _run(["dvc", "exp", "run", "-S", "ddo.beta=0.05"], d, env)
    for stage in ("data", "extractor", "pretrain"):
        assert f"Stage '{stage}' didn't change, skipping" in out
        assert f"Running stage '{stage}'" not in out
    for stage in ("ddo", "sample", "fid", "table"):
        assert f"Running stage '{stage}'" in out
    assert yaml.safe_load((d / "params.yaml").read_text())["ddo"]["beta"] == 0.05
