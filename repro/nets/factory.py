"""The one network factory: a JSON architecture dict -> the network it describes.

Every checkpoint of the package stores its architecture as JSON (repro.nets.checkpoint); ``arch["precond"]``
names the family and the rest are the constructor arguments of that family's preconditioned network, with the
upstream parameter names (so released weights copy in with a strict key and shape check):

=========  ===============================================  =====================================
precond    network                                          module
=========  ===============================================  =====================================
edm, vp    DDPM++ U-Net (SongUNet) in EDMPrecond/VPPrecond  repro.nets.edm (EDM, Karras et al. 2022)
edm2       magnitude-preserving U-Net in Precond            repro.nets.edm2 (EDM2, Karras et al. 2024)
var        next-scale AR transformer (no img_* keys)        repro.nets.var (VAR, Tian et al. 2024)
var-vqvae  VAR's multi-scale VQ tokenizer (no img_* keys)   repro.nets.vqvae
=========  ===============================================  =====================================

Example::

    net = build_network(arch_presets()["tiny-8x8-cond"])
    with torch.device("meta"):                      # paper-size nets without allocating memory
        big = build_network(arch_presets()["img512-l"])
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from torch import nn

from repro.nets import edm, edm2, var, vqvae

# Keys every family takes, then each family's network class and its own keys.
_COMMON = {"img_resolution", "img_channels", "label_dim", "use_fp16"}
_SONG_UNET = {"model_type", "augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
              "attn_resolutions", "dropout", "label_dropout", "embedding_type", "channel_mult_noise", "encoder_type",
              "decoder_type", "resample_filter"}
_EDM2_UNET = {"model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
              "attn_resolutions", "label_balance", "concat_balance", "resample_filter", "channels_per_head", "dropout",
              "res_balance", "attn_balance", "clip_act"}
FAMILIES: dict[str, tuple[type, frozenset]] = {
    "edm": (edm.EDMPrecond, frozenset(_COMMON | _SONG_UNET | {"sigma_min", "sigma_max", "sigma_data"})),
    "vp": (edm.VPPrecond, frozenset(_COMMON | _SONG_UNET | {"beta_d", "beta_min", "M", "epsilon_t"})),
    "edm2": (edm2.Precond, frozenset(_COMMON | _EDM2_UNET | {"sigma_data", "logvar_channels"})),
}
_LISTS = ("channel_mult", "attn_resolutions", "resample_filter")
# Token models: their constructor arguments only (they take no img_resolution / img_channels).
AR_FAMILIES: dict[str, tuple[type, frozenset]] = {
    "var": (var.VAR, frozenset({"depth", "embed_dim", "num_heads", "num_classes", "vocab_size", "Cvae", "patch_nums",
                                "mlp_ratio", "norm_eps", "cond_drop_rate", "tokenizer"})),
    "var-vqvae": (vqvae.VQVAE, frozenset({"vocab_size", "z_channels", "ch", "ch_mult", "patch_nums", "in_channels",
                                          "share_quant_resi"})),
}


def arch_keys(precond: str) -> frozenset:
    """The architecture keys family ``precond`` accepts (besides ``precond`` itself)."""
    if precond not in FAMILIES:
        raise ValueError(f"arch['precond'] must be one of {sorted(FAMILIES)}, got {precond!r}")
    return FAMILIES[precond][1]


def arch_presets() -> dict:
    """Deep copies of the named architectures: EDM's CIFAR-10 nets, EDM2's ImageNet nets, a tiny test net.

    Example::

        net = build_network(arch_presets()["edm-cifar10-32x32-cond-vp"])
    """
    return copy.deepcopy({**edm.PRESETS, **edm2.PRESETS})


def build_network(arch: Mapping[str, Any]) -> nn.Module:
    """Build the preconditioned denoiser a JSON-able architecture dict describes.

    Required: ``precond`` (a key of :data:`FAMILIES`), ``img_resolution``, ``img_channels``; everything else is
    optional (the family's constructor arguments). An unknown key or family raises ``ValueError`` naming it.

    Example::

        net = build_network(dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10,
                                 model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]))
    """
    arch = dict(arch)
    precond = arch.pop("precond", None)
    if precond in AR_FAMILIES:
        cls, allowed = AR_FAMILIES[precond]
        unknown = sorted(set(arch) - allowed)
        if unknown:
            raise ValueError(f"unknown architecture key {unknown[0]!r} for precond={precond!r}")
        tokenizer = arch.pop("tokenizer", None)
        net = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
        if tokenizer is not None:  # a VAR trained here carries its tokenizer (frozen) in the same file
            net.tokenizer = build_network({"precond": "var-vqvae", **tokenizer}).requires_grad_(False)
        return net
    cls, allowed = FAMILIES[precond] if precond in FAMILIES else (None, arch_keys(precond))
    for key in arch:
        if key not in allowed:
            raise ValueError(f"unknown architecture key {key!r} for precond={precond!r}")
    for key in ("img_resolution", "img_channels"):
        if key not in arch:
            raise ValueError(f"architecture dict is missing the required key {key!r}")
    for key in _LISTS:
        if key in arch:
            arch[key] = list(arch[key])
    return cls(**arch)
