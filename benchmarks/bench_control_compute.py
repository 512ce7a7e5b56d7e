"""Benchmark: one DDO round against one equal-compute MLE control round (ddo.control_budget: compute), measured.

repro.methods.ddo.control.forward_equivalents counts a round's compute in network forward-equivalents and gives the
control the steps that make it equal to a DDO round's. This script checks the count against the clock, side by side
in one run, on the tiny preset's network and training digits: the fake bank's sampling (the sampler the ddo stage
draws fakes with), DDO steps (repro.methods.ddo.family.ddo_step_loss, backward, Adam) and control steps
(control_step_loss, backward, Adam), alternating DDO and control steps so that both see the same machine load. It
prints seconds per step for each, the counted and measured step ratio, and the counted and measured ratio of whole
rounds (fake bank + steps; the selection evaluations are as many on either side and left out of both).

    python benchmarks/bench_control_compute.py                   # tiny preset, CPU, 10 timed steps each
    python benchmarks/bench_control_compute.py --steps 20 --bank-images 500

The network has random weights and the "fakes" of the timed DDO steps are training digits (the timing does not
depend on the pixels); the bank's sampling is timed on ``--bank-images`` seeds and scaled to the bank's size.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from functools import partial

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from repro.config import load_config  # noqa: E402
from repro.datasets.images import load_embedded, split_indices  # noqa: E402
from repro.methods.ddo.control import control_plan, forward_equivalents, sampler_nfe  # noqa: E402
from repro.methods.ddo.family import control_step_loss, ddo_step_loss  # noqa: E402
from repro.methods.ddo.rounds import eval_forward  # noqa: E402
from repro.methods.training import for_training, step_generator  # noqa: E402
from repro.nets.factory import build_network  # noqa: E402
from repro.nets.layers import disable_dropout  # noqa: E402
from repro.sampling.generate import generate_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each kind (after 2 warm-up steps)")
    ap.add_argument("--bank-images", type=int, default=500, help="fakes sampled to time the bank (one batch)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = load_config(preset=args.preset)
    d, s, net_cfg = cfg.ddo, cfg.sampler, cfg.pretrain.network
    data = load_embedded(cfg.data.dataset)
    if cfg.data.holdout:
        train, _ = split_indices(len(data.images), cfg.data.holdout, cfg.data.holdout_seed)
        data = type(data)(**{**data.__dict__, "images": data.images[train], "labels": data.labels[train]})
    label_dim = 10 if net_cfg.conditional else 0
    arch = dict(precond=net_cfg.precond, img_resolution=data.shape[-1], img_channels=data.shape[0],
                label_dim=label_dim, model_channels=net_cfg.model_channels, channel_mult=list(net_cfg.channel_mult),
                num_blocks=net_cfg.num_blocks, attn_resolutions=list(net_cfg.attn_resolutions), dropout=0.0)
    base = for_training(disable_dropout(build_network(arch))).train()
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    nets = {k: copy.deepcopy(base).train().requires_grad_(True) for k in ("ddo", "control")}
    opts = {k: torch.optim.Adam(n.parameters(), lr=d.lr) for k, n in nets.items()}
    bank = {"images": data.images.copy()}  # stand-in fakes: timing does not depend on the pixels
    n = len(data.images)
    mine = slice(0, d.batch)
    sigma_data = cfg.pretrain.sigma_data

    def step(kind: str, i: int) -> None:
        g = step_generator(d.seed, 0 if kind == "ddo" else 1, 1, i)
        idx = torch.randint(n, [d.batch], generator=g)
        net = nets[kind]
        if kind == "ddo":
            loss, _ = ddo_step_loss(net, ref, data, bank, idx, mine, g, d, s, d.P_std, sigma_data, label_dim, "cpu",
                                    partial(eval_forward, net))
        else:
            loss = control_step_loss(net, data, idx, g, d, s, d.P_std, sigma_data, label_dim, "cpu")
        opts[kind].zero_grad(set_to_none=True)
        loss.backward()
        opts[kind].step()

    times: dict[str, list[float]] = {"ddo": [], "control": []}
    for i in range(args.steps + 2):  # alternating: both kinds under the same load
        for kind in ("ddo", "control"):
            t = time.perf_counter()
            step(kind, i)
            if i >= 2:
                times[kind].append(time.perf_counter() - t)
    ref.eval()
    m = min(args.bank_images, n)
    t = time.perf_counter()
    for _ in generate_images(ref, np.arange(m), img_shape=data.shape, label_dim=label_dim, sampler=s,
                             labels=data.labels[:m] if label_dim else None, device="cpu"):
        pass
    t_bank_img = (time.perf_counter() - t) / m

    fe = forward_equivalents(batch=d.batch, nimg_per_round=d.nimg_per_round, eval_every_nimg=d.eval_every_nimg,
                             bank_images=n, nfe=sampler_nfe(s), selection_samples=d.selection_samples,
                             budget="compute")
    plan = control_plan(d, data, s) if d.control_budget == "compute" else None
    t_ddo, t_ctl = statistics.median(times["ddo"]), statistics.median(times["control"])
    k, k_c = fe["ddo_steps"], fe["control_steps"]
    ddo_round = n * t_bank_img + k * t_ddo
    ctl_round = k_c * t_ctl
    counted_ddo = fe["ddo_fake_bank"] + fe["ddo_training"]
    print(f"device: cpu ({platform.processor() or 'cpu'}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"preset {args.preset}: network {sum(p.numel() for p in base.parameters()) / 1e6:.3f}M params, "
          f"{'x'.join(map(str, data.shape))}, batch {d.batch} pairs; {n} training images; sampler NFE "
          f"{sampler_nfe(s)}; {args.steps} timed steps of each kind (median), bank timed on {m} images")
    print(f"DDO step (B pairs)          : {t_ddo * 1e3:8.1f} ms   counted {8 * d.batch:,} forward-equivalents")
    print(f"control step (2B images)    : {t_ctl * 1e3:8.1f} ms   counted {6 * d.batch:,} forward-equivalents")
    print(f"DDO / control step          : counted {8 / 6:.3f}   measured {t_ddo / t_ctl:.3f}")
    print(f"fake bank                   : {t_bank_img * 1e3:8.2f} ms per image x {n} = {n * t_bank_img:.1f} s   "
          f"counted {fe['ddo_fake_bank']:,} forward-equivalents")
    print(f"DDO round (bank + {k} steps) : {ddo_round:8.1f} s   counted {counted_ddo:,}")
    print(f"control round ({k_c} steps)  : {ctl_round:8.1f} s   counted {fe['control_training']:,}"
          f"{'' if plan is None else ' (the preset sets control_budget: compute)'}")
    print(f"control / DDO round         : counted {fe['control_training'] / counted_ddo:.3f}   measured "
          f"{ctl_round / ddo_round:.3f}   (selection: {fe['evaluations']} evaluations on either side, not timed)")
    print(f"forward-equivalent, measured: {t_ctl / (6 * d.batch) * 1e6:.1f} us from control steps, "
          f"{t_ddo / (8 * d.batch) * 1e6:.1f} us from DDO steps, {t_bank_img / sampler_nfe(s) * 1e6:.1f} us from "
          "the bank's no-grad forwards")


if __name__ == "__main__":
    main()
