"""Tests for repro.nets.edm (DDPM++ SongUNet + EDM / VP preconditioning).

How the reference numbers below were established
-----------------------------------------------
The upstream implementation (NVlabs/edm, commit 008a4e5, training/networks.py)
was built in a scratch directory OUTSIDE this repository, for the same configs
(EDMPrecond/VPPrecond with model_type='SongUNet' and train.py's ddpmpp kwargs).
From it we recorded: parameter counts, the number of state_dict entries, a
SHA-256 digest of the sorted "key:[shape]" listing, and (for the golden-output
test) the denoiser outputs for deterministic weights and inputs.  Our nets were
also checked there to load the upstream state_dicts with strict=True, to have
the same key order, equal buffers, and outputs equal to upstream to ~1e-6 for
random weights.  No upstream code lives in this repository.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_meta, listing_digest

from repro.nets import edm as nw
from repro.nets.edm import BASELINE_CIFAR10_DDPMPP_VP, EDM_CIFAR10_DDPMPP_COND, EDM_CIFAR10_DDPMPP_UNCOND, EDMPrecond, SongUNet, VPPrecond
from repro.nets.factory import arch_presets, build_network
from repro.nets.layers import count_parameters, disable_dropout

torch.set_num_threads(2)

TINY = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def _fill_deterministic(net):
    """Deterministic, RNG-free, non-trivial weights (same recipe used on upstream)."""
    with torch.no_grad():
        for j, (_, p) in enumerate(sorted(net.named_parameters())):
            n = p.numel()
            fan_in = n // p.shape[0] if p.ndim >= 2 else 1
            v = torch.sin(torch.arange(n, dtype=torch.float64) * 0.731 + j) / math.sqrt(fan_in)
            p.copy_(v.reshape(p.shape).to(p.dtype))
    return net


def _tiny(precond="edm", **overrides):
    torch.manual_seed(0)
    return build_network(dict(TINY, precond=precond, **overrides))


# ---------------------------------------------------------------------------
# Paper configs: parameter counts and the full state_dict listing vs upstream.
# ---------------------------------------------------------------------------

# (arch, #params, #state_dict entries, sha256 of sorted "key:[shape]" lines) from upstream.
UPSTREAM_LISTINGS = {
    "edm-cifar10-cond": (EDM_CIFAR10_DDPMPP_COND, 55_735_299, 427,
                         "46bdcd866a90e08be3b83f3ae1c6f7f96b03e06475d78ae087460c06a7950a29"),
    "edm-cifar10-uncond": (EDM_CIFAR10_DDPMPP_UNCOND, 55_733_891, 425,
                           "0ec9cc6056a7f0e1d44652344439c5a96614bcc51be97c42fe2c9162b162f0a2"),
    "baseline-cifar10-vp": (BASELINE_CIFAR10_DDPMPP_VP, 61_804_419, 552,
                            "1e7841e7ccb453f7c9db60f7374d7927ca55e564bf57e91e6af8e6cc9013099a"),
    "tiny": (dict(TINY, precond="edm"), 188_945, 148,
             "11bf2324779298305f281a2fd5a1396717d553226c04d1197eb8529d44f688b5"),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_LISTINGS))
def test_param_count_and_state_dict_listing_match_upstream(name):
    arch, n_params, n_keys, digest = UPSTREAM_LISTINGS[name]
    net = build_meta(arch)
    sd = net.state_dict()
    assert count_parameters(net) == n_params
    assert len(sd) == n_keys
    assert listing_digest(sd) == digest


def test_cifar_param_counts_round_to_published_56M():
    # EDM paper, Table 2: DDPM++ CIFAR-10 nets have 56M parameters (55.7M).
    for arch in (EDM_CIFAR10_DDPMPP_COND, EDM_CIFAR10_DDPMPP_UNCOND):
        n = count_parameters(build_meta(arch))
        assert round(n / 1e6, 1) == 55.7
        assert round(n / 1e6) == 56


def test_cifar_representative_keys():
    sd = build_meta(EDM_CIFAR10_DDPMPP_COND).state_dict()
    expected = {
        "model.map_label.weight": [128, 10],
        "model.map_label.bias": [128],
        "model.map_augment.weight": [128, 9],
        "model.map_layer0.weight": [512, 128],
        "model.map_layer1.bias": [512],
        "model.enc.32x32_conv.weight": [128, 3, 3, 3],
        "model.enc.32x32_block0.skip.weight": [256, 128, 1, 1],
        "model.enc.16x16_down.conv0.resample_filter": [1, 1, 2, 2],
        "model.enc.16x16_down.skip.resample_filter": [1, 1, 2, 2],
        "model.enc.16x16_block3.qkv.weight": [768, 256, 1, 1],
        "model.enc.16x16_block3.proj.weight": [256, 256, 1, 1],
        "model.enc.8x8_block3.affine.weight": [256, 512],
        "model.dec.8x8_in0.norm2.weight": [256],
        "model.dec.8x8_block0.conv0.weight": [256, 512, 3, 3],
        "model.dec.16x16_up.conv0.resample_filter": [1, 1, 2, 2],
        "model.dec.16x16_up.skip.weight": [256, 256, 1, 1],
        "model.dec.16x16_block4.qkv.bias": [768],
        "model.dec.32x32_block4.conv0.weight": [256, 384, 3, 3],
        "model.dec.32x32_aux_norm.weight": [256],
        "model.dec.32x32_aux_conv.weight": [3, 256, 3, 3],
    }
    for key, shape in expected.items():
        assert list(sd[key].shape) == shape, key
    absent = ["model.map_augment.bias", "model.map_noise.freqs", "model.enc.32x32_block0.qkv.weight",
              "model.dec.8x8_in1.qkv.weight", "model.dec.16x16_block3.qkv.weight",
              "model.enc.32x32_conv.resample_filter"]
    for key in absent:
        assert key not in sd, key
    assert "model.map_label.weight" not in build_meta(EDM_CIFAR10_DDPMPP_UNCOND).state_dict()


def test_tiny_state_dict_representative_keys():
    sd = build_meta(dict(TINY, precond="edm")).state_dict()
    expected = {
        "model.map_label.weight": [16, 10],
        "model.map_layer0.weight": [64, 16],
        "model.enc.8x8_conv.weight": [16, 1, 3, 3],
        "model.enc.8x8_block0.conv0.weight": [16, 16, 3, 3],
        "model.enc.4x4_down.conv0.weight": [16, 16, 3, 3],
        "model.enc.4x4_down.skip.weight": [16, 16, 1, 1],
        "model.enc.4x4_block0.qkv.weight": [96, 32, 1, 1],
        "model.enc.4x4_block0.skip.weight": [32, 16, 1, 1],
        "model.dec.4x4_in0.proj.weight": [32, 32, 1, 1],
        "model.dec.4x4_block0.conv0.weight": [32, 64, 3, 3],
        "model.dec.4x4_block1.norm2.bias": [32],
        "model.dec.8x8_up.skip.resample_filter": [1, 1, 2, 2],
        "model.dec.8x8_block0.norm0.weight": [48],
        "model.dec.8x8_block1.skip.weight": [16, 32, 1, 1],
        "model.dec.8x8_aux_conv.weight": [1, 16, 3, 3],
    }
    for key, shape in expected.items():
        assert list(sd[key].shape) == shape, key
    assert "model.enc.8x8_block0.skip.weight" not in sd  # 16 -> 16 without resampling: identity skip
    assert "model.map_augment.weight" not in sd
    # GroupNorm groups = min(32, C // 4): 16 -> 4, 32 -> 8, 48 -> 12.
    net = _tiny()
    assert net.model.dec["8x8_block0"].norm0.num_groups == 12
    assert net.model.enc["4x4_block0"].norm1.num_groups == 8
    assert net.model.enc["8x8_block0"].norm0.num_groups == 4


# ---------------------------------------------------------------------------
# Golden outputs recorded from upstream with deterministic weights/inputs.
# ---------------------------------------------------------------------------

GOLDEN = {
    "edm": dict(
        sum=-23.83566665649414, abs_sum=106.76637268066406, sum_nolabel=-23.83068084716797,
        row_0_0_0=[-0.03556068614125252, 0.4935971200466156, 0.9593757390975952, 1.2921652793884277],
        row_2_0_7=[-0.21411137282848358, -0.18862228095531464, -0.17272214591503143, -0.1151188537478447],
        row_1_0_3=[0.47812241315841675, 0.5581987500190735, 0.5625691413879395, 0.45974352955818176,
                   0.26601946353912354, 0.008827432990074158, -0.2744723856449127, -0.5705192685127258],
    ),
    "vp": dict(
        sum=90.14857482910156, abs_sum=194.0797576904297, sum_nolabel=90.12152099609375,
        row_0_0_0=[0.035852011293172836, 0.5856464505195618, 1.0533103942871094, 1.3823394775390625],
        row_2_0_7=[1.6783618927001953, 2.1165719032287598, 2.414767026901245, 2.317904233932495],
        row_1_0_3=[1.629539966583252, 1.7394537925720215, 1.6228848695755005, 1.3278073072433472,
                   0.8935574293136597, 0.3756738305091858, -0.15956047177314758, -0.6145898103713989],
    ),
}


@pytest.mark.parametrize("precond", ["edm", "vp"])
def test_outputs_match_upstream_golden_values(precond):
    net = _fill_deterministic(_tiny(precond, augment_dim=9)).eval()
    n = 3
    x = (torch.sin(torch.arange(n * 64, dtype=torch.float64) * 0.37) * 1.5).float().reshape(n, 1, 8, 8)
    sigma = torch.tensor([0.05, 0.5, 2.0])
    labels = torch.eye(10)[[3, 7, 0]]
    aug = torch.cos(torch.arange(n * 9, dtype=torch.float64) * 0.5).float().reshape(n, 9)
    g = GOLDEN[precond]
    with torch.no_grad():
        out = net(x, sigma, labels, augment_labels=aug)
        out_nolabel = net(x, sigma, None)
    assert out.dtype == torch.float32 and out.shape == x.shape
    tol = dict(rtol=1e-4, atol=1e-4)
    assert float(out.sum()) == pytest.approx(g["sum"], rel=1e-4, abs=1e-4)
    assert float(out.abs().sum()) == pytest.approx(g["abs_sum"], rel=1e-4, abs=1e-4)
    assert float(out_nolabel.sum()) == pytest.approx(g["sum_nolabel"], rel=1e-4, abs=1e-4)
    torch.testing.assert_close(out[0, 0, 0, :4], torch.tensor(g["row_0_0_0"]), **tol)
    torch.testing.assert_close(out[2, 0, 7, 4:], torch.tensor(g["row_2_0_7"]), **tol)
    torch.testing.assert_close(out[1, 0, 3, :], torch.tensor(g["row_1_0_3"]), **tol)


# ---------------------------------------------------------------------------
# Preconditioning formulas (EDM paper, Table 1), checked with a recording stub.
# ---------------------------------------------------------------------------


class _RecordingUNet(torch.nn.Module):
    """Stand-in for F_theta: records its inputs and returns F = 0.3 * x_in + 0.1 * noise_label."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = dict(x=x.clone(), noise=noise_labels.clone(), labels=class_labels, aug=augment_labels)
        return 0.3 * x + 0.1 * noise_labels.reshape(-1, 1, 1, 1)


