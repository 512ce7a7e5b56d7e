"""Losses as pure functions of tensors: the EDM denoising loss and the DDO objective.

The random draws (sigma, noise) are arguments, made by :func:`draw_sigma_noise` from an explicit generator,
so that a resumed run draws exactly what an uninterrupted one would, and so that the DDO pair shares them.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def draw_sigma_noise(shape, P_mean: float, P_std: float, generator: torch.Generator | None = None,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """sigma ~ LogNormal(P_mean, P_std) per sample ([N,1,1,1]) and eps ~ N(0, I) of the image shape."""
    n = shape[0]
    rnd = torch.randn([n, 1, 1, 1], generator=generator, device=device)
    sigma = (rnd * P_std + P_mean).exp()
    eps = torch.randn(shape, generator=generator, device=device)
    return sigma, eps


# Karras et al. 2022 (EDM), Eq. 8 / Table 1: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.
def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


# Karras et al. 2022 (EDM), Eq. 2/8: E_{sigma, y, n} lambda(sigma) ||D(y + n; sigma) - y||^2.
def edm_loss(denoise: Denoiser, y: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
             eps: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Per-sample EDM loss (sum over pixels divided by their number, i.e. the per-pixel mean), shape [N]."""
    D = denoise(y + eps * sigma, sigma.flatten(), labels)
    return (edm_weight(sigma, sigma_data) * (D - y) ** 2).flatten(1).mean(1)




# Tian et al. 2024 (VAR), Eq. 6: the next-scale model's likelihood; its training loss is the mean cross-entropy per
# token, with label dropout to the unconditional class (which keeps classifier-free guidance possible).
def ar_mle_loss(net, quantizer, tokens: torch.Tensor, labels: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Mean next-scale cross-entropy per token of token maps [N, L]; the ``uncond`` rows are scored under the
    unconditional class (``net.num_classes``). ``net`` may be DDP-wrapped."""
    from repro.nets.var import token_logp

    null = torch.full_like(labels, getattr(net, "module", net).num_classes)
    return -token_logp(net, quantizer, tokens, torch.where(uncond, null, labels)).mean()
