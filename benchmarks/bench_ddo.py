"""Benchmark: the cost of one DDO step against one plain EDM-loss step, and the sampler's images per second.

Measured side by side in one run, on the same network, batch and device. A DDO step on B pairs does two
forward+backward passes of theta (B real, B fake) and two no-grad forwards of the reference, so its ideal cost
is about 2 x (EDM step on B) + 2 x (no-grad forward on B); the script prints that prediction next to the
measurement.

    python benchmarks/bench_ddo.py                        # tiny preset network (8x8 digits), CPU
    python benchmarks/bench_ddo.py --arch cifar10 --batch 16 --steps 3
    python benchmarks/bench_ddo.py --device cuda --arch cifar10 --batch 256
    python benchmarks/bench_ddo.py --device cuda --arch edm2-s --batch 64 --precision fp32

``--precision`` is ddo.precision (repro.methods.training.training_precision): fp32 = float32 with TF32 off, as the
paper fine-tunes; tf32; bf16 autocast. On CUDA the peak GPU memory of the DDO step is printed too.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.config import load_config  # noqa: E402
from repro.methods.ddo.loss import ddo_diffusion_loss  # noqa: E402
from repro.methods.ddo.rounds import eval_forward  # noqa: E402
from repro.methods.losses import draw_sigma_noise, edm_loss  # noqa: E402
from repro.methods.training import for_training, training_precision  # noqa: E402
from repro.nets.edm2 import PRESETS  # noqa: E402
from repro.nets.factory import arch_presets, build_network  # noqa: E402
from repro.nets.layers import disable_dropout  # noqa: E402
from repro.sampling.edm import edm_sampler  # noqa: E402


def tiny_arch() -> dict:
    net = load_config(preset="tiny").pretrain.network
    return dict(precond=net.precond, img_resolution=8, img_channels=1, label_dim=10 if net.conditional else 0,
                model_channels=net.model_channels, channel_mult=list(net.channel_mult), num_blocks=net.num_blocks,
                attn_resolutions=list(net.attn_resolutions), dropout=0.0)


def timed(fn, steps: int, device: str) -> list[float]:
    out = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "cifar10", "edm2-s"], default="tiny",
                    help="tiny preset net; EDM's CIFAR-10 DDPM++ (56M); EDM2-S ImageNet-64 (280M)")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32", help="ddo.precision")
    ap.add_argument("--batch", type=int, default=128, help="images (EDM step) = pairs (DDO step)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sample-batch", type=int, default=None)
    ap.add_argument("--num-steps", type=int, default=18, help="sampler steps (NFE = 2 * num_steps - 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    arch = {"tiny": tiny_arch, "cifar10": lambda: {**arch_presets()["edm-cifar10-32x32-cond-vp"]},
            "edm2-s": lambda: dict(PRESETS["img64-s"])}[args.arch]()
    dev = args.device
    precision = training_precision(args.precision, dev)
    autocast = precision.__enter__()
    net = for_training(disable_dropout(build_network(arch))).to(dev).train()
    ref = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    c, r, L = arch["img_channels"], arch["img_resolution"], arch.get("label_dim", 0)
    B = args.batch
    x = torch.rand(B, c, r, r, device=dev) * 2 - 1
    xf = torch.rand(B, c, r, r, device=dev) * 2 - 1
    y = torch.nn.functional.one_hot(torch.randint(L, [B]), L).float().to(dev) if L else None
    sigma, eps = draw_sigma_noise(x.shape, -1.2, 1.2, device=dev)

    def edm_step():
        with autocast():
            loss = edm_loss(net, x, y, sigma, eps, 0.5).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ddo_step():
        with autocast():  # theta's fake pass in eval mode, as the DDO round runs it
            loss, _ = ddo_diffusion_loss(net, ref, x, y, xf, y, sigma, eps, alpha=1.0, beta=0.05, sigma_data=0.5,
                                         net_fake=partial(eval_forward, net))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def ref_forward():
        with autocast():
            ref(x + sigma * eps, sigma.flatten(), y)

    for fn in (edm_step, ddo_step, ref_forward):  # warm-up
        fn()
    t_edm = statistics.median(timed(edm_step, args.steps, dev))
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ddo = statistics.median(timed(ddo_step, args.steps, dev))
    ddo_mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak" if dev == "cuda" else "n/a on CPU"
    t_fwd = statistics.median(timed(ref_forward, args.steps, dev))
    ideal = 2 * t_edm + 2 * t_fwd

    sb = args.sample_batch or B
    lat = torch.randn(sb, c, r, r, device=dev)
    ys = torch.nn.functional.one_hot(torch.randint(L, [sb]), L).float().to(dev) if L else None
    net.eval()
    t_sample = statistics.median(timed(lambda: edm_sampler(net, lat, ys, num_steps=args.num_steps),
                                       max(1, args.steps // 5), dev))
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak" if dev == "cuda" else "n/a on CPU"
    n_params = sum(p.numel() for p in net.parameters())
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"network: {args.arch} ({n_params / 1e6:.3f}M params, {c}x{r}x{r}, label_dim {L}), batch {B}, "
          f"precision {args.precision}")
    print(f"EDM-loss step (B images)            : {t_edm * 1e3:9.1f} ms")
    print(f"no-grad forward (B images)          : {t_fwd * 1e3:9.1f} ms")
    print(f"DDO step (B pairs)                  : {t_ddo * 1e3:9.1f} ms   GPU memory {ddo_mem}")
    print(f"DDO / EDM step                      : {t_ddo / t_edm:9.2f} x")
    print(f"ideal (2 EDM steps + 2 fwd) / EDM   : {ideal / t_edm:9.2f} x   (measured / ideal = {t_ddo / ideal:.2f})")
    print(f"sampler ({args.num_steps} steps, {2 * args.num_steps - 1} NFE, batch {sb}): "
          f"{sb / t_sample:9.1f} images/s; memory {mem}")


if __name__ == "__main__":
    main()
