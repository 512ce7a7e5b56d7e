"""Benchmark: peak memory of the ImageNet data stage against the number of images (it should not grow with them).

Makes a synthetic ImageNet-like folder (10 classes of JPEGs of odd sizes around 300x250), then for each size N
prepares the first N images (hard links into a folder of their own) with repro.datasets.imagenet.prepare_imagenet
at 64x64 in a fresh process, and prints N, the number of shards, that process's peak RSS (ru_maxrss) and seconds.
What still grows with N: the list of file names and labels, held whole, and the index.

    python benchmarks/bench_imagenet_data_memory.py                        # N = 500, 2000, 8000; shards of 250
    python benchmarks/bench_imagenet_data_memory.py --sizes 1000,10000 --shard-size 1000
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, classes: int = 10) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        w, h = 250 + int(rng.integers(0, 100)), 200 + int(rng.integers(0, 100))
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # blocky: small and quick JPEGs
        path = d / f"img_{i:07d}.JPEG"
        Image.fromarray(pixels).resize((w, h)).save(path, quality=85)
        files.append(path)
    return files


def child(source: str, out: str, shard_size: int) -> None:
    from repro.config import DataConfig
    from repro.datasets.imagenet import prepare_imagenet

    t = time.perf_counter()
    m = prepare_imagenet(DataConfig(dataset="imagenet64", source=source, shard_size=shard_size),
                         Path(out) / "imagenet64.npz", Path(out) / "manifest.json")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{m['n']} {len(m['shards'])} {peak:.1f} {time.perf_counter() - t:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="500,2000,8000")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_folder(tmp / "all", max(sizes))
        print(f"synthetic JPEGs, 64x64 ADM crops, shards of {a.shard_size}; one fresh process per row")
        print(f"{'images':>8} {'shards':>7} {'peak RSS MiB':>13} {'seconds':>8}")
        for n in sizes:
            src = tmp / f"src{n}"
            for f in files[:n]:
                (src / f.parent.name).mkdir(parents=True, exist_ok=True)
                os.link(f, src / f.parent.name / f.name)
            r = subprocess.run([sys.executable, __file__, "--child", str(src), str(tmp / f"out{n}"),
                                str(a.shard_size)], capture_output=True, text=True, check=True)
            n_, shards, peak, secs = r.stdout.split()
            print(f"{n_:>8} {shards:>7} {float(peak):>13.1f} {float(secs):>8.1f}")


if __name__ == "__main__":
    main()
