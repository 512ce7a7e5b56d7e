"""Latent decoding: EDM2's ImageNet-512 models sample 4x64x64 SD-VAE latents; the SD-VAE decoder makes the images.

EDM2 (Karras et al. 2024, training/encoders.py, StabilityVAEEncoder) whitens the raw latents of Stability AI's
``sd-vae-ft-mse`` per channel: final = raw * scale + bias with scale = 0.5 / raw_std, bias = -raw_mean * scale,
raw_mean = [5.81, 3.25, 0.12, -2.15], raw_std = [4.17, 4.62, 3.71, 3.28], computed in float32. Decoding
inverts that exactly, runs the VAE decoder, and maps its output to uint8 as EDM2 does: clamp to [0, 1], times
255, truncated (EDM2 feeds the VAE pixels in [0, 1], not [-1, 1]). EDM2 decodes in batches of 8.

The VAE is diffusers' ``AutoencoderKL``, built from a config written here (no hub call at run time) and loaded
strictly from a sha256-verified safetensors file (registry entry ``sd-vae-ft-mse``, MIT licence). Files written
before diffusers renamed its attention layers (query/key/value/proj_attn) are read with those four names mapped
to the new ones (to_q/to_k/to_v/to_out.0); anything else that does not fit is an error.

Example::

    vae = load_autoencoder("checkpoints/sd-vae-ft-mse.safetensors")
    decode = LatentDecoder(vae)
    images = decode(latents)          # [N, 4, 64, 64] float -> [N, 3, 512, 512] uint8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["EDM2_RAW_MEAN", "EDM2_RAW_STD", "SD_VAE_FT_MSE", "KL_F8_TINY", "CONFIGS", "edm2_scale_bias",
           "load_autoencoder", "tiny_autoencoder", "save_autoencoder", "LatentDecoder", "LatentEncoder"]

# EDM2 StabilityVAEEncoder defaults (the img512 models were trained on latents whitened with these).
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5

# stabilityai/sd-vae-ft-mse config.json (the kl-f8 autoencoder of Stable Diffusion: 8x down, 4 latent channels).
SD_VAE_FT_MSE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}

# The micro stand-ins' VAE (registry decoder sd-vae-tiny): the same kl-f8 layout (4 levels: 512 px -> 64x64 latents,
# 4 latent channels), 8 channels per block and one layer per block, so it encodes and decodes 512x512 on a CPU.
KL_F8_TINY: dict[str, Any] = {**SD_VAE_FT_MSE, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
                              "norm_num_groups": 4}

CONFIGS: dict[str, dict[str, Any]] = {"sd-vae-ft-mse": SD_VAE_FT_MSE,  # registry arch name -> AutoencoderKL config
                                      "kl-f8-tiny": KL_F8_TINY}

_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def edm2_scale_bias(raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD, final_mean=EDM2_FINAL_MEAN,
                    final_std=EDM2_FINAL_STD) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, bias) with final = raw * scale + bias, in float32 as EDM2 computes them."""
    scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def _renamed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map diffusers' pre-0.15 attention names inside ``...attentions.N.`` onto the current ones."""
    out = {}
    for key, value in tensors.items():
        head, _, leaf = key.rpartition(".")           # e.g. 'decoder.mid_block.attentions.0.query', 'weight'
        parent, _, name = head.rpartition(".")
        if ".attentions." in f".{parent}." and name in _OLD_ATTENTION_NAMES:
            key = f"{parent}.{_OLD_ATTENTION_NAMES[name]}.{leaf}"
        out[key] = value
    return out


def load_autoencoder(path: Path | str, arch: str = "sd-vae-ft-mse", device="cpu") -> torch.nn.Module:
    """diffusers ``AutoencoderKL(**CONFIGS[arch])`` with the weights of ``path`` (safetensors), keys and shapes strict.

    The caller verifies the file's sha256 first (repro.storage.download.fetch / :func:`repro.nets.released.load_decoder`).
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - diffusers is in requirements.txt
        raise ImportError("the SD-VAE decoder needs diffusers: pip install -r requirements.txt") from e

    from repro.nets.state import load_state_strict
    from repro.storage.files import load_safetensors

    if arch not in CONFIGS:
        raise KeyError(f"unknown autoencoder {arch!r}; known: {', '.join(CONFIGS)}")
    tensors = _renamed(load_safetensors(str(path)))
    with torch.device("meta"):
        vae = AutoencoderKL(**CONFIGS[arch])
    load_state_strict(vae, {k: v.to("meta") for k, v in tensors.items()}, str(path))  # keys + shapes, no data
    vae = vae.to_empty(device="cpu")
    load_state_strict(vae, tensors, str(path))
    return vae.eval().requires_grad_(False).to(device)


def tiny_autoencoder(seed: int = 0) -> torch.nn.Module:
    """A random-weight ``AutoencoderKL`` of :data:`KL_F8_TINY` (the micro stand-ins' VAE), drawn from ``seed``."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**KL_F8_TINY).eval().requires_grad_(False)


def save_autoencoder(vae: torch.nn.Module, path: Path | str) -> Path:
    """``vae``'s weights as a safetensors file in the upstream (diffusers) key layout :func:`load_autoencoder` reads."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(path))
    return Path(path)


class LatentDecoder:
    """EDM2 latents (whitened) -> uint8 RGB images through the SD-VAE decoder, ``batch`` latents at a time."""

    def __init__(self, vae: torch.nn.Module, scale: np.ndarray | None = None, bias: np.ndarray | None = None,
                 batch: int = 8):
        default_scale, default_bias = edm2_scale_bias()
        self.vae = vae
        self.scale = torch.as_tensor(default_scale if scale is None else scale, dtype=torch.float32)
        self.bias = torch.as_tensor(default_bias if bias is None else bias, dtype=torch.float32)
        self.batch = int(batch)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if x.ndim != 4 or x.shape[1] != len(self.scale):
            raise ValueError(f"latent decoder: expected latents [N, {len(self.scale)}, H, W], got {tuple(x.shape)}")
        device = next(self.vae.parameters()).device
        x = x.to(device)
        raw = (x - self.bias.to(device).view(1, -1, 1, 1)) / self.scale.to(device).view(1, -1, 1, 1)
        pixels = torch.cat([self.vae.decode(b).sample for b in raw.split(self.batch)])
        return pixels.clamp(0, 1).mul(255).to(torch.uint8)


class LatentEncoder:
    """uint8 RGB images -> EDM2's stored latents: the SD-VAE encoder's raw posterior mean and std, concatenated
    ([N, 8, H/8, W/8] float32), as EDM2's dataset tool stores them (StabilityVAEEncoder.encode_pixels: pixels / 255,
    in [0, 1]). Training draws mean + std * noise and whitens it with ``edm2_scale_bias``; nothing is drawn here."""

    def __init__(self, vae: torch.nn.Module, batch: int = 8):
        self.vae = vae
        self.batch = int(batch)

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(images))
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"latent encoder: expected uint8 images [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        device = next(self.vae.parameters()).device
        out = []
        for b in x.split(self.batch):
            dist = self.vae.encode(b.to(device).to(torch.float32) / 255).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
        return torch.cat(out).numpy()
