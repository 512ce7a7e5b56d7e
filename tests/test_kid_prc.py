"""KID, precision/recall and the eigenvalue Fréchet distance against independent numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from repro.evaluation.fidelity import frechet_distance, inception_score, kid, precision_recall, trace_sqrt_product


def _cov(rng, n, d, scale=1.0):
    x = rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) * scale / np.sqrt(d))
    return np.cov(x, rowvar=False)


@pytest.mark.parametrize("d,n", [(16, 200), (300, 1000), (120, 60)])  # the last: N < D, singular covariances
def test_eig_trace_and_fd_match_scipy_sqrtm(d, n):
    rng = np.random.default_rng(d)
    s1, s2 = _cov(rng, n, d), _cov(rng, n, d, 2.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ref_trace = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(ref_trace, rel=1e-6)
    fd_ref = mu1 @ mu1 - 2 * mu1 @ mu2 + mu2 @ mu2 + np.trace(s1) + np.trace(s2) - 2 * ref_trace
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fd_ref, rel=1e-6)
    if n > d:
        assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(fd_ref, rel=1e-6)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)  # sqrt of round-off when singular
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu1, s1, mu2, s2, method="svd")


def _independent_kid(x, y, subsets, m, seed):
    rng = np.random.RandomState(seed)
    d = x.shape[1]
    vals = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)].astype(np.float64)
        b = y[rng.choice(len(y), m, replace=False)].astype(np.float64)
        k = lambda p, q: (p @ q.T / d + 1.0) ** 3  # noqa: E731
        kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
        off = lambda g: (g.sum() - np.trace(g)) / (m * (m - 1))  # noqa: E731
        vals.append(off(kaa) + off(kbb) - 2 * kab.mean())
    return np.mean(vals), np.std(vals)


def test_kid_matches_an_independent_unbiased_mmd():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    y = (rng.standard_normal((150, 8)) * 1.3 + 0.4).astype(np.float32)
    got = kid(x, y, subsets=7, subset_size=50, seed=3)
    mean, std = _independent_kid(x, y, 7, 50, 3)
    assert got["kid_mean"] == pytest.approx(mean, rel=1e-5) and got["kid_std"] == pytest.approx(std, rel=1e-4)
    assert got["kid_mean"] > 0.05
    same = kid(x, rng.permutation(x), subsets=7, subset_size=50, seed=3)["kid_mean"]
    assert abs(same) < got["kid_mean"] / 5  # unbiased: near 0 for the same distribution
    with pytest.raises(ValueError, match="subset size"):
        kid(x, y, subset_size=1000)


def _independent_prc(gen, real, k):
    dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # noqa: E731
    r_real = np.sort(dist(real, real), axis=1)[:, k]  # k-th neighbour, the point itself (distance 0) excluded
    r_gen = np.sort(dist(gen, gen), axis=1)[:, k]
    precision = (dist(gen, real) <= r_real[None, :]).any(axis=1).mean()
    recall = (dist(real, gen) <= r_gen[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_match_an_independent_knn_computation():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((90, 5))
    gen = np.concatenate([rng.standard_normal((60, 5)) * 0.5, rng.standard_normal((30, 5)) + 4.0])  # narrow + off
    got = precision_recall(gen, real, k=3)
    p, r = _independent_prc(gen, real, 3)
    assert got["precision"] == pytest.approx(p, abs=1e-6) and got["recall"] == pytest.approx(r, abs=1e-6)
    assert 0.5 < got["precision"] < 0.8  # the 30 shifted points fall outside the real manifold
    assert got["recall"] < 0.9  # the narrow generator misses real tails
    assert precision_recall(real, real, k=3) == {"precision": 1.0, "recall": 1.0}


def test_inception_score_says_why_it_is_not_computed():
    with pytest.raises(NotImplementedError, match="logits"):
        inception_score()
