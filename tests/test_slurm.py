"""Through a real SLURM (slurmctld + slurmd + slurmdbd on MariaDB, started by slurm/local-cluster.sh).

.ci/run starts the cluster before the tests; run by hand, the fixture starts it (as root) and stops what it
started. Where SLURM cannot start (not root, no apt), these tests skip with the reason the start-up gave.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from repro.config import preset_dict
from repro.evaluation.tables.data import read_result

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


def _sinfo_ok() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm():
    if _sinfo_ok():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM is not running and starting it needs root: `sudo bash slurm/local-cluster.sh up`")
    p = subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "up"], capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0 or not _sinfo_ok():
        pytest.skip(f"slurm/local-cluster.sh up failed: {(p.stderr or p.stdout).strip()[-500:]}")
    yield
    subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "down"], capture_output=True, timeout=120)


def _env(d: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}", "OMP_WAIT_POLICY": "PASSIVE", "DVC_NO_ANALYTICS": "1"}
    for k in ("REPRO_TRACKING", "SLURM_JOB_ID", "REPRO_IN_JOB"):
        env.pop(k, None)
    return env


def _run(cmd, cwd, env, timeout=600, ok=True):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def project(slurm, tmp_path_factory):
    """A project directory (micro preset, the slurm/ scripts) with data, extractor and base model made locally."""
    d = tmp_path_factory.mktemp("slurm-project")
    shutil.copytree(ROOT / "slurm", d / "slurm")
    (d / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    env = _env(d)
    for stage in ("data", "extractor", "pretrain"):
        _run(["repro", stage, "--no-progress"], d, env)
    return d, env


def _runs(d: Path, env: dict) -> list[dict]:
    from repro.pipeline.tracking import find_runs

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        return find_runs(d, "micro")
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _round_dirs(d: Path, name: str) -> list[Path]:
    return sorted(d.glob(f"runs/ddo-*/{name}"))


def _sacct(job: str, timeout: float = 90) -> dict:
    """sacct's view of a job once every line is final (the result file can appear before the job has ended)."""
    t0 = time.time()
    while True:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,State,ExitCode"],
                             capture_output=True, text=True, check=True).stdout
        rows = {line.split("|")[0]: line.split("|")[1:] for line in out.strip().splitlines()}
        busy = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"}
        if rows and not any(v[0].split()[0] in busy for v in rows.values()) or time.time() - t0 > timeout:
            return rows
        time.sleep(1)


def test_submitit_runs_a_ddo_round_as_a_slurm_job(project):
    d, env = project
    p = _run(["repro", "ddo", "--round", "1", "--no-progress", "--set", "launcher.executor=slurm",
              "--set", "launcher.poll_s=1"], d, env)
    assert "submitted job" in p.stderr
    job = p.stderr.split("submitted job ")[1].split(";")[0].strip()
    assert _sacct(job)[job][0] == "COMPLETED"
    for kind in ("ddo", "control"):
        (rd,) = _round_dirs(d, f"{kind}-round1")
        assert (rd / "done.json").is_file() and (rd / "best.safetensors").is_file()
    runs = [r for r in _runs(d, env) if r["stage"] == "ddo" and r["parent"] is None]
    assert any(r["tags"]["slurm_job_id"] == job and r["status"] == "FINISHED" for r in runs)


def test_a_swept_ddo_round_sends_its_candidates_as_a_job_array(project):
    d, env = project
    p = _run(["repro", "ddo", "--round", "1", "--no-progress", "--set", "launcher.executor=slurm",
              "--set", "launcher.poll_s=1", "--set", "launcher.resources.cpus_per_task=1",
              "--set", "ddo.sweep_beta=[0.1, 0.3]"], d, env)
    assert "stage ddo-round1-candidates: 2 tasks as job array" in p.stderr, p.stderr[-2000:]
    array = p.stderr.split("candidates: 2 tasks as job array ")[1].split()[0]
    rows = _sacct(array)
    assert len(rows) == 2 and all(v[0] == "COMPLETED" for v in rows.values()), rows
    (rd,) = [x for x in _round_dirs(d, "ddo-round1") if (x / "a1-b0.1").is_dir()]
    done = json.loads((rd / "done.json").read_text())
    assert [c["beta"] for c in done["candidates"]] == [0.1, 0.3]
    chosen = rd / f"a{done['chosen']['alpha']:g}-b{done['chosen']['beta']:g}" / "best.safetensors"
    assert (rd / "best.safetensors").read_bytes() == chosen.read_bytes()
    assert (rd.parent / "control-round1" / "done.json").is_file()  # the stage's own job: the MLE control


