"""Tracking: the only module that imports MLflow.

Every stage is an MLflow run tagged with its stage, git commit, config hash, preset and (where set) SLURM job
id and container image digest; DDO rounds are nested runs. A run stopped by preemption ends as KILLED; with
several processes only rank 0 logs (the others get a NullTracker). The default store is the sqlite file
``mlflow.db`` in the project directory (artifacts in ``mlruns/`` beside it); ``MLFLOW_TRACKING_URI``
overrides it. ``REPRO_TRACKING=off`` disables tracking (the stage still runs and writes its outputs).

See the runs with ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` from the project directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from repro.cluster import distributed
from repro.cluster.preempt import Preempted

log = logging.getLogger(__name__)

# The MLflow UI opens an experiment on the view its kind names; ours are training runs, not GenAI traces.
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        # Uncommitted changes, except the files the pipeline itself writes while it runs (dvc.lock, results/).
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)dvc.lock", ":(exclude)results", ":(exclude)*.gitignore"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _key(name: str) -> str:
    """A param or metric name as MLflow accepts it (alphanumerics, _ - . space : /): e.g. a guided model's '+' -> '_'."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class Tracker:
    """A small interface over one active run; NullTracker does nothing (tracking off)."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id

    def log_params(self, params: dict) -> None:
        import mlflow

        mlflow.log_params({_key(k): str(v)[:500] for k, v in _flatten(params).items()}, run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({_key(k): float(v) for k, v in metrics.items()}, step=step, run_id=self.run_id)

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        for k, v in tags.items():
            client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        import mlflow

        mlflow.MlflowClient().log_artifact(self.run_id, str(path), subdir)

    def log_image(self, image: np.ndarray, name: str, scale: int = 4) -> None:
        """Log a uint8 image (H,W) or (H,W,C) as a PNG artifact, upscaled by ``scale`` (nearest)."""
        from PIL import Image

        img = Image.fromarray(image)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            img.save(p)
            self.log_artifact(p, "images")

    def log_figure(self, fig, name: str) -> None:
        import mlflow

        mlflow.MlflowClient().log_figure(self.run_id, fig, f"plots/{name}")

    def log_dataset(self, path: Path, name: str, digest: str, context: str = "training") -> None:
        """Record a data set this run read as one of its inputs (MLflow's Datasets column): name, digest, file."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        ds = MetaDataset(source=resolve_dataset_source(str(path)), name=name, digest=digest[:16])
        mlflow.MlflowClient().log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(),
                                                                    [InputTag("mlflow.data.context", context)])])

    @contextlib.contextmanager
    def child(self, name: str, params: dict | None = None, tags: dict | None = None) -> Iterator["Tracker"]:
        """A nested run (e.g. one DDO round) under this run."""
        import mlflow

        client = mlflow.MlflowClient()
        parent = client.get_run(self.run_id)
        run = client.create_run(parent.info.experiment_id, run_name=name,
                                tags={**{k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")},
                                      "mlflow.parentRunId": self.run_id, **(tags or {})})
        child = Tracker(run.info.run_id)
        if params:
            child.log_params(params)
        status = "FAILED"
        try:
            yield child
            status = "FINISHED"
        except Preempted:
            status = "KILLED"  # stopped to be resumed, not failed
            raise
        finally:
            client.set_terminated(run.info.run_id, status)


class NullTracker(Tracker):
    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def set_tags(self, tags): pass
    def log_artifact(self, path, subdir=None): pass
    def log_image(self, image, name, scale=4): pass
    def log_figure(self, fig, name): pass
    def log_dataset(self, path, name, digest, context="training"): pass

    @contextlib.contextmanager
    def child(self, name, params=None, tags=None):
        yield NullTracker()


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


class TrackingError(ValueError):
    """The MLflow store cannot be used (unknown scheme, unreachable server, corrupt or read-only store): an input
    error, said in one line with the fix, before the stage does any work."""

    def __init__(self, uri: str, problem: str, fix: str = ""):
        super().__init__(f"MLflow tracking store {uri}: {problem}. Fix: {fix or 'correct MLFLOW_TRACKING_URI'}, or "
                         "run without tracking (REPRO_TRACKING=off)")


SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_uri(uri: str, timeout: float = 3.0) -> None:
    """Refuse, at once, a tracking URI that cannot work: an unknown scheme, a sqlite file in a missing folder (MLflow
    would create it), a server that does not answer (MLflow would retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(uri)
    scheme = u.scheme.split("+")[0]
    if scheme not in SCHEMES and not (len(scheme) <= 1 and uri):  # "" or a drive letter: a local folder
        raise TrackingError(uri, f"unknown scheme {u.scheme!r}", f"use one of {', '.join(SCHEMES)}")
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is not None and not db.parent.is_dir():
            raise TrackingError(uri, f"the folder {db.parent} does not exist", "create it, or point to another one")
    if scheme in ("http", "https"):
        port = u.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname or "", port), timeout=timeout).close()
        except OSError as e:
            raise TrackingError(uri, f"no server answers at {u.hostname}:{port} ({e.strerror or e})",
                                "start the tracking server") from None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite store between processes on this machine (MLflow creates its tables on
    first use, and several processes doing that at once fail with 'table experiments already exists')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    from repro.storage.layout import STORE_LOCK_SUFFIX

    lock = Path(uri[len("sqlite:///"):] + STORE_LOCK_SUFFIX)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _store_errors() -> tuple:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, SQLAlchemyError, PermissionError)


def end_stale_runs(client, exp_id: str) -> list[str]:
    """End as KILLED the runs a killed process left RUNNING on this machine (its pid, recorded as a tag, is gone);
    their metrics stay where they were logged. Returns their ids."""
    from repro.storage.files import pid_alive

    stale = []
    host = platform.node()
    for r in client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=1000):
        pid = r.data.tags.get("pid", "")
        if r.data.tags.get("host") == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            client.set_terminated(r.info.run_id, "KILLED")
            stale.append(r.info.run_id)
    if stale:
        log.info("MLflow: ended %d run(s) left RUNNING by a killed process as KILLED", len(stale))
    return stale


@contextlib.contextmanager
def stage_run(stage: str, *, root: Path, preset: str, params: dict, config_hash: str) -> Iterator[Tracker]:
    """Open the MLflow run of one stage (experiment ``repro-<preset>``) and yield its Tracker."""
    if os.environ.get("REPRO_TRACKING", "on").lower() in ("off", "0", "false", "no") or not distributed.is_main():
        yield NullTracker()  # tracking off, or not rank 0 of several processes (rank 0 logs for all)
        return
    import warnings

    warnings.filterwarnings("ignore", module=r"mlflow|sqlalchemy|alembic")
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri(root)
    check_uri(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # not MLflow's 7 (minutes of back-off)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(uri)
    exp_name = f"repro-{preset}"
    try:
        with store_lock(uri):
            exp = mlflow.get_experiment_by_name(exp_name)
            if exp is None:
                artifacts = (root / "mlruns").resolve().as_uri() if uri.startswith("sqlite:///") else None
                exp_id = mlflow.create_experiment(exp_name, artifact_location=artifacts,
                                                  tags={EXPERIMENT_KIND: TRAINING})
            else:
                exp_id = exp.experiment_id
                if exp.tags.get(EXPERIMENT_KIND) != TRAINING:  # the UI opens an experiment on the view its kind names
                    mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND, TRAINING)
            stale = end_stale_runs(mlflow.MlflowClient(), exp_id)
    except _store_errors() as e:
        raise TrackingError(uri, f"cannot be opened or written ({' '.join(str(e).split())[:300]})",
                            "check that the store is writable and not corrupt (move a corrupt mlflow.db aside: a new "
                            "one is made)") from None
    tags = {
        "stage": stage,
        "preset": preset,
        "config_hash": config_hash,
        "git_commit": git_commit(root),
        "host": platform.node(),
        # in a job: its id; a stage whose work ran as a job array (sample): the array's id
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("REPRO_SLURM_ARRAY_JOB_ID", ""),
        "image_digest": os.environ.get("REPRO_IMAGE_DIGEST", ""),
        "pid": str(os.getpid()),  # a later run ends this one as KILLED if this process dies without ending it
        **({"ended_killed_runs": ",".join(stale)[:5000]} if stale else {}),
    }
    try:
        active = mlflow.start_run(experiment_id=exp_id, run_name=stage, tags={**tags, "device": _device_name()})
    except _store_errors() as e:
        raise TrackingError(uri, f"cannot be written ({' '.join(str(e).split())[:300]})",
                            "make the store writable") from None
    with active as run:
        tracker = Tracker(run.info.run_id)
        tracker.log_params(params)
        log.info("MLflow: run %s (stage %s) in %s", run.info.run_id[:8], stage, uri)
        t0 = time.time()
        try:
            yield tracker
        except Preempted:
            _log_time(tracker, t0)
            mlflow.end_run("KILLED")  # stopped to be resumed (the rerun is a new run), not failed
            raise
        _log_time(tracker, t0)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def _log_time(tracker: Tracker, t0: float) -> None:
    """The run's wall seconds and device-seconds (wall x processes: one device each) for cost accounting."""
    wall = time.time() - t0
    tracker.log_metrics({"wall_seconds": wall, "device_seconds": wall * distributed.world_size()})


def find_runs(root: Path, preset: str) -> list[dict]:
    """Runs of a preset's experiment as dicts (name, stage, parent, status, metrics keys); for tests and tools."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(f"repro-{preset}")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = []
    for r in runs:
        arts = [a.path for a in client.list_artifacts(r.info.run_id)]
        for d in [a for a in arts if "." not in a]:
            arts += [a.path for a in client.list_artifacts(r.info.run_id, d)]
        out.append({"run_id": r.info.run_id, "name": r.info.run_name, "stage": r.data.tags.get("stage"),
                    "parent": r.data.tags.get("mlflow.parentRunId"), "status": r.info.status,
                    "metrics": sorted(r.data.metrics), "tags": dict(r.data.tags), "artifacts": sorted(arts),
                    "inputs": [(d.dataset.name, d.dataset.digest) for d in r.inputs.dataset_inputs],
                    "experiment_tags": dict(exp.tags)})
    return out
