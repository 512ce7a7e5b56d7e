"""Benchmark: the closed-form kernel critic's time and memory against bank size (repro.methods.kernel).

One guidance evaluation is grad D at a batch of query images against a real and a fake bank of the given size each
(CIFAR-sized vectors, 3 x 32 x 32, uniform in [-1, 1]; the values do not change the cost). The evaluation streams
the banks in chunks, so its largest intermediate is fixed by ``--chunk`` whatever the bank size: this prints the
measured time per evaluation, the time per (query, bank image) pair, the peak resident memory of the process (which
holds the banks several times: the float32 inputs, their float64 copies and, for the polyharmonic kernel at a noise
level, a noised float64 copy; banks_MiB is one float64 copy of both), and the chunk's bound.

    python benchmarks/kernel_banks.py                                  # CPU, banks 1000 .. 8000
    python benchmarks/kernel_banks.py --device cuda --banks 10000 50000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.methods.kernel import KernelCritic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--banks", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--kernel", default="polyharmonic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    dim = 3 * 32 * 32
    print(f"# kernel critic gradient, {a.kernel}, dim {dim}, {a.queries} queries, chunk {a.chunk}, device {a.device} "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    bound = (a.chunk * a.chunk * 3 + a.chunk * dim) * 8 / 2 ** 20
    print(f"# largest intermediate per block: ~{bound:.0f} MiB (chunk^2 distances/weights + a chunk of the bank)")
    print("bank_each  s_per_eval  us_per_pair  peak_rss_MiB  banks_MiB")
    g = torch.Generator().manual_seed(0)
    for n in a.banks:
        real = (torch.rand(n, dim, generator=g) * 2 - 1).to(a.device)
        fake = (torch.rand(n, dim, generator=g) * 2 - 1).to(a.device)
        x = (torch.rand(a.queries, dim, generator=g) * 2 - 1).to(a.device)
        critic = KernelCritic(real, fake, a.kernel, 1.0, chunk=a.chunk).at_sigma(0.5, seed=1)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            critic.grad(x, normalize=True)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = min(times)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n:9d}  {t:10.3f}  {t / (a.queries * 2 * n) * 1e6:11.3f}  {rss:12.0f}  {2 * n * dim * 8 / 2 ** 20:9.0f}")


if __name__ == "__main__":
    main()
