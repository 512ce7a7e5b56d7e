"""torch.distributed in one place: who am I (rank), how many are we (world size), and the few collectives we use.

A stage runs as one process (the default), or as several: `torchrun --nproc-per-node N -m repro.cli ddo`, or one
SLURM task per GPU (the launcher). The environment says which: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and
MASTER_ADDR/MASTER_PORT; under srun we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and take the first host of
the job as the master. The backend is NCCL when the process has a GPU, gloo on CPU.

Only rank 0 writes files and talks to MLflow; every rank computes. Training splits each step's global batch
(drawn whole, as by one process) into contiguous per-rank slices and averages the gradients (DDP); sampling
splits the seeds by whole batches (:func:`gather_chunks`), so every image is made in the same batch as in one
process and the gathered results are bitwise those of one process.
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


def device() -> torch.device:
    """Where this process computes: its GPU (chosen by :func:`init_from_env`) if it has one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _comm_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def batch_slice(batch: int, field: str) -> slice:
    """This rank's contiguous part of a global batch of ``batch`` items; the batch must split evenly.

    ``field`` names the config field for the error message (e.g. 'ddo.batch').
    """
    world = world_size()
    if batch % world:
        from repro.config import ConfigError

        raise ConfigError([(field, f"{batch} does not split evenly over {world} processes",
                            f"use a multiple of {world}, or run with a number of processes that divides {batch}")])
    n = batch // world
    return slice(rank() * n, (rank() + 1) * n)


def wrap_ddp(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` for training: inside DistributedDataParallel (which averages gradients over the ranks and, when it
    is built, copies rank 0's weights to every rank) when there are several processes; ``net`` itself otherwise.
    """
    if not dist.is_initialized():
        return net
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # 1x1 convolutions get gradients whose strides differ from DDP's buckets only along size-1 dimensions:
    # the same memory layout, so the warning about it is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [torch.cuda.current_device()] if _comm_device() == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, gradient_as_bucket_view=True)


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (e.g. a score, so that every rank takes the same decisions)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_chunks(local: list) -> list:
    """All chunks in their global order, on every rank, from each rank's chunks ``k = rank, rank + W, ...``.

    The inverse of dealing chunks round-robin (``chunks[rank::world]``): results made per chunk on the ranks
    come back in the order one process would have made them.
    """
    parts = all_gather_object(local)
    total = sum(len(p) for p in parts)
    return [parts[k % len(parts)][k // len(parts)] for k in range(total)]


def all_mean(values: list[float]) -> list[float]:
    """The mean over ranks of each value (e.g. per-rank losses, to log the global batch's loss)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def all_max(value: int) -> int:
    """The largest ``value`` over the ranks, on every rank."""
    if not dist.is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool | int) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a preemption signal seen by one of them)."""
    return bool(all_max(int(bool(flag))))
