"""The DDO objective (Zheng et al. 2025) as pure functions of tensors: the GAN loss of the implicit discriminator
sig(beta (log p_theta - log p_ref)), its diffusion instantiation (ELBO surrogate) and its autoregressive one
(exact log-likelihood of VAR token maps).
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
    real, fake = ddo_terms(r_real, r_fake, alpha, beta)
    return real + fake


def ddo_terms(r_real: torch.Tensor, r_fake: torch.Tensor, alpha: float | torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of Eq. 13 per pair: (-log sig(beta r_real), -alpha log(1 - sig(beta r_fake))).

    ``alpha`` may be a per-pair tensor (AR DDO weights the unconditional rows' fake term 0).
    """
    return -F.logsigmoid(beta * r_real), -alpha * F.logsigmoid(-beta * r_fake)


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


# Zheng et al. 2025 (DDO), Eq. 13 with the exact AR log-likelihood (Eq. 1) and the VAR recipe (research/ddo.md 1.4):
# the pair's rows whose label is dropped to the unconditional class keep only the real term (fake weight 0: that
# branch is trained toward the data, as maximum likelihood does), and the loss is divided by max(alpha, 1).
def ar_ddo_objective(r_real: torch.Tensor, r_fake: torch.Tensor, uncond: torch.Tensor, alpha: float,
                     beta: float) -> torch.Tensor:
    """Per-pair AR DDO loss from exact log-ratios r = log p_theta - log p_ref; ``uncond`` [N] bool marks the pairs
    scored under the unconditional class."""
    w_fake = torch.where(uncond, 0.0, float(alpha)).to(r_fake.dtype)
    real, fake = ddo_terms(r_real, r_fake, w_fake, beta)
    return (real + fake) / max(alpha, 1.0)


def ar_ddo_loss(net, ref, quantizer, tokens_real: torch.Tensor, y_real: torch.Tensor, tokens_fake: torch.Tensor,
                y_fake: torch.Tensor, uncond: torch.Tensor, *, alpha: float, beta: float) -> tuple[torch.Tensor, dict]:
    """The AR DDO loss of a batch of pairs (real_i, fake_i) of token maps [N, L]; returns (mean loss, diagnostics).

    ``uncond`` [N] bool: label dropout, drawn by the caller (``VAR.drop_labels``): those pairs are scored under the
    unconditional class. Real and fake go through theta as one batch of 2N (as the paper's VAR trainer does); the
    reference runs without gradient. Fakes are the reference's samples, decoded and re-encoded by the tokenizer.
    """
    from repro.nets.var import logp

    null = torch.full_like(y_real, getattr(net, "module", net).num_classes)  # (DDP wraps theta)
    labels = torch.cat((torch.where(uncond, null, y_real), torch.where(uncond, null, y_fake)))
    tokens = torch.cat((tokens_real, tokens_fake))
    n = tokens_real.shape[0]
    lp = logp(net, quantizer, tokens, labels)
    with torch.no_grad():
        lp_ref = logp(ref, quantizer, tokens, labels)
    r = lp - lp_ref
    r_real, r_fake = r[:n], r[n:]
    loss = ar_ddo_objective(r_real, r_fake, uncond, alpha, beta)
    cond = ~uncond
    stats = {
        "r_real": r_real.detach().mean().item(),
        "r_fake": r_fake.detach()[cond].mean().item() if cond.any() else 0.0,
        "margin": (r_real.detach()[cond].mean() - r_fake.detach()[cond].mean()).item() if cond.any() else 0.0,
        "uncond_fraction": uncond.float().mean().item(),
    }
    return loss.mean(), stats


@torch.no_grad()
def ar_fakes(ref, tokenizer, labels: torch.Tensor, seeds) -> torch.Tensor:
    """AR DDO's fakes: token maps sampled from the reference (the guidance-free conditional model, no sampling
    tricks; one seed per row), decoded to pixels and re-encoded by the tokenizer (the "pixel-encoded space" the
    author found better, research/ddo.md 1.4); shape [N, L]."""
    from repro.sampling.var import sample_tokens

    tokens = sample_tokens(ref, tokenizer.quantize, labels, cfg=1.0, cfg_mode="guidance-free-at-1", seeds=seeds)
    return tokenizer.encode(tokenizer.decode(tokens))
