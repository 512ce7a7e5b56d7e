"""repro.storage.unpickle: EDM persistence pickles are read as data (nothing executed) and convert exactly.

The pickles are written here, without upstream code, the way NVlabs' ``torch_utils.persistence`` writes
them: every decorated object is reduced to ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
with ``meta = dict(type='class', version=6, module_src=<source>, class_name=<name>, state=<state>)`` where
``state`` is the third field of ``object.__reduce__(obj)`` (protocol 0: the object's ``__getstate__()``,
i.e. ``__dict__`` with ``_parameters``, ``_buffers``, ``_modules``, ... and the ``_init_args`` /
``_init_kwargs`` the decorator records).  In EDM's networks.py every layer class is decorated, so inner
modules are persistent too; ``torch.nn.ModuleDict`` containers are pickled normally by torch.  Tensors
are pickled by torch's own reducers (``_rebuild_parameter`` / ``_rebuild_tensor_v2`` with storages as
nested legacy ``torch.save`` blobs).  Fake ``torch_utils.persistence`` / ``dnnlib.util`` modules exist in
``sys.modules`` only while a pickle is being written.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from repro.nets import convert as cv
from repro.nets import edm as N
from repro.nets.checkpoint import load_model, read_model_meta
from repro.nets.factory import arch_presets, build_network
from repro.storage import unpickle as ep

# Upstream class names of the layers our network mirrors (facts about EDM's training/networks.py).
UPSTREAM_NAMES = {
    N.Linear: "Linear",
    N.Conv2d: "Conv2d",
    N.GroupNorm: "GroupNorm",
    N.UNetBlock: "UNetBlock",
    N.PositionalEmbedding: "PositionalEmbedding",
    N.SongUNet: "SongUNet",
    N.EDMPrecond: "EDMPrecond",
    N.VPPrecond: "VPPrecond",
}
FAKE_SRC = "# stand-in for training/networks.py\n" + "".join(
    f"class {n}:\n    pass\n" for n in sorted(set(UPSTREAM_NAMES.values()) | {"EDMLoss", "AugmentPipe", "Precond",
                                                                                 "MPConv"}))

# Upstream-style constructor kwargs (what EDM's train.py passes: network kwargs + interface kwargs).
TINY_KW = dict(img_resolution=8, img_channels=1, label_dim=10, use_fp16=False, model_type="SongUNet",
               embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[4], dropout=0.13, augment_dim=9)


class FakeEasyDict(dict):
    """Pickles as the global dnnlib.util.EasyDict (the fake module exists only while writing)."""


FakeEasyDict.__module__ = "dnnlib.util"
FakeEasyDict.__qualname__ = FakeEasyDict.__name__ = "EasyDict"


class PlainPersistent:
    """A decorated non-Module class (EDMLoss, AugmentPipe, EDM2 encoders)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self._init_args = ()
        self._init_kwargs = dict(kwargs)


def _reconstruct_persistent_obj(meta):  # never called: the loader must not use upstream code
    raise AssertionError("the loader called torch_utils.persistence._reconstruct_persistent_obj")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class PersistenceWriter(pickle.Pickler):
    """Writes objects of the classes in ``names`` the way torch_utils.persistence's decorator reduces them."""

    def __init__(self, f, names, module_src, protocol):
        super().__init__(f, protocol=protocol)
        self.names, self.module_src = names, module_src

    def reducer_override(self, obj):
        name = self.names.get(type(obj))
        if name is None:
            return NotImplemented
        fields = list(object.__reduce__(obj))  # what the decorator's super().__reduce__() returns
        fields += [None] * max(3 - len(fields), 0)
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=name, state=fields[2])
        return (_reconstruct_persistent_obj, (meta,), None)


@contextlib.contextmanager
def fake_upstream_modules():
    pkg, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = pers
    dn, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    util.EasyDict = FakeEasyDict
    dn.util = util
    fakes = {"torch_utils": pkg, "torch_utils.persistence": pers, "dnnlib": dn, "dnnlib.util": util}
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_pickle(path: Path, container, names=None, module_src=FAKE_SRC, protocol=4) -> Path:
    names = {**UPSTREAM_NAMES, PlainPersistent: "EDMLoss"} if names is None else names
    buf = io.BytesIO()
    with fake_upstream_modules():
        PersistenceWriter(buf, names, module_src, protocol).dump(container)
    path.write_bytes(buf.getvalue())
    return path


