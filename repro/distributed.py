"""torch.distributed in one place: who am I (rank), how many are we (world size), and the few collectives we use.

A stage runs as one process (the default), or as several: `torchrun --nproc-per-node N -m repro.cli ddo`, or one
SLURM task per GPU (the launcher). The environment says which: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and
MASTER_ADDR/MASTER_PORT; under srun we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and take the first host of
the job as the master. The backend is NCCL when the process has a GPU, gloo on CPU.

Only rank 0 writes files and talks to MLflow; every rank computes.
"""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def env_world_size() -> int:
    """World size the environment asks for (1 outside torchrun/srun)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1) if _launched() else 1


def _launched() -> bool:
    # srun sets SLURM_PROCID per task; a bare sbatch script (one task) is not a distributed launch by itself.
    return "WORLD_SIZE" in os.environ or ("SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ)


def _first_slurm_host() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def init_from_env(timeout_s: int = 1800) -> bool:
    """Join the process group the environment describes; True if distributed. Idempotent; no-op for one process."""
    if dist.is_initialized():
        return True
    world = env_world_size()
    if world <= 1:
        return False
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool | int) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a preemption signal seen by one of them)."""
    if not dist.is_initialized():
        return bool(flag)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
