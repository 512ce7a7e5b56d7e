"""Tests for repro.nets.edm2 (EDM2 magnitude-preserving U-Net + EDM preconditioning).

How the reference numbers below were established
-----------------------------------------------
The upstream implementation (NVlabs/edm2, commit 4bf8162, training/networks_edm2.py
with torch_utils/ and dnnlib/ from the same commit) was placed in a scratch
directory OUTSIDE this repository (/tmp) and its ``Precond`` class was built
with the same keyword arguments as our architecture dicts (minus ``precond``):
the paper-size presets on the meta device, the tiny configs on CPU.  From it we
recorded: parameter counts, the number of state_dict entries, and a SHA-256
digest of the sorted ``"key:[shape]"`` lines (see :func:`_listing_digest`).
For every preset our state_dict also has the same key order.  Numerically, our
tiny nets loaded upstream's state_dicts with ``strict=True`` and matched its
outputs to <= 6e-7 (random weights, cond/uncond, eval and train mode incl.
forced weight normalisation, logvar head; gradients to ~3e-6 relative).  The
golden values in ``GOLDEN`` are upstream's outputs for the deterministic weights
of :func:`_fill_deterministic` and the inputs of :func:`_golden_inputs`.  No
upstream code lives in this repository.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_meta, listing_digest

from repro.nets.edm2 import PRESETS, Block, MPConv, MPFourier, Precond, mp_cat, mp_silu, mp_sum
from repro.nets.factory import arch_presets, build_network
from repro.nets.layers import count_parameters, disable_dropout

torch.set_num_threads(2)

TINY = dict(precond="edm2", img_resolution=8, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], channels_per_head=8)
TINY_UNCOND = dict(TINY, label_dim=0)


def _fill_deterministic(net):
    """RNG-free, non-trivial weights and buffers (the same recipe was applied to upstream)."""
    with torch.no_grad():
        for j, (key, t) in enumerate(sorted(net.state_dict(keep_vars=True).items())):
            v = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.731 + j)
            if key.endswith("freqs"):
                v = v * 3.0
            elif key.endswith("phases"):
                v = (v + 1) * math.pi
            elif t.ndim == 0:  # learned scalar gains: keep them away from their zero init
                v = 1.0 + 0.5 * v
            t.copy_(v.reshape(t.shape).to(t.dtype))
    return net


def _tiny(arch=TINY, seed=0):
    torch.manual_seed(seed)
    return build_network(arch)


def _set_gains(net, value):
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(value)
    return net


# ---------------------------------------------------------------------------
# Paper-size configs: parameter counts and full state_dict listing vs upstream.
# ---------------------------------------------------------------------------

# preset -> (#params, #state_dict entries, sha256 of sorted "key:[shape]"), all from upstream Precond.
UPSTREAM_LISTINGS = {
    "img64-s": (280_209_381, 203, "22b3276a02028fe23a17cabb20613129b788ae803db8191c21ba31f6d90cceb7"),
    "img512-xs": (124_713_253, 203, "b47957c7494da6774b24b7115cfda5d1bd3851a31c89508298753abe2ba33a36"),
    "img512-l": (777_498_085, 203, "4891bfcfca6fb9747c21d74e5232a3d00fa5ccd7f15af55d9b8943a14f2c37c6"),
    "img64-xs": (124_710_949, 203, "e7faf26fe3680d1f58915009af6201014d159f8c17f5ad1902c3c5407f543dfc"),
    "img64-m": (497_803_173, 203, "de5ca5fc34391cfbcea63e1559bf509822837a3fd6614f84fafa1e20caeeb845"),
    "img64-l": (777_492_325, 203, "896e6753e1d5514e8f22c931d153898611b9269b76453323df2f1f24b2c025b1"),
    "img64-xl": (1_119_276_837, 203, "8feb53834fdb03bffa583a4175fcacde1967476f674851dd024e57b30f686823"),
    "img512-xxs": (31_309_029, 203, "5742f6ef370e392dcec7029ebac3ad762f4f8903e2933924d237d9e31c476216"),
    "img512-s": (280_212_837, 203, "1f1a89e6f6d492c3352ad63c404965e2186b758c182b8a71617b03aee3fb639b"),
    "img512-m": (497_807_781, 203, "adccee75d171c2b2ab2032d330396fd9ec7a7d4825324032e13f2adef04dcb63"),
    "img512-xl": (1_119_283_749, 203, "cd4a58456b8de0e5e42e369eb2b68ed49355a4778fc7a02decba32da839bb09c"),
    "img512-xxl": (1_523_164_773, 203, "238ce9d65700c3862522aa8a4eb473a4771efbf9a06b08571675b05d30b2183f"),
    "img512-xs-uncond": (124_201_253, 202, "e0e4d933900262a9eaf4a441838ec76095762980d311ae0445de54921ae6c4e5"),
    "img512-s-uncond": (279_444_837, 202, "24b58d08064b27d4a76188d24c5a5b17419ca5cc2c0176b4ee82a24bb21ce185"),
}


def test_every_preset_has_an_upstream_listing():
    assert set(PRESETS) == set(UPSTREAM_LISTINGS)


@pytest.mark.parametrize("name", sorted(UPSTREAM_LISTINGS))
def test_param_count_and_state_dict_listing_match_upstream(name):
    n_params, n_keys, digest = UPSTREAM_LISTINGS[name]
    net = build_meta(PRESETS[name])
    sd = net.state_dict()
    assert count_parameters(net) == n_params
    assert len(sd) == n_keys
    assert listing_digest(sd) == digest


def test_paper_sizes_round_to_published_counts():
    # DDO README / model card: edm2-img64-s-ddo 280M, edm2-img512-l-ddo 777M.
    assert round(count_parameters(build_meta(PRESETS["img64-s"])) / 1e6) == 280
    assert round(count_parameters(build_meta(PRESETS["img512-l"])) / 1e6) == 777
    # The XS autoguidance net (edm2-img512-xs-0134217-0.165.pkl): 124,713,253 ~ 125M.
    assert round(count_parameters(build_meta(PRESETS["img512-xs"])) / 1e6) == 125


def test_paper_size_representative_keys():
    sd = build_meta(PRESETS["img64-s"]).state_dict()
    expected = {
        "unet.out_gain": [],
        "unet.emb_fourier.freqs": [192],
        "unet.emb_fourier.phases": [192],
        "unet.emb_noise.weight": [768, 192],
        "unet.emb_label.weight": [768, 1000],
        "unet.enc.64x64_conv.weight": [192, 4, 3, 3],
        "unet.enc.64x64_block0.emb_gain": [],
        "unet.enc.32x32_down.conv_res0.weight": [192, 192, 3, 3],
        "unet.enc.32x32_block0.conv_skip.weight": [384, 192, 1, 1],
        "unet.enc.16x16_block0.attn_qkv.weight": [1728, 576, 1, 1],
        "unet.enc.8x8_block2.attn_proj.weight": [768, 768, 1, 1],
        "unet.dec.8x8_in0.attn_qkv.weight": [2304, 768, 1, 1],
        "unet.dec.8x8_block0.conv_res0.weight": [768, 1536, 3, 3],
        "unet.dec.8x8_block3.conv_skip.weight": [768, 1344, 1, 1],
        "unet.dec.16x16_up.emb_linear.weight": [768, 768],
        "unet.dec.64x64_block3.conv_res0.weight": [192, 384, 3, 3],
        "unet.out_conv.weight": [3, 192, 3, 3],
        "logvar_fourier.freqs": [128],
        "logvar_linear.weight": [1, 128],
    }
    for key, shape in expected.items():
        assert list(sd[key].shape) == shape, key
    absent = ["unet.enc.32x32_block0.attn_qkv.weight", "unet.dec.8x8_in1.attn_qkv.weight",
              "unet.enc.64x64_block0.conv_skip.weight", "unet.enc.64x64_conv.bias", "unet.emb_noise.bias"]
    for key in absent:
        assert key not in sd, key
    big = build_meta(PRESETS["img512-l"]).state_dict()
    assert list(big["unet.enc.64x64_conv.weight"].shape) == [320, 5, 3, 3]  # 4 latent channels + ones
    assert list(big["unet.out_conv.weight"].shape) == [4, 320, 3, 3]
    assert list(big["unet.dec.8x8_in0.attn_qkv.weight"].shape) == [3840, 1280, 1, 1]
    assert "unet.emb_label.weight" not in build_meta(PRESETS["img512-xs-uncond"]).state_dict()


# ---------------------------------------------------------------------------
# Tiny config: listing vs upstream and explicit keys.
# ---------------------------------------------------------------------------

def test_tiny_state_dict_listing_matches_upstream():
    net = _tiny()
    sd = net.state_dict()
    assert count_parameters(net) == 181_691
    assert len(sd) == 63
    assert listing_digest(sd) == "8c04a1e4e573ea487f765c30f718dadb15b6cd76b97127d4d7d1a8e32d2e9d11"
    un = _tiny(TINY_UNCOND)
    assert count_parameters(un) == 181_371
    assert len(un.state_dict()) == 62
    assert listing_digest(un.state_dict()) == "f2f91a603d9d23658167046aa336ae840d6a3b3e039fde7dd1cab440981de5e3"


def test_tiny_state_dict_representative_keys():
    sd = _tiny().state_dict()
    expected = {
        "unet.emb_label.weight": [32, 10],
        "unet.enc.8x8_conv.weight": [16, 4, 3, 3],
        "unet.enc.4x4_block0.attn_qkv.weight": [96, 32, 1, 1],
        "unet.enc.4x4_block0.conv_skip.weight": [32, 16, 1, 1],
        "unet.dec.4x4_block0.conv_res0.weight": [32, 64, 3, 3],  # decoder conv_res0 sees the concatenation
        "unet.dec.4x4_block1.conv_skip.weight": [32, 48, 1, 1],
        "unet.dec.8x8_block0.conv_res0.weight": [16, 48, 3, 3],
        "unet.dec.8x8_up.emb_gain": [],
    }
    for key, shape in expected.items():
        assert list(sd[key].shape) == shape, key
    assert "unet.enc.8x8_block0.conv_skip.weight" not in sd
    assert "unet.dec.4x4_in1.attn_qkv.weight" not in sd
    # Heads of `channels_per_head` channels: with the default 64 the 32-channel tiny net has no attention.
    no_attn = build_network(dict(TINY, channels_per_head=64)).state_dict()
    assert not any("attn" in k for k in no_attn)
    assert _tiny().unet.enc["4x4_block0"].num_heads == 4


# ---------------------------------------------------------------------------
# Golden outputs recorded from upstream with deterministic weights/inputs.
# ---------------------------------------------------------------------------

GOLDEN = {
    "cond": dict(
        F_sum=-0.2085784524679184, F_abs_sum=49.036773681640625, F_abs_sum_nolabel=48.72634506225586,
        F_row_1_0_2=[0.06897987425327301, 0.08486881852149963, 0.07774625718593597, 0.05374433472752571,
                     0.03006749227643013, 0.008581914938986301, -0.002790888538584113, -0.03575720638036728],
        F_row_2_2_5=[0.039410803467035294, 0.010862002149224281, -0.0014842654345557094, -0.019332842901349068,
                     -0.03949372097849846, -0.048821210861206055, -0.026625990867614746, -0.001220959471538663],
        D_sum=5.512188911437988,
        D_row_0_1_4=[-1.2091727256774902, -1.4259464740753174, -1.4536546468734741, -1.284529209136963,
                     -0.9405880570411682, -0.469142884016037, 0.06643331795930862, 0.5940418839454651],
        logvar=[-0.11513371020555496, 0.05143298953771591, 0.13999147713184357],
    ),
    "uncond": dict(
        F_sum=-0.022904034703969955, F_abs_sum=18.890657424926758,
        F_row_1_0_2=[0.04090050607919693, 0.05935801938176155, 0.05771077796816826, 0.043528877198696136,
                     0.026521826162934303, 0.007623409852385521, -0.004791022278368473, -0.015711355954408646],
        F_row_2_2_5=[-0.0010914797894656658, -0.010552287101745605, -0.004945462569594383, -0.013367035426199436,
                     -0.025829847902059555, -0.03218971565365791, -0.025627119466662407, -0.020027311518788338],
        D_sum=5.7682013511657715,
        D_row_0_1_4=[-1.2161329984664917, -1.4396600723266602, -1.4682133197784424, -1.297667384147644,
                     -0.9510794281959534, -0.47572770714759827, 0.06477620452642441, 0.594699501991272],
        logvar=[-0.11513371020555496, 0.05143298953771591, 0.13999147713184357],
    ),
}


def _golden_inputs(n=3):
    x = (torch.sin(torch.arange(n * 3 * 64, dtype=torch.float64) * 0.37) * 1.5).float().reshape(n, 3, 8, 8)
    sigma = torch.tensor([0.05, 0.5, 2.0])
    labels = torch.eye(10)[[3, 7, 0]]
    return x, sigma, labels


@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_outputs_match_upstream_golden_values(kind):
    arch = TINY if kind == "cond" else TINY_UNCOND
    net = _fill_deterministic(build_network(arch)).eval()
    x, sigma, labels = _golden_inputs()
    labels = labels if kind == "cond" else None
    g = GOLDEN[kind]
    s = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        F_x = net.unet(x / (0.25 + s**2).sqrt(), sigma.log() / 4, labels)
        D_x, logvar = net(x, sigma, labels, return_logvar=True)
    atol = 2e-6
    assert F_x.sum().item() == pytest.approx(g["F_sum"], abs=1e-4)
    assert F_x.abs().sum().item() == pytest.approx(g["F_abs_sum"], rel=1e-5)
    torch.testing.assert_close(F_x[1, 0, 2], torch.tensor(g["F_row_1_0_2"]), atol=atol, rtol=0)
    torch.testing.assert_close(F_x[2, 2, 5], torch.tensor(g["F_row_2_2_5"]), atol=atol, rtol=0)
    assert D_x.sum().item() == pytest.approx(g["D_sum"], abs=1e-4)
    torch.testing.assert_close(D_x[0, 1, 4], torch.tensor(g["D_row_0_1_4"]), atol=atol, rtol=0)
    torch.testing.assert_close(logvar.flatten(), torch.tensor(g["logvar"]), atol=atol, rtol=0)
    if kind == "cond":
        with torch.no_grad():
            F_nolabel = net.unet(x / (0.25 + s**2).sqrt(), sigma.log() / 4, torch.zeros(3, 10))
        assert F_nolabel.abs().sum().item() == pytest.approx(g["F_abs_sum_nolabel"], rel=1e-5)


# ---------------------------------------------------------------------------
# Magnitude-preserving primitives and layers.
# ---------------------------------------------------------------------------

def test_mp_primitive_formulas():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(mp_silu(x), F.silu(x) / 0.596)
    a, b = torch.randn(2, 6, 3), torch.randn(2, 2, 3)
    torch.testing.assert_close(mp_sum(a, a * 3, t=0.0), a)
    torch.testing.assert_close(mp_sum(a, a * 3, t=0.3), (0.7 * a + 0.9 * a) / math.sqrt(0.49 + 0.09))
    # mp_cat: s = sqrt((Na + Nb) / ((1-t)^2 + t^2)); a * s (1-t) / sqrt(Na), b * s t / sqrt(Nb).
    s = math.sqrt(8 / (0.8**2 + 0.2**2))
    expected = torch.cat([a * (s * 0.8 / math.sqrt(6)), b * (s * 0.2 / math.sqrt(2))], dim=1)
    torch.testing.assert_close(mp_cat(a, b, dim=1, t=0.2), expected)


def test_mp_primitives_preserve_unit_magnitude():
    torch.manual_seed(0)
    z = torch.randn(200_000)
    assert mp_silu(z).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
    assert mp_sum(z, torch.randn(200_000), t=0.3).std().item() == pytest.approx(1.0, abs=0.01)
    cat = mp_cat(torch.randn(4000, 48), torch.randn(4000, 16), t=0.5)
    assert cat.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
    # Both halves of the concatenation carry equal total energy at t = 0.5.
    assert cat[:, :48].pow(2).sum().item() == pytest.approx(cat[:, 48:].pow(2).sum().item(), rel=0.05)
    four = MPFourier(512)(torch.randn(2000))
    assert four.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize(
    "cin,cout,kw",
    [
        (64, 64, dict(flavor="enc")),
        (64, 96, dict(flavor="enc", attention=True)),
        (64, 64, dict(flavor="enc", resample_mode="down")),
        (64, 64, dict(flavor="dec", resample_mode="up")),
        (64, 32, dict(flavor="dec", attention=True)),
    ],
)
def test_mp_block_keeps_unit_magnitude_at_init(cin, cout, kw):
    # Random weights at init (N(0,1) raw weights, zero emb_gain), unit-variance inputs:
    # the block output RMS must stay within 15% of 1 (measured 0.90-0.999; attention
    # blocks sit near 0.91).  Plain SiLU or an unnormalised sum would give ~0.6-0.8.
    torch.manual_seed(1)
    blk = Block(cin, cout, emb_channels=128, channels_per_head=16, **kw).eval()
    x = torch.randn(8, cin, 16, 16)
    emb = torch.randn(8, 128)
    with torch.no_grad():
        y = blk(x, emb)
    rms = y.pow(2).mean().sqrt().item()
    assert 0.85 < rms < 1.15, rms


def test_mpconv_uses_normalised_weights():
    torch.manual_seed(2)
    conv = MPConv(16, 8, kernel=[3, 3]).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        conv.weight.mul_(100.0)  # keep the eps=1e-4 in (eps + rms) negligible
        y0 = conv(x)
        conv.weight.mul_(7.5)
        y1 = conv(x)
        conv.weight[3].mul_(20.0)  # per-output-filter normalisation
        y2 = conv(x)
        # Effective weight: unit-RMS filter divided by sqrt(fan_in), times the gain.
        rms = conv.effective_weight(gain=2.0).pow(2).mean(dim=(1, 2, 3)).sqrt()
        conv.weight.mul_(1e-7)  # far below unit RMS the eps=1e-4 of the normalisation shows
        y3 = conv(x)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, y0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y3, y0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(rms, torch.full((8,), 2.0 / math.sqrt(16 * 9)), atol=1e-5, rtol=1e-4)
    lin = MPConv(12, 5, kernel=[]).eval()
    z = torch.randn(3, 12)
    with torch.no_grad():
        lin.weight.mul_(100.0)
        ref = lin(z, gain=0.5)
        lin.weight.mul_(3.0)
    torch.testing.assert_close(lin(z, gain=0.5), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, z @ lin.effective_weight(0.5).t())


def test_forced_weight_normalisation_in_training_mode():
    torch.manual_seed(3)
    conv = MPConv(16, 8, kernel=[3, 3])
    with torch.no_grad():
        conv.weight.mul_(5.0)
    x = torch.randn(2, 16, 8, 8)
    conv.eval()
    with torch.no_grad():
        conv(x)
    assert conv.weight.pow(2).mean(dim=(1, 2, 3)).sqrt().min().item() > 4.0  # eval: stored weight untouched
    conv.train()
    y = conv(x)
    row_rms = conv.weight.detach().pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(row_rms, torch.ones(8), atol=1e-3, rtol=0)
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_whole_net_is_invariant_to_raw_weight_scale():
    # Raw weights start at RMS ~1e3 so that the eps=1e-4 in (eps + rms) is negligible.
    net = _set_gains(_tiny(seed=4), 0.8).eval()
    mpconvs = [m for m in net.modules() if isinstance(m, MPConv)]
    x, sigma, labels = _golden_inputs()
    with torch.no_grad():
        for m in mpconvs:
            m.weight.mul_(1e3)
        ref = net.unet(x, sigma.log() / 4, labels)
        for j, m in enumerate(mpconvs):
            m.weight.mul_(0.5 + j)
        out = net.unet(x, sigma.log() / 4, labels)
    assert ref.abs().mean() > 1e-2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# Preconditioning formulas (EDM Table 1 / EDM2 Precond) with a recording stub.
# ---------------------------------------------------------------------------

class _RecordingUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, class_labels):
        self.calls.append((x.clone(), c_noise.clone(), None if class_labels is None else class_labels.clone()))
        return torch.tanh(x) * 0.5 + 0.25  # a known, non-trivial F


def test_preconditioning_coefficients_match_edm2_definitions():
    net = _tiny()
    net.unet = _RecordingUNet()
    torch.manual_seed(5)
    x = torch.randn(4, 3, 8, 8) * 3
    sigma = torch.tensor([0.002, 0.3, 1.7, 80.0])
    labels = torch.eye(10)[[1, 2, 3, 4]]
    D = net(x, sigma, labels)
    x_in, c_noise, lab = net.unet.calls[-1]
    s = sigma.double().reshape(-1, 1, 1, 1)
    sd = 0.5
    c_in = 1 / torch.sqrt(sd**2 + s**2)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / torch.sqrt(s**2 + sd**2)
    torch.testing.assert_close(x_in.double(), c_in * x.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c_noise.double(), torch.log(sigma.double()) / 4, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lab, labels)
    F_ref = torch.tanh(x_in.double()) * 0.5 + 0.25
    torch.testing.assert_close(D.double(), c_skip * x.double() + c_out * F_ref, atol=1e-5, rtol=1e-5)
    assert D.dtype == torch.float32
    # sigma_data is honoured.
    net.sigma_data = 1.3
    net(x, sigma[:1], labels)
    x_in2, _, _ = net.unet.calls[-1]
    torch.testing.assert_close(x_in2, x / math.sqrt(1.3**2 + 0.002**2), atol=1e-6, rtol=1e-6)


def test_logvar_head_uses_c_noise():
    net = _tiny()
    sigma = torch.tensor([0.1, 1.0, 10.0])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        D, logvar = net(x, sigma, None, return_logvar=True)
        expected = net.logvar_linear(net.logvar_fourier(sigma.log() / 4)).reshape(-1, 1, 1, 1)
    assert logvar.shape == (3, 1, 1, 1)
    torch.testing.assert_close(logvar, expected)
    torch.testing.assert_close(D, net(x, sigma, None))


# ---------------------------------------------------------------------------
# Tiny forward passes on CPU.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [TINY, TINY_UNCOND], ids=["cond", "uncond"])
def test_tiny_forward_per_sample_sigma_and_determinism(arch):
    net = _set_gains(_tiny(arch, seed=6), 0.7).eval()
    torch.manual_seed(7)
    x = torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    labels = torch.eye(10)[[0, 3, 3, 9]] if arch["label_dim"] else None
    with torch.no_grad():
        d1 = net.denoise(x, sigma, labels)
        d2 = net.denoise(x, sigma, labels)
        d_col = net(x, sigma.reshape(4, 1, 1, 1), labels)
        d_single = net(x[1:2], sigma[1], None if labels is None else labels[1:2])
    assert d1.shape == x.shape and d1.dtype == torch.float32
    assert torch.isfinite(d1).all()
    assert torch.equal(d1, d2)
    torch.testing.assert_close(d_col, d1)
    torch.testing.assert_close(d_single, d1[1:2], atol=1e-5, rtol=1e-5)
    # Per-sample sigma really is per sample: another sigma for sample 0 only changes sample 0.
    with torch.no_grad():
        d3 = net.denoise(x, torch.tensor([1.0, 0.3, 2.0, 40.0]), labels)
    assert not torch.allclose(d3[0], d1[0], atol=1e-4)
    torch.testing.assert_close(d3[1:], d1[1:], atol=1e-5, rtol=1e-5)


def test_labels_change_the_output_and_label_forms_agree():
    net = _set_gains(_tiny(seed=8), 0.9).eval()
    torch.manual_seed(9)
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    with torch.no_grad():
        d_a = net.denoise(x, sigma, torch.eye(10)[[1, 2, 3]])
        d_b = net.denoise(x, sigma, torch.eye(10)[[4, 5, 6]])
        d_idx = net.denoise(x, sigma, torch.tensor([1, 2, 3]))
        d_none = net.denoise(x, sigma, None)
        d_zero = net.denoise(x, sigma, torch.zeros(3, 10))
        d_bcast = net.denoise(x, sigma, torch.eye(10)[[5]])
        d_rep = net.denoise(x, sigma, torch.eye(10)[[5, 5, 5]])
    assert (d_a - d_b).abs().max() > 1e-3
    torch.testing.assert_close(d_idx, d_a)
    torch.testing.assert_close(d_none, d_zero)
    torch.testing.assert_close(d_bcast, d_rep)
    # Unconditional nets ignore labels.
    un = _tiny(TINY_UNCOND).eval()
    with torch.no_grad():
        torch.testing.assert_close(un.denoise(x, sigma, torch.eye(10)[[1, 2, 3]]), un.denoise(x, sigma))


def test_fp16_flag_is_ignored_on_cpu():
    a = _tiny(seed=10).eval()
    b = build_network(dict(TINY, use_fp16=True)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = b(x, 0.7)
        assert out.dtype == torch.float32
        assert torch.equal(out, a(x, 0.7))


def test_disable_dropout():
    net = _set_gains(_tiny(dict(TINY, dropout=0.5), seed=11), 1.0)
    assert all(m.dropout == 0.5 for m in net.modules() if isinstance(m, Block))
    x = torch.randn(2, 3, 8, 8)
    net.train()
    with torch.no_grad():
        net(x, 1.0)  # first training pass applies the forced weight normalisation
        torch.manual_seed(0)
        y1 = net(x, 1.0)
        torch.manual_seed(1)
        y2 = net(x, 1.0)
    assert (y1 - y2).abs().max() > 1e-4
    disable_dropout(net)
    assert all(m.dropout == 0.0 for m in net.modules() if isinstance(m, Block))
    with torch.no_grad():
        torch.manual_seed(0)
        y1 = net(x, 1.0)
        torch.manual_seed(1)
        y2 = net(x, 1.0)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# Presets and the builder.
# ---------------------------------------------------------------------------

def test_presets_are_json_able_and_follow_edm2():
    presets = json.loads(json.dumps(arch_presets()))
    assert {k: presets[k] for k in PRESETS} == PRESETS
    assert arch_presets()["img64-s"] is not PRESETS["img64-s"]  # copies
    s, l, xs = presets["img64-s"], presets["img512-l"], presets["img512-xs"]
    assert (s["img_resolution"], s["img_channels"], s["label_dim"]) == (64, 3, 1000)
    assert (l["img_resolution"], l["img_channels"], l["label_dim"]) == (64, 4, 1000)
    assert (s["model_channels"], l["model_channels"], xs["model_channels"]) == (192, 320, 128)
    assert (s["dropout"], l["dropout"], xs["dropout"]) == (0.0, 0.10, 0.0)
    for arch in (s, l, xs):
        assert arch["channel_mult"] == [1, 2, 3, 4] and arch["num_blocks"] == 3
        assert arch["attn_resolutions"] == [16, 8] and arch["sigma_data"] == 0.5
        assert arch["label_balance"] == 0.5 and arch["concat_balance"] == 0.5
    assert isinstance(build_meta(presets["img64-s"]), Precond)


def test_factory_rejects_bad_edm2_arch():
    with pytest.raises(ValueError, match="bogus_key"):
        build_network(dict(TINY, bogus_key=1))
    with pytest.raises(ValueError, match="img_channels"):
        build_network({k: v for k, v in TINY.items() if k != "img_channels"})
    with pytest.raises(ValueError, match="unknown architecture key 'channels_per_head' for precond='edm'"):
        build_network(dict(TINY, precond="edm"))
    with pytest.raises(ValueError, match="must be one of"):
        build_network(dict(TINY, precond="edm3"))
    with pytest.raises(ValueError, match=r"EDM2 UNet: img_resolution=6 is not divisible by 2\^2"):
        build_network(dict(TINY, img_resolution=6, channel_mult=[1, 2, 2]))
    with pytest.raises(ValueError, match="EDM2 UNet: channel_mult must not be empty"):
        build_network(dict(TINY, channel_mult=[]))
    assert isinstance(build_network(TINY), Precond)
