"""Sampling: EDM's Heun sampler and a generator of uint8 image batches with per-seed randomness.

Image i depends only on seed i: its initial noise, its random label and its churn noise all come from a
generator seeded with seed i, so the same seeds give the same images whatever the batch size or the number
of processes. Batches are yielded as uint8, so a metric can consume them without PNGs on disk.

What a config adds around the network (:func:`sampling_denoiser`), in this order: autoguidance with a guide
network (``sampler.guidance``, repro.sampling.autoguidance), torch.compile of the networks (``sampler.compile``, CUDA only)
and an autocast dtype for each network evaluation (``sampler.dtype``). The sampler itself only ever sees one
``denoise(x, sigma, labels)`` callable, and its state stays float64. A latent model's output goes through a
``decoder`` (repro.nets.sd_vae) instead of :func:`to_uint8`.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Protocol

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]  # sampler output (float) -> uint8 images [B, C, H, W]

log = logging.getLogger(__name__)


# Karras et al. 2022 (EDM), Eq. 5: t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, t_N = 0.
def sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The N+1 noise levels of the EDM schedule, float64, ending with 0."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


class Correction(Protocol):
    """A guidance term added to the model's score inside the Heun step (discriminator guidance and its kin).

    ``correction(x, sigma, labels, step, order)`` returns delta ~ grad_x log p_data(x; sigma) / p_model(x; sigma)
    (already weighted; the shape of x, any float dtype) or None for nothing, at the first-order (``order=1``,
    x = x_hat) or the second-order (``order=2``, x = the Euler step's x_next) evaluation of step ``step``.
    ``sigma`` has shape [N]. The sampler adds it to the score, score <- score + delta, which on EDM's ODE
    dx/dsigma = -sigma score is d <- d - sigma delta.

    Optional: ``churn(step, gamma) -> Tensor [N] | None``, per-sample churn factors replacing the sampler's
    ``gamma`` at this step (DG's "boosting"). Whether it returns a tensor must depend on ``step`` only, so that
    the per-seed noise streams stay independent of the other images in a batch.
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, step: int,
                 order: int) -> torch.Tensor | None: ...


# Karras et al. 2022 (EDM), Algorithm 2: stochastic Heun sampler (deterministic when S_churn = 0).
@torch.no_grad()
def edm_sampler(denoise: Denoiser, latents: torch.Tensor, labels: torch.Tensor | None = None, *,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                correction: Correction | None = None) -> torch.Tensor:
    """Integrate the probability-flow ODE (plus optional churn) from sigma_max to 0; float64 state.

    ``denoise(x, sigma, labels)`` is called with float32 x and a per-sample sigma of shape [N].
    Number of network evaluations: 2 * num_steps - 1. ``correction``: a guidance term (see :class:`Correction`);
    None leaves the algorithm exactly as written (the same floating-point operations).
    """
    n = latents.shape[0]
    col = (n,) + (1,) * (latents.ndim - 1)  # a per-sample noise level broadcast over the sample's dimensions

    def D(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = t.to(torch.float32).expand(n)
        return denoise(x.to(torch.float32), sigma, labels).to(torch.float64)

    def guide(d: torch.Tensor, x: torch.Tensor, t: torch.Tensor, i: int, order: int) -> torch.Tensor:
        if correction is None:
            return d
        delta = correction(x, t.expand(n), labels, i, order)
        return d if delta is None else d - t.reshape(-1, *col[1:]) * delta.to(torch.float64)

    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Increase noise temporarily (churn); a correction may set it per sample.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        per_sample = getattr(correction, "churn", None)
        per_sample = per_sample(i, gamma) if per_sample is not None else None
        if per_sample is not None:
            gamma = per_sample.to(torch.float64).reshape(col)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
            t_hat = t_hat.reshape(n)
        else:
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur
            if gamma > 0:
                x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        t_col = t_hat.reshape(col) if t_hat.ndim else t_hat
        # Euler step.
        d_cur = guide((x_hat - D(x_hat, t_hat)) / t_col, x_hat, t_hat, i, 1)
        x_next = x_hat + (t_next - t_col) * d_cur
        # Second-order (Heun) correction, except on the last step to sigma = 0.
        if i < num_steps - 1:
            d_prime = guide((x_next - D(x_next, t_next)) / t_next, x_next, t_next, i, 2)
            x_next = x_hat + (t_next - t_col) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