@contextlib.contextmanager
def recording_init_args(monkeypatch, classes=None):
    """Record constructor args on our classes as the persistence decorator does (_init_args/_init_kwargs)."""
    with monkeypatch.context() as m:
        for cls in UPSTREAM_NAMES if classes is None else classes:
            def init(self, *args, __orig=cls.__init__, **kwargs):
                __orig(self, *args, **kwargs)
                self._init_args = copy.deepcopy(args)
                self._init_kwargs = copy.deepcopy(kwargs)
            m.setattr(cls, "__init__", init)
        yield


def make_net(monkeypatch, precond="edm", seed=0):
    kw = dict(TINY_KW)
    if precond == "vp":
        kw.update(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    cls = N.EDMPrecond if precond == "edm" else N.VPPrecond
    torch.manual_seed(seed)
    with recording_init_args(monkeypatch):
        net = cls(**kw)
    with torch.no_grad():  # make every tensor non-trivial (zero-initialised biases, near-zero output layers)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return copy.deepcopy(net).eval().requires_grad_(False)


def edm_container(ema):
    return dict(
        ema=ema,
        loss_fn=PlainPersistent(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
        augment_pipe=PlainPersistent(p=np.float64(0.12), xflip=np.int64(100000000), probs=np.zeros(3)),
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="digits.zip",
                            use_labels=True, xflip=False, cache=True, resolution=8, max_size=np.int64(1797)),
    )


def outputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.002, 0.02, 0.5, 2.0, 20.0, 80.0])
    labels = torch.eye(10)[torch.tensor([0, 3, 9, 1, 5, 7])]
    with torch.no_grad():
        return net(x, sigma, labels)


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precond,protocol", [("edm", 4), ("edm", 2), ("vp", 4)])
def test_convert_matches_direct_weights(tmp_path, monkeypatch, precond, protocol):
    ema = make_net(monkeypatch, precond)
    src = write_pickle(tmp_path / "net.pkl", edm_container(ema), protocol=protocol)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    summary = cv.convert_edm_pickle(src, tmp_path / "net.safetensors")
    assert "torch_utils" not in sys.modules and not [m for m in sys.modules if m.startswith("_imported_module_")]
    assert summary["class_name"] == UPSTREAM_NAMES[type(ema)]
    assert summary["tensors"] == len(ema.state_dict())
    assert summary["other_entries"] == ["augment_pipe", "dataset_kwargs", "loss_fn"]

    net, arch, info = load_model(tmp_path / "net.safetensors")
    assert arch["precond"] == precond and arch["model_channels"] == 16 and arch["augment_dim"] == 9
    for k, v in ema.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    assert torch.equal(outputs(net), outputs(ema))
    # a network built from our own arch dict with the same tensors agrees too
    direct = build_network(arch).eval()
    direct.load_state_dict(ema.state_dict())
    assert torch.equal(outputs(net), outputs(direct))


