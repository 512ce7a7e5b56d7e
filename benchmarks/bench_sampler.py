"""Benchmark: sampler throughput at the papers' network sizes, with random weights.

For each network (EDM CIFAR-10 DDPM++ 56M, EDM2 ImageNet-64 S 280M, EDM2 ImageNet-512 L 777M in latents) this
times network evaluations at a given batch and reports images per second for the paper's sampler (Heun:
NFE = 2 * steps - 1), plus peak memory. On CPU a full sampling run is too slow to time, so by default it times
`--evals` network evaluations and divides by the NFE (the sampler adds only a few elementwise ops per step);
`--full` runs the whole sampler instead.

    python benchmarks/bench_sampler.py                       # CPU, batch 2, 2 evaluations per network
    python benchmarks/bench_sampler.py --device cuda --batch 64 --full
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.networks import arch_presets, build_network, count_parameters  # noqa: E402
from repro.networks_edm2 import EDM2_PRESETS  # noqa: E402
from repro.sampler import edm_sampler  # noqa: E402

NETS = {  # name: (architecture, sampler steps of the paper protocol)
    "edm-cifar10-ddpmpp (56M)": (lambda: arch_presets()["edm-cifar10-32x32-cond-vp"], 18),
    "edm2-img64-s (280M)": (lambda: dict(EDM2_PRESETS["img64-s"]), 32),
    "edm2-img512-l (777M, latents)": (lambda: dict(EDM2_PRESETS["img512-l"]), 32),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--evals", type=int, default=2, help="network evaluations timed per network")
    ap.add_argument("--full", action="store_true", help="time the whole sampler instead of single evaluations")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (GPU)")
    args = ap.parse_args()
    dev = args.device
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, {args.dtype}")
    for name, (make_arch, steps) in NETS.items():
        torch.manual_seed(0)
        arch = make_arch()
        net = build_network(arch).to(dev).eval().requires_grad_(False)
        c, r, L = arch["img_channels"], arch["img_resolution"], arch.get("label_dim", 0)
        x = torch.randn(args.batch, c, r, r, device=dev)
        y = torch.nn.functional.one_hot(torch.arange(args.batch) % L, L).float().to(dev) if L else None
        sigma = torch.full([args.batch], 2.5, device=dev)
        nfe = 2 * steps - 1
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        ctx = torch.autocast(dev, dtype=amp) if amp is not None else torch.autocast(dev, enabled=False)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), ctx:
            net(x, sigma, y)  # warm-up
            sync(dev)
            t0 = time.perf_counter()
            if args.full:
                edm_sampler(net, x, y, num_steps=steps)
                evals = nfe
            else:
                for _ in range(args.evals):
                    net(x, sigma, y)
                evals = args.evals
            sync(dev)
            dt = (time.perf_counter() - t0) / evals
        ips = args.batch / (dt * nfe)
        mem = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU peak" if dev == "cuda" else
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process peak RSS")
        how = "whole sampler" if args.full else f"{evals} evaluations, / NFE"
        print(f"{name:32s} {count_parameters(net) / 1e6:7.1f}M params  {dt * 1e3:9.1f} ms/eval  "
              f"{nfe} NFE  {ips:10.4f} images/s ({how}); {mem}")
        del net


if __name__ == "__main__":
    main()
