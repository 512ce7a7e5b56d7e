"""Benchmark: sampler throughput at the papers' network sizes, with random weights.

For each setting (EDM CIFAR-10 DDPM++ 56M; EDM2 ImageNet-64 S 280M; EDM2 ImageNet-512 L 777M in latents with
the SD-VAE decoder; the same with autoguidance by EDM2-XS, DDO's w = 1.1) this times network evaluations at a
given batch through the same callable the sampler integrates (repro.sampling.edm.sampling_denoiser: guidance,
dtype, compile) and reports images per second for the paper's sampler (Heun: NFE = 2 * steps - 1; a guided
evaluation runs both networks), plus peak memory. Latent settings add the SD-VAE decode (83.65M, real config,
random weights). On CPU a full sampling run is too slow to time, so by default it times `--evals` evaluations
and divides by the NFE (the sampler adds only a few elementwise ops per step); `--full` runs the whole sampler.

    python benchmarks/bench_sampler.py                                 # CPU, batch 2, 2 evaluations each
    python benchmarks/bench_sampler.py --dtype bf16 --only img512      # CPU autocast bf16
    python benchmarks/bench_sampler.py --device cuda --batch 64 --full --dtype fp16 --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.config import load_config  # noqa: E402
from repro.nets.edm2 import PRESETS  # noqa: E402
from repro.nets.factory import arch_presets, build_network  # noqa: E402
from repro.nets.layers import count_parameters  # noqa: E402
from repro.sampling.edm import edm_sampler  # noqa: E402
from repro.sampling.generate import sampling_denoiser  # noqa: E402

GUIDE = "edm2-img512-xs-0134217-0.165"
SETTINGS = {  # name: (architecture, guide architecture, sampler steps of the paper protocol, latent decoder)
    "edm-cifar10-ddpmpp (56M)": (lambda: arch_presets()["edm-cifar10-32x32-cond-vp"], None, 18, False),
    "edm2-img64-s (280M)": (lambda: dict(PRESETS["img64-s"]), None, 32, False),
    "edm2-img512-l (777M) + vae": (lambda: dict(PRESETS["img512-l"]), None, 32, True),
    "edm2-img512-l + ag xs w=1.1 + vae": (lambda: dict(PRESETS["img512-l"]),
                                          lambda: dict(PRESETS["img512-xs"]), 32, True),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU peak"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process peak RSS"


def build(arch: dict, dev: str):
    return build_network(arch).to(dev).eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--evals", type=int, default=2, help="network evaluations timed per setting")
    ap.add_argument("--full", action="store_true", help="time the whole sampler instead of single evaluations")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="sampler.dtype (autocast)")
    ap.add_argument("--compile", action="store_true", help="sampler.compile (CUDA only)")
    ap.add_argument("--only", default="", help="run the settings whose name contains this text")
    args = ap.parse_args()
    dev = args.device
    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, dtype {args.dtype}, "
          f"compile {args.compile}")
    for name, (make_arch, make_guide, steps, latent) in SETTINGS.items():
        if args.only not in name:
            continue
        torch.manual_seed(0)
        arch = make_arch()
        net = build(arch, dev)
        gnet = build(make_guide(), dev) if make_guide else None
        sampler = dataclasses.replace(load_config(preset="imagenet512-l").sampler, num_steps=steps, dtype=args.dtype,
                                      compile=args.compile, guidance=1.1 if gnet is not None else 1.0,
                                      guide=GUIDE if gnet is not None else "")
        try:
            denoise = sampling_denoiser(net, sampler, guide=gnet, device=dev)
        except ValueError as e:
            print(f"{name:36s} skipped: {e}")
            continue
        c, r, L = arch["img_channels"], arch["img_resolution"], arch.get("label_dim", 0)
        x = torch.randn(args.batch, c, r, r, device=dev)
        y = torch.nn.functional.one_hot(torch.arange(args.batch) % L, L).float().to(dev) if L else None
        sigma = torch.full([args.batch], 2.5, device=dev)
        nfe = 2 * steps - 1
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            denoise(x, sigma, y)  # warm-up (and compilation)
            sync(dev)
            t0 = time.perf_counter()
            if args.full:
                out = edm_sampler(denoise, x, y, num_steps=steps)
                evals = nfe
            else:
                for _ in range(args.evals):
                    out = denoise(x, sigma, y)
                evals = args.evals
            sync(dev)
            dt = (time.perf_counter() - t0) / evals
            t_dec = 0.0
            if latent:
                from diffusers import AutoencoderKL

                from repro.nets.sd_vae import SD_VAE_FT_MSE, LatentDecoder

                vae = AutoencoderKL(**SD_VAE_FT_MSE).to(dev).eval().requires_grad_(False)
                decode = LatentDecoder(vae)
                decode(out[:1])  # warm-up
                sync(dev)
                t1 = time.perf_counter()
                images = decode(out)
                sync(dev)
                t_dec = time.perf_counter() - t1
                assert images.shape == (args.batch, 3, 8 * r, 8 * r)
        ips = args.batch / (dt * nfe + t_dec)
        params = count_parameters(net) + (count_parameters(gnet) if gnet is not None else 0)
        how = "whole sampler" if args.full else f"{evals} evaluations, x NFE"
        dec = f" + decode {t_dec * 1e3:.0f} ms/batch" if latent else ""
        print(f"{name:36s} {params / 1e6:7.1f}M params  {dt * 1e3:9.1f} ms/eval  {nfe} NFE{dec}  "
              f"{ips:10.4f} images/s ({how}); {peak_memory(dev)}")
        del net, gnet


if __name__ == "__main__":
    main()