def _stubbed(net):
    net.model = _RecordingUNet()
    return net


def test_edm_preconditioning_follows_table1():
    sigma_data = 0.7
    net = _stubbed(EDMPrecond(8, 1, label_dim=10, sigma_data=sigma_data, model_channels=16,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, 8)
    s = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    labels = torch.eye(10)[[1, 2, 3, 4]]
    d = net(x, s.float(), labels)
    sd2 = sigma_data ** 2
    c_skip = sd2 / (s ** 2 + sd2)
    c_out = s * sigma_data / (s ** 2 + sd2).sqrt()
    c_in = 1 / (sd2 + s ** 2).sqrt()
    c_noise = s.log() / 4
    col = lambda t: t.reshape(-1, 1, 1, 1)  # noqa: E731
    seen = net.model.seen
    torch.testing.assert_close(seen["x"], (col(c_in) * x.double()).float())
    torch.testing.assert_close(seen["noise"], c_noise.float())
    torch.testing.assert_close(seen["labels"], labels)
    f = 0.3 * col(c_in) * x.double() + 0.1 * col(c_noise)
    torch.testing.assert_close(d, (col(c_skip) * x.double() + col(c_out) * f).float())
    # Coefficients as exposed by the wrapper, too.
    cs, co, ci, cn = net.coefficients(col(s.float()))
    torch.testing.assert_close(cs, col(c_skip).float())
    torch.testing.assert_close(co, col(c_out).float())
    assert net.sigma_min == 0.0 and net.sigma_max == float("inf") and net.use_fp16 is False


def test_vp_preconditioning_follows_table1():
    beta_d, beta_min, M = 19.9, 0.1, 1000
    net = _stubbed(VPPrecond(8, 1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    torch.manual_seed(2)
    x = torch.randn(3, 1, 8, 8)
    s = torch.tensor([0.05, 1.0, 50.0], dtype=torch.float64)
    d = net.denoise(x, s.float())
    t = ((beta_min ** 2 + 2 * beta_d * torch.log(1 + s ** 2)).sqrt() - beta_min) / beta_d  # sigma^{-1}
    c_noise = (M - 1) * t
    c_in = 1 / (s ** 2 + 1).sqrt()
    col = lambda u: u.reshape(-1, 1, 1, 1)  # noqa: E731
    seen = net.model.seen
    torch.testing.assert_close(seen["x"], (col(c_in) * x.double()).float())
    torch.testing.assert_close(seen["noise"], c_noise.float())
    assert seen["labels"] is None  # unconditional
    f = 0.3 * col(c_in) * x.double() + 0.1 * col(c_noise)
    torch.testing.assert_close(d, (x.double() - col(s) * f).float())  # c_skip = 1, c_out = -sigma
    # sigma(t) and its inverse, and the supported range sigma(epsilon_t) .. sigma(1).
    tt = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    sig = net.sigma(tt)
    torch.testing.assert_close(sig, torch.sqrt(torch.exp(0.5 * beta_d * tt ** 2 + beta_min * tt) - 1))
    torch.testing.assert_close(net.sigma_inv(sig), tt)
    assert net.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * beta_d * 1e-10 + beta_min * 1e-5)), rel=1e-9)
    assert net.sigma_max == pytest.approx(152.16697, rel=1e-6)


