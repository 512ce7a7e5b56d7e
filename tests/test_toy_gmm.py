"""The toy oracle (repro/toys/gmm.py) against direct computations: density, score, denoiser, sampling."""

import math

import pytest
import torch

from repro.toys.gmm import GaussianMixture, grid, log_ratio, log_ratio_grad, ring

F64 = torch.float64


def test_log_prob_matches_direct_sum_and_integrates_to_one():
    g = GaussianMixture([[0.0, 0.0], [2.0, -1.0]], [0.5, 1.0], [0.3, 0.7])
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma = 0.7
    direct = torch.zeros(50, dtype=F64)
    for w, m, s in zip(g.weights, g.means, g.stds):
        v = s ** 2 + sigma ** 2
        direct += w * torch.exp(-0.5 * ((x - m) ** 2).sum(1) / v) / (2 * math.pi * v)
    assert torch.allclose(g.log_prob(x, sigma), direct.log(), rtol=1e-12)
    # integrates to one on a grid (2-D trapezoid)
    t = torch.linspace(-8, 8, 801, dtype=F64)
    xx = torch.cartesian_prod(t, t)
    mass = g.log_prob(xx, sigma).exp().sum() * (t[1] - t[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 0.3, 5.0])
def test_score_is_the_gradient_of_log_prob(sigma):
    g = ring(k=6, radius=2.0, std=0.2)
    x = (3 * torch.rand(40, 2, generator=torch.Generator().manual_seed(1), dtype=F64) - 1.5).requires_grad_(True)
    auto, = torch.autograd.grad(g.log_prob(x, sigma).sum(), x)
    assert torch.allclose(g.score(x.detach(), sigma), auto, rtol=1e-9, atol=1e-12)


def test_per_row_sigma_and_denoiser_is_tweedie():
    g = grid(n=2, spacing=2.0, std=0.3)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    sig = torch.linspace(0.1, 3.0, 8, dtype=F64)
    per_row = g.denoise(x, sig)
    for i in range(8):
        one = g.denoise(x[i:i + 1], sig[i].item())
        assert torch.allclose(per_row[i], one[0], rtol=1e-12)
    # Tweedie's formula by Monte Carlo: E[x0 | x_sigma] for a point near one mode
    gen = torch.Generator().manual_seed(3)
    x0 = g.sample(400_000, gen)
    s = 0.5
    xs = x0 + s * torch.randn(x0.shape, generator=gen, dtype=F64)
    near = ((xs - torch.tensor([1.0, 1.0], dtype=F64)) ** 2).sum(1) < 0.05 ** 2
    mc = x0[near].mean(0)
    assert torch.allclose(g.denoise(torch.tensor([[1.0, 1.0]], dtype=F64), s)[0], mc, atol=0.03)


def test_sampling_matches_the_moments():
    g = GaussianMixture([[1.0], [-2.0]], [0.5, 0.25], [0.25, 0.75])
    x = g.sample(200_000, torch.Generator().manual_seed(4))
    mean = (g.weights * g.means[:, 0]).sum()
    var = (g.weights * (g.stds ** 2 + g.means[:, 0] ** 2)).sum() - mean ** 2
    assert x.mean().item() == pytest.approx(mean.item(), abs=0.01)
    assert x.var().item() == pytest.approx(var.item(), rel=0.01)
    assert g.mode_mass(x).item() > 0.99
    assert g.mode_mass(torch.tensor([[10.0]], dtype=F64)).item() == 0.0


def test_optimal_discriminator_corrects_the_model_score_to_the_data_score():
    data = ring(k=8, radius=2.0, std=0.1)
    model = ring(k=8, radius=2.2, std=0.2, weights=torch.arange(1, 9, dtype=F64))
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    for sigma in (0.05, 0.5, 2.0):
        corrected = model.score(x, sigma) + log_ratio_grad(data, model, x, sigma)
        assert torch.allclose(corrected, data.score(x, sigma), rtol=1e-10, atol=1e-10)
        d = torch.sigmoid(log_ratio(data, model, x, sigma))  # d* = p/(p+q)
        p, q = data.log_prob(x, sigma).exp(), model.log_prob(x, sigma).exp()
        assert torch.allclose(d, p / (p + q), rtol=1e-9)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture([0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture([[0.0]], 0.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([[0.0], [1.0]], 1.0, [1.0, -1.0])
