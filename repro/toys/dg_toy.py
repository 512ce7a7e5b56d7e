"""Discriminator guidance on 2-D Gaussian mixtures: exact answers to check DG and improved DG against.

The "pretrained model" is a mixture ``model`` with its exact noised score (so its sampler's only error is the
ODE discretisation), the data a mixture ``data``; both are :class:`repro.toys.gmm.GaussianMixture`. Then:

* the optimal discriminator is known: logit* = log p_data^sigma - log p_model^sigma (:func:`exact_logit`);
* guided samples (EDM's Heun sampler + :class:`repro.methods.dg.DiscriminatorGuidance`) are scored under the
  exact p_data (:func:`sample_metrics`: NLL, mode mass, the total variation between the modes' frequencies and
  their weights);
* the error of a discriminator's correction is DG's KL bound, computed against the exact correction
  (:func:`kl_bound_error`): E = 1/2 int g^2 E_{p_data^t} ||c* - w c_phi||^2 dt, by Monte Carlo over DG's time
  sampler and exact samples of p_data^t. E with c_phi = 0 is the unguided model's bound; their ratio below 1 is
  DG's "gain".

Example::

    data, model = toy_pair()
    real, fake = toy_banks(data, model, 4096, 4096, seed=0)
    disc = MLPDiscriminator()
    train_discriminator(disc, real, fake, DGTrainConfig(epochs=20, batch=256, lr=1e-3), None, NullTracker())
    x = guided_samples(model, vp_logit(disc), 2000, seed=1, w=1.0)
    sample_metrics(data, x)          # {'nll': ..., 'mode_mass': ..., 'mode_tv': ...}
"""

from __future__ import annotations

import math

import numpy as np
import torch

from repro.methods.dg import D_CLIP, DiscriminatorGuidance, grad_log_ratio, kl_bound_constant, sample_tau, \
    sigma_from_tau
from repro.sampling.edm import edm_sampler
from repro.toys.gmm import GaussianMixture, log_ratio, ring

__all__ = ["toy_pair", "toy_banks", "exact_logit", "guided_samples", "sample_metrics", "kl_bound_error"]

F64 = torch.float64


def toy_pair() -> tuple[GaussianMixture, GaussianMixture]:
    """The default toy: data = 8 equal modes on a circle of radius 2 (std 0.1); model = the same circle with
    modes twice as wide (std 0.2), a radius of 2.1 and unequal weights 1 : 2 : ... : 8 (a model that covers
    every mode, with the wrong masses and shapes, as a pretrained model does)."""
    data = ring(k=8, radius=2.0, std=0.1)
    model = ring(k=8, radius=2.1, std=0.2, weights=torch.arange(1, 9, dtype=F64))
    return data, model


def toy_banks(data: GaussianMixture, model: GaussianMixture, n_real: int, n_fake: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Real and fake banks [n, d] float32: exact samples of ``data`` and of ``model`` (the model's generator)."""
    g = torch.Generator().manual_seed(seed)
    return data.sample(n_real, g).float().numpy(), model.sample(n_fake, g).float().numpy()


def exact_logit(data: GaussianMixture, model: GaussianMixture):
    """The optimal discriminator's logit log(d*/(1-d*)) = log p_data^sigma(x) - log p_model^sigma(x), as a
    logit function in EDM's convention (float64)."""
    def logit(x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        return log_ratio(data, model, x, sigma)
    return logit


def guided_samples(model: GaussianMixture, logit, n: int, seed: int, w: float = 1.0, num_steps: int = 32,
                   dtype: torch.dtype = torch.float32, **guidance) -> torch.Tensor:
    """n samples [n, d] (float64) of EDM's Heun sampler on ``model``'s exact denoiser, guided by ``logit`` with
    weight ``w`` (``w=0``: no correction object at all). Latents from ``seed``; other keywords go to
    :class:`DiscriminatorGuidance` (``tau_min``, ``d_clip``, ...)."""
    z = torch.randn(n, model.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    corr = DiscriminatorGuidance(logit, w=w, dtype=dtype, **guidance) if w != 0 else None
    return edm_sampler(model.denoiser(), z, num_steps=num_steps, correction=corr)


def sample_metrics(data: GaussianMixture, x: torch.Tensor) -> dict[str, float]:
    """Exact scores of samples under the data mixture: ``nll`` = -mean log p_data(x) (nats), ``mode_mass`` =
    fraction within 3 std of a mode, ``mode_tv`` = 1/2 sum_k |freq_k - weight_k| with each sample assigned to
    its most likely mode."""
    x = x.to(F64)
    k = data.responsibilities(x).argmax(dim=1)
    freq = torch.bincount(k, minlength=len(data.weights)).to(F64) / len(x)
    return {"nll": -data.log_prob(x).mean().item(), "mode_mass": data.mode_mass(x).item(),
            "mode_tv": 0.5 * (freq - data.weights).abs().sum().item()}


def kl_bound_error(data: GaussianMixture, model: GaussianMixture, logit, n: int, seed: int, w: float = 1.0,
                   t_min: float = 1e-5, d_clip: float = D_CLIP, dtype: torch.dtype = torch.float32) -> dict:
    """DG's KL bound of the guided model against the exact correction, and of the unguided model.

    E = 1/2 int_{t_min}^1 g(t)^2 E_{x ~ p_data^t} ||c* - w c_phi||^2_VP dt with c* = grad log(p_data / p_model)
    and c_phi = grad log(d / (1 - d)) (clipped as in sampling). In EDM's coordinates and with t drawn from DG's
    time density beta / (1 - alpha^2) / Z this is Z / 2 E[sigma^2 ||c*_x - w c_phi,x||^2] (derivation in
    :func:`repro.methods.dg.improved_dg_objective`). Returns {'E_model', 'E_guided', 'ratio'} (ratio < 1:
    the guidance helps; > 1: it hurts)."""
    g = torch.Generator().manual_seed(seed)
    sigma = sigma_from_tau(sample_tau(n, g, t_min, dtype=F64))
    x = data.sample(n, g, sigma=sigma)
    c_star = data.score(x, sigma) - model.score(x, sigma)
    c_phi, _ = grad_log_ratio(logit, x.to(dtype), sigma.to(dtype), None, d_clip)
    Z = kl_bound_constant(t_min)
    e_model = 0.5 * Z * (sigma ** 2 * (c_star ** 2).sum(1)).mean().item()
    e_guided = 0.5 * Z * (sigma ** 2 * ((c_star - w * c_phi.to(F64)) ** 2).sum(1)).mean().item()
    return {"E_model": e_model, "E_guided": e_guided, "ratio": e_guided / e_model if e_model > 0 else math.nan}
