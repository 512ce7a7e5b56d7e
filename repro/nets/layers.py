"""Layer utilities shared by every network family: level checks, parameter counts, switching dropout off.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn


def disable_dropout(net: nn.Module) -> nn.Module:
    """Set every dropout probability in ``net`` to zero (in place) and return ``net``.

    Covers the residual-block dropout of :class:`UNetBlock` and EDM2's blocks,
    the class-label dropout of :class:`SongUNet` (used for classifier-free
    guidance) and any ``torch.nn`` dropout modules.  DDO fine-tuning runs without dropout.
    """
    for module in net.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr in ("dropout", "label_dropout"):  # our blocks keep their probabilities as plain floats
            if isinstance(getattr(module, attr, None), (int, float)):
                setattr(module, attr, 0.0)
    return net


def check_levels(net_name: str, channel_mult: Iterable[int], img_resolution: int) -> list[int]:
    """A U-Net's channel multipliers as ints, one per resolution level; the resolution must halve evenly down them."""
    channel_mult = [int(m) for m in channel_mult]
    if not channel_mult:
        raise ValueError(f"{net_name}: channel_mult must not be empty")
    if img_resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(f"{net_name}: img_resolution={img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
    return channel_mult


def count_parameters(net: nn.Module) -> int:
    """Number of trainable scalars (buffers such as resample filters excluded)."""
    return sum(p.numel() for p in net.parameters())
