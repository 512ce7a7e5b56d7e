"""Closed-form IPM critic guidance (Srikanth, Asokan et al., arXiv 2306.01654, "GANs settle scores"): the math.

For an IPM whose critics live in the unit ball of a kernel's RKHS, the optimal critic between the data p and the
model q is the kernel smoothing of their difference, D*(x) = int k(x, y) (p(y) - q(y)) dy (research/dg.md c.1;
the derivation is standard, the paper's own equations could not be read). From banks of real samples x_i and
the model's samples y_j it is, in closed form and without training,

    D(x) = 1/N sum_i k(x, x_i) - 1/M sum_j k(x, y_j),     grad D(x) = 1/N sum_i grad k(x, x_i) - 1/M sum_j ...

and guidance adds w grad D to the model's score (:class:`KernelGuidance`, a
:class:`repro.sampling.edm.Correction`): samples climb the kernel-smoothed data density and descend the
kernel-smoothed model density.

Kernels (``k(x, y) = phi(||x - y|| / h)``, bandwidth ``h``):

* ``gaussian``: phi(r) = exp(-r^2 / 2);
* ``polyharmonic``: the radial basis of the authors' closed-form discriminator (their PolyGAN code, read for
  facts only: research/dg.md c.1): phi(r) = r^(2m - n), times log r when n is even and 2m - n >= 0, with n the
  dimension (``poly_n``, 0 = the data's) and m the order (``poly_m``). Here the sign is chosen so that k
  decreases with the distance (k = phi for 2m - n < 0, -phi otherwise), so that D is large near the data as for
  the Gaussian kernel. In image dimensions 2m - n is very negative (m = 1, n = 3072: r^-3070): the critic is
  dominated by the nearest bank samples and its size leaves float64's range. Everything is therefore accumulated
  in the log domain (an online log-sum-exp over bank chunks, as in a streamed softmax) and
  :meth:`KernelCritic.grad` can return the gradient divided by its largest term (``normalize=True``; the
  direction of grad D, its scale set by the guidance weight). ``normalize=False`` gives the exact values.

Bounded memory and time: banks are subsampled to ``max_bank`` each (a seeded choice) and the sums run over chunks
of ``chunk`` bank samples against blocks of ``chunk`` query points, so no [queries x bank x dim] tensor exists
and the largest intermediate is [chunk x chunk].

Where the kernel acts (``where``):

* ``noised`` (the default): at noise level sigma the critic compares x_t with the banks noised to the same
  sigma, i.e. the closed-form critic between p_data^sigma and p_model^sigma, the very marginals whose score the
  model estimates and DG's discriminator separates. Its gradient is taken at x_t itself (no denoiser evaluation,
  no Jacobian), and at large sigma it is smooth, where a critic on clean banks would be compared with a blurry x_t
  it cannot resemble. For the Gaussian kernel the noise is integrated out exactly: E_eps exp(-||x - y - sigma
  eps||^2 / 2h^2) = (h^2 / (h^2 + sigma^2))^(n/2) exp(-||x - y||^2 / 2(h^2 + sigma^2)), the same kernel with
  bandwidth sqrt(h^2 + sigma^2) on the clean banks (the prefactor is common to both banks, so it is dropped).
  For the polyharmonic kernel the banks are noised with a fixed draw per call (seeded by the step), a Monte-Carlo
  estimate of the same thing.
* ``denoised``: the critic on the clean banks, evaluated at the model's denoised estimate x0_hat = D_theta(x_t;
  sigma) (one more network evaluation per guided step), its gradient in x0_hat used as the gradient in x_t (the
  denoiser's Jacobian taken as the identity, as the paper's pixel/latent variants would need it differentiated
  otherwise). Offered for comparison. On the 2-D toy (benchmarks/kernel_dcd_toy.py, output in
  benchmarks/results/kernel_dcd_toy_cpu.txt: banks of 600, 12 Heun steps) with the polyharmonic kernel (n = 2,
  m = 1: -log r) it diverged (exact NLL 21.6 at w = 1, unguided 5.9) where ``noised`` improved it (5.78 at w = 3),
  and with the Gaussian kernel ``noised`` did better at every weight tried: a further reason for the default.

Example::

    critic = KernelCritic(real, fake, kernel="gaussian", bandwidth=0.2)
    critic.value(x), critic.grad(x)                          # D(x) [n], grad D(x) [n, ...]
    guidance = KernelGuidance(critic, w=1.0)
    images = edm_sampler(net, latents, num_steps=18, correction=guidance)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from repro.nets.vpsde import tau_from_sigma

__all__ = ["KERNELS", "WHERE", "polyharmonic_power", "kernel_value", "KernelCritic", "KernelGuidance",
           "median_bandwidth"]

KERNELS = ("polyharmonic", "gaussian")
WHERE = ("noised", "denoised")
F64 = torch.float64


def polyharmonic_power(m: int, n: int) -> tuple[float, bool]:
    """(2m - n, whether phi carries a log r factor): PolyGAN's rule, log r for even n with 2m - n >= 0."""
    p = 2 * m - n
    return float(p), (n % 2 == 0 and p >= 0)


