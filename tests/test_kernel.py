"""Closed-form IPM kernel guidance (repro.methods.kernel): the critic and its gradient against direct
computations, chunking, the same-distribution limit, and the 2-D toy on exact metrics."""

import math

import pytest
import torch

from repro.methods.kernel import KernelCritic, KernelGuidance, kernel_value, polyharmonic_power
from repro.sampling.edm import edm_sampler
from repro.toys.dg_toy import sample_metrics, toy_banks, toy_pair

F64 = torch.float64
# (kernel, poly_m, dim): Gaussian; polyharmonic r^(2m-n) with 2m - n < 0 (n = 3, 5) and the log form (n = 2, m = 2:
# the thin-plate spline r^2 log r).
CASES = [("gaussian", 1, 3), ("polyharmonic", 1, 3), ("polyharmonic", 1, 5), ("polyharmonic", 2, 2)]


def _banks(dim, n=40, m=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g) * 1.3 + 0.4


def _direct(x, real, fake, kernel, h, m):
    return kernel_value(x, real, kernel, h, m).mean(1) - kernel_value(x, fake, kernel, h, m).mean(1)


def test_polyharmonic_power():
    assert polyharmonic_power(1, 3072) == (-3070.0, False)
    assert polyharmonic_power(2, 2) == (2.0, True)      # thin-plate spline r^2 log r
    assert polyharmonic_power(2, 3) == (1.0, False)


