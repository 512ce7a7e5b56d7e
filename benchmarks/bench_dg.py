"""Benchmark: what Discriminator Guidance costs next to the diffusion network, measured side by side.

Random weights at the released sizes (DG's CIFAR-10 ADM extractor, 48M parameters, and head, 2.9M; EDM's
CIFAR-10 DDPM++, 56M) or the tiny test sizes, on the same batch and device:

* sampling: one EDM network evaluation (no gradient) against one guidance evaluation (extractor + head forward
  and backward to the input: what DiscriminatorGuidance does once per Heun step with w2 = 0); the guided
  sampler's cost per step is then 2 network evaluations + 1 guidance evaluation (the last step: 1 + 1);
* training: one DG step (BCE: extractor without gradient, head forward and backward, Adam) against one improved-DG
  step (reconstructed objective: gradient to the input with a graph through extractor and head, the EDM network
  without gradient, second backward into the head).

    python benchmarks/bench_dg.py                                   # tiny sizes, CPU
    python benchmarks/bench_dg.py --size released --batch 2 --steps 2
    python benchmarks/bench_dg.py --size released --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.methods.dg import DiscriminatorGuidance, sample_tau, vp_logit  # noqa: E402
from repro.methods.dg_train import discriminator_loss  # noqa: E402
from repro.nets.adm import DG_CIFAR10_EXTRACTOR, TINY_EXTRACTOR, EncoderUNet, dg_head, tiny_head  # noqa: E402
from repro.nets.discriminators import ADMDiscriminator  # noqa: E402
from repro.nets.factory import arch_presets, build_network  # noqa: E402


def timed(fn, steps: int, device: str) -> float:
    out = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "released"], default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev, B = args.device, args.batch
    torch.manual_seed(0)
    if args.size == "released":
        arch = {**arch_presets()["edm-cifar10-32x32-uncond-vp"]}
        ext_cfg, head_cfg = DG_CIFAR10_EXTRACTOR, dg_head()
    else:
        arch = dict(precond="edm", img_resolution=8, img_channels=1, label_dim=0, model_channels=16,
                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
        ext_cfg, head_cfg = TINY_EXTRACTOR, tiny_head()
    net = build_network(arch).to(dev).eval().requires_grad_(False)
    disc = ADMDiscriminator(EncoderUNet(ext_cfg), EncoderUNet(head_cfg)).to(dev)
    c, r = arch["img_channels"], arch["img_resolution"]
    x = torch.randn(B, c, r, r, device=dev)
    sigma = torch.full([B], 2.0, device=dev)
    guidance = DiscriminatorGuidance(vp_logit(disc.eval()), w=2.0)

    @torch.no_grad()
    def net_eval():
        net(x, sigma, None)

    @torch.no_grad()
    def guidance_eval():
        guidance(x.double(), sigma.double(), None, 1, 1)

    x0 = torch.rand(B, c, r, r, device=dev) * 2 - 1
    real = (torch.arange(B, device=dev) % 2).float()
    tau = sample_tau(B, torch.Generator().manual_seed(0), device=dev)
    eps = torch.randn(B, c, r, r, device=dev)
    opt = torch.optim.Adam(disc.head.parameters(), lr=3e-4, weight_decay=1e-7)
    disc.train()

    def step(objective):
        loss, _ = discriminator_loss(disc, x0, None, real, tau, eps, objective, net)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()

    for fn in (net_eval, guidance_eval, lambda: step("bce"), lambda: step("mse")):  # warm-up
        fn()
    t_net = timed(net_eval, args.steps, dev)
    t_guid = timed(guidance_eval, args.steps, dev)
    t_bce = timed(lambda: step("bce"), args.steps, dev)
    t_mse = timed(lambda: step("mse"), args.steps, dev)
    if dev == "cuda":
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak allocated"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process peak RSS"
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {B}, {args.steps} timed repeats")
    print(f"sizes: {args.size}: EDM net {count(net):.1f}M, extractor {count(disc.extractor):.1f}M, "
          f"head {count(disc.head):.2f}M params, images {c}x{r}x{r}")
    print(f"EDM network evaluation (no grad)          : {t_net * 1e3:10.1f} ms")
    print(f"guidance evaluation (fwd + bwd to input)  : {t_guid * 1e3:10.1f} ms   = {t_guid / t_net:.2f} network evals")
    print(f"guided Heun step / unguided (w2 = 0)      : {(2 * t_net + t_guid) / (2 * t_net):10.2f} x")
    print(f"DG training step (BCE, head only)         : {t_bce * 1e3:10.1f} ms")
    print(f"improved-DG training step (double bwd)    : {t_mse * 1e3:10.1f} ms   = {t_mse / t_bce:.2f} x the BCE step")
    print(f"memory: {mem}")


if __name__ == "__main__":
    main()
