"""Where work runs: here (``local``), through submitit in this process (``debug``), or as SLURM jobs (``slurm``).

The only module that imports submitit, and it knows nothing of the pipeline's stages or methods. A stage
(repro.pipeline) describes its work as **waves**: each :class:`Wave` is a list of picklable callables that can run
at the same time (one is a job, several are one job array) and that need what the waves before them made;
``here=True`` marks cheap bookkeeping (a selection, a publication) that runs in this process. :func:`run_waves`
runs them in order and blocks until each has ended, so ``dvc repro`` stays correct: a job that fails fails the
stage, with its log tail. ``params.yaml``'s ``launcher:`` section picks the executor and each stage's resources.

Inside a job (and for local runs, :func:`run_here`) a callable runs with:
- preemption handling: SIGUSR1/SIGUSR2 (the warning before the time limit; submitit asks for SIGUSR2) and SIGTERM
  (preemption, ``scontrol requeue``) become a flag; the training loops save their state at the next step boundary
  and stop; on a warning the job requeues itself, and the requeued job resumes from that state;
- a job never submits another: inside one (SLURM_JOB_ID set) every stage runs here.
torch.distributed is joined by the callable itself (repro.cluster.distributed reads the SLURM task environment).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from repro.config import Config, Resources, resources_for

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal with its state saved; run again to resume


class JobFailed(RuntimeError):
    """A submitted job failed (or was cancelled); the message holds its id, state and log tail."""


def in_job() -> bool:
    """True inside a SLURM job (or a job started by this launcher): run here, never submit another job."""
    return bool(os.environ.get("SLURM_JOB_ID")) or os.environ.get("REPRO_IN_JOB") == "1"


# ----------------------------------------------------------------------------------------------------------
# Running a stage here (locally, or inside a job).


def run_here(call: Callable[[], Any], max_requeue: int = 3) -> Any:
    """Run ``call()`` in this process with preemption handling (see the module docstring)."""
    from repro.cluster import preempt

    with preempt.handle():
        try:
            return call()
        except preempt.Preempted as e:
            if os.environ.get("SLURM_JOB_ID"):
                _leave_for_requeue(e, max_requeue)  # does not return
            raise


def _slurm_job_ref() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]


def _leave_for_requeue(e: Exception, max_requeue: int) -> None:
    """The state is saved: requeue this job (on a time-limit warning) and exit without a result.

    On SIGTERM SLURM itself is requeueing (preemption, ``scontrol requeue``) or cancelling the job: exit only.
    Exiting without a result keeps submitit waiting for the requeued run instead of reporting a failure.
    """
    job, signum = _slurm_job_ref(), getattr(e, "signum", 0)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    main_rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0  # the group is closed now
    if signum != signal.SIGTERM and main_rank:
        if restarts >= max_requeue:
            log.error("job %s: not requeued, it already ran %d times (launcher.max_requeue); state saved: resubmit "
                      "to resume", job, restarts + 1)
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            log.error("job %s: `scontrol requeue` failed (%s); state saved: resubmit to resume", job,
                      out.stderr.strip())
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)
        log.warning("job %s: %s; requeued (restart %d)", job, e, restarts + 1)
    else:
        log.warning("job %s: %s; leaving it to SLURM", job, e)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


@dataclass(frozen=True)
class Wave:
    """Work that can run at the same time: one callable is one job, several are one job array.

    ``name`` names the jobs (``repro-<preset>-<name>``) and the log lines; ``stage`` says whose resources the jobs
    get (``launcher.stages.<stage>`` over ``launcher.resources``); ``here``: run the callables in this process
    instead (cheap bookkeeping between waves), never submitted. Each callable must be picklable.
    """

    name: str
    stage: str
    calls: tuple
    here: bool = False


class _InJob:
    """What a submitted job runs: the job's environment and logging, then one callable with preemption handling."""

    def __init__(self, call: Callable[[], Any], cfg: Config):
        self.call, self.cfg = call, cfg

    def __call__(self) -> Any:
        _enter_job(self.cfg)
        return run_here(self.call, self.cfg.launcher.max_requeue)

    def __repr__(self) -> str:
        return f"_InJob({self.call!r})"


def _enter_job(cfg: Config) -> None:
    """In a job's process: the environment the sbatch script exports (also under the in-process debug executor),
    and logging to the job's log."""
    os.environ.update(_job_env(cfg))
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[repro] %(message)s", stream=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Submitting: parameters, executors, waiting.


def slurm_parameters(cfg: Config, stage: str, job_name: str | None = None) -> dict:
    """submitit SlurmExecutor parameters (its names are sbatch's) for ``stage``'s job."""
    res: Resources = resources_for(cfg.launcher, stage)
    lc = cfg.launcher
    tasks = res.tasks_per_node or max(res.gpus_per_node, 1)
    params: dict = {
        "job_name": job_name or f"repro-{cfg.preset}-{stage}",
        "nodes": res.nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{int(round(res.mem_gb * 1024))}MB",
        "time": res.time_min,
        "signal_delay_s": res.signal_delay_s,
        "array_parallelism": res.array_parallelism,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **res.extra},
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    setup = [f"export {k}={shlex.quote(v)}" for k, v in _job_env(cfg).items()] + list(lc.setup)
    params["setup"] = setup
    if lc.container == "pyxis":
        args = [f"--container-image={lc.image}", "--container-workdir=" + "${SLURM_SUBMIT_DIR}"]
        if lc.bind:
            args.append("--container-mounts=" + ",".join(lc.bind))
        params["srun_args"] = args
    return params


