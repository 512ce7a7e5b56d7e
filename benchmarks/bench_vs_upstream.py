"""Benchmark: our EDM sampler against upstream EDM's generate.py on the same network, weights, seeds and GPU.

Upstream's code (NVlabs/edm: training/networks.py, generate.py) is imported from a folder given by ``--edm`` that
the user fetched (benchmarks/gpu_check.sh expects it in the ignored third_party/edm); it is never part of this
repository. Both sides get the CIFAR-10 DDPM++ network (EDMPrecond + SongUNet, 55.7M parameters, random weights:
upstream's own initialisation, copied into our network with a strict key and shape check) and the same seeds.

Timed for each batch size: one whole batch from seeds to uint8 images on the host, i.e. per-seed generators,
latents, class labels, the 18-step Heun sampler (35 network evaluations), conversion to uint8 and the copy to the
CPU. Upstream's generate.py then writes one PNG per image; that is left out on both sides (file I/O, not sampling).
Upstream runs as generate.py does (float32, PyTorch's default TF32 flags, which this script does not change); ours
runs each variant named in ``--variants`` (dtype = sampler.dtype, +compile = sampler.compile,
+cl = channels-last weights). The first call of each (variant, batch) is a warm-up (and compiles); the figure is
the median of ``--reps`` timed calls. Also printed: whether the fp32 images equal upstream's.

    python benchmarks/bench_vs_upstream.py --edm third_party/edm --batches 64,256,1024
    python benchmarks/bench_vs_upstream.py --edm third_party/edm --device cpu --batches 2 --steps 2 --reps 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.config import load_config  # noqa: E402
from repro.nets.state import load_state_strict  # noqa: E402
from repro.nets.factory import arch_presets, build_network  # noqa: E402
from repro.sampling.generate import generate_images  # noqa: E402

# upstream train.py's --arch=ddpmpp --cond=1 settings for CIFAR-10 (facts: names and values, not code)
UPSTREAM_KWARGS = dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, model_type="SongUNet",
                       embedding_type="positional", encoder_type="standard", decoder_type="standard",
                       channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                       dropout=0.13, augment_dim=9)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, dev: str) -> float:
    fn()  # warm-up (and compilation)
    out = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm", required=True, help="a checkout of NVlabs/edm (never committed here)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="64,256,1024")
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", default="fp32,bf16,fp16,bf16+cl,bf16+compile,fp16+compile")
    ap.add_argument("--compile-batches", default="1024", help="batch sizes at which +compile variants run")
    ap.add_argument("--fid", default="", help="also time an FID run end to end with this variant of ours (e.g. "
                    "bf16+compile): --fid-n seeds sampled at batch --fid-batch, Inception features (random weights in "
                    "torch-fidelity's layout: the same work as the real ones) streamed into statistics")
    ap.add_argument("--fid-n", type=int, default=50000)
    ap.add_argument("--fid-batch", type=int, default=1024)
    args = ap.parse_args()
    dev = args.device
    sys.path.insert(0, os.path.abspath(args.edm))
    import generate as up_generate  # noqa: E402  (upstream)
    from training import networks as up_networks  # noqa: E402  (upstream)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}, "
          f"matmul.allow_tf32 {torch.backends.cuda.matmul.allow_tf32} (defaults, both sides)")
    torch.manual_seed(0)
    up = up_networks.EDMPrecond(**UPSTREAM_KWARGS).to(dev).eval().requires_grad_(False)
    arch = arch_presets()["edm-cifar10-32x32-cond-vp"]
    ours = build_network(arch)
    load_state_strict(ours, {k: v.detach().cpu() for k, v in up.state_dict().items()}, "upstream EDMPrecond")
    ours = ours.to(dev).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"network: CIFAR-10 DDPM++ cond ({n_params / 1e6:.2f}M parameters, random weights), "
          f"{args.steps} steps = {2 * args.steps - 1} NFE")

    base = load_config(preset="edm-cifar10-cond").sampler
    variants = [v for v in args.variants.split(",") if v]
    nets_cl = {}

    def ours_fn(batch: int, variant: str):
        parts = variant.split("+")
        sampler = dataclasses.replace(base, num_steps=args.steps, batch=batch, dtype=parts[0],
                                      compile="compile" in parts, label_mode="random")
        net = ours
        if "cl" in parts:
            if "cl" not in nets_cl:
                nets_cl["cl"] = copy.deepcopy(ours).to(memory_format=torch.channels_last)
            net = nets_cl["cl"]
        seeds = list(range(batch))
        return lambda: next(generate_images(net, seeds, img_shape=(3, 32, 32), label_dim=10, sampler=sampler,
                                            batch=batch, device=dev))[1]

    def upstream_fn(batch: int):
        seeds = list(range(batch))

        def run():
            rnd = up_generate.StackedRandomGenerator(dev, seeds)
            latents = rnd.randn([batch, 3, 32, 32], device=dev)
            labels = torch.eye(10, device=dev)[rnd.randint(10, size=[batch], device=dev)]
            x = up_generate.edm_sampler(up, latents, labels, randn_like=rnd.randn_like, num_steps=args.steps)
            return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()
        return run

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        with torch.no_grad():
            a, b = upstream_fn(batch)(), ours_fn(batch, "fp32")()
        diff = (a.int() - b.int()).abs()
        print(f"batch {batch}: fp32 images ours vs upstream: {(diff == 0).float().mean().item() * 100:.3f}% of "
              f"pixels equal, max difference {diff.max().item()} grey levels")
        with torch.no_grad():
            t_up = timed(upstream_fn(batch), args.reps, dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print(f"  upstream generate.py sampler (fp32)      {batch / t_up:9.1f} images/s  ({t_up * 1e3:8.1f} ms/batch)")
        for v in variants:
            if "compile" in v and (dev != "cuda" or str(batch) not in args.compile_batches.split(",")):
                continue
            with torch.no_grad():
                t = timed(ours_fn(batch, v), args.reps, dev)
            mem = f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak" if dev == "cuda" else ""
            print(f"  ours {v:<36s} {batch / t:9.1f} images/s  ({t * 1e3:8.1f} ms/batch)  "
                  f"ours/upstream = {t_up / t:5.2f}x{mem}", flush=True)
            rows.append((batch, v, t_up / t))
    best = max(rows, key=lambda r: r[2]) if rows else None
    if best:
        print(f"best ratio: {best[2]:.2f}x (batch {best[0]}, {best[1]})")
    if args.fid:
        fid_wall_time(args, ours, ours_fn, dev)


def fid_wall_time(args, ours, ours_fn, dev: str) -> None:
    import tempfile

    from repro.evaluation import fidelity
    from repro.evaluation.inception import random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        ext = fidelity.make_extractor(fidelity.INCEPTION_EXTRACTOR, random_inception_weights(f"{tmp}/w.pth"), device=dev)
    feature = fidelity.default_feature(fidelity.INCEPTION_EXTRACTOR)
    seeds = list(range(args.fid_n))
    parts = args.fid.split("+")
    base = load_config(preset="edm-cifar10-cond").sampler
    sampler = dataclasses.replace(base, batch=args.fid_batch, dtype=parts[0], compile="compile" in parts)
    with torch.no_grad():
        ours_fn(args.fid_batch, args.fid)()  # warm-up (compilation) outside the timing
        probe = torch.randint(0, 256, (args.fid_batch, 3, 32, 32), dtype=torch.uint8)
        fidelity.extract_features(ext, probe, feature)
        sync(dev)
        t = time.perf_counter()
        t_features = 0.0
        stats = fidelity.FeatureStats()
        for _, images, _ in generate_images(ours, seeds, img_shape=(3, 32, 32), label_dim=10, sampler=sampler,
                                            batch=args.fid_batch, device=dev):
            sync(dev)
            t0 = time.perf_counter()
            stats.update(fidelity.extract_features(ext, images, feature))
            sync(dev)
            t_features += time.perf_counter() - t0
        wall = time.perf_counter() - t
    print(f"FID run, {args.fid_n} images ({args.fid}, batch {args.fid_batch}, {2 * args.steps - 1} NFE): "
          f"{wall:.1f} s wall, of which Inception features {t_features:.1f} s ({t_features / wall * 100:.0f}%); "
          f"{args.fid_n / wall:.0f} images/s end to end")


if __name__ == "__main__":
    main()
