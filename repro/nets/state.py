"""State dicts in and out of our networks, below the factory: the strict key and shape check every loader uses, and
the ``weights_only`` reader of released ``.pth`` state dicts (no code runs)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state_strict(net: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str,
                      keep_dtype: bool = False) -> None:
    """Copy tensors into ``net`` after checking that keys and shapes match exactly.

    ``keep_dtype``: each parameter and buffer takes the dtype of its tensor (e.g. float16 weights stay float16);
    otherwise the values are cast to the network's dtypes.
    """
    own = net.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shape = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch for {len(shape)} tensors, e.g. {k}: file {tuple(tensors[k].shape)} "
                         f"vs network {tuple(own[k].shape)}")
        raise ValueError(f"{where}: weights do not fit the network: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in own.items():
            if keep_dtype and v.dtype != tensors[k].dtype:
                v.data = tensors[k].to(v.device).clone()
            else:
                v.copy_(tensors[k])


def read_torch_state(path: Path, where: str | None = None) -> dict[str, torch.Tensor]:
    """A released ``.pth`` state dict read with ``weights_only=True`` (no code runs); refuses anything else."""
    where = where or str(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with objects outside the allowed set, truncated file, ...
        raise ValueError(f"{where}: not a plain torch state dict readable with weights_only=True ({e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a dict of tensors (a state dict)")
    return state