def test_sbatch_script_runs_a_ddo_round(project):
    d, env = project
    p = _run(["sbatch", "--parsable", "--wait", "slurm/ddo_round.sh", "--params", "params.yaml", "--round", "1",
              "--set", "ddo.seed=7"], d, env)
    job = p.stdout.strip().split(";")[0]
    assert _sacct(job)[job][0] == "COMPLETED"
    log = (d / f"repro-ddo-round-{job}.log").read_text()
    assert "ddo --round 1: ddo-round1 best" in log and "ddo --round 1: control-round1 best" in log
    runs = _runs(d, env)
    (top,) = [r for r in runs if r["stage"] == "ddo" and r["parent"] is None and r["tags"]["slurm_job_id"] == job]
    assert top["status"] == "FINISHED"
    children = [r for r in runs if r["parent"] == top["run_id"]]
    assert sorted(c["name"] for c in children) == ["control-round1", "ddo-round1"]


def test_sbatch_script_refuses_bad_arguments(project):
    d, env = project
    p = _run(["bash", "slurm/ddo_round.sh", "--preset", "micro", "--rounds", "2"], d, env, ok=False)
    assert p.returncode == 2 and "unknown argument '--rounds'" in p.stderr


def test_a_crashing_job_fails_the_stage_with_its_log_tail(project):
    """The job dies without a result (its batch script exits 3 before the stage starts): the command must fail,
    not hang (this is what SLURM accounting is for), and say why."""
    d, env = project
    t0 = time.time()
    p = _run(["repro", "data", "--set", "launcher.executor=slurm", "--set", "launcher.poll_s=1",
              "--set", "launcher.setup=[echo about to crash, exit 3]"], d, env, timeout=300, ok=False)
    assert p.returncode == 1, p.stderr
    assert "failed (state FAILED)" in p.stderr and "about to crash" in p.stderr
    assert time.time() - t0 < 240


def test_sample_shards_go_out_as_a_job_array(project):
    d, env = project
    _run(["repro", "ddo", "--no-progress"], d, env)  # the models to sample (round 1 is reused from above)
    sets = ["--set", "launcher.executor=slurm", "--set", "launcher.poll_s=1", "--set", "sample.shard_size=96",
            "--set", "launcher.resources.cpus_per_task=1"]
    p = _run(["repro", "sample", "--no-progress", *sets], d, env)
    assert "stage sample-shards: 8 tasks as job array" in p.stderr, p.stderr[-2000:]
    array = p.stderr.split("sample-shards: 8 tasks as job array ")[1].split()[0]
    rows = _sacct(array)
    assert len(rows) == 8 and all(v[0] == "COMPLETED" for v in rows.values()), rows
    published = sorted(x.relative_to(d / "samples").as_posix() for x in (d / "samples").rglob("*.npz"))
    assert len(published) == 8 and published[0] == "base/seeds-000000000-000000096.npz"
    # per-seed images: a shard made in an array task equals the same seeds made here
    import numpy as np

    from repro.config import load_config
    from repro.sampling.shards import Shard, run_shard

    cfg = load_config(d / "params.yaml")
    here = run_shard(Shard("base", d / "models/base.safetensors", 96, 192, d / "check.npz"), cfg.sampler,
                     cfg.sample.batch, device="cpu")
    a = np.load(here)["images"]
    b = np.load(d / "samples/base/seeds-000000096-000000192.npz")["images"]
    assert a.shape == (96, 1, 8, 8) and np.array_equal(a, b)
    # a second run finds every shard finished and submits nothing
    p = _run(["repro", "sample", "--no-progress", *sets], d, env)
    assert "job array" not in p.stderr


