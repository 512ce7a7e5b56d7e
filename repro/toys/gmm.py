"""Isotropic Gaussian mixtures with exact densities and scores at every noise level: the package's toy oracle.

A mixture p(x) = sum_k w_k N(x; mu_k, s_k^2 I) in R^d, diffused by the EDM forward process x_sigma = x + sigma n
(variance-exploding, n ~ N(0, I)), stays a mixture in closed form:

    p_sigma(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I)                                      (convolution)
    grad log p_sigma(x) = sum_k r_k(x) (mu_k - x) / (s_k^2 + sigma^2)       r_k = posterior of component k
    D(x; sigma) = E[x_0 | x_sigma = x] = x + sigma^2 grad log p_sigma(x)                   (Tweedie; EDM's D)

So every method of the package can be checked against a known answer on it: the DDO optimum
p_ref^(1-1/beta) p_data^(1/beta) (Zheng et al. 2025, Theorem 3.3), the DG correction with the optimal
discriminator d* = p_data / (p_data + p_model) turning the model score into the data score (Kim et al. 2023),
the kernel-smoothed critic, and Langevin refinement. Everything is float64 by default; nothing here is trained.

Example::

    data = ring(k=8, radius=2.0, std=0.1)
    x = data.sample(1000, torch.Generator().manual_seed(0))
    data.log_prob(x).mean(), data.score(x, sigma=0.5).shape      # (tensor(...), torch.Size([1000, 2]))
    denoise = data.denoiser()                                   # D(x, sigma, labels): the package's contract
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["GaussianMixture", "ring", "grid", "log_ratio", "log_ratio_grad"]

F64 = torch.float64


def _as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a column [N, 1] (a scalar, or one value per row of x)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.reshape(-1, 1).expand(x.shape[0], 1) if s.numel() > 1 else s.reshape(1, 1).expand(x.shape[0], 1)


class GaussianMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I) in R^d, with exact noised marginals (see the module docstring)."""

    def __init__(self, means, stds, weights=None, dtype=F64):
        self.means = torch.as_tensor(means, dtype=dtype)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=dtype).reshape(-1).expand(k).clone()
        w = torch.ones(k, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype).reshape(-1)
        if w.shape[0] != k or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        if (self.stds <= 0).any():
            raise ValueError("stds must be positive")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _parts(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """log w_k N(x; mu_k, v_k I) per component [N, K], and the variances v_k = s_k^2 + sigma^2 [N, K]."""
        x = x.to(self.means.dtype)
        var = self.stds[None, :] ** 2 + _as_sigma(sigma, x) ** 2                       # [N, K]
        sq = ((x[:, None, :] - self.means[None, :, :]) ** 2).sum(-1)                 # [N, K]
        logn = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.log(self.weights)[None, :] + logn, var

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p_sigma(x), shape [N]."""
        parts, _ = self._parts(x, sigma)
        return torch.logsumexp(parts, dim=1)

    def responsibilities(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Posterior probability of each component given x_sigma = x, shape [N, K]."""
        parts, _ = self._parts(x, sigma)
        return torch.softmax(parts, dim=1)

    def score(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """grad_x log p_sigma(x), shape [N, d]."""
        parts, var = self._parts(x, sigma)
        r = torch.softmax(parts, dim=1)                                                # [N, K]
        x = x.to(self.means.dtype)
        return ((r / var)[:, :, None] * (self.means[None] - x[:, None, :])).sum(1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """EDM's ideal denoiser D(x; sigma) = E[x_0 | x_sigma = x] = x + sigma^2 grad log p_sigma(x)."""
        return x.to(self.means.dtype) + _as_sigma(sigma, x) ** 2 * self.score(x, sigma)

    def denoiser(self) -> Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """The ideal denoiser as the package's model contract ``D(x, sigma, labels)`` (labels ignored)."""
        def D(x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
            return self.denoise(x, sigma).to(x.dtype)
        return D

    def sample(self, n: int, generator: Optional[torch.Generator] = None, sigma=0.0) -> torch.Tensor:
        """n samples of p_sigma, shape [n, d] (component by the weights, then the Gaussian)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        std = torch.sqrt(self.stds[k] ** 2 + torch.as_tensor(sigma, dtype=self.means.dtype) ** 2)
        return self.means[k] + std[:, None] * torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)

    def mode_mass(self, x: torch.Tensor, radius: float = 3.0) -> torch.Tensor:
        """Fraction of the points within ``radius`` standard deviations of some component's mean (on the modes)."""
        d = torch.cdist(x.to(self.means.dtype), self.means) / self.stds[None, :]
        return (d.min(dim=1).values <= radius).to(self.means.dtype).mean()


def ring(k: int = 8, radius: float = 2.0, std: float = 0.1, weights=None) -> GaussianMixture:
    """k equal Gaussians on a circle in 2-D (the classic toy of GAN and guidance papers)."""
    angle = 2 * math.pi * torch.arange(k, dtype=F64) / k
    return GaussianMixture(radius * torch.stack([angle.cos(), angle.sin()], 1), std, weights)


def grid(n: int = 3, spacing: float = 2.0, std: float = 0.1, weights=None) -> GaussianMixture:
    """n x n Gaussians on a square grid centred at the origin in 2-D."""
    c = (torch.arange(n, dtype=F64) - (n - 1) / 2) * spacing
    return GaussianMixture(torch.cartesian_prod(c, c), std, weights)


def log_ratio(p: GaussianMixture, q: GaussianMixture, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
    """log p_sigma(x) - log q_sigma(x): the logit log(d*/(1-d*)) of the optimal discriminator between p and q."""
    return p.log_prob(x, sigma) - q.log_prob(x, sigma)


def log_ratio_grad(p: GaussianMixture, q: GaussianMixture, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
    """grad_x log(p_sigma / q_sigma)(x) = score_p - score_q: DG's correction with the optimal discriminator."""
    return p.score(x, sigma) - q.score(x, sigma)
