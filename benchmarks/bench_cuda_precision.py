"""Benchmark: what half precision and torch.compile do to the tiny pipeline's metric and speed, on one device.

Takes a finished tiny run's models (models/base.safetensors and, when present, models/ddo/ddo-round<R>.safetensors,
plus the extractor and reference statistics of the extractor stage), samples the tiny protocol's seed ranges with
each sampler setting (sampler.dtype fp32/bf16/fp16, sampler.compile on/off) and prints FD-digits per range, its
change against fp32 (the noise between the two seed ranges is printed beside it: a change below it is no
change), the fraction of uint8 pixels that differ from fp32, and images per second, all measured in one run.

    python benchmarks/bench_cuda_precision.py                  # on CUDA, from the repository root after `dvc repro`
    python benchmarks/bench_cuda_precision.py --device cpu --variants fp32,bf16 --n 200
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from repro.config import load_config  # noqa: E402
from repro.evaluation import fidelity  # noqa: E402
from repro.evaluation.metric import load_metric  # noqa: E402
from repro.nets.checkpoint import load_model  # noqa: E402
from repro.sampling.generate import generate_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--root", default=".", help="the project holding models/ (a finished tiny run)")
    ap.add_argument("--variants", default="fp32,fp32+compile,bf16,bf16+compile,fp16,fp16+compile")
    ap.add_argument("--n", type=int, default=0, help="seeds per range (default: the preset's sample.n_samples)")
    ap.add_argument("--batch", type=int, default=1797)
    args = ap.parse_args()
    dev, root = args.device, Path(args.root)
    cfg = load_config(preset="tiny")
    n = args.n or cfg.sample.n_samples
    ranges = [np.arange(cfg.sample.first_seed + k * cfg.sample.n_samples, cfg.sample.first_seed + k * cfg.sample.n_samples + n)
              for k in range(cfg.sample.repeats)]
    metric = load_metric(cfg.extractor.kind, root / "models/extractor.safetensors", root / "models/reference_stats.npz")
    metric.extractor.to(dev)
    models = {"base": root / "models/base.safetensors"}
    last = root / f"models/ddo/ddo-round{cfg.ddo.rounds}.safetensors"
    if last.is_file():
        models[last.stem] = last
    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}), torch {torch.__version__}; "
          f"tiny preset sampler: {cfg.sampler.num_steps} steps; {len(ranges)} seed ranges of {n}")
    for name, path in models.items():
        net, arch, _ = load_model(path, device=dev)
        net.eval().requires_grad_(False)
        shape = (arch["img_channels"], arch["img_resolution"], arch["img_resolution"])
        label_dim = arch.get("label_dim", 0)
        ref_images = None
        for variant in args.variants.split(","):
            parts = variant.split("+")
            sampler = dataclasses.replace(cfg.sampler, dtype=parts[0], compile="compile" in parts, batch=args.batch)
            fds, times, images = [], [], []
            for k, seeds in enumerate(ranges):
                with torch.no_grad():
                    if k == 0 and "compile" in parts:  # compile outside the timing
                        list(generate_images(net, seeds[:args.batch], img_shape=shape, label_dim=label_dim,
                                             sampler=sampler, device=dev))
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    imgs = [b for _, b, _ in generate_images(net, seeds, img_shape=shape, label_dim=label_dim,
                                                             sampler=sampler, device=dev)]
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                    stats = fidelity.FeatureStats()
                    for b in imgs:
                        stats.update(metric.features(b))
                fds.append(metric.distance(stats))
                images.append(torch.cat(imgs))
            if ref_images is None:
                ref_images, ref_fds = images, fds
            changed = statistics.mean((a != b).float().mean().item() for a, b in zip(images, ref_images))
            delta = [a - b for a, b in zip(fds, ref_fds)]
            noise = abs(fds[0] - fds[1]) if len(fds) > 1 else float("nan")
            print(f"{name:<12s} {variant:<14s} FD-digits " + " ".join(f"{f:.4f}" for f in fds)
                  + "  (vs fp32 " + " ".join(f"{d:+.4f}" for d in delta) + f"; between ranges {noise:.4f})"
                  + f"  pixels changed vs fp32 {changed * 100:6.2f}%  {n / statistics.mean(times):9.0f} images/s",
                  flush=True)


if __name__ == "__main__":
    main()
