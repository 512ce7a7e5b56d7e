"""Per-seed generation of uint8 image batches around the sampler, with the config's settings.

Image i depends only on seed i: its initial noise, its random label and its churn noise all come from a
generator seeded with seed i, so the same seeds give the same images whatever the batch size or the number
of processes. Batches are yielded as uint8, so a metric can consume them without PNGs on disk.

What a config adds around the network (:func:`sampling_denoiser`), in this order: autoguidance with a guide
network (``sampler.guidance``, repro.sampling.autoguidance), torch.compile of the networks (``sampler.compile``,
CUDA only) and an autocast dtype for each network evaluation (``sampler.dtype``). The sampler itself
(repro.sampling.edm) only ever sees one ``denoise(x, sigma, labels)`` callable and an optional guidance
``correction``. A latent model's output goes through a ``decoder`` (repro.nets.sd_vae) instead of :func:`to_uint8`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from repro.config import SamplerConfig
from repro.sampling.edm import Correction, Decoder, Denoiser, edm_sampler

log = logging.getLogger(__name__)


class SeedStack:
    """One torch.Generator per seed; draws are stacked along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 63)) for s in seeds]
        self.device = device

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(list(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], dtype=x.dtype)

    def randint(self, high: int) -> torch.Tensor:
        return torch.stack([torch.randint(high, [], generator=g, device=self.device) for g in self.generators])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images to uint8 (EDM's convention: x * 127.5 + 128, clipped, truncated)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images to float32 in [-1, 1]."""
    x = torch.as_tensor(x)
    return x.to(torch.float32) / 127.5 - 1


def one_hot(labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    if labels is None or label_dim == 0:
        return None
    return torch.nn.functional.one_hot(labels.long(), label_dim).to(torch.float32)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()


def with_precision(denoise: Denoiser, dtype: str, device="cpu") -> Denoiser:
    """``denoise`` evaluated under autocast to ``dtype`` ('fp32' returns it unchanged), output float32.

    bf16 and fp16 are what GPUs give; on CPU bf16 runs through CPU autocast (to test the path, or on CPUs with
    bf16 units) and fp16 is refused, as on any device other than CUDA and CPU.
    """
    if dtype == "fp32":
        return denoise
    if dtype not in AUTOCAST:
        raise ValueError(f"sampler.dtype: unknown dtype {dtype!r}. Fix: use fp32, bf16 or fp16")
    kind = torch.device(device).type
    if kind == "cpu" and dtype == "fp16":
        raise ValueError("sampler.dtype: fp16 autocast is for CUDA GPUs, and this run samples on the CPU. "
                         "Fix: set sampler.dtype: fp32 (or bf16) on CPU")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"sampler.dtype: {dtype} autocast is supported on cuda and cpu, not {kind}. "
                         "Fix: set sampler.dtype: fp32")
    if kind == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("sampler.dtype: this GPU has no bfloat16 support. Fix: set sampler.dtype: fp16 or fp32")
    if kind == "cpu":
        log.info("sampler.dtype bf16 on CPU: network evaluations under CPU autocast (bfloat16)")
    amp = AUTOCAST[dtype]

    def cast(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(kind, dtype=amp):
            out = denoise(x, sigma, labels)
        return out.to(torch.float32)

    return cast


def compiled(net: Denoiser, device="cpu") -> Denoiser:
    """``torch.compile(net)`` on CUDA, made once per network and reused; on CPU ``net`` itself, with a log line."""
    if torch.device(device).type != "cuda":
        log.info("sampler.compile ignored: torch.compile is used on CUDA only; sampling eagerly on %s", device)
        return net
    if not isinstance(net, torch.nn.Module):
        return torch.compile(net)
    if net not in _compiled:
        _compiled[net] = torch.compile(net)
    return _compiled[net]


def sampling_denoiser(net: Denoiser, sampler: SamplerConfig, *, guide: Denoiser | None = None,
                      device="cpu") -> Denoiser:
    """The one callable the sampler integrates: ``net`` with the config's guidance, compilation and dtype.

    ``sampler.guidance`` = w != 1 needs ``guide``: D = guide + w (net - guide) (repro.sampling.autoguidance.autoguidance).
    With w = 1 the guide is not used at all, so the result is ``net`` itself (bitwise the unguided sampler).
    """
    w = sampler.guidance
    if w != 1.0 and guide is None:
        raise ValueError(f"sampler.guidance is {w} but no guide network was given. Fix: run the pretrain stage "
                         "with sampler.guide set (it writes models/guide.safetensors), or set sampler.guidance: 1.0")
    if sampler.compile:
        net = compiled(net, device)
        guide = compiled(guide, device) if guide is not None and w != 1.0 else guide
    if w != 1.0:
        from repro.sampling.autoguidance import autoguidance

        net = autoguidance(net, guide, w)
    return with_precision(net, sampler.dtype, device)


def generate_images(denoise: Denoiser, seeds: Sequence[int], *, img_shape: Sequence[int], label_dim: int,
                    sampler: SamplerConfig, labels: Sequence[int] | np.ndarray | None = None,
                    batch: int | None = None, device="cpu", progress: bool = False, desc: str = "sampling",
                    part: tuple[int, int] = (0, 1),
                    guide: Denoiser | None = None, decoder: Decoder | None = None,
                    correction: Correction | None = None,
                    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
    """Yield (seeds, uint8 images [B,C,H,W], int labels or None) batch by batch.

    ``part=(rank, world)`` yields only the batches k with k mod world = rank (for several processes; see
    repro.cluster.distributed.gather_chunks): whole batches, so each image is computed exactly as by one process.

    Labels: given per seed (``labels``), else by ``sampler.label_mode``: 'balanced' gives seed i the class
    i mod label_dim (DDO's class-balanced protocol), 'random' draws it from seed i's generator (EDM's protocol).
    An unconditional net gets None.

    ``guide``: the guide network, used when ``sampler.guidance`` != 1 (see :func:`sampling_denoiser`, which also
    applies ``sampler.dtype`` and ``sampler.compile``). ``decoder``: turns the sampler's output into uint8
    images (a latent model's SD-VAE decoder, repro.nets.sd_vae); default :func:`to_uint8`. ``img_shape`` is the
    shape the network samples in (latents for a latent model). ``correction``: a guidance term added to the
    score inside each Heun step (:class:`Correction`; a stateful one starts afresh at step 0 of each batch).
    """
    from tqdm.auto import tqdm

    denoise = sampling_denoiser(denoise, sampler, guide=guide, device=device)
    seeds = np.asarray(seeds, dtype=np.int64)
    if labels is None and label_dim and sampler.label_mode == "balanced":
        labels = seeds % label_dim
    batch = batch or sampler.batch
    chunks = [np.arange(i, min(i + batch, len(seeds))) for i in range(0, len(seeds), batch)][part[0]::part[1]]
    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="img", disable=not progress, leave=False)
    for idx in chunks:
        rnd = SeedStack(seeds[idx].tolist(), device=device)
        latents = rnd.randn(img_shape)
        y = None
        if label_dim:
            y = torch.as_tensor(np.asarray(labels)[idx], device=device) if labels is not None else rnd.randint(label_dim)
        x = edm_sampler(denoise, latents, one_hot(y, label_dim), num_steps=sampler.num_steps,
                        sigma_min=sampler.sigma_min, sigma_max=sampler.sigma_max, rho=sampler.rho,
                        S_churn=sampler.S_churn, S_min=sampler.S_min, S_max=sampler.S_max, S_noise=sampler.S_noise,
                        randn_like=rnd.randn_like, correction=correction)
        images = decoder(x) if decoder is not None else to_uint8(x)
        bar.update(len(idx))
        yield seeds[idx], images.cpu(), (y.cpu() if y is not None else None)
    bar.close()


def image_grid(images: np.ndarray, ncol: int = 16) -> np.ndarray:
    """uint8 [N,C,H,W] to one uint8 grid image [rows*H, ncol*W, C] (C=1 squeezed to 2-D)."""
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def sample_grid(net, label_dim: int, img_shape, sampler: SamplerConfig, n: int = 80, ncol: int = 20,
                **extras) -> np.ndarray:
    """A fixed-seed sample grid (seeds 0..n-1; labels 0..9 cycling when conditional) for MLflow artifacts.

    ``extras``: ``guide`` / ``decoder`` for generate_images (a guided or latent model's grid).
    """
    labels = np.arange(n) % label_dim if label_dim else None
    images = np.concatenate([b.numpy() for _, b, _ in generate_images(net, np.arange(n), img_shape=img_shape,
                                                                      label_dim=label_dim, sampler=sampler,
                                                                      labels=labels, **extras)])
    return image_grid(images, ncol=ncol)