# ---------------------------------------------------------------------------
# Shapes, sigma/label forms, determinism, conditioning, dropout.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("precond", ["edm", "vp"])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_shapes_and_sigma_forms(precond, label_dim):
    net = _tiny(precond, label_dim=label_dim).eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)  # any float dtype in, float32 out
    labels = torch.eye(10)[[0, 5, 9]] if label_dim else None
    with torch.no_grad():
        per_sample = net(x, torch.tensor([0.7, 0.7, 0.7]), labels)
        assert per_sample.shape == (3, 1, 8, 8) and per_sample.dtype == torch.float32
        for s in (0.7, torch.tensor(0.7), torch.full((3, 1, 1, 1), 0.7)):
            torch.testing.assert_close(net(x, s, labels), per_sample)
        mixed = net(x, torch.tensor([0.1, 1.0, 10.0]), labels)
        torch.testing.assert_close(mixed[1:2], net(x[1:2], 1.0, None if labels is None else labels[1:2]))
        torch.testing.assert_close(net.denoise(x, 0.7, labels), per_sample)
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.ones(2), labels)


def test_labels_none_on_conditional_net_means_zero_labels_and_labels_matter():
    net = _fill_deterministic(_tiny()).eval()
    torch.manual_seed(3)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        none = net(x, 1.0, None)
        zeros = net(x, 1.0, torch.zeros(4, 10))
        a = net(x, 1.0, torch.eye(10)[[0, 1, 2, 3]])
        b = net(x, 1.0, torch.eye(10)[[4, 5, 6, 7]])
        idx = net(x, 1.0, torch.tensor([0, 1, 2, 3]))  # integer class indices -> one-hot
    torch.testing.assert_close(none, zeros)
    torch.testing.assert_close(idx, a)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample reacts to its label
    # Also with the freshly initialised (near-zero output) net, at the U-Net level.
    fresh = _tiny().eval().model
    with torch.no_grad():
        fa = fresh(x, torch.zeros(4), torch.eye(10)[[0, 1, 2, 3]])
        fb = fresh(x, torch.zeros(4), torch.eye(10)[[4, 5, 6, 7]])
    assert not torch.equal(fa, fb)


