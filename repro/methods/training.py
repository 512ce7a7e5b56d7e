"""Pieces every training loop shares (pretraining, DDO rounds, discriminators): per-step random generators,
EMA (half-life, or EDM2's power function), learning-rate warm-up and decay, precision, and the resumable state file.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from repro.datasets.sharded import ShardedDataset
from repro.sampling.generate import one_hot
from repro.storage.files import atomic_path


def step_generator(*keys: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, round, step, ...): draws depend on progress only."""
    digest = hashlib.sha256(np.asarray(keys, dtype=np.int64).tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sharded_batch(data: ShardedDataset, runs, label_dim: int, g: torch.Generator, batch: int, mine: slice):
    """The network inputs and one-hot labels of this rank's items ``runs`` of a global batch of ``batch``; a latent
    data set's draws take this rank's slice of noise drawn with ``g`` for the whole batch (as one process)."""
    items, labels = data.read(runs)
    noise = torch.randn((batch, *data.shape), generator=g)[mine] if data.latent else None
    return data.to_model(items, noise), one_hot(torch.as_tensor(labels), label_dim)


def ema_beta(batch: int, halflife_nimg: int) -> float:
    """Per-step EMA decay for a half-life given in images (EDM's ema_halflife_kimg, in images)."""
    return 0.5 ** (batch / max(halflife_nimg, 1e-8)) if halflife_nimg > 0 else 0.0


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))


def rampup_lr(lr: float, nimg: int, rampup_nimg: int) -> float:
    return lr * min(nimg / rampup_nimg, 1.0) if rampup_nimg > 0 else lr


def save_state(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def lr_decay(nimg: int, decay_nimg: int) -> float:
    """EDM2's learning-rate decay (Karras et al. 2024, Section 2): 1 / sqrt(max(nimg / decay_nimg, 1)); 1 when 0."""
    return 1.0 / math.sqrt(max(nimg / decay_nimg, 1.0)) if decay_nimg > 0 else 1.0


# Karras et al. 2024 (EDM2), Section 3.1: a power-function EMA with exponent gamma has relative standard deviation
# sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))); gamma is the largest real root of
# gamma^3 + 7 gamma^2 + (16 - 1/sigma_rel^2) gamma + (12 - 1/sigma_rel^2).
def power_ema_gamma(sigma_rel: float) -> float:
    """The exponent gamma of EDM2's power-function EMA with relative standard deviation ``sigma_rel`` (< 0.289)."""
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


# Karras et al. 2024 (EDM2), Eq. 3 with images as time: beta = (1 - batch / t)^(gamma + 1) after t images.
def power_ema_beta(gamma: float, nimg_after: int, batch: int) -> float:
    """The power-function EMA's decay for the step that brings the images seen to ``nimg_after``."""
    return (1.0 - batch / nimg_after) ** (gamma + 1.0)


@contextlib.contextmanager
def training_precision(mode: str, device: torch.device | str = "cpu") -> Iterator[Callable[[], Any]]:
    """How networks compute while training, restored afterwards; yields the forward pass's autocast context.

    fp32: float32 with TF32 off (matmuls and cuDNN convolutions), as DDO's paper trains the diffusion loss; tf32: TF32
    on (CUDA); bf16: float32 weights with bfloat16 autocast.
    """
    if mode not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"ddo.precision: unknown mode {mode!r}. Fix: use fp32, tf32 or bf16")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    kind = torch.device(device).type
    try:
        yield lambda: torch.autocast(kind, dtype=torch.bfloat16, enabled=mode == "bf16")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def freeze_uncertainty(net: torch.nn.Module) -> torch.nn.Module:
    """EDM2's learned uncertainty head (``logvar_linear``; repro.nets.edm2.Precond) frozen: the EDM and DDO losses here
    do not use it (DDO drops it when fine-tuning), and DDP needs a gradient for every trainable parameter."""
    head = getattr(net, "logvar_linear", None)
    if isinstance(head, torch.nn.Module):
        head.requires_grad_(False)
    return net


def for_training(net: torch.nn.Module) -> torch.nn.Module:
    """A network as the training loops compute with it: float32 weights (a released EDM2 snapshot is float16), and
    EDM2's U-Net not switched to float16 on CUDA (its ``use_fp16``); autocast is training_precision's business."""
    net = net.float()
    for m in net.modules():
        if hasattr(m, "use_fp16"):
            m.use_fp16 = False
    return net