def test_records_capture_state_and_init_kwargs(tmp_path, monkeypatch):
    ema = make_net(monkeypatch)
    data = ep.read_edm_pickle(write_pickle(tmp_path / "net.pkl", edm_container(ema)))
    rec = data["ema"]
    assert isinstance(rec, ep.PersistentRecord) and rec.class_name == "EDMPrecond" and rec.version == 6
    assert rec.module_name_hint == "training.networks"
    assert rec.module_src_sha256 == hashlib.sha256(FAKE_SRC.encode()).hexdigest()
    assert rec.init_args == () and rec.init_kwargs == TINY_KW
    model = rec.state["_modules"]["model"]
    assert model.class_name == "SongUNet" and model.init_kwargs["in_channels"] == 1
    enc = model.state["_modules"]["enc"]
    assert isinstance(enc, ep.TorchModuleRecord) and enc.class_name.endswith("ModuleDict")
    assert enc.state["_modules"]["8x8_conv"].class_name == "Conv2d"
    assert rec.state["training"] is False and rec.state["sigma_data"] == 0.5
    assert data["loss_fn"].class_name == "EDMLoss" and data["loss_fn"].state["P_std"] == 1.2
    aug = data["augment_pipe"].state
    assert isinstance(aug["p"], np.float64) and aug["p"] == 0.12 and np.array_equal(aug["probs"], np.zeros(3))
    assert data["dataset_kwargs"]["max_size"] == 1797
    sd = ep.state_dict_from_record(rec)
    ref = ema.state_dict()
    assert list(sd) == list(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


class _Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2))
        self.register_parameter("unused", None)
        self.register_buffer("kept", torch.arange(4.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.register_buffer("nothing", None)


class _Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("top", torch.zeros(2, 2))
        self.blocks = nn.ModuleList([_Leaf(), nn.Sequential(_Leaf(), _Leaf())])
        self.named = nn.ModuleDict({"a": _Leaf(), "b": _Leaf()})
        self.empty = None


def test_state_dict_from_record_follows_torch_rules(tmp_path):
    torch.manual_seed(0)
    tree = _Tree()
    path = write_pickle(tmp_path / "t.pkl", {"ema": tree}, names={_Tree: "Tree", _Leaf: "Leaf"})
    sd = ep.state_dict_from_record(ep.read_edm_pickle(path)["ema"])
    ref = tree.state_dict()
    assert list(sd) == list(ref)  # same names, same order; non-persistent and None entries skipped
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert not any("scratch" in k or "nothing" in k or "unused" in k for k in sd)


# --- nothing is executed ---------------------------------------------------------------------------------


class Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _evil_storage_blob(marker: Path) -> bytes:
    parts = [0x1950A86A20F9469CFC6C, 1001, dict(protocol_version=1001, little_endian=True,
                                                 type_sizes=dict(short=2, int=4, long=4)),
             Evil(exec, f"open({str(marker)!r}, 'w').write('ran')"), []]
    return b"".join(pickle.dumps(p, protocol=2) for p in parts)


@pytest.mark.parametrize("where", ["top", "in_state", "in_storage"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
def test_harmful_reduce_is_refused(tmp_path, monkeypatch, kind, where):
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    evil = {"os.system": Evil(os.system, f"touch {marker}"), "builtins.exec": Evil(exec, code),
            "builtins.eval": Evil(eval, code)}[kind]
    global_name = {"os.system": f"{os.system.__module__}.system"}.get(kind, kind)
    if where == "in_storage":
        evil, global_name = Evil(torch.storage._load_from_bytes, _evil_storage_blob(marker)), "builtins.exec"
    ema = make_net(monkeypatch)
    if where == "in_state":
        ema.model.some_attribute = evil  # a plain attribute lands in the persistent state (__dict__)
        container = edm_container(ema)
    else:
        container = dict(edm_container(ema), evil=evil)
    src = write_pickle(tmp_path / "evil.pkl", container)
    with pytest.raises(ep.UnsafePickleError, match=global_name.replace(".", r"\.")) as info:
        ep.read_edm_pickle(src)
    assert "nothing from the pickle was executed" in str(info.value)
    with pytest.raises(ep.UnsafePickleError):
        cv.convert_edm_pickle(src, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    if kind == "builtins.exec" and where == "top":  # control: an ordinary unpickler would have run it
        with fake_upstream_modules():
            pickle.loads(pickle.dumps(evil))
        assert marker.exists()


def test_module_src_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    src_code = f"open({str(marker)!r}, 'w').write('module_src ran')\n" + FAKE_SRC
    ema = make_net(monkeypatch)
    path = write_pickle(tmp_path / "net.pkl", edm_container(ema), module_src=src_code)
    data = ep.read_edm_pickle(path)
    cv.convert_edm_pickle(path, tmp_path / "net.safetensors")
    assert not marker.exists()
    assert data["ema"].module_src_sha256 == hashlib.sha256(src_code.encode()).hexdigest()
    exec(compile(src_code, "<module_src>", "exec"), {})  # control: executing that source creates the marker
    assert marker.exists()


def _craft(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


@pytest.mark.parametrize("blob,match", [
    (_craft(b"cnumpy\nndarray\n", b"K\x01\x85", b"R"), "REDUCE"),  # allowed name, but not callable
    (pickle.dumps(Evil(collections.OrderedDict), 2)[:-1] + b"}U\x01aK\x01sb.", "BUILD"),  # setstate
    (_craft(b"cposix\nsystem\n"), r"posix\.system"),
    (_craft(b"ctorch._utils\n_rebuild_tensor_v3\n"), "_rebuild_tensor_v3"),
    (_craft(b"X\x01\x00\x00\x00xQ"), "persistent id"),
    (_craft(b"(ctorch_utils.persistence\n_reconstruct_persistent_obj\n", b"o"), "INST/OBJ"),
])
def test_crafted_opcodes_are_refused(blob, match):
    with pytest.raises(ep.UnsafePickleError, match=match):
        ep.loads_edm_pickle(blob)


def test_numpy_scalars_under_both_module_names():
    b = pickle.dumps([np.float32(1.5), np.int64(7), np.arange(3.0)], protocol=2)
    assert b"numpy._core.multiarray" in b or b"numpy.core.multiarray" in b
    for name in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        crafted = b.replace(b"numpy._core.multiarray", name).replace(b"numpy.core.multiarray", name)
        s, i, a = ep.loads_edm_pickle(crafted)
        assert s == np.float32(1.5) and s.dtype == np.float32 and i == 7 and np.array_equal(a, np.arange(3.0))


# --- strict checks ---------------------------------------------------------------------------------------


def _missing(net):
    del net.model.map_layer0._parameters["bias"]


def _extra(net):
    net.model.map_layer0.register_buffer("extra_buf", torch.zeros(3))


def _reshaped(net):
    w = net.model.map_layer0.weight
    net.model.map_layer0._parameters["weight"] = nn.Parameter(w.detach().reshape(-1), requires_grad=False)


@pytest.mark.parametrize("edit,key,what", [
    (_missing, "model.map_layer0.bias", "missing"),
    (_extra, "model.map_layer0.extra_buf", "unexpected"),
    (_reshaped, "model.map_layer0.weight", "shape mismatch"),
])
def test_strict_keys_and_shapes(tmp_path, monkeypatch, edit, key, what):
    ema = make_net(monkeypatch)
    edit(ema)
    src = write_pickle(tmp_path / "bad.pkl", edm_container(ema))
    with pytest.raises(ValueError, match=what) as info:
        cv.convert_edm_pickle(src, tmp_path / "bad.safetensors")
    assert key in str(info.value)
    assert not (tmp_path / "bad.safetensors").exists()


def test_sha256_checked_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    evil = write_pickle(tmp_path / "evil.pkl", {"x": Evil(exec, f"open({str(marker)!r}, 'w')")})
    with pytest.raises(ValueError, match="sha256 mismatch"):  # not UnsafePickleError: never unpickled
        ep.read_edm_pickle(evil, expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        cv.convert_edm_pickle(evil, tmp_path / "o.safetensors", expected_sha256="0" * 64)
    assert not marker.exists()
    src = write_pickle(tmp_path / "net.pkl", edm_container(make_net(monkeypatch)))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert ep.read_edm_pickle(src, expected_sha256=digest.upper())["ema"].class_name == "EDMPrecond"


def test_roundtrip_through_load_model(tmp_path, monkeypatch):
    ema = make_net(monkeypatch)
    src = write_pickle(tmp_path / "edm-tiny.pkl", edm_container(ema))
    dst = tmp_path / "models" / "edm-tiny.safetensors"
    summary = cv.convert_edm_pickle(src, dst, expected_sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    arch, info = read_model_meta(dst)
    assert arch == summary["arch"] and arch == cv.arch_from_record(ep.read_edm_pickle(src)["ema"])
    assert info["source_file"] == "edm-tiny.pkl" and info["source_sha256"] == summary["sha256"]
    net, arch2, info2 = load_model(dst)
    assert arch2 == arch and info2 == info
    assert torch.equal(outputs(net), outputs(ema))
    # later loads read only our format: the pickle can go away
    src.unlink()
    net3, _, _ = load_model(dst)
    assert torch.equal(outputs(net3), outputs(net))


# --- EDM2 layout and what does not convert -------------------------------------------------------------


class _MPConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3).half(), requires_grad=False)


class _Edm2Precond(nn.Module):
    def __init__(self):
        super().__init__()
        self.unet = nn.ModuleDict({"conv": _MPConv()})
        self._init_args, self._init_kwargs = (), dict(img_resolution=64, img_channels=3, label_dim=1000)


def test_edm2_layout_reads_and_is_checked_strictly(tmp_path):
    """An EDM2 EasyDict reads as data; a Precond whose 'unet' is not EDM2's UNet is refused with a clear error.

    (EDM2 conversion itself is tested in tests/test_edm2_pickle.py.)"""
    ema = _Edm2Precond()
    top = FakeEasyDict(encoder=PlainPersistent(scale=0.5), dataset_kwargs=FakeEasyDict(resolution=64),
                       loss_fn=PlainPersistent(P_mean=-0.4), ema=ema)
    names = {_Edm2Precond: "Precond", _MPConv: "MPConv", PlainPersistent: "StandardRGBEncoder"}
    path = write_pickle(tmp_path / "edm2.pkl", top, names=names)
    data = ep.read_edm_pickle(path)
    assert isinstance(data, ep.EasyDict) and data.ema.class_name == "Precond"
    assert data.dataset_kwargs.resolution == 64
    sd = ep.state_dict_from_record(data.ema)
    assert list(sd) == ["unet.conv.weight"] and sd["unet.conv.weight"].dtype == torch.float16
    assert torch.equal(sd["unet.conv.weight"], ema.unet.conv.weight)
    with pytest.raises(ValueError, match="'unet' submodule is 'torch.nn.modules.container.ModuleDict'"):
        cv.arch_from_record(data.ema)
    with pytest.raises(ValueError, match="expected EDM2's 'UNet'"):
        cv.convert_edm_pickle(path, tmp_path / "edm2.safetensors")
    assert not (tmp_path / "edm2.safetensors").exists()
    del data.ema.state["_modules"]["unet"]  # without it, upstream defaults give the img64-s layout
    arch = cv.arch_from_record(data.ema)
    assert arch["precond"] == "edm2" and arch["model_channels"] == 192 and arch["use_fp16"] is True


def test_edmprecond_default_model_type_is_dhariwal(tmp_path, monkeypatch):
    ema = make_net(monkeypatch)
    rec = ep.read_edm_pickle(write_pickle(tmp_path / "n.pkl", edm_container(ema)))["ema"]
    del rec.state["_init_kwargs"]["model_type"]  # upstream EDMPrecond defaults to DhariwalUNet
    with pytest.raises(NotImplementedError, match="DhariwalUNet"):
        cv.arch_from_record(rec)


def test_cifar10_init_kwargs_give_the_preset_layout():
    """The kwargs EDM's train.py records for --arch=ddpmpp --cond=1 map onto our CIFAR-10 preset."""
    state = {"_init_args": (), "_init_kwargs": dict(
        model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
        augment_dim=9, dropout=0.13, use_fp16=False, img_resolution=np.int64(32), img_channels=3, label_dim=10),
        "_parameters": {}, "_buffers": {}, "_modules": {}}
    rec = ep.PersistentRecord("EDMPrecond", "training.networks", 6, state)
    arch = cv.arch_from_record(rec)
    assert arch["img_resolution"] == 32 and type(arch["img_resolution"]) is int
    with torch.device("meta"):
        ours = build_network(arch).state_dict()
        preset = build_network(arch_presets()["edm-cifar10-32x32-cond-vp"]).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in preset.items()}
    assert sum(v.numel() for v in ours.values()) > 55_000_000