def kernel_value(x: torch.Tensor, y: torch.Tensor, kernel: str, bandwidth: float, m: int = 1,
                 n: int = 0) -> torch.Tensor:
    """k(x_a, y_b) [A, B] computed directly (the reference the tests check the streamed critic against)."""
    r = torch.cdist(x.flatten(1).to(F64), y.flatten(1).to(F64)) / bandwidth
    if kernel == "gaussian":
        return torch.exp(-0.5 * r ** 2)
    p, log = polyharmonic_power(m, n or x[0].numel())
    phi = r ** p * (torch.log(r) if log else 1)
    return phi if p < 0 else -phi


def median_bandwidth(real: torch.Tensor, fake: torch.Tensor, n: int = 512, seed: int = 0) -> float:
    """The median distance between (up to ``n``) real and fake samples: a bandwidth on the data's scale."""
    g = torch.Generator().manual_seed(seed)
    a = real[torch.randperm(len(real), generator=g)[:n]].flatten(1).to(F64)
    b = fake[torch.randperm(len(fake), generator=g)[:n]].flatten(1).to(F64)
    return float(torch.cdist(a, b).median())


class _LogAcc:
    """A running signed sum held as exp(m) * s (m: running max of the log-magnitudes), per query row."""

    def __init__(self, rows: int, shape: tuple, device):
        self.m = torch.full([rows], -math.inf, dtype=F64, device=device)
        self.s = torch.zeros((rows,) + shape, dtype=F64, device=device)

    def _rescale(self, logmag: torch.Tensor) -> torch.Tensor:
        m_new = torch.maximum(self.m, logmag.max(dim=1).values)
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        old = torch.where(torch.isfinite(self.m), torch.exp(self.m - safe), torch.zeros_like(self.m))
        self.s = self.s * old.reshape(-1, *([1] * (self.s.ndim - 1)))
        self.m = m_new
        return torch.exp(logmag - safe[:, None])

    def add(self, logmag: torch.Tensor, sign: torch.Tensor) -> None:
        """Add sum_b sign[a, b] exp(logmag[a, b]) to row a (logmag, sign [A, B])."""
        e = self._rescale(logmag)
        self.s = self.s + (e * sign).sum(1)

    def add_grad(self, logmag: torch.Tensor, sign: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add sum_b sign[a, b] exp(logmag[a, b]) (x_a - y_b) to row a, without an [A, B, dim] tensor."""
        wts = self._rescale(logmag) * sign
        self.s = self.s + x * wts.sum(1, keepdim=True) - wts @ y


class KernelCritic:
    """The closed-form IPM critic D(x) = mean_i k(x, x_i) - mean_j k(x, y_j) of a real and a fake bank.

    ``real`` [N, ...], ``fake`` [M, ...] (any float dtype; kept in float64 on their device); ``kernel`` one of
    :data:`KERNELS`; ``bandwidth`` h (> 0); ``poly_m``, ``poly_n`` the polyharmonic order and dimension (n = 0:
    the data's); ``max_bank``: each bank subsampled to at most this many samples (0 = all; seeded by ``seed``);
    ``chunk``: bank samples and query points per block (memory ~ chunk^2 + chunk x dim numbers).
    ``noise_sigma`` (:meth:`at_sigma`) makes the critic that between the banks noised to that level (see the
    module's ``noised``).
    """

    def __init__(self, real: torch.Tensor, fake: torch.Tensor, kernel: str = "polyharmonic", bandwidth: float = 1.0,
                 *, poly_m: int = 1, poly_n: int = 0, max_bank: int = 0, chunk: int = 1024, seed: int = 0):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}. Fix: use 'polyharmonic' "
                             "(the authors' closed-form discriminator) or 'gaussian'")
        if not (bandwidth > 0 and math.isfinite(bandwidth)):
            raise ValueError(f"bandwidth must be a positive number, got {bandwidth}. Fix: e.g. median_bandwidth()")
        if len(real) < 1 or len(fake) < 1 or real.shape[1:] != fake.shape[1:]:
            raise ValueError(f"real and fake banks must be non-empty with the same sample shape, got "
                             f"{tuple(real.shape)} and {tuple(fake.shape)}. Fix: pass [N, ...] and [M, ...] banks")
        if chunk < 1 or max_bank < 0 or poly_m < 1 or poly_n < 0:
            raise ValueError("chunk and poly_m must be >= 1, max_bank and poly_n >= 0. Fix: e.g. chunk=1024, "
                             "max_bank=0 (all), poly_m=1, poly_n=0 (the data's dimension)")
        g = torch.Generator().manual_seed(seed)

        def sub(bank: torch.Tensor) -> torch.Tensor:
            if max_bank and len(bank) > max_bank:
                bank = bank[torch.randperm(len(bank), generator=g)[:max_bank].to(bank.device)]
            return bank.flatten(1).to(F64)

        self.real, self.fake = sub(real), sub(fake)
        self.shape = tuple(real.shape[1:])
        self.kernel, self.bandwidth, self.chunk = kernel, float(bandwidth), int(chunk)
        self.poly_m, self.poly_n = int(poly_m), int(poly_n) or self.real.shape[1]
        self.power, self.log_r = polyharmonic_power(self.poly_m, self.poly_n)
        self.sigma = 0.0

    def at_sigma(self, sigma: float, seed: int = 0) -> "KernelCritic":
        """This critic between the banks noised to ``sigma`` (Gaussian kernel: exactly, as the wider bandwidth
        sqrt(h^2 + sigma^2); polyharmonic: one noise draw per bank sample from ``seed``, the same however the
        banks are chunked). Returns a shallow copy."""
        c = object.__new__(KernelCritic)
        c.__dict__.update(self.__dict__)
        c.sigma = float(sigma)
        if self.kernel == "polyharmonic" and sigma > 0:
            g = torch.Generator().manual_seed(int(seed))
            c.real = self.real + sigma * torch.randn(self.real.shape, generator=g, dtype=F64).to(self.real.device)
            c.fake = self.fake + sigma * torch.randn(self.fake.shape, generator=g, dtype=F64).to(self.fake.device)
        return c

    # -- the terms of one block -------------------------------------------------------------------------------
    def _h(self) -> float:
        return math.sqrt(self.bandwidth ** 2 + self.sigma ** 2) if self.kernel == "gaussian" else self.bandwidth

    def _terms(self, x: torch.Tensor, y: torch.Tensor, grad: bool):
        """log|phi| [A, B], sign [A, B]; with ``grad`` also log|c| and sign of c with grad_x phi = c (x - y)."""
        h = self._h()
        d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) if x.shape[1] <= 4 else \
            (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)
        if self.kernel == "gaussian":
            logk = -0.5 * d2 / h ** 2
            sign = torch.ones_like(logk)
            if not grad:
                return logk, sign
            return logk, sign, logk - 2 * math.log(h), -sign
        p = self.power
        logr = 0.5 * torch.log(d2.clamp_min(1e-300)) - math.log(h)
        ksign = 1.0 if p < 0 else -1.0
        if self.log_r:
            logk = p * logr + torch.log(logr.abs().clamp_min(1e-300))
            sign = ksign * torch.sign(logr)
        else:
            logk = p * logr
            sign = torch.full_like(logk, ksign)
        if not grad:
            return logk, sign
        # d phi / dr = r^(p-1) (p log r + 1) (log form) or p r^(p-1); grad_x = phi'(r) / (r h) * (x - y) / h ... in
        # units of h: grad_x phi(|x - y| / h) = phi'(r) (x - y) / (r h^2).
        if self.log_r:
            inner = p * logr + 1
            logc = (p - 2) * logr + torch.log(inner.abs().clamp_min(1e-300)) - 2 * math.log(h)
            csign = ksign * torch.sign(inner)
        else:
            logc = (p - 2) * logr + math.log(abs(p)) - 2 * math.log(h) if p != 0 else torch.full_like(logr, -math.inf)
            csign = torch.full_like(logr, ksign * (1.0 if p > 0 else -1.0))
        return logk, sign, logc, csign

    def _stream(self, x: torch.Tensor, grad: bool):
        """Accumulators of D (and grad D) for one block of queries x [A, dim] over both banks."""
        v = _LogAcc(len(x), (), x.device)
        gacc = _LogAcc(len(x), (x.shape[1],), x.device) if grad else None
        for bank, weight in ((self.real, 1 / len(self.real)), (self.fake, -1 / len(self.fake))):
            for lo in range(0, len(bank), self.chunk):
                y = bank[lo:lo + self.chunk]
                t = self._terms(x, y, grad)
                lw, s = math.log(abs(weight)), math.copysign(1.0, weight)
                v.add(t[0] + lw, s * t[1])
                if grad:
                    gacc.add_grad(t[2] + lw, s * t[3], x, y)
        return v, gacc

    def _blocks(self, x: torch.Tensor):
        x = x.flatten(1).to(F64)
        for lo in range(0, len(x), self.chunk):
            yield x[lo:lo + self.chunk]

    def log_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, s) with D(x) = exp(m) * s per sample: the critic without leaving float64's range."""
        ms, ss = [], []
        for xb in self._blocks(x):
            v, _ = self._stream(xb, False)
            ms.append(v.m)
            ss.append(v.s)
        return torch.cat(ms), torch.cat(ss)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) [n] in float64 (may under- or overflow for polyharmonic kernels in high dimension)."""
        m, s = self.log_value(x)
        return s * torch.exp(m)

    def grad(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """grad_x D(x), x's shape, float64; ``normalize``: each sample's gradient divided by its largest term's
        coefficient exp(m) (the same direction, a scale free of the kernel's range)."""
        out = []
        for xb in self._blocks(x):
            _, gacc = self._stream(xb, True)
            out.append(gacc.s if normalize else gacc.s * torch.exp(gacc.m)[:, None])
        return torch.cat(out).reshape(x.shape)


class KernelGuidance:
    """Closed-form kernel guidance as the sampler's correction: delta = w grad_x D(x) inside a time window.

    ``critic``: a :class:`KernelCritic` on the banks; ``where``: ``noised`` (default, argued in the module) or
    ``denoised`` (needs ``denoise(x, sigma, labels)``, the model's denoiser); ``w`` the weight at each step's
    first evaluation, ``w2`` at the Heun correction's; window tau(sigma) in [tau_min, tau_max] (as DG's).
    ``normalize``: use only the direction of grad D, scaled to the size of a score at sigma: g / rms(g) / sigma
    per sample (rms over the sample's dimensions), so that the sampler's step moves by w times a unit-RMS direction
    per unit of sigma, next to the model's own (x - D(x)) / sigma, whose RMS is about 1 along the trajectory: w is
    the guidance's size relative to the model's score. Needed for polyharmonic kernels in image dimensions, whose
    gradient's magnitude leaves float64's range (the critic is evaluated with :meth:`KernelCritic.grad`
    ``normalize=True`` and rescaled). ``w = 0``: returns None (the unguided sampler exactly).
    ``evaluations`` counts critic gradient evaluations (one per call on a batch); ``denoiser_evaluations`` the
    extra network evaluations of ``denoised``.

    Example::

        guidance = KernelGuidance(KernelCritic(real, fake, "gaussian", 0.5), w=1.0)
        x = edm_sampler(net, latents, correction=guidance)
    """

    def __init__(self, critic: KernelCritic, w: float = 1.0, w2: float = 0.0, *, where: str = "noised",
                 tau_min: float = 0.0, tau_max: float = 1.0, normalize: bool = False,
                 denoise: Optional[Callable] = None):
        if where not in WHERE:
            raise ValueError(f"where must be one of {', '.join(WHERE)}, got {where!r}. Fix: use 'noised'")
        if where == "denoised" and denoise is None:
            raise ValueError("where='denoised' needs the model's denoiser. Fix: pass denoise=net, or where='noised'")
        for name, v in (("w", w), ("w2", w2)):
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if not 0 <= tau_min <= tau_max:
            raise ValueError(f"tau_min/tau_max must satisfy 0 <= tau_min <= tau_max, got {tau_min}, {tau_max}")
        self.critic, self.w, self.w2, self.where = critic, float(w), float(w2), where
        self.tau_min, self.tau_max, self.normalize, self.denoise = float(tau_min), float(tau_max), normalize, denoise
        self.evaluations = 0
        self.denoiser_evaluations = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, step: int,
                 order: int) -> torch.Tensor | None:
        w = self.w if order == 1 else self.w2
        if w == 0:
            return None
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).expand(n)
        tau = tau_from_sigma(sigma.to(F64))
        inside = (tau >= self.tau_min) & (tau <= self.tau_max)
        if not bool(inside.any()):
            return None
        s = float(sigma[0])  # the sampler's steps share sigma across the batch (per-sample churn excepted)
        if self.where == "noised":
            critic, at = self.critic.at_sigma(s, seed=2 * step + order), x
        else:
            critic = self.critic
            at = self.denoise(x.to(torch.float32), sigma.to(torch.float32), labels).to(F64)
            self.denoiser_evaluations += 1
        g = critic.grad(at, normalize=self.normalize)
        if self.normalize:
            rms = g.flatten(1).pow(2).mean(1).sqrt()
            g = g / (rms.clamp_min(1e-300) * sigma.to(F64)).reshape(-1, *([1] * (g.ndim - 1)))
            g = torch.where(rms.reshape(-1, *([1] * (g.ndim - 1))) > 0, g, torch.zeros_like(g))
        self.evaluations += 1
        scale = torch.where(inside, torch.full([n], w, dtype=F64, device=x.device),
                            torch.zeros([n], dtype=F64, device=x.device))
        return g.to(F64) * scale.reshape(-1, *([1] * (x.ndim - 1)))
