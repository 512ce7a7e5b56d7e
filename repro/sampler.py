"""Sampling: EDM's Heun sampler and a generator of uint8 image batches with per-seed randomness.

Image i depends only on seed i: its initial noise, its random label and its churn noise all come from a
generator seeded with seed i, so the same seeds give the same images whatever the batch size or the number
of processes. Batches are yielded as uint8, so a metric can consume them without PNGs on disk.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from repro.config import SamplerConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# Karras et al. 2022 (EDM), Eq. 5: t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, t_N = 0.
def sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The N+1 noise levels of the EDM schedule, float64, ending with 0."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


# Karras et al. 2022 (EDM), Algorithm 2: stochastic Heun sampler (deterministic when S_churn = 0).
@torch.no_grad()
def edm_sampler(denoise: Denoiser, latents: torch.Tensor, labels: torch.Tensor | None = None, *,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
    """Integrate the probability-flow ODE (plus optional churn) from sigma_max to 0; float64 state.

    ``denoise(x, sigma, labels)`` is called with float32 x and a per-sample sigma of shape [N].
    Number of network evaluations: 2 * num_steps - 1.
    """
    n = latents.shape[0]

    def D(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = t.to(torch.float32).expand(n)
        return denoise(x.to(torch.float32), sigma, labels).to(torch.float64)

    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Increase noise temporarily (churn).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        # Euler step.
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Second-order (Heun) correction, except on the last step to sigma = 0.
        if i < num_steps - 1:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


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


def generate_images(denoise: Denoiser, seeds: Sequence[int], *, img_shape: Sequence[int], label_dim: int,
                    sampler: SamplerConfig, labels: Sequence[int] | np.ndarray | None = None,
                    batch: int | None = None, device="cpu", progress: bool = False, desc: str = "sampling",
                    part: tuple[int, int] = (0, 1),
                    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
    """Yield (seeds, uint8 images [B,C,H,W], int labels or None) batch by batch.

    ``part=(rank, world)`` yields only the batches k with k mod world = rank (for several processes; see
    repro.distributed.gather_chunks): whole batches, so each image is computed exactly as by one process.

    Labels: given per seed (``labels``), else by ``sampler.label_mode``: 'balanced' gives seed i the class
    i mod label_dim (DDO's class-balanced protocol), 'random' draws it from seed i's generator (EDM's protocol).
    An unconditional net gets None.
    """
    from tqdm.auto import tqdm

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
                        randn_like=rnd.randn_like)
        bar.update(len(idx))
        yield seeds[idx], to_uint8(x).cpu(), (y.cpu() if y is not None else None)
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
