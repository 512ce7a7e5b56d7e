"""EDM sampler: the schedule against its formula, per-seed determinism, and a Gaussian toy with a known answer."""

import math

import numpy as np
import pytest
import torch

from repro.config import load_config
from repro.nets.factory import build_network
from repro.sampling.edm import edm_sampler, sigma_steps
from repro.sampling.generate import SeedStack, from_uint8, generate_images, to_uint8


def test_sigma_schedule_matches_formula():
    N, smin, smax, rho = 18, 0.002, 80.0, 7.0
    t = sigma_steps(N, smin, smax, rho)
    assert t.dtype == torch.float64 and len(t) == N + 1 and t[-1] == 0
    for i in range(N):
        expected = (smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert t[i].item() == pytest.approx(expected, rel=1e-12)
    assert t[0].item() == pytest.approx(smax) and t[N - 1].item() == pytest.approx(smin)
    assert torch.all(t[:-1] > t[1:])


def test_heun_on_gaussian_data_converges_at_second_order():
    """For data N(0, s^2 I) the ideal denoiser is D(x; sigma) = x s^2 / (s^2 + sigma^2), and the probability-flow
    ODE maps sigma_max * z to s * z * sigma_max / sqrt(s^2 + sigma_max^2). Heun's method must converge to it at
    second order in the number of steps (18 steps are still ~5% off on this toy; 100 steps are within 0.2%)."""
    s = 0.5
    denoise = lambda x, sigma, labels: x * s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    z = torch.randn([64, 1, 4, 4], generator=torch.Generator().manual_seed(0))
    exact = z.double() * s * 80 / math.sqrt(s**2 + 80**2)
    err = {n: ((edm_sampler(denoise, z, num_steps=n) - exact).abs().max() / exact.abs().max()).item()
           for n in (40, 100)}
    assert err[100] < 2e-3
    assert 4 < err[40] / err[100] < 9  # (100 / 40)^2 = 6.25 for a second-order method


def test_nfe_is_two_steps_minus_one():
    calls = []

    def denoise(x, sigma, labels):
        calls.append(1)
        return x * 0

    edm_sampler(denoise, torch.randn(2, 1, 2, 2), num_steps=18)
    assert len(calls) == 35


def test_churn_noise_comes_from_the_per_seed_generators():
    denoise = lambda x, sigma, labels: x * 0.25 / (0.25 + sigma.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = edm_sampler(denoise, z, num_steps=6, S_churn=10, randn_like=SeedStack([1, 2, 3]).randn_like)
    b = edm_sampler(denoise, z, num_steps=6, S_churn=10, randn_like=SeedStack([1, 2, 3]).randn_like)
    c = edm_sampler(denoise, z, num_steps=6, S_churn=0)
    d = edm_sampler(denoise, z, num_steps=6, S_churn=10, randn_like=SeedStack([1, 2, 4]).randn_like)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(a[:2], d[:2]) and not torch.allclose(a[2], d[2])  # only seed 3 -> 4 changed


def test_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(from_uint8(x)), x)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network(dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)).eval()


def _generate(net, seeds, batch, sampler):
    out = [(s, x, y) for s, x, y in generate_images(net, seeds, img_shape=(1, 8, 8), label_dim=10, sampler=sampler,
                                                     batch=batch)]
    return (np.concatenate([s for s, _, _ in out]), torch.cat([x for _, x, _ in out]),
            torch.cat([y for _, _, y in out]))


def test_image_i_depends_only_on_seed_i(net):
    sampler = load_config(preset="micro").sampler
    seeds = np.arange(100, 111)
    s8, x8, y8 = _generate(net, seeds, 8, sampler)
    s3, x3, y3 = _generate(net, seeds, 3, sampler)
    assert np.array_equal(s8, seeds) and np.array_equal(s3, seeds)
    assert torch.equal(y8, y3)  # per-seed random labels
    # uint8 images: identical up to a rounding flip where batched float math differs in the last bits
    assert (x8.int() - x3.int()).abs().max() <= 1
    assert (x8 != x3).float().mean() < 0.01
    # a subset of the seeds gives the same images as in the full run
    s_sub, x_sub, _ = _generate(net, seeds[5:7], 2, sampler)
    assert (x_sub.int() - x8[5:7].int()).abs().max() <= 1
    # other seeds give other images
    _, x_other, _ = _generate(net, seeds + 1000, 8, sampler)
    assert (x_other.int() - x8.int()).abs().float().mean() > 5


