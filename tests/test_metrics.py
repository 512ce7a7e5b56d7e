"""Tests for repro.evaluation.classifier and repro.evaluation.fidelity (FD-digits / FID through torch-fidelity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from repro.evaluation.classifier import load_classifier, read_classifier_metadata, save_classifier, train_classifier, u8_to_float
from repro.evaluation.fidelity import (
    DIGITS_EXTRACTOR,
    FeatureStats,
    compute_statistics,
    default_feature,
    extract_features,
    frechet_distance,
    frechet_distance_from_stats,
    make_extractor,
)

TRAIN_KW = dict(steps=300, batch=64, lr=3e-3, seed=0, feature_dim=64, width=32, progress=False)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Everything here is tiny; on a busy 2-core machine 2 intra-op threads are several times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    return x, d.target


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    x, y = digits
    model, info = train_classifier(x, y, **TRAIN_KW)
    path = tmp_path_factory.mktemp("clf") / "digits_classifier.safetensors"
    save_classifier(model, path, metadata=info)
    return model, info, str(path)


def _batches(x: np.ndarray, sizes):
    i = 0
    for s in sizes:
        if i >= len(x):
            break
        yield torch.from_numpy(x[i : i + s])
        i += s
    if i < len(x):
        yield torch.from_numpy(x[i:])


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def test_fd_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)
    # symmetric in its arguments, and zero for identical Gaussians
    assert frechet_distance(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(expected, rel=1e-10)
    assert abs(frechet_distance(mu1, np.diag(a), mu1, np.diag(a))) < 1e-10


def test_fd_matches_torch_fidelity_on_random_spd():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(1)
    for d in (3, 20, 64):
        mu1, mu2 = rng.standard_normal(d), 0.5 * rng.standard_normal(d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        ours = frechet_distance(mu1, s1, mu2, s2)
        theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)[
            KEY_METRIC_FID
        ]
        assert ours > 0
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_fd_rank_deficient_and_fallback(monkeypatch):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    import repro.evaluation.fidelity as fidelity

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((10, 20)), rng.standard_normal((12, 20)) + 0.3  # N < D: singular covariances
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ours = frechet_distance(a.mean(0), s1, b.mean(0), s2)
    theirs = fid_statistics_to_metric({"mu": a.mean(0), "sigma": s1}, {"mu": b.mean(0), "sigma": s2}, False)
    assert np.isfinite(ours)
    assert ours == pytest.approx(theirs[KEY_METRIC_FID], rel=1e-6)
    assert abs(frechet_distance(a.mean(0), s1, a.mean(0), s1)) < 1e-5

    # if sqrtm fails (non-finite), the eps-offset retry is used
    real_sqrtm, calls = fidelity.scipy.linalg.sqrtm, []

    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fidelity.scipy.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(UserWarning, match="near-singular"):
        fallback = frechet_distance(a.mean(0), s1, b.mean(0), s2, method="sqrtm")
    assert len(calls) == 2
    assert fallback == pytest.approx(ours, rel=1e-3)  # eps=1e-6 on the diagonals of singular matrices


def test_fd_shape_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# FeatureStats


def test_feature_stats_streaming_matches_numpy(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((1000, 16)) * rng.uniform(0.5, 2.0, 16) + rng.uniform(-3, 3, 16)
    st = FeatureStats()
    i = 0
    for k, s in enumerate([1, 7, 100, 392, 500]):  # different batch sizes, numpy and torch inputs
        chunk = feats[i : i + s]
        st.update(torch.from_numpy(chunk) if k % 2 else chunk)
        i += s
    assert st.n == 1000
    np.testing.assert_allclose(st.mu, feats.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(st.sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-10)

    # merge of two halves == whole
    a, b = FeatureStats().update(feats[:300]), FeatureStats().update(feats[300:])
    a.merge(b)
    np.testing.assert_allclose(a.sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-10)

    # .npz round trip keeps mu, sigma, n and can keep streaming
    st.meta = {"extractor": "x", "feature": "f"}
    st.save(tmp_path / "stats.npz")
    st2 = FeatureStats.load(tmp_path / "stats.npz")
    assert st2.n == 1000 and st2.meta == st.meta
    np.testing.assert_allclose(st2.mu, st.mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(st2.sigma, st.sigma, rtol=0, atol=1e-12)
    more = rng.standard_normal((50, 16))
    st2.update(more)
    np.testing.assert_allclose(st2.sigma, np.cov(np.concatenate([feats, more]), rowvar=False), rtol=0, atol=1e-9)

    # reference stats without n (EDM-style npz) are frozen
    np.savez(tmp_path / "ref.npz", mu=st.mu, sigma=st.sigma)
    ref = FeatureStats.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref.sigma, st.sigma)
    with pytest.raises(RuntimeError):
        ref.update(more)


def test_feature_stats_rejects_bad_input():
    st = FeatureStats().update(np.zeros((4, 3)))
    with pytest.raises(ValueError):
        st.update(np.zeros((4, 5)))
    with pytest.raises(ValueError):
        st.update(np.zeros(3))


# ---------------------------------------------------------------------------------------------
# Classifier


def test_classifier_accuracy(trained):
    _, info, _ = trained
    print(f"digits classifier: {info}")
    assert info["steps"] == TRAIN_KW["steps"]
    assert info["holdout_accuracy"] >= 0.9
    assert info["train_accuracy"] >= 0.9


def test_classifier_training_deterministic(digits):
    x, y = digits
    kw = dict(TRAIN_KW, steps=25)
    m1, i1 = train_classifier(x, y, **kw)
    m2, i2 = train_classifier(x, y, **kw)
    m3, _ = train_classifier(x, y, **dict(kw, seed=1))
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert i1 == i2
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)  # the seed matters


def test_save_load_roundtrip_and_wrong_shape(trained, digits, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, info, path = trained
    loaded = load_classifier(path)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = u8_to_float(torch.from_numpy(digits[0][:32]))
    assert torch.equal(loaded.features(x), model.features(x))

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == model.config
    tensors = load_file(path)
    tensors["fc.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="fc.weight"):
        load_classifier(bad)

    tensors = load_file(path)
    del tensors["head.bias"]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="head.bias"):
        load_classifier(bad)

    save_file(load_file(path), str(bad))  # no metadata
    with pytest.raises(ValueError, match="not a DigitsClassifier"):
        load_classifier(bad)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# torch-fidelity extractor


def test_registered_extractor_matches_direct_features(trained, digits):
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    model, _, path = trained
    assert DIGITS_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY
    ext = make_extractor(DIGITS_EXTRACTOR, path)
    assert isinstance(ext, torch_fidelity.FeatureExtractorBase)
    assert default_feature(ext) == "features" and default_feature(DIGITS_EXTRACTOR) == "features"
    x_u8 = torch.from_numpy(digits[0][:200])
    with torch.no_grad():
        direct = model.features(u8_to_float(x_u8))
    via = extract_features(ext, x_u8, "features")
    assert via.shape == (200, 64) and via.dtype == torch.float32
    torch.testing.assert_close(via, direct, rtol=0, atol=0)
    (raw,) = ext(x_u8)  # torch-fidelity's own calling convention: a tuple
    torch.testing.assert_close(raw, direct, rtol=0, atol=0)

    with pytest.raises(ValueError):  # torch-fidelity's vassert: uint8 only
        ext(u8_to_float(x_u8))
    with pytest.raises(ValueError):  # native channel count only
        ext(x_u8.repeat(1, 3, 1, 1))


def test_make_extractor_requires_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception"):
        make_extractor("inception-v3-compat", None)
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        make_extractor("inception-v3-compat", missing)
    with pytest.raises(FileNotFoundError):
        make_extractor(DIGITS_EXTRACTOR, tmp_path / "nope.safetensors")


def test_inception_gets_grayscale_repeated_to_rgb(monkeypatch, tmp_path, digits):
    """No Inception weights here: build torch-fidelity's Inception with random weights to check the plumbing."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = tmp_path / "fake-inception.pth"
    torch.save({}, weights)
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    ext = make_extractor("inception-v3-compat", weights)
    assert default_feature(ext) == "2048"
    gray = torch.from_numpy(digits[0][:2])
    f_gray = extract_features(ext, gray, "2048")
    f_rgb = extract_features(ext, gray.repeat(1, 3, 1, 1), "2048")
    assert f_gray.shape == (2, 2048)
    torch.testing.assert_close(f_gray, f_rgb, rtol=0, atol=0)
    with pytest.raises(ValueError):  # torch-fidelity itself refuses a 1-channel batch
        ext(gray)