def test_eval_mode_is_deterministic():
    net = _tiny(dropout=0.5).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x, 0.5, None), net(x, 0.5, None))


def test_augment_labels_optional_and_used():
    net = _fill_deterministic(_tiny(augment_dim=9)).eval()
    assert net.model.map_augment is not None and net.model.map_augment.bias is None
    torch.manual_seed(4)
    x = torch.randn(2, 1, 8, 8)
    seen = []
    net.model.map_layer0.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    ones = torch.ones(2, 9)
    with torch.no_grad():
        none = net(x, 0.5, None)  # augment_labels=None: map_augment skipped
        zero = net(x, 0.5, None, augment_labels=torch.zeros(2, 9))
        aug = net(x, 0.5, None, augment_labels=ones)
        # The augmentation embedding is added to the noise (+ label) embedding.
        torch.testing.assert_close(seen[2] - seen[0], net.model.map_augment(ones))
    torch.testing.assert_close(none, zero)
    assert (none - aug).abs().max() > 1e-5  # weak but real effect on D (float32 noise is ~1e-7)


def test_disable_dropout_makes_train_mode_deterministic():
    net = _fill_deterministic(_tiny(dropout=0.5, label_dropout=0.5)).train()
    x = torch.randn(4, 1, 8, 8)
    labels = torch.eye(10)[[0, 1, 2, 3]]
    with torch.no_grad():
        torch.manual_seed(0)
        a = net(x, 1.0, labels)
        b = net(x, 1.0, labels)
    assert not torch.equal(a, b)
    assert disable_dropout(net) is net
    blocks = [m for m in net.modules() if isinstance(m, nw.UNetBlock)]
    assert blocks and all(m.dropout == 0.0 for m in blocks) and net.model.label_dropout == 0.0
    with torch.no_grad():
        c = net(x, 1.0, labels)
        d = net(x, 1.0, labels)
        e = net.eval()(x, 1.0, labels)
    assert torch.equal(c, d)
    torch.testing.assert_close(c, e)


