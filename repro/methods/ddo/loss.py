"""The DDO objective (Zheng et al. 2025) as pure functions of tensors: the GAN loss of the implicit discriminator
sig(beta (log p_theta - log p_ref)) and its diffusion instantiation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repro.methods.losses import Denoiser, edm_weight


# Zheng et al. 2025 (DDO), Eq. 13: L = -E_data log sig(beta r) - alpha E_ref log(1 - sig(beta r)).
def ddo_objective(r_real: torch.Tensor, r_fake: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Per-pair DDO loss from the log-ratios r = log p_theta - log p_ref on a real and a fake sample.

    -log(1 - sigmoid(z)) is written as -logsigmoid(-z); no clamping.
    """
    return -F.logsigmoid(beta * r_real) - alpha * F.logsigmoid(-beta * r_fake)


# Zheng et al. 2025 (DDO), Eqs. 14-16 with EDM's weighting (Appendix C/D):
#   log p(x) ~ -sum_{C,H,W} lambda(sigma) ||D(x + sigma eps; sigma) - x||^2, one (sigma, eps) per pair.
def diffusion_logp(denoise: Denoiser, x: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
                   eps: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """ELBO surrogate of log p(x) up to a constant shared by theta and the reference; shape [N]."""
    D = denoise(x + eps * sigma, sigma.flatten(), labels)
    return -(edm_weight(sigma, sigma_data) * (D - x) ** 2).flatten(1).sum(1)


def ddo_diffusion_loss(net: Denoiser, ref: Denoiser, x_real: torch.Tensor, y_real: torch.Tensor | None,
                       x_fake: torch.Tensor, y_fake: torch.Tensor | None, sigma: torch.Tensor, eps: torch.Tensor,
                       *, alpha: float, beta: float, sigma_data: float,
                       net_fake: Denoiser | None = None) -> tuple[torch.Tensor, dict]:
    """The diffusion DDO loss of a batch of pairs (real_i, fake_i); returns (mean loss, diagnostics).

    The same (sigma_i, eps_i) is used for real_i and fake_i and for theta and the reference (common random
    numbers). The reference runs without gradient. Call it in fp32 with dropout disabled.

    ``net_fake``: theta as called on the fakes (default ``net``). The paper's code, as a third party transcribes
    Appendix D (research/ddo.md 1.3), runs theta's fake pass in eval mode; with dropout off that only matters for
    EDM2, whose train-mode forward rewrites its weights in place (forced weight normalisation), which a second
    train-mode pass before the backward pass must not do.
    """
    # 1. log-likelihood surrogates under theta (with gradient) and the reference (without).
    logp_real = diffusion_logp(net, x_real, y_real, sigma, eps, sigma_data)
    logp_fake = diffusion_logp(net_fake or net, x_fake, y_fake, sigma, eps, sigma_data)
    with torch.no_grad():
        ref_real = diffusion_logp(ref, x_real, y_real, sigma, eps, sigma_data)
        ref_fake = diffusion_logp(ref, x_fake, y_fake, sigma, eps, sigma_data)
    # 2. log-ratios r = log p_theta - log p_ref, and the GAN loss of the implicit discriminator sig(beta r).
    r_real, r_fake = logp_real - ref_real, logp_fake - ref_fake
    loss = ddo_objective(r_real, r_fake, alpha, beta)
    stats = {
        "r_real": r_real.detach().mean().item(),
        "r_fake": r_fake.detach().mean().item(),
        "margin": (r_real - r_fake).detach().mean().item(),  # what the official VAR trainer logs
        "d_real": torch.sigmoid(beta * r_real.detach()).mean().item(),
        "d_fake": torch.sigmoid(beta * r_fake.detach()).mean().item(),
    }
    return loss.mean(), stats