# ---------------------------------------------------------------------------------------------
# FD-digits end to end


def test_fd_digits_self_zero_and_separates(trained, digits):
    _, _, path = trained
    x, _ = digits
    ext = make_extractor(DIGITS_EXTRACTOR, path)
    feat = default_feature(ext)
    st_all = compute_statistics(_batches(x, [100, 37, 500]), ext, feat)
    assert st_all.n == len(x) and st_all.meta == {"extractor": DIGITS_EXTRACTOR, "feature": "features"}
    assert abs(frechet_distance(st_all.mu, st_all.sigma, st_all.mu, st_all.sigma)) < 1e-6

    # streaming with other batch sizes gives the same statistics
    st_b = compute_statistics(_batches(x, [256] * 8), ext, feat)
    # (float32 conv results depend slightly on the batch size, hence not 1e-10 here)
    np.testing.assert_allclose(st_b.sigma, st_all.sigma, rtol=0, atol=1e-6 * np.abs(st_all.sigma).max())

    # Two halves of the real digits, split at random (seeded). NB: the contiguous first/second
    # halves come from different writers and are measurably further apart (~5x), so a random
    # split is the fair "same distribution" reference.
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    half = len(x) // 2
    st_1 = compute_statistics(_batches(x[perm[:half]], [256] * 4), ext, feat)
    st_2 = compute_statistics(_batches(x[perm[half:]], [256] * 4), ext, feat)
    fd_halves = frechet_distance_from_stats(st_1, st_2)

    def noisy(std):
        return np.clip(x.astype(np.float64) + rng.normal(0, std, x.shape), 0, 255).round().astype(np.uint8)

    flat = x.reshape(len(x), -1)
    shuffled = np.stack([row[rng.permutation(flat.shape[1])] for row in flat]).reshape(x.shape)
    fd_light = frechet_distance_from_stats(st_all, compute_statistics(_batches(noisy(32), [512] * 4), ext, feat))
    fd_heavy = frechet_distance_from_stats(st_all, compute_statistics(_batches(noisy(128), [512] * 4), ext, feat))
    fd_shuf = frechet_distance_from_stats(st_all, compute_statistics(_batches(shuffled, [512] * 4), ext, feat))
    print(f"FD-digits: halves={fd_halves:.4g} noise32={fd_light:.4g} noise128={fd_heavy:.4g} shuffled={fd_shuf:.4g}")
    assert fd_halves > 0
    assert fd_heavy > 10 * fd_halves
    assert fd_shuf > 10 * fd_halves
    assert fd_heavy > fd_light > fd_halves  # monotone in the amount of corruption

    other = FeatureStats(meta={"extractor": "inception-v3-compat", "feature": "2048"}).update(np.zeros((2, 64)))
    with pytest.raises(ValueError, match="different extractors"):
        frechet_distance_from_stats(st_all, other)


