"""Pieces every training loop shares (pretraining, DDO rounds, discriminators): per-step random generators,
EMA, learning-rate warm-up, and the resumable state file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from repro.storage.files import atomic_path


def step_generator(*keys: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, round, step, ...): draws depend on progress only."""
    digest = hashlib.sha256(np.asarray(keys, dtype=np.int64).tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


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
