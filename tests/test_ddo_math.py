"""DDO on toys with known answers (Zheng et al. 2025, Theorems 3.1/3.3 and Eq. 10), and the diffusion loss."""

import math

import numpy as np
import pytest
import torch

from repro.methods.ddo.loss import ddo_diffusion_loss, ddo_objective, diffusion_logp
from repro.methods.losses import edm_weight
from repro.nets.factory import build_network

F64 = torch.float64


def gauss_logp(x, m, log_s):
    s = torch.exp(log_s)
    return -0.5 * ((x - m) / s) ** 2 - log_s - 0.5 * math.log(2 * math.pi)


def target_gaussian(m_r, s_r, m_d, s_d, beta):
    """p_ref^(1-1/beta) p_data^(1/beta), normalised, is Gaussian: precision and mean in closed form."""
    a, b = 1 - 1 / beta, 1 / beta
    lam = a / s_r**2 + b / s_d**2
    mean = (a * m_r / s_r**2 + b * m_d / s_d**2) / lam
    return mean, lam ** -0.5


def alpha_for(m_r, s_r, m_d, s_d, beta):
    """The alpha that makes p* = alpha^(-1/beta) p_ref^(1-1/beta) p_data^(1/beta) normalised (Theorem 3.3)."""
    x = np.linspace(-12, 12, 200_001)
    pr = np.exp(-0.5 * ((x - m_r) / s_r) ** 2) / (s_r * math.sqrt(2 * math.pi))
    pd = np.exp(-0.5 * ((x - m_d) / s_d) ** 2) / (s_d * math.sqrt(2 * math.pi))
    z = np.trapezoid(pr ** (1 - 1 / beta) * pd ** (1 / beta), x)
    return z ** beta


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_ddo_converges_to_theorem_optimum_on_gaussians(beta):
    m_r, s_r, m_d, s_d = 0.0, 1.0, 1.0, 0.6
    alpha = alpha_for(m_r, s_r, m_d, s_d, beta)
    if beta == 1.0:
        assert alpha == pytest.approx(1.0, abs=1e-6)  # beta = 1: alpha = 1 and the optimum is p_data
    rng = np.random.default_rng(0)
    x_data = torch.tensor(rng.normal(m_d, s_d, 400_000))
    x_ref = torch.tensor(rng.normal(m_r, s_r, 400_000))
    theta = torch.tensor([m_r, math.log(s_r)], dtype=F64, requires_grad=True)  # theta starts from the reference
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    ref_d, ref_r = gauss_logp(x_data, m_r, torch.tensor(math.log(s_r), dtype=F64)), gauss_logp(x_ref, m_r, torch.tensor(math.log(s_r), dtype=F64))

    def closure():
        opt.zero_grad()
        r_real = gauss_logp(x_data, theta[0], theta[1]) - ref_d
        r_fake = gauss_logp(x_ref, theta[0], theta[1]) - ref_r
        loss = (-torch.nn.functional.logsigmoid(beta * r_real)).mean() + \
            alpha * (-torch.nn.functional.logsigmoid(-beta * r_fake)).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    # The package's ddo_objective must give the same optimum: check its value/gradient agree with the above.
    r_real = gauss_logp(x_data, theta[0], theta[1]) - ref_d
    r_fake = gauss_logp(x_ref, theta[0], theta[1]) - ref_r
    lhs = ddo_objective(r_real, r_fake, alpha, beta).mean()
    rhs = (-torch.nn.functional.logsigmoid(beta * r_real)).mean() + \
        alpha * (-torch.nn.functional.logsigmoid(-beta * r_fake)).mean()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)
    m_star, s_star = target_gaussian(m_r, s_r, m_d, s_d, beta)
    # Tolerance: Monte-Carlo error of 400k samples (importance weights p_data/p_ref stay bounded here).
    assert theta[0].item() == pytest.approx(m_star, abs=0.02)
    assert math.exp(theta[1].item()) == pytest.approx(s_star, abs=0.02)


def _optimise(alpha, beta, x_data, x_ref, m_r, s_r):
    theta = torch.tensor([m_r, math.log(s_r)], dtype=F64, requires_grad=True)
    lr_ = torch.tensor(math.log(s_r), dtype=F64)
    ref_d, ref_r = gauss_logp(x_data, m_r, lr_), gauss_logp(x_ref, m_r, lr_)
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ddo_objective(gauss_logp(x_data, theta[0], theta[1]) - ref_d,
                             gauss_logp(x_ref, theta[0], theta[1]) - ref_r, alpha, beta).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return theta[0].item(), math.exp(theta[1].item())


