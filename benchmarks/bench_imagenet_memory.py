"""Peak host memory (RSS) per rank of a DDO round on sharded data, against the number of items.

For each data size (default 10k, 100k, 1M items) this writes a synthetic sharded data set in the data stage's format
(3x8x8 uint8 items, 5,000 per shard, written through np.memmap: nothing decoded; repro.datasets.sharded.
write_array_shards) and a micro EDM network (the micro preset's architecture, random weights), then runs one DDO
round (repro.methods.ddo.rounds.train_round) on 2 gloo processes (torchrun): the round generates its whole fake
bank (one fake per item, as shards per rank, sampler.num_steps 2), then trains 32 steps of batch 64 reading each
rank's slice through the seeded shard order. Each rank reports its peak RSS (getrusage ru_maxrss, which counts the
memory-mapped shard pages it touched) and its RSS before the round. The selection metric is a stand-in (a function
of the weights), the same at every size: the selection samples' memory does not depend on the data size.

    nice -n 5 python benchmarks/bench_imagenet_memory.py [--sizes 10000 100000 1000000] [--out FILE]

Prints a table (sizes side by side, ratios to the smallest size) and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

SHAPE, CLASSES, SHARD = (3, 8, 8), 10, 5000


class WeightMetric:
    """The selection metric's stand-in: a deterministic function of the weights (no sampling, no extractor)."""

    name = "weight_norm"

    def score(self, net, seeds, label_dim, img_shape, sampler):
        return float(sum((p.detach().double() ** 2).sum() for p in net.parameters()).sqrt()) % 1.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(folder: Path) -> None:
    """One rank (under torchrun): a DDO round on the sharded data in ``folder``; writes rank-<r>.json."""
    import torch

    from repro.cluster import distributed
    from repro.config import load_config
    from repro.datasets.sharded import ShardedDataset
    from repro.methods.ddo.rounds import train_round
    from repro.pipeline.tracking import NullTracker

    torch.set_num_threads(1)
    distributed.init_from_env()
    cfg = load_config(preset="micro")
    data = ShardedDataset(folder / "data/manifest.json")
    before = _rss_mib()
    t0 = time.time()
    dcfg = replace(cfg.ddo, nimg_per_round=32 * 64, eval_every_nimg=16 * 64, batch=64)
    sampler = replace(cfg.sampler, num_steps=2, batch=1000)
    train_round("ddo", 1, folder / "base.safetensors", data, dcfg, sampler, 0.5, WeightMetric(), folder / "round",
                NullTracker(), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (folder / f"rank-{distributed.rank()}.json").write_text(json.dumps(
        {"rss_before_mib": before, "peak_rss_mib": peak, "seconds": time.time() - t0}))
    distributed.shutdown()


def prepare(folder: Path, n: int) -> None:
    """The synthetic shards (seeded noise images, labels i mod 10) and the micro base network."""
    from repro.config import load_config
    from repro.datasets.sharded import write_array_shards
    from repro.methods.pretrain import arch_from_config
    from repro.nets.checkpoint import save_model
    from repro.nets.factory import build_network

    def fill(start: int, stop: int):
        rng = np.random.default_rng(start)
        return rng.integers(0, 256, (stop - start, *SHAPE), dtype=np.uint8), np.arange(start, stop) % CLASSES

    d = folder / "data"
    write_array_shards(d / "synthetic.npz", d / "manifest.json", n, SHARD, SHAPE, CLASSES, fill)

    class Shape:
        shape, num_classes = SHAPE, CLASSES

    import torch

    arch = arch_from_config(load_config(preset="micro").pretrain, Shape)
    torch.manual_seed(0)
    save_model(folder / "base.safetensors", build_network(arch), arch, {"kind": "benchmark"})


def run(sizes: list[int], out: Path | None) -> None:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-mem-{n}-") as tmp:
            folder = Path(tmp)
            t0 = time.time()
            prepare(folder, n)
            made = time.time() - t0
            env = {**os.environ, "OMP_NUM_THREADS": "1", "REPRO_TRACKING": "off"}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(29500 + n % 997), __file__, "--worker", str(folder)],
                           check=True, env=env)
            ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(2)]
            rows.append({"n": n, "shards": -(-n // SHARD), "made_s": made, "ranks": ranks})
            print(f"n={n}: {ranks}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    lines = ["# bench_imagenet_memory: peak RSS per rank of one DDO round on sharded data (2 gloo ranks)",
             f"# commit {commit}; {platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.platform()}; "
             f"torch {__import__('torch').__version__}",
             f"# items {SHAPE} uint8, {SHARD} per shard; micro EDM net; fake bank of n fakes (sampler 2 steps) + "
             "32 steps of batch 64; selection metric: stand-in",
             "",
             "| items | shards | rank | RSS before round (MiB) | peak RSS (MiB) | peak / smallest size's | round s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for r, x in enumerate(row["ranks"]):
            base = rows[0]["ranks"][r]["peak_rss_mib"]
            lines.append(f"| {row['n']:,} | {row['shards']} | {r} | {x['rss_before_mib']:.0f} | {x['peak_rss_mib']:.0f} "
                         f"| {x['peak_rss_mib'] / base:.3f} | {x['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker)
    else:
        run(a.sizes, a.out)


if __name__ == "__main__":
    main()