def test_sbatch_scripts_sample_then_fid(project):
    """slurm/sample.sh remakes only a deleted shard (the rest are from the array above), then slurm/fid.sh,
    chained with --dependency=afterok, writes the metrics and the tables."""
    d, env = project
    sets = ["--params", "params.yaml", "--set", "sample.shard_size=96"]
    published = d / "samples/base/seeds-000000096-000000192.npz"
    before = published.read_bytes()
    (d / "runs/samples-work/base" / published.name).unlink()  # the finished shard itself (samples/ is its copy)
    sample = _run(["sbatch", "--parsable", "slurm/sample.sh", *sets], d, env).stdout.strip().split(";")[0]
    fid = _run(["sbatch", "--parsable", "--wait", f"--dependency=afterok:{sample}", "slurm/fid.sh", *sets],
               d, env, timeout=900).stdout.strip().split(";")[0]
    assert _sacct(sample)[sample][0] == "COMPLETED" and _sacct(fid)[fid][0] == "COMPLETED"
    log = (d / f"repro-sample-{sample}.log").read_text()
    assert "8 shards of up to 96 seeds, 7 already finished" in log, log[-2000:]
    assert published.read_bytes() == before  # the same per-seed images again, in a job
    metrics = read_result(d / "results/micro")
    assert {m["name"] for m in metrics["models"]} >= {"base", "ddo-round2", "control-round2"}
    assert "ddo-round2" in (d / "results/micro/table.md").read_text()
    assert "stage table done" in (d / f"repro-fid-{fid}.log").read_text()


def _wait(cond, timeout: float, what: str, poll: float = 0.5):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out after {timeout}s waiting for {what}"
        time.sleep(poll)


def _state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    return out or "GONE"


@pytest.mark.parametrize("how", ["scontrol-requeue", "usr1-warning"])
def test_a_preempted_round_resumes_and_ends_with_the_uninterrupted_weights(project, tmp_path, how):
    """scontrol requeue (SIGTERM: SLURM requeues) or the time-limit warning (SIGUSR1: the job requeues itself)
    while a round trains: the state is saved at the next step, the requeued job resumes from it, and the round's
    best checkpoint and evaluations are bitwise those of an uninterrupted run (here, in a copy of the project)."""
    d, env = project
    seed = {"scontrol-requeue": 21, "usr1-warning": 22}[how]
    sets = ["--set", f"ddo.seed={seed}", "--set", "ddo.nimg_per_round=3200", "--set", "ddo.eval_every_nimg=800",
            "--set", "ddo.control=false"]
    ref = tmp_path / "ref"
    shutil.copytree(d, ref, ignore=shutil.ignore_patterns("runs", "mlflow.db", "mlruns", "samples", "*.log"))
    _run(["repro", "ddo", "--round", "1", "--no-progress", *sets], ref, {**_env(ref), "REPRO_TRACKING": "off"})
    (ref_rd,) = [p for p in ref.glob("runs/ddo-*/ddo-round1") if (p / "done.json").is_file()]
    rd = d / ref_rd.relative_to(ref)  # same params, same input files: the same run directory name

    job = _run(["sbatch", "--parsable", "slurm/ddo_round.sh", "--params", "params.yaml", "--round", "1", *sets], d,
               env).stdout.strip()
    _wait(lambda: (rd / "state.pt").is_file(), 300, "the first saved state (training has started)")
    assert not (rd / "done.json").exists()
    if how == "scontrol-requeue":
        _run(["scontrol", "requeue", job], d, env)
    else:
        _run(["scancel", "--signal=USR1", job], d, env)
    # The requeued job starts again by itself (slurm/local-cluster.sh sets cred_expire=20: SLURM's wait before a
    # requeued job may start; forcing an earlier start makes slurmctld kill it: "Job credential revoked").
    _wait(lambda: _state(job) in ("PENDING", "RUNNING"), 120, "the job to be requeued")
    assert _sacct(job, timeout=400)[job][0] == "COMPLETED"
    log = (d / f"repro-ddo-round-{job}.log").read_text()
    signame = "SIGTERM" if how == "scontrol-requeue" else "SIGUSR1"
    assert f"stopped on {signame}" in log and f"job {job} (restart 1)" in log, log[-3000:]
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert resumed and " at 0 images" not in resumed[0]
    assert (rd / "best.safetensors").read_bytes() == (ref_rd / "best.safetensors").read_bytes()
    done, ref_done = (json.loads((p / "done.json").read_text()) for p in (rd, ref_rd))
    assert done["evals"] == ref_done["evals"] and done["best_score"] == ref_done["best_score"]