def test_ddo_objective_optimum_with_package_function():
    """Same as above, optimising ddo_objective itself (beta = 0.5 overshoots the data: sharper than p_data)."""
    m_r, s_r, m_d, s_d, beta = 0.0, 1.0, 1.0, 0.6, 0.5
    rng = np.random.default_rng(1)
    x_data, x_ref = torch.tensor(rng.normal(m_d, s_d, 400_000)), torch.tensor(rng.normal(m_r, s_r, 400_000))
    m, s = _optimise(alpha_for(m_r, s_r, m_d, s_d, beta), beta, x_data, x_ref, m_r, s_r)
    m_star, s_star = target_gaussian(m_r, s_r, m_d, s_d, beta)
    assert m == pytest.approx(m_star, abs=0.02) and s == pytest.approx(s_star, abs=0.02)
    assert s < s_d  # beta < 1 goes past p_data, away from p_ref


def _expected_grad(m_d, s_d, m_r=0.0, s_r=1.0, alpha=1.0, beta=1.0):
    """Exact expectation (quadrature) of the DDO gradient at theta = ref, w.r.t. (mean, log std)."""
    x = torch.linspace(-12, 12, 48_001, dtype=F64)
    dx = x[1] - x[0]
    w_d = torch.exp(gauss_logp(x, m_d, torch.tensor(math.log(s_d), dtype=F64))) * dx
    w_r = torch.exp(gauss_logp(x, m_r, torch.tensor(math.log(s_r), dtype=F64))) * dx
    theta = torch.tensor([m_r, math.log(s_r)], dtype=F64, requires_grad=True)
    ref = gauss_logp(x, m_r, torch.tensor(math.log(s_r), dtype=F64))
    r = gauss_logp(x, theta[0], theta[1]) - ref
    l_real = -torch.nn.functional.logsigmoid(beta * r)
    l_fake = ddo_objective(torch.zeros_like(r), r, alpha, beta) - ddo_objective(torch.zeros_like(r),
                                                                                torch.zeros_like(r), 0.0, beta)
    loss = (w_d * l_real).sum() + (w_r * l_fake).sum()
    (g,) = torch.autograd.grad(loss, theta)
    return g


def test_expected_gradient_zero_when_reference_equals_data():
    # Eq. 10: grad L = int (1 - d)(p_theta - p_data) grad log p_theta = 0 at p_theta = p_ref = p_data.
    g_same = _expected_grad(m_d=0.0, s_d=1.0)
    g_diff = _expected_grad(m_d=0.5, s_d=0.7)
    assert g_same.abs().max().item() < 1e-8
    assert g_diff.abs().max().item() > 0.1


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    arch = dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    net = build_network(arch).to(torch.float32)
    ref = build_network(arch).to(torch.float32)
    ref.load_state_dict(net.state_dict())
    return net, ref.requires_grad_(False)


def _pairs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand([n, 1, 8, 8], generator=g, dtype=torch.float32) * 2 - 1
    y = torch.nn.functional.one_hot(torch.randint(10, [n], generator=g), 10).float()
    sigma = torch.exp(torch.randn([n, 1, 1, 1], generator=g) * 1.2 - 1.2).float()
    eps = torch.randn([n, 1, 8, 8], generator=g, dtype=torch.float32)
    return x, y, sigma, eps


def test_diffusion_logp_is_weighted_squared_error_summed_over_pixels(tiny_net):
    net, _ = tiny_net
    x, y, sigma, eps = _pairs()
    with torch.no_grad():
        D = net(x + sigma * eps, sigma.flatten(), y)
        manual = -((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (D - x) ** 2).sum(dim=(1, 2, 3))
        got = diffusion_logp(net, x, y, sigma, eps, 0.5)
    assert torch.allclose(got, manual, rtol=1e-6)
    assert torch.allclose(edm_weight(torch.tensor(1.0), 0.5), torch.tensor(1.25 / 0.25))


def test_diffusion_ddo_loss_at_theta_equal_ref(tiny_net):
    net, ref = tiny_net
    x, y, sigma, eps = _pairs()
    x_fake, _, _, _ = _pairs(seed=1)
    alpha, beta = 1.0, 0.2
    # theta = ref: every log-ratio is exactly 0 (shared noise), so the loss is (1 + alpha) log 2.
    loss, stats = ddo_diffusion_loss(net, ref, x, y, x_fake, y, sigma, eps, alpha=alpha, beta=beta, sigma_data=0.5)
    assert loss.item() == pytest.approx((1 + alpha) * math.log(2), abs=1e-6)
    assert stats["r_real"] == 0.0 and stats["r_fake"] == 0.0
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())  # the reference runs without gradient
    g_diff = sum(p.grad.abs().sum() for p in net.parameters())
    assert g_diff > 0
    # Fake pair identical to the real pair (same image, label, noise): the two gradient terms cancel exactly.
    net.zero_grad()
    loss, _ = ddo_diffusion_loss(net, ref, x, y, x.clone(), y, sigma, eps, alpha=1.0, beta=beta, sigma_data=0.5)
    loss.backward()
    g_same = sum(p.grad.abs().sum() for p in net.parameters())
    assert g_same < 1e-6 * g_diff