def _job_env(cfg: Config) -> dict[str, str]:
    env = {"REPRO_IN_JOB": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if cfg.launcher.image_digest:
        env["REPRO_IMAGE_DIGEST"] = cfg.launcher.image_digest
    return env


def python_command(cfg: Config) -> str | None:
    """The interpreter the job runs: this one, or the container's (apptainer exec --nv IMAGE python)."""
    lc = cfg.launcher
    if lc.container == "apptainer":
        binds = [a for b in lc.bind for a in ("--bind", b)]
        return shlex.join(["apptainer", "exec", "--nv", *binds, lc.image, "python"])
    if lc.container == "pyxis":
        return "python"
    return None  # submitit's default: sys.executable


def log_folder(cfg: Config, root: Path) -> Path:
    return (Path(root) / cfg.launcher.log_dir).resolve() / "%j"


def make_executor(cfg: Config, stage: str, root: Path, job_name: str | None = None):
    import submitit

    folder = log_folder(cfg, root)
    if cfg.launcher.executor == "debug":
        return submitit.DebugExecutor(folder=folder)
    if cfg.launcher.executor != "slurm":
        raise ValueError(f"launcher.executor {cfg.launcher.executor!r} does not submit jobs")
    try:
        ex = submitit.SlurmExecutor(folder=folder, python=python_command(cfg), max_num_timeout=cfg.launcher.max_requeue)
    except RuntimeError as e:  # no srun on PATH
        raise JobFailed(f"launcher.executor is 'slurm' but this machine has no SLURM client ({e}). Fix: run on a "
                        "SLURM login node, or set launcher.executor: local") from None
    ex.update_parameters(**slurm_parameters(cfg, stage, job_name))
    return ex


def submission_script(cfg: Config, stage: str, root: Path) -> str:
    """The sbatch script the slurm executor would submit for ``stage`` (what `repro job-script STAGE` prints)."""
    from submitit.slurm import slurm as _slurm

    params = slurm_parameters(cfg, stage)
    python = python_command(cfg) or shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(log_folder(cfg, root)))}"
    return _slurm._make_sbatch_string(command=command, folder=log_folder(cfg, root), **params)


def run_waves(waves: Iterable[Wave], cfg: Config, root: Path) -> None:
    """Run the waves in order, each as jobs this call waits for (or here, for ``Wave.here``).

    ``waves`` may be a generator: a wave is planned only after the ones before it have ended.
    """
    root = Path(root).resolve()
    for wave in waves:
        if wave.here or in_job():
            for call in wave.calls:
                run_here(call, cfg.launcher.max_requeue)
            continue
        ex = make_executor(cfg, wave.stage, root, job_name=f"repro-{cfg.preset}-{wave.name}")
        if len(wave.calls) == 1:
            jobs = [ex.submit(_InJob(wave.calls[0], cfg))]
        else:
            with ex.batch():  # one job array
                jobs = [ex.submit(_InJob(call, cfg)) for call in wave.calls]
            log.info("stage %s: %d tasks as job array %s", wave.name, len(jobs), str(jobs[0].job_id).split("_")[0])
            os.environ["REPRO_SLURM_ARRAY_JOB_ID"] = str(jobs[0].job_id).split("_")[0]  # MLflow records it
        wait(jobs, cfg.launcher.poll_s, what=f"stage {wave.name}")


def wait(jobs: list, poll_s: float, what: str) -> list:
    """Block until every job ends; raise JobFailed with the log tail of the first one that failed.

    Ctrl-C cancels the jobs (a DVC stage interrupted on the login node leaves nothing running).
    """
    ids = ", ".join(str(j.job_id) for j in jobs[:5]) + (" ..." if len(jobs) > 5 else "")
    log.info("%s: submitted job%s %s; waiting (logs: %s)", what, "s" if len(jobs) > 1 else "", ids,
             jobs[0].paths.stdout.parent)
    last = None
    try:
        while not all(j.done() for j in jobs):
            states = sorted({j.state for j in jobs})
            if states != last:
                log.info("%s: %s", what, "/".join(states))
                last = states
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for j in jobs:
            j.cancel(check=False)
        raise
    results = []
    for j in jobs:
        try:
            results.append(j.results())  # one per task: a job of several tasks (ranks) has several
        except Exception as e:  # submitit's FailedJobError / UncompletedJobError, or the stage's own error
            tail = _tail(j)
            raise JobFailed(f"{what}: job {j.job_id} failed (state {j.state}).\n{tail or _short(e)}") from None
    return results


def _short(e: Exception, n: int = 15) -> str:
    lines = str(e).strip().splitlines()
    return "\n".join(lines[-n:])


def _tail(job, n: int = 30) -> str:
    for p in (job.paths.stdout, job.paths.stderr):
        try:
            text = Path(p).read_text(errors="replace").rstrip().splitlines()
        except OSError:
            continue
        if text:
            return f"--- last {min(n, len(text))} lines of {p} ---\n" + "\n".join(text[-n:])
    return ""