def test_dvc_repro_runs_the_pipeline_through_slurm(slurm, tmp_path):
    """`dvc repro` with launcher.executor: slurm: every stage's command submits a job and waits for it."""
    d = tmp_path / "dvc-project"
    d.mkdir()
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
    params = preset_dict("micro")
    params["launcher"] = {"executor": "slurm", "poll_s": 1, "resources": {"cpus_per_task": 2, "time_min": 30}}
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**_env(d), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], d, env)
    (d / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/runs/\n/samples\n")
    _run(["dvc", "init", "-q"], d, env)
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "init"], d, env)
    out = _run(["dvc", "repro"], d, env, timeout=1500)
    text = out.stdout + out.stderr
    for stage in ("data", "extractor", "pretrain", "ddo", "sample", "fid"):
        assert f"stage {stage}: submitted job" in text or (stage == "sample" and "as job array" in text), stage
    metrics = read_result(d / "results/micro")
    assert [m["name"] for m in metrics["models"]] == ["base", "ddo-round1", "ddo-round2", "control-round2"]
    tops = [r for r in _runs(d, env) if r["parent"] is None]
    assert {r["stage"] for r in tops} >= {"data", "extractor", "pretrain", "ddo", "sample", "fid"}
    assert all(r["tags"]["slurm_job_id"] for r in tops if r["stage"] != "table")
    # the launcher is not a stage param: switching back to local reruns nothing
    params["launcher"]["executor"] = "local"
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage" not in _run(["dvc", "repro"], d, env).stdout


def test_a_stage_on_two_slurm_tasks_trains_as_one_process(project, tmp_path):
    """launcher.resources.tasks_per_node=2: submitit starts 2 srun tasks that join one gloo process group from
    SLURM's environment; the base model they train equals one local process's up to float summation order."""
    import numpy as np
    from safetensors.numpy import load_file

    d, _ = project
    sets = ["--set", "pretrain.seed=5", "--set", "pretrain.total_nimg=2048", "--set", "pretrain.batch=64"]
    out = {}
    for name, extra in (("local", []), ("slurm", ["--set", "launcher.executor=slurm", "--set", "launcher.poll_s=1",
                                                  "--set", "launcher.resources.tasks_per_node=2",
                                                  "--set", "launcher.resources.cpus_per_task=1"])):
        w = tmp_path / name
        shutil.copytree(d, w, ignore=shutil.ignore_patterns("runs", "mlflow.db", "mlruns", "samples", "*.log", "models"))
        p = _run(["repro", "pretrain", "--no-progress", *sets, *extra], w, {**_env(w), "REPRO_TRACKING": "off"})
        out[name] = load_file(w / "models" / "base.safetensors")
        if name == "slurm":
            job = p.stderr.split("submitted job ")[1].split(";")[0].strip()
            assert _sacct(job)[job][0] == "COMPLETED"
            log0 = (w / "runs" / "slurm" / job / f"{job}_0_log.out").read_text()
            assert "on 2 process(es)" in log0 and (w / "runs" / "slurm" / job / f"{job}_1_log.out").is_file()
    assert out["local"].keys() == out["slurm"].keys()
    diff = max(float(np.abs(out["local"][k] - out["slurm"][k]).max()) for k in out["local"])
    moved = max(float(np.abs(out["local"][k]).max()) for k in out["local"])
    assert diff < 1e-5 and moved > 0, diff
