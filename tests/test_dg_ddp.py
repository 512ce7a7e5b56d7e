"""The discriminator trainer on two processes (torch.distributed over gloo on CPU) against one: the same
weights up to the order of float sums, for DG's BCE and for improved DG's objective (whose double backward
runs through DistributedDataParallel).

The workers are this file run as a script (``python tests/test_dg_ddp.py OUT``) with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set as torchrun sets them; the one-process run is the same script without them.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# Tolerance on trained weights, 2 processes vs 1: each rank's mean over its half of the batch, averaged by DDP,
# differs from one process's mean only in float32 rounding (~1e-7 relative); 6 Adam steps at lr 1e-3 keep that
# far below 1e-5, while training moves the weights by more than 10x that (checked).
ATOL = 1e-5


def worker(out: Path) -> None:
    from repro.cluster import distributed
    from repro.methods.dg_train import DGTrainConfig, train_discriminator
    from repro.nets.discriminators import MLPDiscriminator
    from repro.toys.dg_toy import toy_banks, toy_pair
    from repro.pipeline.tracking import NullTracker

    distributed.init_from_env()
    data, model = toy_pair()
    real, fake = toy_banks(data, model, 96, 96, seed=0)
    for objective in ("bce", "mse"):
        torch.manual_seed(0)
        disc = MLPDiscriminator(width=32, depth=2)
        cfg = DGTrainConfig(objective=objective, epochs=2, batch=32 if objective == "mse" else 64, lr=1e-3)
        train_discriminator(disc, real, fake, cfg, out / objective, NullTracker(), denoise=model.denoiser(),
                            progress=False)
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dg-ddp")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "REPRO_TRACKING": "off"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID"):
        env.pop(k, None)
    port = str(free_port())
    cmds = [(d / "one", env)] + [(d / "two", {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for out, e in cmds]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    return d


@pytest.mark.parametrize("objective", ["bce", "mse"])
def test_two_processes_train_the_weights_of_one(runs, objective):
    from repro.nets.discriminators import MLPDiscriminator

    for epoch in (1, 2):
        name = f"{objective}/discriminator_{epoch:04d}.safetensors"
        one, two = load_file(str(runs / "one" / name)), load_file(str(runs / "two" / name))
        assert one.keys() == two.keys()
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert diff <= ATOL, f"{name}: 2 processes differ from 1 by {diff:.3g}"
    torch.manual_seed(0)
    init = MLPDiscriminator(width=32, depth=2).state_dict()
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 10 * ATOL
    assert not (runs / "two" / objective / "state.pt").exists() and (runs / "two" / objective / "done.json").is_file()


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