def test_explicit_labels_are_used(net):
    sampler = load_config(preset="micro").sampler
    labels = np.array([3, 3, 7])
    _, _, y = _generate_with_labels(net, [1, 2, 3], labels, sampler)
    assert y.tolist() == [3, 3, 7]


def _generate_with_labels(net, seeds, labels, sampler):
    out = list(generate_images(net, seeds, img_shape=(1, 8, 8), label_dim=10, sampler=sampler, labels=labels,
                               batch=2))
    return (np.concatenate([s for s, _, _ in out]), torch.cat([x for _, x, _ in out]),
            torch.cat([y for _, _, y in out]))


def _reference_heun(denoise, latents, num_steps, S_churn=0.0, randn_like=torch.randn_like):
    """Algorithm 2 written out once more, independently, for the bit-identity check of the hooked sampler."""
    t = sigma_steps(num_steps, 0.002, 80.0, 7.0)
    x = latents.to(torch.float64) * t[0]
    n = latents.shape[0]
    for i in range(num_steps):
        g = min(S_churn / num_steps, 2 ** 0.5 - 1)
        th = t[i] + g * t[i]
        xh = x + (th ** 2 - t[i] ** 2).sqrt() * randn_like(x) if g > 0 else x
        d = (xh - denoise(xh.float(), th.float().expand(n), None).double()) / th
        x = xh + (t[i + 1] - th) * d
        if i < num_steps - 1:
            d2 = (x - denoise(x.float(), t[i + 1].float().expand(n), None).double()) / t[i + 1]
            x = xh + (t[i + 1] - th) * (0.5 * d + 0.5 * d2)
    return x


def test_unguided_and_zero_correction_are_bit_identical_to_algorithm_2():
    denoise = lambda x, s, y: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for churn in (0.0, 5.0):
        ref = _reference_heun(denoise, z, 6, churn, SeedStack([1, 2, 3]).randn_like)
        out = edm_sampler(denoise, z, num_steps=6, S_churn=churn, randn_like=SeedStack([1, 2, 3]).randn_like)
        zero = edm_sampler(denoise, z, num_steps=6, S_churn=churn, randn_like=SeedStack([1, 2, 3]).randn_like,
                           correction=lambda x, s, y, i, o: torch.zeros_like(x))
        assert torch.equal(out, ref) and torch.equal(zero, ref)


def test_correction_adds_to_the_score_exactly():
    """Data N(0, s_d^2): model score of N(0, s_m^2) + the exact log-ratio gradient = data score; the corrected
    sampler lands where the sampler with the exact data denoiser does."""
    s_d, s_m = 0.5, 1.0
    data = lambda x, s, y: x * s_d ** 2 / (s_d ** 2 + s.view(-1, 1) ** 2)  # noqa: E731  (ideal denoisers)
    model = lambda x, s, y: x * s_m ** 2 / (s_m ** 2 + s.view(-1, 1) ** 2)  # noqa: E731

    def delta(x, s, y, i, order):  # grad log N(0, s_d^2 + s^2) - grad log N(0, s_m^2 + s^2)
        v = s.view(-1, 1).double() ** 2
        return -x / (s_d ** 2 + v) + x / (s_m ** 2 + v)

    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    want = edm_sampler(data, z, num_steps=12)
    got = edm_sampler(model, z, num_steps=12, correction=delta)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(edm_sampler(model, z, num_steps=12), want, atol=1e-2)


def test_per_sample_churn_from_the_correction():
    class Boost:
        def __call__(self, x, s, y, i, o):
            return None

        def churn(self, i, gamma):  # sample 0 churns at even steps; depends on the step only
            return torch.tensor([0.2, 0.0, 0.0]) if i % 2 == 0 else None

    denoise = lambda x, s, y: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    plain = edm_sampler(denoise, z, num_steps=6, randn_like=SeedStack([1, 2, 3]).randn_like)
    boosted = edm_sampler(denoise, z, num_steps=6, randn_like=SeedStack([1, 2, 3]).randn_like, correction=Boost())
    assert torch.equal(boosted[1:], plain[1:])  # gamma 0: the noise is drawn but not added
    assert not torch.allclose(boosted[0], plain[0])
