"""Our checkpoint format: safetensors weights + the JSON architecture that rebuilds the network (nets.factory).

Every network the package trains or converts is saved with :func:`save_model` and rebuilt with
:func:`load_model`; tensors are copied in with a strict key and shape check (:func:`repro.nets.state.load_state_strict`).
Tensors keep the dtype they were saved in: a released EDM2 snapshot converted here keeps its float16 weights, so
it computes exactly as upstream samples it (EDM2 computes each layer's gain / sqrt(fan_in) in the gain's dtype);
a network trained here is float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from repro.nets.factory import build_network
from repro.nets.state import load_state_strict
from repro.storage.files import load_safetensors, readable, save_safetensors


def save_model(path: Path, net: torch.nn.Module, arch: dict, info: dict | None = None) -> None:
    """Save a network's weights (their dtypes, contiguous) with its architecture and free-form info as metadata."""
    meta = {"arch": json.dumps(arch, sort_keys=True), "info": json.dumps(info or {}, sort_keys=True)}
    save_safetensors(path, net.state_dict(), meta)


def read_model_meta(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with readable(str(path), "safetensors file"), safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "arch" not in meta:
        raise ValueError(f"{path}: not a repro checkpoint (no 'arch' metadata); write it with repro.storage.files.save_model")
    return json.loads(meta["arch"]), json.loads(meta.get("info", "{}"))


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict, dict]:
    """Rebuild a network from a checkpoint written by :func:`save_model`, in the dtypes it was saved in; returns
    (net, arch, info). Cast it (``net.float()``) where a computation needs one dtype, as DDO's fp32 training does."""
    arch, info = read_model_meta(path)
    net = build_network(arch)
    load_state_strict(net, load_safetensors(str(path)), str(path), keep_dtype=True)
    return net.to(device).eval(), arch, info


def weight_dtypes(path: Path) -> list[str]:
    """The dtypes a checkpoint's tensors are stored in (the protocol records them: float16 = as released)."""
    from safetensors import safe_open

    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    with readable(str(path), "safetensors file"), safe_open(str(path), framework="pt") as f:
        return sorted({names.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype().lower()) for k in f.keys()})
