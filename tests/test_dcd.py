"""Discriminator Contrastive Divergence (repro.methods.dcd): the WGAN-GP loss, Langevin refinement with zero step,
with the true log-density ratio (pixel and latent space: recovers the data exactly), and with a trained critic."""

import pytest
import torch

from repro.methods.dcd import (CriticTrainConfig, MLPCritic, critic_grad, gradient_penalty, langevin,
                               latent_langevin, train_critic, wgan_gp_loss)
from repro.toys.dg_toy import sample_metrics, toy_banks
from repro.toys.gmm import log_ratio, ring

F64 = torch.float64


def test_wgan_gp_loss_on_a_linear_critic():
    """D(x) = a.x: the penalty is (|a| - 1)^2 exactly, the Wasserstein term a.(mean real - mean fake)."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(32, 3, generator=g, dtype=F64), torch.randn(32, 3, generator=g, dtype=F64) + 1
    for a in (torch.tensor([0.6, 0.8, 0.0], dtype=F64), torch.tensor([2.0, 0.0, 0.0], dtype=F64)):
        critic = lambda x, a=a: x @ a  # noqa: E731
        gp = gradient_penalty(critic, real, fake, g)
        assert torch.allclose(gp, torch.full_like(gp, (a.norm().item() - 1) ** 2), atol=1e-12)
        loss, parts = wgan_gp_loss(critic, real, fake, 10.0, g)
        w = (real.mean(0) - fake.mean(0)) @ a
        assert parts["wasserstein"] == pytest.approx(w.item(), abs=1e-12)
        assert loss.item() == pytest.approx(-w.item() + 10 * (a.norm().item() - 1) ** 2, abs=1e-10)


def test_zero_step_leaves_samples_unchanged():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    critic = MLPCritic(2, width=8, depth=1).double()
    for kw in ({"steps": 5, "step_size": 0.0}, {"steps": 0, "step_size": 0.1}):
        out = langevin(x, critic_grad(critic), noise=1.0, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(out, x)
    moved = langevin(x, critic_grad(critic), steps=1, step_size=1e-2, noise=0.0)
    assert not torch.equal(moved, x)                    # a non-zero step does move them
    with pytest.raises(ValueError, match="step_size"):
        langevin(x, critic_grad(critic), steps=1, step_size=-1.0)


def test_langevin_with_the_true_log_ratio_recovers_the_data():
    """Pixel space: critic = log p_data - log p_model, prior = the model's exact score; the chain targets
    p_model exp(D) = p_data. From model samples (NLL under p_data ~3.8), 150 steps reach the NLL of exact data
    samples within 0.1 nats, and the mode mass of the data."""
    data, model = ring(8, 2.0, 0.1), ring(8, 2.1, 0.2)
    g = torch.Generator().manual_seed(0)
    x0, exact = model.sample(400, g), data.sample(400, g)
    target, start = sample_metrics(data, exact), sample_metrics(data, x0)
    x = langevin(x0, critic_grad(lambda x: log_ratio(data, model, x)), steps=150, step_size=2e-3,
                 prior=model.score, generator=g)
    got = sample_metrics(data, x)
    assert start["nll"] > target["nll"] + 2
    assert abs(got["nll"] - target["nll"]) < 0.1, (got, target)
    assert got["mode_mass"] > 0.97 and start["mode_mass"] < 0.7


def test_latent_langevin_with_the_true_log_ratio_recovers_the_data():
    """Latent space: G(z) = A z + b (so p_g is Gaussian), data Gaussian; critic = log p_data - log p_g exactly.
    The chain on z with the Gaussian prior makes G(z_K) ~ p_data: mean and covariance match the data's."""
    A, b = torch.tensor([[1.0, 0.3], [0.0, 0.7]], dtype=F64), torch.tensor([0.5, -0.5], dtype=F64)
    p_g = torch.distributions.MultivariateNormal(b, A @ A.T)
    mu, cov = torch.tensor([-0.5, 0.8], dtype=F64), torch.tensor([[0.5, -0.1], [-0.1, 0.3]], dtype=F64)
    p_d = torch.distributions.MultivariateNormal(mu, cov)
    G = lambda z: z @ A.T + b  # noqa: E731
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 2, generator=g, dtype=F64)
    x = latent_langevin(z, G, lambda x: p_d.log_prob(x) - p_g.log_prob(x), steps=600, step_size=0.02, generator=g)
    assert (G(z).mean(0) - mu).norm() > 1.0              # the generator alone is far off
    assert (x.mean(0) - mu).norm() < 0.04
    assert (torch.cov(x.T) - cov).abs().max() < 0.03


def test_a_trained_critic_moves_toy_samples_toward_the_data():
    """A WGAN-GP critic trained on 1000 real (ring of radius 2) vs 1000 model samples (radius 2.5): 20 DCD steps
    along its gradient lower the exact NLL under the data by over a nat and raise the mass near the data's modes."""
    data, model = ring(8, 2.0, 0.1), ring(8, 2.5, 0.15)
    real, fake = toy_banks(data, model, 1000, 1000, 0)
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    torch.manual_seed(0)
    critic = MLPCritic(2, width=64, depth=2)
    train_critic(critic, real, fake, CriticTrainConfig(steps=400, batch=64, lr=2e-3))
    with torch.no_grad():
        assert critic(real).mean() - critic(fake).mean() > 0.2   # it tells them apart
    x0 = fake[:400].double()
    x = langevin(x0, critic_grad(critic.double()), steps=20, step_size=2e-2, noise=0.0)
    before, after = sample_metrics(data, x0), sample_metrics(data, x)
    assert after["nll"] < before["nll"] - 1.0, (before, after)
    assert after["mode_mass"] > before["mode_mass"] + 0.05
