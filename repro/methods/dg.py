"""Discriminator Guidance (Kim et al., ICML 2023) and improved DG (Verine et al., 2025): the math and the guidance.

A pretrained diffusion model has score s_theta ~ grad log p_theta^t, not the data's grad log p_data^t. With the
discriminator d*(x, t) = p_data^t / (p_data^t + p_theta^t) between noised data and noised model samples, the
missing term is the gradient of its logit:

    grad log p_data^t = s_theta + grad_x log(d* / (1 - d*))                      (DG, the correction c_theta)

DG trains a noise-conditioned discriminator d_phi with a time-weighted binary cross-entropy and samples with
score <- s_theta + w grad_x log(d_phi / (1 - d_phi)). Improved DG keeps the sampler and changes the training
objective to one that bounds the KL divergence of the refined model (reconstructed here, see
:func:`improved_dg_objective`).

Conventions. DG's discriminators live in VP coordinates (beta_0 = 0.1, beta_1 = 20, the VP-SDE of Song et al.
2021): they take x_vp = alpha(tau) x_0 + s(tau) eps and the VP time tau in [0, 1]. EDM's sampler works with
x = x_0 + sigma eps. The two are the same noising with sigma = s / alpha and x_vp = alpha x. A
"logit function" here is ``logit(x, sigma, labels) -> [N]`` in EDM's convention (:func:`vp_logit` adapts a
VP-native network to it), which is also what :class:`DiscriminatorGuidance` takes. Everything works on any
device; devices and dtypes come from the tensors.

Facts used (research/dg.md a.1, a.2; DG code alsdudrla10/DG @1a152b7, classifier_lib.py and generate.py, read
for facts only): the VP constants, the sigma <-> tau map, the time sampler of training, the log-ratio with d
clipped to [1e-5, 1 - 1e-5], the guidance evaluated at (x_hat, sigma_hat) with weight w (2.0 unconditional
CIFAR-10, 1.0 conditional) inside tau in [0.01, 1.0], the second-order weight w2 (default 0) and the "boosting"
rules. Equation numbers of the DG paper are not given: its body was not readable (research/dg.md a.2).

Example::

    disc = ADMDiscriminator(extractor, head)                 # repro.nets.discriminators
    guidance = DiscriminatorGuidance(vp_logit(disc), w=2.0)  # DG's CIFAR-10 unconditional setting
    images = edm_sampler(net, latents, num_steps=18, correction=guidance)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from repro.nets.vpsde import (BETA_0, BETA_1, alpha_from_sigma, cosine_time, integral_beta, sigma_from_tau,
                              tau_from_sigma, vp_alpha, vp_std)

__all__ = [
    "BETA_0", "BETA_1", "T_MIN", "D_CLIP", "OUTSIDE",
    "integral_beta", "vp_alpha", "vp_std", "sigma_from_tau", "tau_from_sigma", "alpha_from_sigma",
    "tau_density", "sample_tau", "cosine_time", "vp_logit",
    "clipped_log_ratio", "grad_log_ratio",
    "dg_bce_loss", "improved_dg_weight", "improved_dg_objective", "improved_dg_loss",
    "kl_bound_constant", "DiscriminatorGuidance",
]

T_MIN = 1e-5                 # smallest diffusion time of DG's training time sampler
D_CLIP = 1e-5                # DG clips d to [D_CLIP, 1 - D_CLIP] before taking log(d / (1 - d))
OUTSIDE = 1e7                # DG's log-ratio outside the guidance window (it disables boosting there)

LogitFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample [N] tensor as [N, 1, ...] to broadcast over the sample's dimensions."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------
# The VP-SDE pieces DG uses (the sigma <-> tau conversions are in repro.nets.vpsde).


# DG (Kim et al. 2023), training time sampler (classifier_lib.vpsde.get_diffusion_time, importance sampling):
#   p(t) proportional to g(t)^2 / s(t)^2 = beta(t) / (1 - exp(-int beta)) on [t_min, 1]. Its antiderivative is
#   log(exp(int beta) - 1) = log sigma(t)^2, so the normaliser is Z = log sigma(1)^2 - log sigma(t_min)^2.
def tau_density(tau: torch.Tensor, t_min: float = T_MIN, beta_0: float = BETA_0, beta_1: float = BETA_1) -> torch.Tensor:
    """The normalised density of DG's importance-sampled training time on [t_min, 1] (0 outside).

    Example::

        >>> tau_density(torch.tensor([0.5]), t_min=1e-5)  # doctest: +ELLIPSIS
        tensor([...])
    """
    g2 = beta_0 + tau * (beta_1 - beta_0)
    dens = g2 / -torch.expm1(-integral_beta(tau, beta_0, beta_1))
    Z = kl_bound_constant(t_min, beta_0, beta_1)
    return torch.where((tau >= t_min) & (tau <= 1), dens / Z, torch.zeros_like(dens))


def kl_bound_constant(t_min: float = T_MIN, beta_0: float = BETA_0, beta_1: float = BETA_1) -> float:
    """Z = int_{t_min}^1 beta(t) / (1 - exp(-int beta)) dt = log(sigma(1)^2 / sigma(t_min)^2), the normaliser of
    :func:`tau_density` (DG's ``normalizing_constant``)."""
    hi = math.log(math.expm1(beta_0 + 0.5 * (beta_1 - beta_0)))
    lo = math.log(math.expm1(beta_0 * t_min + 0.5 * (beta_1 - beta_0) * t_min ** 2))
    return hi - lo


def sample_tau(n: int, generator: torch.Generator | None = None, t_min: float = T_MIN, importance: bool = True,
               device="cpu", dtype=torch.float32, beta_0: float = BETA_0, beta_1: float = BETA_1) -> torch.Tensor:
    """n diffusion times for discriminator training: DG's importance sampler (``importance=True``: density
    :func:`tau_density`) or uniform on [t_min, 1].

    Importance sampling by inversion: log sigma^2 is uniform on [log sigma(t_min)^2, log sigma(1)^2], i.e. EDM's
    sigma is log-uniform between sigma(t_min) ~ 1e-3 and sigma(1) ~ 152; tau = :func:`tau_from_sigma` of it.
    The uniform draw is made in float64 on the CPU from ``generator`` (the same numbers on every device).

    Example::

        >>> sample_tau(3, torch.Generator().manual_seed(0)).shape
        torch.Size([3])
    """
    if not 0 < t_min < 1:
        raise ValueError(f"t_min must be in (0, 1), got {t_min}. Fix: use DG's 1e-5")
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if importance:
        lo = math.log(math.expm1(beta_0 * t_min + 0.5 * (beta_1 - beta_0) * t_min ** 2))
        log_s2 = lo + u * kl_bound_constant(t_min, beta_0, beta_1)
        tau = tau_from_sigma(torch.exp(0.5 * log_s2), beta_0, beta_1)
    else:
        tau = t_min + u * (1 - t_min)
    return tau.to(device=device, dtype=dtype)


def vp_logit(disc: Callable, time: str = "linear") -> LogitFn:
    """Adapt a VP-native discriminator ``disc(x_vp, tau, labels) -> logit [N]`` (DG's convention) to EDM's
    ``logit(x, sigma, labels)``: x_vp = x / sqrt(1 + sigma^2), tau = tau(sigma) (``time='cosine'``: ADM's
    cosine time, DG's 64x64 path). The conversion is computed in x's dtype.

    Example::

        logit = vp_logit(ADMDiscriminator(extractor, head))
        logit(x, sigma, None)            # [N], the discriminator's log(d / (1 - d)) before clipping
    """
    if time not in ("linear", "cosine"):
        raise ValueError(f"time must be 'linear' or 'cosine', got {time!r}. Fix: 'cosine' only for ADM's 64x64 "
                         "classifier as extractor")

    def logit(x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        tau = tau_from_sigma(sigma)
        if time == "cosine":
            tau = cosine_time(tau)
        return disc(_col(alpha_from_sigma(sigma), x) * x, tau, labels)

    logit.disc = disc  # type: ignore[attr-defined]
    return logit


# ----------------------------------------------------------------------------------------------------------
# The log-ratio and its gradient.


# DG (Kim et al. 2023), classifier_lib.get_log_ratio: log(d / (1 - d)) with d clipped to [c, 1 - c], c = 1e-5.
def clipped_log_ratio(logit: torch.Tensor, d_clip: float = D_CLIP) -> torch.Tensor:
    """log(d / (1 - d)) of d = sigmoid(logit) clipped to [d_clip, 1 - d_clip]; ``d_clip=0``: the logit itself.

    Since log(d / (1 - d)) is increasing in d, this is the logit clamped to +-log((1 - c) / c) (+-11.51 for DG's
    c = 1e-5): the same values as DG's formula, without the rounding of going through sigmoid in float32, and
    the same gradient (1 inside, 0 where clipped).

    Example::

        >>> clipped_log_ratio(torch.tensor([0.5, 40.0]))
        tensor([ 0.5000, 11.5129])
    """
    if not 0 <= d_clip < 0.5:
        raise ValueError(f"d_clip must be in [0, 0.5), got {d_clip}. Fix: use DG's 1e-5, or 0 for no clipping")
    if d_clip == 0:
        return logit
    bound = math.log((1 - d_clip) / d_clip)
    return logit.clamp(-bound, bound)


def grad_log_ratio(logit: LogitFn, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                   d_clip: float = D_CLIP, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x ell, ell) with ell = :func:`clipped_log_ratio` of ``logit(x, sigma, labels)``, per sample.

    The gradient is taken with respect to EDM's x (for a VP-native network through :func:`vp_logit` this is
    alpha times the gradient in x_vp, which is DG's -sigma^2 alpha grad_{x_vp} ell / -sigma^2). Works inside
    ``torch.no_grad()`` (the sampler's context).

    Example::

        g, ell = grad_log_ratio(lambda x, s, y: -(x ** 2).sum(1), torch.ones(4, 2), torch.ones(4))
        # g == -2 x, ell == -2
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        ell = clipped_log_ratio(logit(x, sigma, labels), d_clip)
        g, = torch.autograd.grad(ell.sum(), x, create_graph=create_graph, allow_unused=True)
    g = torch.zeros_like(x) if g is None else g
    return (g, ell) if create_graph else (g.detach(), ell.detach())


# ----------------------------------------------------------------------------------------------------------
# Training objectives.


# DG (Kim et al. 2023), discriminator loss L_phi = int lambda(t) (E_data[-log d] + E_model[-log(1 - d)]) dt, one
# term per noised sample; lambda is realised by the time sampler (importance sampling: weight 1).
def dg_bce_loss(logit: torch.Tensor, real: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample binary cross-entropy of d = sigmoid(logit) against ``real`` (1 = data, 0 = model sample),
    times ``weight`` (lambda(t); None = 1, DG's importance-sampled training). Written on the logit
    (softplus form), so no clipping is needed; DG's ``nn.BCELoss`` on the sigmoid is the same up to its clamp
    of log at -100.

    Example::

        >>> dg_bce_loss(torch.zeros(2), torch.tensor([1.0, 0.0]))
        tensor([0.6931, 0.6931])
    """
    loss = F.binary_cross_entropy_with_logits(logit, real.to(logit.dtype), reduction="none")
    return loss if weight is None else loss * weight


def improved_dg_weight(sigma: torch.Tensor) -> torch.Tensor:
    """w(sigma) = 1 / sigma^2: with DG's importance-sampled time this weighting makes the denoiser-form loss
    the KL bound of the refined model (derivation in :func:`improved_dg_objective`; reconstructed)."""
    return 1 / sigma ** 2


# Verine et al. 2025 (improved DG), L_d^MSE as reconstructed in research/dg.md (b.1) -- the paper's equation was
# not readable: denoising score matching of the refined score s_theta + grad d_phi on data, EDM denoiser form
#   E_{t, x_0, eps} w(sigma) || D_theta(x_t; sigma) + sigma^2 grad_x d_phi(x_t, sigma) - x_0 ||^2.
def improved_dg_objective(D: torch.Tensor, grad_d: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample improved-DG loss from the model's denoised x (``D``), the discriminator's gradient ``grad_d``
    = grad_x d_phi(x_t, sigma) (x in EDM's convention, x_t = x_0 + sigma eps), the clean ``x0`` and ``sigma``
    [N]; mean over the sample's dimensions, times ``weight`` (default :func:`improved_dg_weight`).

    RECONSTRUCTED, not transcribed: the paper (arXiv 2503.16117) says it replaces the cross-entropy by an
    objective that "properly minimizes the KL divergence", with the refined score s_theta + grad d_phi (d_phi
    the logit) and a loss L_d^MSE; its exact form could not be read (research/dg.md b.1). The form here
    follows from DG's own KL bound:

    1. The refined model's KL to the data is bounded by 1/2 int g(t)^2 E_{p_data^t} ||grad log p_data^t -
       (s_theta + grad d_phi)||^2 dt (+ a prior term), DG's E_{theta,phi}.
    2. Denoising score matching replaces the unknown grad log p_data^t by grad_x log p(x_t | x_0) = (x_0 - x_t)
       / sigma^2 (in EDM's coordinates), which changes the objective by a constant independent of phi.
    3. EDM's denoiser D_theta = x_t + sigma^2 s_theta turns sigma^2 (s_theta + grad d_phi - (x_0 - x_t) /
       sigma^2) into D_theta + sigma^2 grad d_phi - x_0; so the score error is that residual / sigma^2.
    4. In VP coordinates g^2 = beta and grad_{x_vp} = grad_x / alpha, so the integrand is beta / alpha^2
       ||score error in x||^2 dt. Drawing t from DG's density beta / (1 - alpha^2) / Z leaves the factor
       (1 - alpha^2) / alpha^2 = sigma^2, i.e. Z sigma^2 ||residual||^2 / sigma^4: weight 1 / sigma^2.

    The minimiser over d_phi at each sigma is grad d_phi = grad log p_data^sigma - s_theta, the DG correction
    (d_phi = log(p_data / p_theta) + c(sigma)). Open (not readable in the paper): its time weighting, whether
    cross-entropy is kept as a regulariser or initialisation, whether fake samples enter (this form needs only
    data and the frozen s_theta), and the guidance weight at sampling.

    Example::

        loss = improved_dg_objective(D, grad_d, x0, sigma)     # [N]
    """
    s = _col(sigma, x0)
    r = (D + s ** 2 * grad_d - x0) ** 2
    w = improved_dg_weight(sigma) if weight is None else weight
    return w * r.flatten(1).mean(1)


def improved_dg_loss(denoise: Callable, logit: LogitFn, x0: torch.Tensor, labels: torch.Tensor | None,
                     sigma: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample :func:`improved_dg_objective` on data ``x0`` noised as x = x0 + sigma eps: the frozen model's
    ``denoise(x, sigma, labels)`` (no gradient) and grad_x of ``logit(x, sigma, labels)`` (with a graph, so that
    the loss can be back-propagated into the discriminator's parameters). No clipping of the logit in training.

    Example::

        loss = improved_dg_loss(net, vp_logit(disc), x0, None, sigma, eps).mean()
        loss.backward()
    """
    x = (x0 + _col(sigma, x0) * eps).detach()
    grad_d, _ = grad_log_ratio(logit, x, sigma, labels, d_clip=0.0, create_graph=True)
    with torch.no_grad():
        D = denoise(x, sigma, labels).to(x0.dtype)
    return improved_dg_objective(D, grad_d, x0, sigma, weight)


# ----------------------------------------------------------------------------------------------------------
# Guided sampling.


# DG (Kim et al. 2023), the DG sampler dx = [f - g^2 (s_theta + w c_phi)] dt + g dw, c_phi = grad log(d/(1-d)),
# evaluated as in DG's generate.py edm_sampler (window, second-order weight, boosting).
class DiscriminatorGuidance:
    """The DG correction as the sampler's :class:`repro.sampling.edm.Correction`: delta = w grad_x log(d / (1 - d)).

    ``logit(x, sigma, labels) -> [N]``: the discriminator's log(d / (1 - d)) in EDM's convention (use
    :func:`vp_logit` for DG's VP-native networks). At the first-order evaluation of each step (at x_hat,
    sigma_hat) the sampler gets ``w`` times the gradient of the clipped log-ratio, at the second-order
    evaluation ``w2`` times it (DG default 0: the discriminator runs once per step). The sampler adds delta to
    the score, which on EDM's ODE is d <- d - sigma delta: DG's ``d_cur += w * (-sigma^2 grad ell) / sigma``.

    Window: the correction is zero unless tau(sigma) is in [tau_min, tau_max] (DG: [0.01, 1.0]; tau_min 0.01
    is sigma ~ 0.045, so DG is off for the last steps). Decided per sample (DG tests ``tau.min()`` of the batch,
    the same thing when the batch shares sigma, as it does without boosting).

    Boosting (DG's conditional CIFAR-10 setting, ``boosting=True``; needs ``num_steps``): the log-ratio of each
    sample's last first-order evaluation is kept (+inf before the first, 1e7 outside the window); at steps
    i % ``boost_period`` == 0 (5) the samples whose log-ratio is < 0 churn with S_churn = ``boost_churn`` (4),
    i.e. gamma = min(4 / num_steps, sqrt(2) - 1), through :meth:`churn`; at steps i % ``boost_weight_period``
    == 0 (2) their first-order guidance is multiplied by ``boost_factor`` (2). Differences from DG's code: the
    boost ignores S_min / S_max (DG's runs use 0 / inf, where they do not matter), and S_noise is the
    sampler's (DG sets 1.0 for boosted samples; its default S_noise is 1 too).

    ``w = 0`` (and ``w2 = 0``): no discriminator evaluation, None returned, no churn: the sampler's operations
    are exactly the unguided ones. ``dtype``: the discriminator is evaluated in it (float32; float64 for exact
    toys). ``evaluations`` counts discriminator forward+backward passes (one per call on a batch).

    Example::

        guidance = DiscriminatorGuidance(vp_logit(disc), w=1.0, boosting=True, num_steps=18)   # DG cond CIFAR-10
        x = edm_sampler(net, latents, labels, num_steps=18, correction=guidance)
    """

    def __init__(self, logit: LogitFn, w: float = 2.0, w2: float = 0.0, *, tau_min: float = 0.01,
                 tau_max: float = 1.0, d_clip: float = D_CLIP, boosting: bool = False, num_steps: int | None = None,
                 boost_churn: float = 4.0, boost_period: int = 5, boost_weight_period: int = 2,
                 boost_factor: float = 2.0, dtype: torch.dtype = torch.float32):
        if not callable(logit):
            raise ValueError("logit must be callable as logit(x, sigma, labels) -> [N]. Fix: wrap a VP-native "
                             "discriminator with vp_logit(disc)")
        for name, v in (("w", w), ("w2", w2), ("boost_churn", boost_churn), ("boost_factor", boost_factor)):
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v}. Fix: DG uses w=2 (uncond), 1 (cond)")
        if not 0 <= tau_min <= tau_max:
            raise ValueError(f"tau_min/tau_max must satisfy 0 <= tau_min <= tau_max, got {tau_min}, {tau_max}. "
                             "Fix: DG uses tau_min=0.01, tau_max=1.0")
        if not 0 <= d_clip < 0.5:
            raise ValueError(f"d_clip must be in [0, 0.5), got {d_clip}. Fix: DG uses 1e-5")
        if boosting and (num_steps is None or int(num_steps) < 1):
            raise ValueError("num_steps: boosting needs the sampler's number of steps (the churn is S_churn / "
                             "num_steps). Fix: pass num_steps=sampler.num_steps")
        if boost_period < 1 or boost_weight_period < 1:
            raise ValueError("boost_period and boost_weight_period must be >= 1. Fix: DG uses 5 and 2")
        self.logit, self.w, self.w2 = logit, float(w), float(w2)
        self.tau_min, self.tau_max, self.d_clip, self.dtype = float(tau_min), float(tau_max), float(d_clip), dtype
        self.boosting, self.num_steps = bool(boosting), num_steps
        self.boost_churn, self.boost_period = float(boost_churn), int(boost_period)
        self.boost_weight_period, self.boost_factor = int(boost_weight_period), float(boost_factor)
        self.log_ratio: torch.Tensor | None = None  # per sample, from the last first-order evaluation
        self.evaluations = 0

    def reset(self) -> None:
        """Forget the per-sample log-ratios (a new batch); the sampler's step 0 does it."""
        self.log_ratio = None

    def in_window(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample bool: tau(sigma) in [tau_min, tau_max]."""
        tau = tau_from_sigma(sigma.to(torch.float64))
        return (tau >= self.tau_min) & (tau <= self.tau_max)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, step: int,
                 order: int) -> torch.Tensor | None:
        if step == 0 and order == 1:
            self.reset()
        w = self.w if order == 1 else self.w2
        if w == 0:
            return None
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).expand(n)
        inside = self.in_window(sigma)
        if not bool(inside.any()):
            if order == 1:
                self.log_ratio = torch.full([n], OUTSIDE, dtype=torch.float64, device=x.device)
            return None
        # 1. ell = log(d / (1 - d)) (clipped) and its gradient in x, at (x_hat, sigma_hat) or (x_next, sigma_next).
        g, ell = grad_log_ratio(self.logit, x.to(self.dtype), sigma.to(self.dtype), labels, self.d_clip)
        self.evaluations += 1
        ell = torch.where(inside, ell.to(torch.float64), torch.full_like(ell, OUTSIDE, dtype=torch.float64))
        scale = torch.where(inside, torch.full([n], w, dtype=torch.float64, device=x.device),
                            torch.zeros([n], dtype=torch.float64, device=x.device))
        # 2. First order: remember ell; boosting doubles the weight of the samples the discriminator calls fake.
        if order == 1:
            self.log_ratio = ell
            if self.boosting and step % self.boost_weight_period == 0:
                scale = torch.where(ell < 0, scale * self.boost_factor, scale)
        # 3. delta = weight * grad ell (the sampler adds it to the score).
        return g.to(torch.float64) * _col(scale, x)

    def churn(self, step: int, gamma: float) -> torch.Tensor | None:
        """Per-sample churn factors at the boosting steps (a tensor exactly when boosting is on, w != 0 and
        step % boost_period == 0, step > 0), else None (the sampler's gamma for everyone)."""
        if step == 0:
            self.reset()
        if not self.boosting or self.w == 0 or step == 0 or step % self.boost_period:
            return None
        if self.log_ratio is None:
            raise RuntimeError("DiscriminatorGuidance.churn: no log-ratio from the previous step; the sampler must "
                               "call the correction at every first-order evaluation")
        boosted = min(self.boost_churn / self.num_steps, math.sqrt(2) - 1)
        lr = self.log_ratio
        return torch.where(lr < 0, torch.full_like(lr, boosted), torch.full_like(lr, float(gamma)))
