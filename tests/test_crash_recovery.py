"""Clean after a crash, and shared use: runs a killed process left RUNNING end as KILLED (their metrics kept), stray
publish folders go, outputs honour the umask, several processes create one MLflow store safely, and two `repro`
commands on one project serialise. Tests with several processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from repro.storage.files import atomic_dir, write_json

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path, **extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra}
    env.pop("REPRO_TRACKING", None)
    return env


RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from repro.pipeline.tracking import stage_run
    stage, value, die = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "die"
    with stage_run(stage, root=Path.cwd(), preset="micro", params={"p": 1}, config_hash="h") as t:
        t.log_metrics({"loss": value}, step=1)
        if die:
            with t.child("ddo-round1") as c:
                c.log_metrics({"round_loss": value})
                os.kill(os.getpid(), signal.SIGKILL)
""")


def _runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("repro-micro")
    return client.search_runs([exp.experiment_id], max_results=100)


def test_four_processes_create_one_store_and_lose_no_run(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", RUN, f"s{i}", str(i), "live"], cwd=tmp_path,
                              env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(4)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-1500:] for o in outs)
    runs = _runs(tmp_path)
    assert sorted(r.info.run_name for r in runs) == ["s0", "s1", "s2", "s3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.metrics["loss"] for r in runs) == [0.0, 1.0, 2.0, 3.0]


def test_runs_of_a_killed_process_end_as_killed_with_their_metrics(tmp_path):
    p = subprocess.run([sys.executable, "-c", RUN, "ddo", "7", "die"], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == -9, p.stderr[-2000:]
    assert sorted(r.info.status for r in _runs(tmp_path)) == ["RUNNING", "RUNNING"]
    p = subprocess.run([sys.executable, "-c", RUN, "ddo", "8", "live"], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = {(r.info.run_name, r.data.metrics.get("loss", r.data.metrics.get("round_loss"))): r for r in _runs(tmp_path)}
    assert {k: r.info.status for k, r in runs.items()} == {("ddo", 7.0): "KILLED", ("ddo-round1", 7.0): "KILLED",
                                                           ("ddo", 8.0): "FINISHED"}
    killed = {r.info.run_id for (name, v), r in runs.items() if v == 7.0}
    assert set(runs[("ddo", 8.0)].data.tags["ended_killed_runs"].split(",")) == killed  # findable from the rerun


def test_stray_publish_folders_of_dead_processes_are_removed(tmp_path):
    import socket

    dead = subprocess.run(["true"]).args and subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stray = tmp_path / f".samples.{host}.{dead.pid}.x1y2"
    live = tmp_path / f".samples.{host}.{os.getpid()}.a1b2"  # a publish in progress (this process): kept
    other = tmp_path / f".samples.otherhost.{dead.pid}.c3d4"  # another machine's: it cannot be told, kept
    for d in (stray, live, other):
        (d / "base").mkdir(parents=True)
    with atomic_dir(tmp_path / "samples") as tmp:
        (tmp / "f").write_text("x")
    assert not stray.exists() and live.exists() and other.exists()
    assert (tmp_path / "samples" / "f").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".samples.")) == sorted([live.name, other.name])


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A SIGKILL in the middle of an atomic write (a training state, a shard) leaves its temporary file; the next
    write of the same path removes it, and leaves a live writer's and another host's alone."""
    import socket

    from repro.storage.files import write_text

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stray = tmp_path / f".state.pt.{host}.{dead.pid}.k1ll.pt"
    live = tmp_path / f".state.pt.{host}.{os.getpid()}.a1b2.pt"
    other = tmp_path / f".state.pt.otherhost.{dead.pid}.c3d4.pt"
    unrelated = tmp_path / f".best.pt.{host}.{dead.pid}.e5f6.pt"  # another path's: its own next write removes it
    for f in (stray, live, other, unrelated):
        f.write_bytes(b"half")
    write_text(tmp_path / "state.pt", "x")
    assert not stray.exists() and live.exists() and other.exists() and unrelated.exists()
    assert (tmp_path / "state.pt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([unrelated.name, live.name, other.name, "state.pt"])


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                      (0o077, 0o600, 0o700)])
def test_outputs_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "samples") as tmp:
            (tmp / "base").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "samples").stat().st_mode & 0o777 == dir_mode


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from repro.cli import _project_lock
    with _project_lock(Path.cwd()):
        Path("holding").write_text("1")
        time.sleep(float(sys.argv[1]))
        Path("released").write_text(str(time.time()))
""")


def test_two_repro_commands_on_one_project_serialise(tmp_path):
    from repro.config import preset_dict

    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    env = {**os.environ, "REPRO_TRACKING": "off"}
    env.pop("WORLD_SIZE", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "4"], cwd=tmp_path, env=env)
    for _ in range(300):
        if (tmp_path / "holding").exists():
            break
        time.sleep(0.05)
    p = subprocess.run([sys.executable, "-m", "repro.cli", "data", "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    holder.wait(timeout=60)
    assert p.returncode == 0 and holder.returncode == 0, p.stderr
    assert "another repro command runs on this project (pid" in p.stderr
    # the second command's output was written after the first released the project
    assert (tmp_path / "data/digits.npz").stat().st_mtime >= float((tmp_path / "released").read_text())