def test_same_number_as_torch_fidelity_calculate_metrics(trained, digits):
    """Our streaming path and torch-fidelity's own calculate_metrics agree on FD-digits."""
    import torch_fidelity

    _, _, path = trained
    x, _ = digits

    class U8(torch.utils.data.Dataset):
        def __init__(self, a):
            self.a = torch.from_numpy(a)

        def __len__(self):
            return len(self.a)

        def __getitem__(self, i):
            return self.a[i]

    a, b = x[:900], x[900:]
    out = torch_fidelity.calculate_metrics(
        input1=U8(a),
        input2=U8(b),
        fid=True,
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
        batch_size=256,
        feature_extractor=DIGITS_EXTRACTOR,
        feature_extractor_weights_path=path,
    )
    ext = make_extractor(DIGITS_EXTRACTOR, path)
    ours = frechet_distance_from_stats(
        compute_statistics(_batches(a, [300] * 3), ext, "features"),
        compute_statistics(_batches(b, [300] * 3), ext, "features"),
    )
    assert ours == pytest.approx(out[torch_fidelity.KEY_METRIC_FID], rel=1e-4)


def test_every_safetensors_writer_gives_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its metadata in hash-map order, seeded per process: the classifier, a model checkpoint and
    the Inception copy must still be byte-identical from run to run (DVC hashes them; downstream stages depend on it)."""
    import hashlib
    import subprocess
    import sys

    script = """
import sys, torch
from pathlib import Path
from repro.evaluation.classifier import DigitsClassifier, save_classifier
from repro.nets.checkpoint import save_model
from repro.storage.files import save_safetensors
out = Path(sys.argv[1])
torch.manual_seed(0)
net = DigitsClassifier()
save_classifier(net, out / "classifier.safetensors", metadata={"accuracy": 0.9})
save_model(out / "model.safetensors", net, {"width": 32}, {"step": 1})
save_safetensors(out / "plain.safetensors", net.state_dict(), {"kind": "k", "source": "s", "source_sha256": "0" * 64})
"""
    digests = set()
    for i in range(5):
        out = tmp_path / str(i)
        out.mkdir()
        subprocess.run([sys.executable, "-c", script, str(out)], check=True)
        digests.add(tuple(hashlib.sha256((out / f).read_bytes()).hexdigest()
                          for f in ("classifier.safetensors", "model.safetensors", "plain.safetensors")))
    assert len(digests) == 1, digests
    # and the files still read back
    meta = read_classifier_metadata(tmp_path / "0" / "classifier.safetensors")
    assert meta["extra"] == {"accuracy": 0.9}
