"""Upstream EDM / EDM2 network records (read as data by repro.storage.unpickle) -> our networks.

The records carry upstream's constructor arguments and tensors; this module turns them into our JSON
architecture (:func:`arch_from_record`, for :func:`repro.nets.factory.build_network`), copies the tensors in with a
strict key and shape check, and writes our checkpoint format (:func:`convert_edm_pickle`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from repro.nets.checkpoint import save_model
from repro.nets.state import load_state_strict
from repro.nets.factory import arch_keys, build_network
from repro.nets.layers import count_parameters
from repro.storage.files import sha256_file
from repro.storage.unpickle import Record, read_edm_pickle, state_dict_from_record

# Facts about upstream constructor signatures (argument order and defaults), used to read init args.
_UPSTREAM_POSITIONAL = {
    "EDMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                   "sigma_data", "model_type"),
    "VPPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M",
                  "epsilon_t", "model_type"),
    # EDM2 (training/networks_edm2.py): Precond(img_resolution, img_channels, label_dim, use_fp16=True,
    # sigma_data=0.5, logvar_channels=128, **unet_kwargs); the extra kwargs go to UNet and from there to Block.
    "Precond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels"),
}


class UnsupportedNetwork(NotImplementedError, ValueError):
    """A released pickle whose network class or configuration the converter does not build: refused input (the
    CLI says so in one `error:` line, exit 2), nothing of the pickle run. NotImplementedError for callers that
    catch that."""

    def __init__(self, message: str):
        super().__init__(f"{message}. Fix: use a checkpoint of a supported family (`repro/catalog/registry.py` "
                         "lists them), or convert this network to one first")


_UPSTREAM_DEFAULT_MODEL_TYPE = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet"}


_UPSTREAM_SONGUNET_DEFAULTS = dict(
    augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.10, label_dropout=0.0, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
)


# Upstream EDM2 defaults: Precond (img_resolution, img_channels and label_dim have none), UNet, Block.
_UPSTREAM_EDM2_DEFAULTS = dict(
    use_fp16=True, sigma_data=0.5, logvar_channels=128,
    model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None, num_blocks=3,
    attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5,
    resample_filter=[1, 1], channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256,
)


_EDM2_CLASSES = {"Precond", "UNet"}


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, where) for k, v in value.items()}
    raise ValueError(f"{where}: value {value!r:.60} of type {type(value).__name__} is not JSON data")


def _recorded_args(record: Record, positional: tuple) -> dict:
    """Merge a record's ``_init_args`` (named by ``positional``) and ``_init_kwargs`` into one JSON dict."""
    name = record.class_name
    args, kwargs = record.init_args, record.init_kwargs
    if kwargs is None or args is None:
        raise ValueError(f"{name}: the pickle did not record constructor arguments (_init_args/_init_kwargs)")
    if len(args) > len(positional):
        raise ValueError(f"{name}: {len(args)} positional constructor arguments, expected at most {len(positional)}")
    given = dict(zip(positional, args))
    for k, v in dict(kwargs).items():
        if k in given:
            raise ValueError(f"{name}: constructor argument {k!r} given twice")
        given[k] = v
    return _to_json(given, name)


def _edm2_arch_from_record(record: Record) -> dict:
    """Arch dict (``precond='edm2'``, for :func:`repro.nets.edm2.build_network`) from an EDM2 ``Precond``.

    All upstream defaults are filled in, so the JSON is explicit.  ``use_fp16`` is kept: ``build_network``
    accepts it, and it only decides whether the U-Net computes in float16 on CUDA (never on CPU).
    """

    name = record.class_name
    given = _recorded_args(record, _UPSTREAM_POSITIONAL[name])
    for k in ("img_resolution", "img_channels", "label_dim"):  # no upstream default
        if k not in given:
            raise ValueError(f"{name}: constructor argument {k!r} missing from the recorded init args")
    sub = record.submodules.get("unet")
    if isinstance(sub, Record):
        if sub.class_name != "UNet":
            raise ValueError(f"{name}: the 'unet' submodule is {sub.class_name!r}, expected EDM2's 'UNet'")
        if sub.init_kwargs is not None and sub.init_args == ():  # Precond passes everything by keyword
            for k, v in _to_json(dict(sub.init_kwargs), sub.class_name).items():
                if k in given and given[k] != v:
                    raise ValueError(f"{name}: constructor argument {k!r} is {given[k]!r} but its UNet got {v!r}")
    for k, v in _UPSTREAM_EDM2_DEFAULTS.items():
        given.setdefault(k, v)
    for k in sorted(given):
        if k not in arch_keys("edm2"):
            raise ValueError(f"{name}: constructor argument {k!r} has no counterpart in repro.nets.edm2")
    return {"precond": "edm2", **given}


