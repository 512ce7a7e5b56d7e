"""repro.evaluation.references: published FID reference files are read exactly, checked, and never executed.

Reference files are written here in each upstream layout (facts from the writers, no upstream code):
EDM ``fid.py`` -> ``np.savez(mu=, sigma=)``; EDM2 ``calculate_metrics.py`` -> ``pickle.dump`` of
``{'num_images': n, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}}``; guided-diffusion reference batches ->
``arr_0`` (images) + ``mu``/``sigma`` + ``mu_s``/``sigma_s``; ours -> ``FeatureStats.save``.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest

from repro.evaluation import references as R
from repro.evaluation.fidelity import FeatureStats

D = 16


def _spd(rng, d=D, n=64):
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d)
    s = np.cov(x, rowvar=False)
    return x.mean(0) + rng.normal(size=d), (s + s.T) / 2


@pytest.fixture
def stats():
    rng = np.random.default_rng(0)
    return _spd(rng), _spd(rng)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_edm(p, mu, sigma):
    np.savez(p, mu=mu, sigma=sigma)
    return p


def write_edm2(p, mu, sigma, protocol=4, **extra):
    data = {"num_images": 50000, "fid": {"mu": mu, "sigma": sigma},
            "fd_dinov2": {"mu": mu[:8].copy(), "sigma": sigma[:8, :8].copy()}, **extra}
    p.write_bytes(pickle.dumps(data, protocol=protocol))
    return p


def write_openai(p, mu, sigma, mu_s, sigma_s):
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(p, arr_0=imgs, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return p


def independent_fid(mu1, s1, mu2, s2):
    """||mu1-mu2||^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2, via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r @ s2 @ r)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


# ------------------------------------------------------------------------------------------------
# Each format round-trips exactly and is inferred.


def test_each_format_roundtrips_and_is_inferred(tmp_path, stats):
    (mu, sigma), (mu_s, sigma_s) = stats
    files = {
        "edm-npz": write_edm(tmp_path / "cifar10-32x32.npz", mu, sigma),
        "edm2-pkl": write_edm2(tmp_path / "img64.pkl", mu, sigma),
        "openai-npz": write_openai(tmp_path / "VIRTUAL_imagenet256_labeled.npz", mu, sigma, mu_s[:12], sigma_s[:12, :12]),
    }
    st = FeatureStats()
    st.update(np.random.default_rng(1).normal(size=(40, D)))
    st.meta = {"extractor": "inception-v3-compat", "feature": "2048"}
    st.save(tmp_path / "ours.npz")
    files["repro-npz"] = tmp_path / "ours.npz"

    for kind, p in files.items():
        assert R.infer_kind(p) == kind
        ref = R.load_reference(p)
        assert ref.kind == kind and ref.metric == "fid" and ref.path == str(p)
        want_mu, want_sigma = (st.mu, st.sigma) if kind == "repro-npz" else (mu, sigma)
        assert ref.mu.dtype == np.float64 and ref.sigma.dtype == np.float64
        np.testing.assert_array_equal(ref.mu, want_mu)
        np.testing.assert_array_equal(ref.sigma, want_sigma)
        # explicit kind gives the same numbers
        np.testing.assert_array_equal(R.load_reference(p, kind=kind).sigma, want_sigma)
        fs = ref.to_feature_stats()
        np.testing.assert_array_equal(fs.mu, want_mu)
        np.testing.assert_array_equal(fs.sigma, want_sigma)

    assert R.load_reference(files["edm-npz"]).n is None
    assert R.load_reference(files["openai-npz"]).n is None
    edm2 = R.load_reference(files["edm2-pkl"])
    assert edm2.n == 50000 and edm2.meta["available"] == ["fd_dinov2", "fid"]
    ours = R.load_reference(files["repro-npz"])
    assert ours.n == 40 and ours.meta["extractor"] == "inception-v3-compat"

    # Other metrics in the same files.
    dino = R.load_reference(files["edm2-pkl"], metric="fd_dinov2")
    np.testing.assert_array_equal(dino.sigma, sigma[:8, :8])
    sfid = R.load_reference(files["openai-npz"], metric="sfid")
    np.testing.assert_array_equal(sfid.mu, mu_s[:12])
    np.testing.assert_array_equal(sfid.sigma, sigma_s[:12, :12])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_edm2_pickle_protocols_and_numpy1_names(tmp_path, stats, protocol):
    (mu, sigma), _ = stats
    p = write_edm2(tmp_path / "img512.pkl", mu, sigma, protocol=protocol)
    if protocol == 2:  # how numpy 1.x names its reconstructor (text GLOBAL opcodes in protocol 2)
        raw = p.read_bytes()
        assert b"numpy._core.multiarray\n" in raw
        p.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ref = R.load_reference(p, dim=D)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)


def test_inception_dim_2048(tmp_path, stats):
    rng = np.random.default_rng(2)
    mu = rng.normal(size=2048)
    sigma = np.diag(rng.uniform(0.1, 2.0, size=2048))
    p = write_edm(tmp_path / "big.npz", mu, sigma)
    ref = R.load_reference(p, dim=R.INCEPTION_DIM)
    assert ref.dim == 2048
    np.testing.assert_array_equal(ref.sigma, sigma)
    small = write_edm(tmp_path / "small.npz", *stats[0])
    with pytest.raises(ValueError, match=r"small\.npz.*D = 16, expected 2048"):
        R.load_reference(small, dim=R.INCEPTION_DIM)


# ------------------------------------------------------------------------------------------------
# Clear errors.


