"""Benchmark: Fréchet distance at Inception's D = 2048, eigenvalue method vs scipy.linalg.sqrtm, side by side.

Covariances of N random 2048-d features with a decaying spectrum (like Inception pool features), one pair per
repeat; prints the seconds of each method and their relative difference.

    python benchmarks/bench_fd.py                 # D = 2048, N = 10000, 2 repeats
    python benchmarks/bench_fd.py --dim 512 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from repro.evaluation.fidelity import frechet_distance  # noqa: E402


def stats(rng, n: int, d: int, shift: float):
    basis = rng.standard_normal((d, d)) / np.sqrt(d)
    scales = 1.0 / np.sqrt(1 + np.arange(d) / 20)
    x = (rng.standard_normal((n, d)) * scales) @ basis + shift
    return x.mean(0), np.cov(x, rowvar=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n", type=int, default=10000, help="features behind each covariance")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"# Fréchet distance, D = {args.dim}, N = {args.n}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("repeat\teig_s\tsqrtm_s\tspeedup\tfd_eig\tfd_sqrtm\trel_diff")
    for r in range(args.repeats):
        (m1, s1), (m2, s2) = stats(rng, args.n, args.dim, 0.0), stats(rng, args.n, args.dim, 0.01)
        t0 = time.perf_counter()
        a = frechet_distance(m1, s1, m2, s2, method="eig")
        t1 = time.perf_counter()
        b = frechet_distance(m1, s1, m2, s2, method="sqrtm")
        t2 = time.perf_counter()
        print(f"{r}\t{t1 - t0:.2f}\t{t2 - t1:.2f}\t{(t2 - t1) / (t1 - t0):.1f}x\t{a:.6f}\t{b:.6f}\t{abs(a - b) / abs(b):.1e}")


if __name__ == "__main__":
    main()