def test_gradients_reach_every_parameter():
    net = _tiny(augment_dim=9, dropout=0.1).train()
    x = torch.randn(2, 1, 8, 8)
    out = net(x, torch.tensor([0.3, 3.0]), torch.eye(10)[[1, 2]], augment_labels=torch.randn(2, 9))
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_micro_config_small_channel_counts():
    # model_channels=8: GroupNorm falls back to 2 groups of 4 channels.
    net = _tiny(model_channels=8, attn_resolutions=[]).eval()
    assert net.model.enc["8x8_block0"].norm0.num_groups == 2
    with torch.no_grad():
        assert net(torch.randn(2, 1, 8, 8), 2.0, None).shape == (2, 1, 8, 8)


# ---------------------------------------------------------------------------
# build_network / presets / option validation.
# ---------------------------------------------------------------------------


def test_build_network_validates_keys_and_options():
    with pytest.raises(ValueError, match="'bogus_key'"):
        build_network(dict(TINY, precond="edm", bogus_key=1))
    with pytest.raises(ValueError, match="'beta_d'"):
        build_network(dict(TINY, precond="edm", beta_d=19.9))  # VP-only constant on an EDM net
    with pytest.raises(ValueError, match="precond"):
        build_network(dict(TINY, precond="ve"))
    with pytest.raises(ValueError, match="img_channels"):
        build_network(dict(precond="edm", img_resolution=8))
    for bad in (dict(embedding_type="fourier"), dict(encoder_type="residual"), dict(decoder_type="skip"),
                dict(model_type="DhariwalUNet"), dict(use_fp16=True)):
        with pytest.raises(ValueError):
            build_network(dict(TINY, precond="edm", **bad))
    with pytest.raises(ValueError, match="embedding_type"):
        SongUNet(8, 1, 1, embedding_type="fourier")
    with pytest.raises(ValueError, match=r"SongUNet: img_resolution=12 is not divisible by 2\^3"):
        SongUNet(12, 1, 1, channel_mult=[1, 2, 2, 2])
    with pytest.raises(ValueError, match="SongUNet: channel_mult must not be empty"):
        SongUNet(8, 1, 1, channel_mult=[])
    net = build_network(dict(TINY, precond="vp", beta_d=10.0, M=500, embedding_type="positional",
                             resample_filter=[1, 1], use_fp16=False))
    assert isinstance(net, VPPrecond) and net.beta_d == 10.0 and net.M == 500


def test_presets_are_json_able_copies_with_paper_values():
    presets = arch_presets()
    json.dumps(presets)
    cond = presets["edm-cifar10-32x32-cond-vp"]
    assert cond == EDM_CIFAR10_DDPMPP_COND and cond is not EDM_CIFAR10_DDPMPP_COND
    assert cond["precond"] == "edm"  # released "-vp" CIFAR nets = DDPM++ arch + EDM preconditioning
    key_values = (cond["model_channels"], cond["channel_mult"], cond["dropout"], cond["augment_dim"])
    assert key_values == (128, [2, 2, 2], 0.13, 9)
    assert presets["edm-cifar10-32x32-uncond-vp"]["label_dim"] == 0
    net = build_meta(cond)
    assert isinstance(net, EDMPrecond) and net.sigma_data == 0.5 and net.label_dim == 10
    cond["label_dim"] = 3
    assert arch_presets()["edm-cifar10-32x32-cond-vp"]["label_dim"] == 10
    tiny = build_network(presets["tiny-8x8-cond"])
    assert tiny.label_dim == 10 and tiny.img_resolution == 8
