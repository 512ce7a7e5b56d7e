"""Where a stage runs: here (``local``), through submitit in this process (``debug``), or as a SLURM job (``slurm``).

The only module that imports submitit. ``params.yaml`` picks the executor and each stage's resources
(``launcher:``; see repro/config.py LauncherConfig). The command a DVC stage runs (``repro ddo``) submits the job
and blocks until it ends, so ``dvc repro`` stays correct: a job that fails fails the stage, with its log tail.

Inside a job the stage runs like it does locally (`run_here`), with three additions:
- torch.distributed is set up from the SLURM task environment (one task per GPU);
- preemption: SIGUSR1/SIGUSR2 (the warning before the time limit; submitit asks for SIGUSR2) and SIGTERM
  (preemption, ``scontrol requeue``) become a flag; the training loop saves its state at the next step boundary
  and stops; on a warning the job requeues itself. The requeued job resumes from that state;
- a job never submits another: inside one (SLURM_JOB_ID set) every stage runs here.

The sample stage goes out as a job array, one task per shard of seeds; the stage then publishes the shards.
A ddo stage with an alpha/beta sweep (ddo.sweep_alpha / sweep_beta) is orchestrated from here, round by round:
the round's fake bank and reference score as one job, its candidates as one job array, then the selection here
(file copies); finally the ordinary ddo stage as one job, which finds every swept round finished and trains the MLE
control, writes models/ddo and logs the stage to MLflow.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def run_here(stage: str, cfg: Config, root: Path, progress: bool = True, **kwargs) -> None:
    """Run ``stage`` in this process, with torch.distributed from the environment and preemption handling."""
    from repro.cluster import preempt
    from repro.pipeline.stages import run_stage

    with preempt.handle():
        try:
            run_stage(stage, cfg, root, progress=progress, **kwargs)  # joins torch.distributed if launched so
        except preempt.Preempted as e:
            if os.environ.get("SLURM_JOB_ID"):
                _leave_for_requeue(e, cfg.launcher.max_requeue)  # does not return
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


class StageJob:
    """What a submitted job runs: one stage of a config (or one step of it), in the job's process."""

    def __init__(self, stage: str, cfg: Config, root: str, kwargs: dict | None = None):
        self.stage, self.cfg, self.root, self.kwargs = stage, cfg, root, dict(kwargs or {})

    def __call__(self) -> str:
        _enter_job(self.cfg)
        run_here(self.stage, self.cfg, Path(self.root), progress=False, **self.kwargs)
        return f"{self.stage} done"

    def __repr__(self) -> str:
        return f"StageJob({self.stage}, preset {self.cfg.preset})"


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


def run(stage: str, cfg: Config, root: Path, progress: bool = True, **kwargs) -> None:
    """Run ``stage`` where the config says: here, or as a job that this call waits for."""
    if cfg.launcher.executor == "local" or in_job():
        run_here(stage, cfg, root, progress=progress, **kwargs)
        return
    root = Path(root).resolve()
    if stage == "sample" and cfg.launcher.executor == "slurm":
        _run_sample_array(cfg, root, kwargs)
        return
    if stage == "ddo" and _ddo_sweep(cfg):
        _run_ddo_sweep(cfg, root, kwargs)
        return
    ex = make_executor(cfg, stage, root)
    job = ex.submit(StageJob(stage, cfg, str(root), kwargs))
    wait([job], cfg.launcher.poll_s, what=f"stage {stage}")


def _run_sample_array(cfg: Config, root: Path, kwargs: dict) -> None:
    """Sample shards as one job array (one task per shard not yet made), then publish them here."""
    from repro.pipeline import stages

    shards = stages.sample_shards(cfg, root)
    if shards:
        ex = make_executor(cfg, "sample", root, job_name=f"repro-{cfg.preset}-sample-shards")
        jobs = ex.map_array(_ShardJob(cfg, str(root)), shards)
        array = jobs[0].job_id.split("_")[0]
        log.info("sample: %d shards as job array %s", len(shards), array)
        wait(jobs, cfg.launcher.poll_s, what="sample shards")
        os.environ["REPRO_SLURM_ARRAY_JOB_ID"] = array  # the sample stage's MLflow run records it
    run_here("sample", cfg, root, progress=False, **kwargs)  # every shard exists: this only publishes


class _ShardJob:
    def __init__(self, cfg: Config, root: str):
        self.cfg, self.root = cfg, root

    def __call__(self, shard) -> str:
        from repro.pipeline import stages

        _enter_job(self.cfg)
        return str(stages.run_sample_shard(self.cfg, Path(self.root), shard))


def _ddo_sweep(cfg: Config) -> bool:
    from repro.methods.ddo.sweep import sweep_grid

    return bool(sweep_grid(cfg.ddo))


def _run_ddo_sweep(cfg: Config, root: Path, kwargs: dict) -> None:
    """Swept DDO rounds: per round a prepare job, the candidates as one job array, the selection here; then the
    ddo stage itself as one job (it reuses the finished rounds)."""
    from repro.pipeline import stages

    rounds = [kwargs["round"]] if kwargs.get("round") is not None else range(1, cfg.ddo.rounds + 1)
    name = f"repro-{cfg.preset}-ddo"
    for r in rounds:
        todo = stages.ddo_sweep_todo(cfg, root, r)
        if todo["done"]:
            log.info("ddo round %d: already finished", r)
            continue
        if not todo["prepared"]:
            ex = make_executor(cfg, "ddo", root, job_name=f"{name}-round{r}-prepare")
            job = ex.submit(StageJob("ddo", cfg, str(root), {"round": r, "step": "prepare"}))
            wait([job], cfg.launcher.poll_s, what=f"ddo round {r}: fake bank and reference score")
        if todo["candidates"]:
            ex = make_executor(cfg, "ddo", root, job_name=f"{name}-round{r}-candidates")
            jobs = ex.map_array(_CandidateJob(cfg, str(root), r), todo["candidates"])
            log.info("ddo round %d: %d (alpha, beta) candidates as job array %s", r, len(jobs),
                     jobs[0].job_id.split("_")[0])
            wait(jobs, cfg.launcher.poll_s, what=f"ddo round {r} candidates")
        run_here("ddo", cfg, root, progress=False, round=r, step="select")
    ex = make_executor(cfg, "ddo", root)
    wait([ex.submit(StageJob("ddo", cfg, str(root), kwargs))], cfg.launcher.poll_s, what="stage ddo")


class _CandidateJob:
    """One task of a swept round's job array: the candidate (alpha, beta)."""

    def __init__(self, cfg: Config, root: str, round_: int):
        self.cfg, self.root, self.round = cfg, root, round_

    def __call__(self, candidate: tuple[float, float]) -> str:
        alpha, beta = candidate
        return StageJob("ddo", self.cfg, self.root, {"round": self.round, "step": "candidate", "alpha": alpha,
                                                     "beta": beta})()


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