@pytest.mark.parametrize("kernel,m,dim", CASES)
def test_critic_and_gradient_match_autograd_and_finite_difference(kernel, m, dim):
    real, fake = _banks(dim)
    critic = KernelCritic(real, fake, kernel, 0.8, poly_m=m, chunk=16)
    x = torch.randn(6, dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    xa = x.clone().requires_grad_(True)
    direct = _direct(xa, real, fake, kernel, 0.8, m)
    auto, = torch.autograd.grad(direct.sum(), xa)
    assert torch.allclose(critic.value(x), direct.detach(), rtol=1e-10, atol=1e-12)
    g = critic.grad(x)
    assert torch.allclose(g, auto, rtol=1e-9, atol=1e-12)
    assert g.abs().max() > 1e-3                       # not vacuous
    # central finite differences of the critic's own value
    eps = 1e-6
    fd = torch.stack([(critic.value(x + eps * e) - critic.value(x - eps * e)) / (2 * eps)
                      for e in torch.eye(dim, dtype=F64)], 1)
    assert torch.allclose(g, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel,m,dim", CASES)
def test_chunked_equals_unchunked(kernel, m, dim):
    real, fake = _banks(dim, 53, 41)
    x = torch.randn(29, dim, generator=torch.Generator().manual_seed(2))
    whole = KernelCritic(real, fake, kernel, 0.6, poly_m=m, chunk=10_000)
    parts = KernelCritic(real, fake, kernel, 0.6, poly_m=m, chunk=7)
    assert torch.allclose(parts.value(x), whole.value(x), rtol=1e-12, atol=1e-14)
    assert torch.allclose(parts.grad(x), whole.grad(x), rtol=1e-12, atol=1e-14)
    # noised banks too (the polyharmonic noise is drawn per bank sample, not per chunk)
    assert torch.allclose(parts.at_sigma(0.5, 3).grad(x), whole.at_sigma(0.5, 3).grad(x), rtol=1e-12, atol=1e-14)


def test_high_dimension_stays_in_range_and_normalized_keeps_direction():
    """Polyharmonic r^-3070 on CIFAR-sized vectors: the exact gradient underflows, the normalised one does not
    and points the same way as the exact one computed in the log domain on a scaled problem."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(64, 3072, generator=g) * 2 - 1, torch.rand(64, 3072, generator=g) * 2 - 1
    x = torch.rand(5, 3072, generator=g) * 2 - 1
    critic = KernelCritic(real, fake, "polyharmonic", 1.0, chunk=16)
    gn = critic.grad(x, normalize=True)
    assert torch.isfinite(gn).all() and (gn.norm(dim=1) > 0).all()
    m, s = critic.log_value(x)
    assert torch.isfinite(m).all() and (m < -700).all()         # exp(m) is below float64's range
    # with a small bank the nearest sample dominates: the direction is that of grad k(x, nearest)
    near_real = torch.cdist(x.to(F64), critic.real).min(1).values
    near_fake = torch.cdist(x.to(F64), critic.fake).min(1).values
    for i in range(5):
        bank, sign = (critic.real, 1) if near_real[i] < near_fake[i] else (critic.fake, -1)
        y = bank[torch.cdist(x[i:i + 1].to(F64), bank).argmin()]
        expect = -sign * (x[i].to(F64) - y)                     # grad r^p points toward y for p < 0
        cos = torch.nn.functional.cosine_similarity(gn[i], expect, dim=0)
        assert cos > 0.99


def test_gaussian_noised_banks_are_the_expectation_over_the_noise():
    """at_sigma for the Gaussian kernel = E over noised banks (up to the common prefactor), checked by Monte Carlo."""
    real, fake = _banks(2, 20, 20)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    h, sigma, n_mc = 0.5, 0.7, 4000
    exact = KernelCritic(real, fake, "gaussian", h).at_sigma(sigma).value(x)
    g = torch.Generator().manual_seed(6)
    draws = []
    for _ in range(n_mc // 100):
        nr = real.to(F64)[None] + sigma * torch.randn(100, *real.shape, generator=g, dtype=F64)
        nf = fake.to(F64)[None] + sigma * torch.randn(100, *fake.shape, generator=g, dtype=F64)
        draws += [_direct(x, a, b, "gaussian", h, 1) for a, b in zip(nr, nf)]
    draws = torch.stack(draws) / (h ** 2 / (h ** 2 + sigma ** 2))  # the prefactor (h^2 / (h^2 + s^2))^(n/2), n = 2
    se = draws.std(0) / math.sqrt(n_mc)
    assert ((draws.mean(0) - exact).abs() <= 4 * se).all(), (draws.mean(0), exact, se)
    assert (se < 3e-3).all()
    assert exact.abs().max() > 2e-2


@pytest.mark.parametrize("kernel", ["gaussian", "polyharmonic"])
def test_guidance_vanishes_in_expectation_for_banks_of_one_distribution(kernel):
    """Banks both from the data: the mean gradient over 40 bank draws is within 4 standard errors of 0 and far
    below the gradient with banks from the data and the model."""
    data, model = toy_pair()
    x = data.sample(8, torch.Generator().manual_seed(9)) * 1.1
    same, diff = [], []
    for k in range(40):
        a, b = toy_banks(data, data, 200, 200, seed=100 + k)
        same.append(KernelCritic(torch.from_numpy(a), torch.from_numpy(b), kernel, 0.3).grad(x))
        a, b = toy_banks(data, model, 200, 200, seed=100 + k)
        diff.append(KernelCritic(torch.from_numpy(a), torch.from_numpy(b), kernel, 0.3).grad(x))
    same, diff = torch.stack(same), torch.stack(diff)
    se = same.std(0) / math.sqrt(len(same))
    assert (same.mean(0).abs() <= 4 * se + 1e-12).all()
    assert same.mean(0).norm() < 0.25 * diff.mean(0).norm()


@pytest.mark.parametrize("kernel,h,w", [("gaussian", 0.3, 5.0), ("polyharmonic", 0.3, 3.0)])
def test_kernel_guidance_moves_toy_samples_toward_the_data(kernel, h, w):
    """EDM's sampler on the toy model's exact denoiser, with and without kernel guidance from banks of 600 real and
    600 model samples: the NLL under the exact data density and the mode-frequency error both drop."""
    data, model = toy_pair()
    real, fake = toy_banks(data, model, 600, 600, seed=0)
    critic = KernelCritic(torch.from_numpy(real), torch.from_numpy(fake), kernel, h)
    z = torch.randn(600, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    base = sample_metrics(data, edm_sampler(model.denoiser(), z, num_steps=12))
    guidance = KernelGuidance(critic, w=w)
    guided = sample_metrics(data, edm_sampler(model.denoiser(), z, num_steps=12, correction=guidance))
    assert guidance.evaluations == 12                  # first order at every step (window [0, 1], w2 = 0)
    assert guided["nll"] < base["nll"] - 0.05, (base, guided)
    assert guided["mode_tv"] < base["mode_tv"] - 0.02, (base, guided)


def test_zero_weight_is_the_unguided_sampler_and_denoised_mode():
    data, model = toy_pair()
    real, fake = toy_banks(data, model, 100, 100, seed=0)
    critic = KernelCritic(torch.from_numpy(real), torch.from_numpy(fake), "gaussian", 0.3)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    base = edm_sampler(model.denoiser(), z, num_steps=6)
    assert torch.equal(edm_sampler(model.denoiser(), z, num_steps=6, correction=KernelGuidance(critic, w=0.0)), base)
    den = KernelGuidance(critic, w=2.0, where="denoised", denoise=model.denoiser())
    x = edm_sampler(model.denoiser(), z, num_steps=6, correction=den)
    assert den.denoiser_evaluations == den.evaluations == 6 and not torch.equal(x, base)
    with pytest.raises(ValueError, match="denoiser"):
        KernelGuidance(critic, where="denoised")
    with pytest.raises(ValueError, match="kernel must be"):
        KernelCritic(torch.from_numpy(real), torch.from_numpy(fake), "imq", 0.3)


def test_banks_are_subsampled():
    real, fake = _banks(3, 500, 400)
    c = KernelCritic(real, fake, "gaussian", 1.0, max_bank=64, seed=1)
    assert c.real.shape == (64, 3) and c.fake.shape == (64, 3)
    assert torch.equal(c.real, KernelCritic(real, fake, "gaussian", 1.0, max_bank=64, seed=1).real)


def test_normalized_guidance_is_a_unit_rms_direction_at_the_score_scale():
    """normalize=True: delta = w * grad D / rms(grad D) / sigma, whatever the kernel's range (here r^-62)."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(40, 64, generator=g) * 2 - 1, torch.rand(40, 64, generator=g) * 2 - 1
    x = torch.rand(6, 64, generator=g, dtype=F64) * 2 - 1
    critic = KernelCritic(real, fake, "polyharmonic", 1.0)
    sigma = torch.full([6], 0.5, dtype=F64)
    delta = KernelGuidance(critic, w=0.3, normalize=True)(x, sigma, None, 0, 1)
    rms = delta.pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.3 / 0.5), rtol=1e-12)
    direction = critic.at_sigma(0.5, seed=1).grad(x, normalize=True)
    assert torch.allclose(torch.nn.functional.cosine_similarity(delta, direction, dim=1), torch.ones(6, dtype=F64))