def arch_from_record(record: Any) -> dict:
    """JSON architecture for :func:`repro.nets.edm.build_network` from a network record.

    EDM: ``EDMPrecond``/``VPPrecond`` around ``SongUNet``.  Uses the constructor arguments recorded by
    ``torch_utils.persistence`` (``_init_args``/``_init_kwargs``) with upstream's defaults (EDMPrecond's
    ``model_type`` defaults to DhariwalUNet); SongUNet keyword arguments that were not given are filled with
    upstream's SongUNet defaults so the JSON is explicit.

    EDM2: ``Precond`` (around ``UNet``) -> ``precond='edm2'`` with every Precond/UNet/Block argument explicit
    (upstream defaults where not recorded; ``use_fp16`` defaults to True upstream).
    """

    if not isinstance(record, Record):
        raise TypeError(f"arch_from_record: expected a record, got {type(record).__name__}")
    name = record.class_name
    if name == "Precond":
        return _edm2_arch_from_record(record)
    if name in _EDM2_CLASSES:
        raise UnsupportedNetwork(f"EDM2 record class {name!r}: convert the whole 'Precond' network, not its {name}")
    if name not in _UPSTREAM_POSITIONAL:
        raise UnsupportedNetwork(f"network class {name!r}: not supported (only EDMPrecond/VPPrecond with SongUNet, "
                                  "or EDM2's Precond)")
    given = _recorded_args(record, _UPSTREAM_POSITIONAL[name])
    model_type = given.pop("model_type", _UPSTREAM_DEFAULT_MODEL_TYPE[name])
    if model_type != "SongUNet":
        raise UnsupportedNetwork(f"{name} with model_type={model_type!r}: not supported (only SongUNet)")
    sub = record.submodules.get("model")
    if isinstance(sub, Record) and sub.class_name != "SongUNet":
        raise ValueError(f"{name}: init kwargs say SongUNet but the 'model' submodule is {sub.class_name!r}")
    for k in ("img_resolution", "img_channels"):
        if k not in given:
            raise ValueError(f"{name}: constructor argument {k!r} missing from the recorded init args")
    arch = {"precond": "edm" if name == "EDMPrecond" else "vp"}
    for k, v in _UPSTREAM_SONGUNET_DEFAULTS.items():
        given.setdefault(k, v)
    allowed = arch_keys(arch["precond"])
    for k in sorted(given):
        if k not in allowed:
            raise ValueError(f"{name}: constructor argument {k!r} has no counterpart in repro.nets.edm")
    arch.update(given)
    return arch


def _summary_json(value: Any) -> Any:
    """Like :func:`_to_json`, but numpy arrays become lists and anything else non-JSON becomes ``'<type>'``."""
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_summary_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _summary_json(v) for k, v in value.items()}
    try:
        return _to_json(value, "summary")
    except ValueError:
        return f"<{type(value).__name__}>"


def describe_record(obj: Any) -> Optional[dict]:
    """JSON description of a non-network entry (e.g. EDM2's ``encoder``), read as data: class, init args, attributes.

    For EDM2's encoders upstream records no constructor kwargs (train_edm2.py builds them from a class name
    only), so the public attributes carry the facts: ``StabilityVAEEncoder`` has ``vae_name`` (the decoder a
    latent preset needs, e.g. ``stabilityai/sd-vae-ft-mse``), ``scale``, ``bias``, ``batch_size``;
    ``StandardRGBEncoder`` has none.  Nothing is executed; ``None`` for ``None``.
    """
    if obj is None:
        return None
    if not isinstance(obj, Record):
        return {"type": type(obj).__name__, "value": _summary_json(obj)}
    state = obj.state if isinstance(obj.state, dict) else {}
    return {
        "class_name": obj.class_name,
        "module_name_hint": getattr(obj, "module_name_hint", None),
        "init_args": _summary_json(obj.init_args),
        "init_kwargs": _summary_json(obj.init_kwargs),
        "attributes": {str(k): _summary_json(v) for k, v in state.items() if not str(k).startswith("_")},
    }


