"""Sampling options from the config: autoguidance with a guide network, autocast dtype, torch.compile.

Guidance w = 1 must be the unguided sampler bit for bit (the guide is never evaluated); a guide equal to the
main net changes nothing at any w; the guided denoiser is gnet + w (net - gnet). fp32 is the unchanged path;
bf16 runs on CPU through autocast and stays close; fp16 on CPU is refused with a clear error.
"""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from repro.config import ConfigError, load_config
from repro.nets.factory import build_network
from repro.sampling.edm import edm_sampler
from repro.sampling.generate import generate_images, sampling_denoiser, with_precision

SHAPE = (1, 8, 8)


def make_net(seed: int) -> torch.nn.Module:
    """A small conditional DDPM++ with every weight random (EDM zero-inits its output layers)."""
    torch.manual_seed(seed)
    net = build_network(dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


class Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        return self.net(x, sigma, labels)


@pytest.fixture(scope="module")
def nets():
    return make_net(0), make_net(1)


def sampler(**changes):
    return dataclasses.replace(load_config(preset="micro").sampler, **changes)


def images(net, s, **kw):
    return torch.cat([x for _, x, _ in generate_images(net, np.arange(6), img_shape=SHAPE, label_dim=10,
                                                       sampler=s, batch=3, **kw)])


def latents(net, s, **kw):
    """The sampler's float64 output (no uint8 rounding): the decoder hook hands it over unchanged."""
    return torch.cat([x for _, x, _ in generate_images(net, np.arange(6), img_shape=SHAPE, label_dim=10,
                                                       sampler=s, batch=3, decoder=lambda x: x.clone(), **kw)])


def test_guidance_one_is_the_unguided_sampler_bitwise_and_never_runs_the_guide(nets):
    net, gnet = nets
    guide = Counting(gnet)
    plain = latents(net, sampler())
    with_guide = latents(net, sampler(guidance=1.0), guide=guide)
    assert with_guide.dtype == torch.float64 and torch.equal(plain, with_guide)
    assert guide.calls == 0
    assert torch.equal(images(net, sampler()), images(net, sampler(), guide=guide))


def test_a_guide_equal_to_the_net_changes_nothing(nets):
    net, _ = nets
    plain = latents(net, sampler())
    for w in (0.0, 1.1, 2.5):
        assert torch.equal(latents(net, sampler(guidance=w, guide="edm2-img512-xs-0134217-0.165"), guide=net), plain)


def test_guided_denoiser_is_gnet_plus_w_times_net_minus_gnet(nets):
    net, gnet = nets
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.1, 1.0, 5.0, 40.0])
    y = torch.nn.functional.one_hot(torch.tensor([0, 3, 5, 9]), 10).float()
    with torch.no_grad():
        d, g = net(x, sigma, y), gnet(x, sigma, y)
        assert (d - g).abs().mean() > 0.05  # the two nets really differ
        for w in (0.0, 0.5, 1.1, 3.0):
            D = sampling_denoiser(net, sampler(guidance=w, guide="edm2-img512-xs-0134217-0.165"), guide=gnet)
            torch.testing.assert_close(D(x, sigma, y), g + w * (d - g), rtol=1e-5, atol=1e-5)
    # ... and the sampler integrates exactly that denoiser
    w = 1.7
    s = sampler(guidance=w, guide="edm2-img512-xs-0134217-0.165")
    guided = latents(net, s, guide=gnet)
    by_hand = latents(lambda x, sig, lab: torch.lerp(gnet(x, sig, lab), net(x, sig, lab), w), sampler())
    assert torch.equal(guided, by_hand)
    assert (guided - latents(net, sampler())).abs().max() > 1e-2


def test_guidance_without_a_guide_is_refused(nets):
    with pytest.raises(ConfigError, match="sampler.guide"):
        load_config(preset="micro", overrides=["sampler.guidance=1.5"])
    with pytest.raises(ValueError, match="sampler.guidance"):
        images(nets[0], sampler(guidance=1.5, guide="edm2-img512-xs-0134217-0.165"))
    with pytest.raises(ConfigError, match="sampler.guide"):
        load_config(preset="micro", overrides=["sampler.guide=no-such-net"])


def test_fp32_is_the_unchanged_path(nets):
    net, _ = nets
    assert with_precision(net, "fp32") is net
    z = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    direct = edm_sampler(net, z, None, num_steps=5)
    via_config = edm_sampler(sampling_denoiser(net, sampler(dtype="fp32")), z, None, num_steps=5)
    assert torch.equal(direct, via_config)


def test_bf16_on_cpu_runs_under_autocast_and_stays_close(nets):
    net, _ = nets
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.05, 0.5, 5.0, 50.0])
    with torch.no_grad():
        ref = net(x, sigma, None)
        out = with_precision(net, "bf16")(x, sigma, None)
    assert out.dtype == torch.float32
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 2e-2  # bf16 keeps 8 bits of mantissa: visibly different, but close
    a, b = images(net, sampler()), images(net, sampler(dtype="bf16"))
    assert (a.int() - b.int()).abs().float().mean() < 2.0  # uint8 levels


def test_fp16_on_cpu_is_refused_with_the_field_and_the_fix(nets):
    with pytest.raises(ValueError, match=r"sampler.dtype.*CPU.*Fix: set sampler.dtype: fp32"):
        images(nets[0], sampler(dtype="fp16"))


def test_compile_on_cpu_is_ignored_with_a_log_line(nets, caplog):
    net, _ = nets
    with caplog.at_level(logging.INFO, logger="repro.sampling.generate"):
        compiled = latents(net, sampler(compile=True))
    assert "sampler.compile ignored" in caplog.text
    assert torch.equal(compiled, latents(net, sampler()))
