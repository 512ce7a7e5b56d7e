"""repro.storage.unpickle on EDM2-format pickles, the EDM2 registry entries, and repro.sampling.autoguidance.

The pickles are written here without upstream code (see tests/test_edm_pickle.py for the writer): the top
level is a ``dnnlib.util.EasyDict`` ``{encoder, dataset_kwargs, loss_fn, ema}`` like EDM2's training loop and
``reconstruct_phema.py`` write it; ``ema`` is our :class:`Precond` with the constructor arguments recorded
the way ``torch_utils.persistence`` records them, every class pickled under its upstream name (facts about
NVlabs/edm2 training/networks_edm2.py: Precond, UNet, Block, MPConv, MPFourier; training/encoders.py:
StabilityVAEEncoder, StandardRGBEncoder; training/training_loop.py: EDM2Loss), and its weights in float16
(upstream saves ``ema.to(torch.float16)``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_edm_pickle import FakeEasyDict, PlainPersistent, recording_init_args, write_pickle
from torch import nn

from repro.catalog import registry
from repro.nets import convert as cv
from repro.nets import edm2 as e2
from repro.nets import released as pretrained
from repro.nets.checkpoint import load_model, weight_dtypes
from repro.nets.factory import build_network
from repro.sampling.autoguidance import autoguidance
from repro.storage import unpickle as ep

EDM2_NAMES = {e2.Precond: "Precond", e2.UNet: "UNet", e2.Block: "Block", e2.MPConv: "MPConv",
              e2.MPFourier: "MPFourier"}

# What train_edm2.py records for Precond: network kwargs (model_channels, dropout, use_fp16) + interface kwargs.
TINY_KW = dict(img_resolution=8, img_channels=3, label_dim=10, use_fp16=True, model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.0)


class FakeVAEEncoder:
    """Pickled as StabilityVAEEncoder: upstream records no kwargs (built from a class name) and keeps settings."""

    def __init__(self):
        self._init_args, self._init_kwargs = (), {}
        self.vae_name = "stabilityai/sd-vae-ft-mse"
        self.scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        self.bias = np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * self.scale
        self.batch_size = 8
        self._vae = None


NAMES = {**EDM2_NAMES, FakeVAEEncoder: "StabilityVAEEncoder", PlainPersistent: "EDM2Loss"}


def recording_edm2_init_args(monkeypatch):
    return recording_init_args(monkeypatch, EDM2_NAMES)


def make_edm2(monkeypatch, seed=0, **kw):
    torch.manual_seed(seed)
    with recording_edm2_init_args(monkeypatch):
        net = e2.Precond(**{**TINY_KW, **kw})
    with torch.no_grad():  # non-trivial scalar gains (they start at zero) and weights
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.copy_(torch.rand([]) + 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return copy.deepcopy(net).eval().requires_grad_(False).half()  # as released: all tensors float16


def edm2_container(ema, encoder=None):
    return FakeEasyDict(
        encoder=FakeVAEEncoder() if encoder is None else encoder,
        dataset_kwargs=FakeEasyDict(class_name="training.dataset.ImageFolderDataset", path="img64.zip",
                                    use_labels=True, xflip=False, cache=True, resolution=8, max_size=None),
        loss_fn=PlainPersistent(P_mean=-0.8, P_std=1.6, sigma_data=0.5),
        ema=ema,
    )


def outputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0])
    labels = torch.eye(10)[torch.tensor([0, 3, 9, 1, 5])]
    with torch.no_grad():
        return net(x, sigma, labels)


def _fp32_copy(ema):
    return copy.deepcopy(ema).float()


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [4, 2])
def test_edm2_convert_matches_direct_fp16_rounded_weights(tmp_path, monkeypatch, protocol):
    ema = make_edm2(monkeypatch)
    src = write_pickle(tmp_path / "edm2-tiny.pkl", edm2_container(ema), names=NAMES, protocol=protocol)
    summary = cv.convert_edm_pickle(src, tmp_path / "edm2-tiny.safetensors")
    assert summary["class_name"] == "Precond" and summary["tensors"] == len(ema.state_dict())
    assert summary["source_dtypes"] == ["torch.float16"]
    assert summary["other_entries"] == ["dataset_kwargs", "encoder", "loss_fn"]

    net, arch, info = load_model(tmp_path / "edm2-tiny.safetensors")
    assert arch["precond"] == "edm2" and arch["use_fp16"] is True and arch["model_channels"] == 16
    assert arch["channels_per_head"] == 8 and arch["clip_act"] == 256 and arch["logvar_channels"] == 128
    assert info["source_dtypes"] == ["torch.float16"] and info["stored_dtypes"] == ["torch.float16"]
    assert weight_dtypes(tmp_path / "edm2-tiny.safetensors") == ["float16"]
    assert info["source_class"] == "Precond" and info["encoder"]["class_name"] == "StabilityVAEEncoder"
    sd = net.state_dict()
    for k, v in ema.state_dict().items():
        assert sd[k].dtype == torch.float16 and torch.equal(sd[k], v), k  # the released dtype, kept

    # The converted net is upstream's network as released: it computes gain / sqrt(fan_in) in fp16 from its fp16
    # gains, as upstream samples it, so the outputs are identical. A float32 copy of the same weights differs (5e-4
    # here, on outputs up to ~3; tolerance 5e-3 abs): that is the fp32 training path (DDO), not sampling.
    assert torch.equal(outputs(net), outputs(ema))
    diff = (outputs(_fp32_copy(net)) - outputs(ema)).abs().max().item()
    assert 0 < diff < 5e-3, diff
    direct = build_network(arch).eval()
    direct.load_state_dict(ema.state_dict())  # cast into a float32 net
    assert torch.equal(outputs(_fp32_copy(net)), outputs(direct))
    d, logvar = net(torch.ones(2, 3, 8, 8), 1.0, None, return_logvar=True)
    d2, logvar2 = ema(torch.ones(2, 3, 8, 8), 1.0, None, return_logvar=True)
    assert torch.equal(d, d2) and torch.equal(logvar, logvar2)


def test_edm2_encoder_and_records_are_data(tmp_path, monkeypatch):
    ema = make_edm2(monkeypatch)
    path = write_pickle(tmp_path / "edm2.pkl", edm2_container(ema), names=NAMES)
    data = ep.read_edm_pickle(path)
    assert isinstance(data, ep.EasyDict) and list(data) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
    rec = data.ema
    assert rec.class_name == "Precond" and rec.init_args == () and rec.init_kwargs == TINY_KW
    assert rec.module_name_hint == "training.networks_edm2"
    unet = rec.submodules["unet"]
    assert unet.class_name == "UNet" and unet.init_kwargs["model_channels"] == 16
    assert unet.submodules["enc"].state["_modules"]["8x8_block0"].class_name == "Block"
    assert data.loss_fn.class_name == "EDM2Loss" and data.loss_fn.state["P_std"] == 1.6

    enc = cv.describe_record(data.encoder)
    assert enc["class_name"] == "StabilityVAEEncoder" and enc["init_args"] == [] and enc["init_kwargs"] == {}
    assert enc["attributes"]["vae_name"] == "stabilityai/sd-vae-ft-mse" and enc["attributes"]["batch_size"] == 8
    assert np.allclose(enc["attributes"]["scale"], 0.5 / np.array([4.17, 4.62, 3.71, 3.28]))
    assert "_vae" not in enc["attributes"]
    summary = cv.convert_edm_pickle(path, tmp_path / "n.safetensors")
    assert summary["encoder"] == enc

    rgb = PlainPersistent()  # StandardRGBEncoder: no kwargs, no attributes
    path2 = write_pickle(tmp_path / "rgb.pkl", edm2_container(ema, encoder=rgb),
                         names={**EDM2_NAMES, PlainPersistent: "StandardRGBEncoder"})
    summary2 = cv.convert_edm_pickle(path2, tmp_path / "rgb.safetensors")
    assert summary2["encoder"]["class_name"] == "StandardRGBEncoder" and summary2["encoder"]["attributes"] == {}


def _missing(net):
    del net.unet.enc["8x8_block0"].emb_linear._parameters["weight"]


def _extra(net):
    net.unet.register_buffer("extra_buf", torch.zeros(3, dtype=torch.float16))


def _reshaped(net):
    w = net.unet.out_conv.weight
    net.unet.out_conv._parameters["weight"] = nn.Parameter(w.detach().reshape(w.shape[0], -1), requires_grad=False)


@pytest.mark.parametrize("edit,key,what", [
    (_missing, "unet.enc.8x8_block0.emb_linear.weight", "missing"),
    (_extra, "unet.extra_buf", "unexpected"),
    (_reshaped, "unet.out_conv.weight", "shape mismatch"),
])
def test_edm2_strict_keys_and_shapes(tmp_path, monkeypatch, edit, key, what):
    ema = make_edm2(monkeypatch)
    edit(ema)
    src = write_pickle(tmp_path / "bad.pkl", edm2_container(ema), names=NAMES)
    with pytest.raises(ValueError, match=what) as info:
        cv.convert_edm_pickle(src, tmp_path / "bad.safetensors")
    assert key in str(info.value)
    assert not (tmp_path / "bad.safetensors").exists()


# Upstream defaults our presets leave implicit (build_network has the same defaults).
IMPLICIT = dict(use_fp16=True, channel_mult_noise=None, channel_mult_emb=None, resample_filter=[1, 1])


def _record(class_name, kwargs, args=(), modules=None):
    state = {"_init_args": args, "_init_kwargs": kwargs, "_parameters": {}, "_buffers": {},
             "_modules": modules or {}}
    return ep.PersistentRecord(class_name, "training.networks_edm2", 6, state)


@pytest.mark.parametrize("preset,kwargs", [
    # What train_edm2.py + the training loop record for the released nets (interface kwargs from the dataset).
    ("img512-l", dict(model_channels=320, dropout=0.1, use_fp16=True, img_resolution=64, img_channels=4,
                      label_dim=1000)),
    ("img512-xs", dict(model_channels=128, dropout=0.0, use_fp16=True, img_resolution=64, img_channels=4,
                       label_dim=1000)),
    ("img64-s", dict(model_channels=192, dropout=0.0, use_fp16=True, img_resolution=np.int64(64),
                     img_channels=3, label_dim=1000)),
])
def test_edm2_recorded_kwargs_give_the_presets(preset, kwargs):
    arch = cv.arch_from_record(_record("Precond", kwargs))
    assert arch == {**e2.PRESETS[preset], **IMPLICIT}
    assert type(arch["img_resolution"]) is int


def test_edm2_arch_defaults_and_errors():
    # Positional args + upstream defaults (use_fp16 defaults to True, model_channels to 192, ...).
    arch = cv.arch_from_record(_record("Precond", {}, args=(64, 3, 1000)))
    assert arch == {**e2.PRESETS["img64-s"], **IMPLICIT}
    with pytest.raises(ValueError, match="label_dim"):
        cv.arch_from_record(_record("Precond", dict(img_resolution=64, img_channels=3)))
    with pytest.raises(ValueError, match="'bogus' has no counterpart"):
        cv.arch_from_record(_record("Precond", dict(img_resolution=64, img_channels=3, label_dim=0, bogus=1)))
    with pytest.raises(ValueError, match="given twice"):
        cv.arch_from_record(_record("Precond", dict(img_resolution=64), args=(64,)))
    unet = _record("UNet", dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=256))
    with pytest.raises(ValueError, match="'model_channels' is 192 but its UNet got 256"):
        cv.arch_from_record(_record("Precond", dict(img_resolution=64, img_channels=3, label_dim=1000,
                                                    model_channels=192), modules={"unet": unet}))
    with pytest.raises(NotImplementedError, match="whole 'Precond'"):
        cv.arch_from_record(unet)


def test_edm2_registry_entries_are_convertible():
    names = ["edm2-img64-s-1073741-0.075", "edm2-img64-s-ddo", "edm2-img512-l-1879048-0.085",
             "edm2-img512-xs-0134217-0.165", "edm2-img512-l-ddo"]
    for name in names:
        ck = registry.get(name)
        assert ck.convertible and ck.family == "edm2" and ck.fmt == "edm-pickle"
        assert ck.arch in e2.PRESETS
        pretrained.check(type("Cfg", (), {"source": name})())  # does not refuse


# --- guidance --------------------------------------------------------------------------------------------


def _toy(scale, shift):
    def f(x, sigma, labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        lab = 0 if labels is None else labels.sum(1, keepdim=True)
        return scale * x / (1 + s) + shift + lab
    return f


def test_autoguidance_end_points_and_closed_form():
    net, gnet = _toy(1.3, 0.25), _toy(0.7, -0.5)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 1.0, 2.0, 10.0])
    labels = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    d, g = net(x, sigma, labels), gnet(x, sigma, labels)
    assert torch.equal(autoguidance(net, gnet, 1)(x, sigma, labels), d)
    assert torch.equal(autoguidance(net, gnet, 0.0)(x, sigma, labels), g)
    closed = g + 2 * (d - g)  # = 2 d - g
    assert torch.allclose(autoguidance(net, gnet, 2.0)(x, sigma, labels), closed, atol=1e-6, rtol=0)
    # the explicit toy: 2 * (1.3 x / (1 + s) + 0.25 + l) - (0.7 x / (1 + s) - 0.5 + l)
    s = sigma.reshape(-1, 1)
    lab = labels.sum(1, keepdim=True)
    assert torch.allclose(autoguidance(net, gnet, 2.0)(x, sigma, labels), 1.9 * x / (1 + s) + 1.0 + lab, atol=1e-6)


def test_autoguidance_wraps_edm2_nets(monkeypatch):
    net = _fp32_copy(make_edm2(monkeypatch, seed=0))
    gnet = _fp32_copy(make_edm2(monkeypatch, seed=1))
    d, g = outputs(net), outputs(gnet)
    assert torch.allclose(outputs(autoguidance(net, gnet, 1.1)), g + 1.1 * (d - g), atol=1e-5, rtol=0)
    assert torch.equal(outputs(autoguidance(net, gnet, 1.0)), d)