def _build_and_load(arch: dict, tensors: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Build the network for ``arch`` and copy ``tensors`` in with a strict key + shape check, in their dtypes.

    EDM2 nets are built on the meta device first (no random init of up to 777M parameters), checked there,
    then materialised: every parameter and buffer is a state_dict entry, so the copy overwrites all memory.
    """
    if arch.get("precond") != "edm2":
        net = build_network(arch)
        load_state_strict(net, tensors, where, keep_dtype=True)
        return net
    with torch.device("meta"):
        net = build_network(arch)
    load_state_strict(net, {k: v.to("meta") for k, v in tensors.items()}, where)  # keys + shapes, no data
    names = {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}
    if names != set(net.state_dict()):
        raise RuntimeError(f"{where}: network has tensors outside its state_dict; cannot materialise from the file")
    net = net.to_empty(device="cpu")
    load_state_strict(net, tensors, where, keep_dtype=True)
    return net


def convert_edm_pickle(src: Path | str, dst: Path | str, expected_sha256: Optional[str] = None,
                       key: str = "ema") -> dict:
    """Convert ``src[key]`` of an EDM/EDM2 pickle into our checkpoint format at ``dst`` (safetensors + JSON arch).

    The pickle is read as data (nothing executed), the network is rebuilt with
    :func:`repro.nets.edm.build_network`, tensors are copied with a strict key + shape check
    (:func:`repro.nets.state.load_state_strict`) and saved with :func:`repro.storage.files.save_model`, recording the
    source file name, sha256 and the source tensor dtypes in the info.  Returns a summary dict.

    EDM2 (``Precond``): the top level is an EasyDict ``{encoder, dataset_kwargs, loss_fn, ema}``; ``ema`` is
    converted and ``encoder`` is described (class, init kwargs, attributes; see :func:`describe_record`) in
    the summary and the info.  Tensors keep their source dtype: the released EDM2/DDO ``ema`` tensors are
    float16, and upstream computes each MPConv's ``gain / sqrt(fan_in)`` from the float16 scalar gains
    (``emb_gain``, ``out_gain``) in float16; with float32 gains the outputs would differ by about 1e-3 (measured
    ~1.6e-3 on a real checkpoint). Kept in float16 they compute as upstream samples them; the U-Net computes in
    float32 on CPU, or float16 on CUDA when ``use_fp16`` is set. Training casts them to float32 (DDO trains in
    fp32, as the paper says).
    """
    src, dst = Path(src), Path(dst)
    digest = sha256_file(src)
    if expected_sha256 is not None and digest.lower() != expected_sha256.strip().lower():
        raise ValueError(f"{src}: sha256 mismatch: expected {expected_sha256}, got {digest}; not unpickled")
    data = read_edm_pickle(src)
    if not isinstance(data, dict):
        raise ValueError(f"{src}: top-level object is a {type(data).__name__}, expected a dict")
    if key not in data:
        raise ValueError(f"{src}: no entry {key!r}; entries: {sorted(map(str, data))}")
    record = data[key]
    arch = arch_from_record(record)
    tensors = state_dict_from_record(record)
    net = _build_and_load(arch, tensors, f"{src.name}[{key!r}]")
    source_dtypes = sorted({str(t.dtype) for t in tensors.values()})
    encoder = describe_record(data.get("encoder")) if "encoder" in data else None
    info = {
        "source_file": src.name,
        "source_sha256": digest,
        "source_key": key,
        "source_class": record.class_name,
        "source_format": f"torch_utils.persistence v{record.version}",
        "source_dtypes": source_dtypes,
        "stored_dtypes": source_dtypes,
    }
    if encoder is not None:
        info["encoder"] = encoder
    save_model(dst, net, arch, info)
    return {
        "src": str(src),
        "dst": str(dst),
        "sha256": digest,
        "key": key,
        "class_name": record.class_name,
        "arch": arch,
        "tensors": len(tensors),
        "parameters": count_parameters(net),
        "source_dtypes": source_dtypes,
        "encoder": encoder,
        "other_entries": sorted(str(k) for k in data if k != key),
    }
