"""The VP-SDE time of Discriminator Guidance and EDM's noise level: the same noising in two coordinates.

DG's discriminators (Kim et al. 2023) take a VP-noised input x_vp = alpha(tau) x_0 + s(tau) eps and the VP time
tau in [0, 1] of the linear schedule of Song et al. 2021 (beta_0 = 0.1, beta_1 = 20); EDM's sampler works with
x = x_0 + sigma eps. They are the same noising with sigma = s / alpha and x_vp = alpha x (EDM, Table 1 "VP").
These conversions live here, below the networks that condition on tau (repro.nets.discriminators) and the
method that samples with them (repro.methods.dg, which re-exports them).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BETA_0", "BETA_1", "integral_beta", "vp_alpha", "vp_std", "sigma_from_tau", "tau_from_sigma",
           "alpha_from_sigma", "cosine_time"]

BETA_0, BETA_1 = 0.1, 20.0   # DG's VP-SDE (classifier_lib.vpsde), the linear schedule of Song et al. 2021


# Song et al. 2021 (VP-SDE), linear schedule beta(t) = beta_0 + t (beta_1 - beta_0):
#   int_0^t beta(s) ds = beta_0 t + (beta_1 - beta_0) t^2 / 2.
def integral_beta(tau: torch.Tensor, beta_0: float = BETA_0, beta_1: float = BETA_1) -> torch.Tensor:
    """The integrated noise rate int_0^tau beta(s) ds (any shape)."""
    return beta_0 * tau + 0.5 * (beta_1 - beta_0) * tau ** 2


# Song et al. 2021 (VP-SDE) marginal x_t = alpha(t) x_0 + s(t) eps: alpha(t) = exp(-1/2 int_0^t beta).
def vp_alpha(tau: torch.Tensor, beta_0: float = BETA_0, beta_1: float = BETA_1) -> torch.Tensor:
    """The VP mean coefficient alpha(tau) (DG's ``marginal_prob`` mean).

    Example::

        >>> vp_alpha(torch.tensor([0.0, 1.0]))
        tensor([1.0000, 0.0066])
    """
    return torch.exp(-0.5 * integral_beta(tau, beta_0, beta_1))


# Song et al. 2021 (VP-SDE) marginal standard deviation s(t) = sqrt(1 - alpha(t)^2).
def vp_std(tau: torch.Tensor, beta_0: float = BETA_0, beta_1: float = BETA_1) -> torch.Tensor:
    """The VP marginal standard deviation s(tau) = sqrt(1 - exp(-int beta)), computed as sqrt(-expm1(-int beta))."""
    return torch.sqrt(-torch.expm1(-integral_beta(tau, beta_0, beta_1)))


# Karras et al. 2022 (EDM), Table 1 "VP": sigma(t) = sqrt(exp(beta_0 t + (beta_1 - beta_0) t^2 / 2) - 1) = s / alpha.
def sigma_from_tau(tau: torch.Tensor, beta_0: float = BETA_0, beta_1: float = BETA_1) -> torch.Tensor:
    """EDM's noise level sigma of the VP time tau.

    Example::

        >>> float(sigma_from_tau(torch.tensor(1.0)))  # doctest: +ELLIPSIS
        152.16...
    """
    return torch.sqrt(torch.expm1(integral_beta(tau, beta_0, beta_1)))


# Karras et al. 2022 (EDM), Table 1 "VP", inverted (DG's vpsde.compute_tau):
#   tau = (-beta_0 + sqrt(beta_0^2 + 2 (beta_1 - beta_0) log(1 + sigma^2))) / (beta_1 - beta_0).
def tau_from_sigma(sigma: torch.Tensor, beta_0: float = BETA_0, beta_1: float = BETA_1) -> torch.Tensor:
    """The VP time tau of EDM's noise level sigma (the inverse of :func:`sigma_from_tau`).

    Computed in the cancellation-free form tau = 2 L / (beta_0 + sqrt(beta_0^2 + 2 (beta_1 - beta_0) L)),
    L = log1p(sigma^2), which is the same number as DG's formula without its loss of digits at small sigma.

    Example::

        >>> round(float(tau_from_sigma(sigma_from_tau(torch.tensor(0.3, dtype=torch.float64)))), 12)
        0.3
    """
    L = torch.log1p(sigma ** 2)
    return 2 * L / (beta_0 + torch.sqrt(beta_0 ** 2 + 2 * (beta_1 - beta_0) * L))


# Karras et al. 2022 (EDM), VP scaling s(t) = 1 / sqrt(1 + sigma^2) (= alpha of the same noise level).
def alpha_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """alpha(tau(sigma)) = 1 / sqrt(1 + sigma^2): x_vp = alpha x_edm."""
    return torch.rsqrt(1 + sigma ** 2)


# Nichol & Dhariwal 2021 (cosine schedule), inverted for the same alpha: DG's compute_t_cos_from_t_lin, used for
# OpenAI's 64x64 classifier ("ADM trained UNet classifier for 64x64 with Cosine VPSDE"):
#   t_cos = (1 + s) (2 / pi) arccos(sqrt(f_0) alpha_lin(t)) - s,  f_0 = cos(s / (1 + s) pi / 2)^2, s = 0.008.
def cosine_time(tau: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """The cosine-schedule time in [0, 1] whose alpha equals the linear VP schedule's alpha at ``tau``."""
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (1 + s) * 2 / math.pi * torch.arccos(math.sqrt(f0) * vp_alpha(tau)) - s