def test_truncated_files_are_refused(tmp_path, stats):
    (mu, sigma), _ = stats
    for p in (write_edm(tmp_path / "a.npz", mu, sigma), write_edm2(tmp_path / "b.pkl", mu, sigma),
              write_openai(tmp_path / "c.npz", mu, sigma, mu, sigma)):
        raw = p.read_bytes()
        for cut in (len(raw) // 2, len(raw) - 7):
            p.write_bytes(raw[:cut])
            with pytest.raises(ValueError, match=rf"{p.name}.*not a readable"):
                R.load_reference(p)


def test_wrong_shapes_are_refused(tmp_path, stats):
    (mu, sigma), _ = stats
    cases = {
        "sigma_rect.npz": (mu, sigma[:, :-1]),
        "sigma_dim.npz": (mu, sigma[:-1, :-1]),
        "mu_2d.npz": (mu[None], sigma),
    }
    for name, (m, s) in cases.items():
        p = write_edm(tmp_path / name, m, s)
        with pytest.raises(ValueError, match=rf"{name}.*(must be|shape)"):
            R.load_reference(p)
    p = write_edm2(tmp_path / "bad.pkl", mu, sigma[:4])
    with pytest.raises(ValueError, match=r"bad\.pkl.*'fid\.sigma' must be \[D, D\]"):
        R.load_reference(p)


def test_missing_keys_are_refused(tmp_path, stats):
    (mu, sigma), _ = stats
    p = tmp_path / "only_mu.npz"
    np.savez(p, mu=mu)
    with pytest.raises(ValueError, match=r"only_mu\.npz.*match no known reference format"):
        R.load_reference(p)
    with pytest.raises(ValueError, match=r"only_mu\.npz.*missing key\(s\) \['sigma'\]"):
        R.load_reference(p, kind="edm-npz")
    p = tmp_path / "no_spatial.npz"
    np.savez(p, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma)
    assert R.infer_kind(p) == "openai-npz"
    with pytest.raises(ValueError, match=r"no_spatial\.npz.*missing key\(s\) \['mu_s', 'sigma_s'\]"):
        R.load_reference(p, metric="sfid")
    p = tmp_path / "nofid.pkl"
    p.write_bytes(pickle.dumps({"num_images": 3, "fd_dinov2": {"mu": mu, "sigma": sigma}}))
    with pytest.raises(ValueError, match=r"nofid\.pkl.*missing key 'fid'"):
        R.load_reference(p)
    p = tmp_path / "nosigma.pkl"
    p.write_bytes(pickle.dumps({"fid": {"mu": mu}}))
    with pytest.raises(ValueError, match=r"nosigma\.pkl.*missing key\(s\) \['sigma'\] in 'fid'"):
        R.load_reference(p)


def test_nonfinite_and_asymmetric_are_refused(tmp_path, stats):
    (mu, sigma), _ = stats
    bad_mu = mu.copy()
    bad_mu[3] = np.nan
    with pytest.raises(ValueError, match=r"nan\.npz.*'mu' has 1 non-finite"):
        R.load_reference(write_edm(tmp_path / "nan.npz", bad_mu, sigma))
    bad_sigma = sigma.copy()
    bad_sigma[2, 5] = np.inf
    with pytest.raises(ValueError, match=r"inf\.pkl.*'fid\.sigma' has \d+ non-finite"):
        R.load_reference(write_edm2(tmp_path / "inf.pkl", mu, bad_sigma))
    asym = sigma.copy()
    asym[0, 1] += 1e-3 * np.abs(sigma).max()
    with pytest.raises(ValueError, match=r"asym\.npz.*not symmetric"):
        R.load_reference(write_edm(tmp_path / "asym.npz", mu, asym))
    # float32 storage (asymmetry ~1e-7 relative at most) is within the stated tolerance
    ref = R.load_reference(write_edm(tmp_path / "f32.npz", mu.astype(np.float32), sigma.astype(np.float32)))
    np.testing.assert_array_equal(ref.sigma, sigma.astype(np.float32).astype(np.float64))


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_harmful_pickle_is_refused_and_not_run(tmp_path, stats):
    (mu, sigma), _ = stats
    marker = tmp_path / "PWNED"
    p = tmp_path / "img512.pkl"
    p.write_bytes(pickle.dumps({"num_images": 1, "fid": {"mu": mu, "sigma": sigma}, "x": _Evil(marker)}))
    assert b"system" in p.read_bytes()
    with pytest.raises(ValueError, match=r"img512\.pkl.*refused unsafe.*(posix|os)\.system"):
        R.load_reference(p)
    assert not marker.exists()


def test_sha256_checked_before_reading(tmp_path, stats):
    (mu, sigma), _ = stats
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"fid": _Evil(marker)}))
    with pytest.raises(ValueError, match=r"evil\.pkl: sha256 mismatch.*not read"):
        R.load_reference(p, expected_sha256="0" * 64)
    assert not marker.exists()
    good = write_edm(tmp_path / "good.npz", mu, sigma)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        R.load_reference(good, expected_sha256="ab" * 32)
    ref = R.load_reference(good, expected_sha256=_sha(good).upper())
    assert ref.sha256 == _sha(good)


# ------------------------------------------------------------------------------------------------
# FID.


def test_fid_self_zero_and_matches_independent(tmp_path, stats):
    (mu1, s1), (mu2, s2) = stats
    ref = R.load_reference(write_edm2(tmp_path / "img64.pkl", mu1, s1))
    assert abs(R.fid_from_stats(ref.mu, ref.sigma, mu1, s1)) < 1e-9 * np.trace(s1)
    ours = R.fid_from_stats(mu2, s2, ref.mu, ref.sigma)
    want = independent_fid(mu2, s2, mu1, s1)
    assert want > 1.0
    assert abs(ours - want) <= 1e-6 * abs(want)
    # symmetric in its arguments
    assert abs(R.fid_from_stats(mu1, s1, mu2, s2) - want) <= 1e-6 * abs(want)
