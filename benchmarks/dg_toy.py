"""DG and improved DG on the 2-D toy (repro/toys/dg_toy.py), side by side, over several seeds.

Data: 8 modes on a circle (std 0.1); model: the exact score of a wrong mixture (std 0.2, radius 2.1, weights
1:...:8). Every number is exact up to Monte Carlo over samples: guided samples are scored under the exact data
density, and the correction's error is DG's KL bound against the exact correction (ratio < 1: the guidance
lowers the bound; > 1: it raises it). Rows:

* unguided; the optimal discriminator d* (exact) with w = w2 = 1 and with DG's w = 2, w2 = 0;
* "ample": 8,192 real + 8,192 fake samples, 10 epochs; "few": 64 real + 64 fake, 2,000 epochs (an overfitting
  discriminator), each trained with DG's BCE and with improved DG's objective (reconstructed; real only), for
  the few-sample case the KL ratio along the epochs.

Training: MLPDiscriminator (depth 4, width 256 by default: DG's toy size), Adam lr 1e-3 (DG: 3e-4 on images;
faster here), weight decay 1e-7 (DG), DG's importance-sampled time. Sampling: EDM Heun, 18 steps, 4,000
samples, latents seeded per seed.

    python benchmarks/dg_toy.py --seeds 0 1 2 3 4            # ~20 min on 2 shared CPU cores
    python benchmarks/dg_toy.py --seeds 0 --width 64 --quick # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.methods.dg import vp_logit  # noqa: E402
from repro.methods.dg_train import DGTrainConfig, train_discriminator  # noqa: E402
from repro.nets.discriminators import MLPDiscriminator  # noqa: E402
from repro.toys.dg_toy import exact_logit, guided_samples, kl_bound_error, sample_metrics, toy_banks, toy_pair  # noqa: E402
from repro.pipeline.tracking import NullTracker  # noqa: E402


def evaluate(data, model, logit, seed, dtype=torch.float32, n=4000, n_kl=20000, **kw) -> dict:
    out = {}
    for tag, w, w2 in (("w1", 1.0, 1.0), ("w2", 2.0, 0.0)):
        x = guided_samples(model, logit, n, seed=1000 + seed, w=w, w2=w2, num_steps=18, dtype=dtype, **kw)
        out.update({f"{k}@{tag}": v for k, v in sample_metrics(data, x).items()})
    out["kl_ratio"] = kl_bound_error(data, model, logit, n_kl, 2000 + seed, dtype=dtype,
                                     **({"d_clip": kw["d_clip"]} if "d_clip" in kw else {}))["ratio"]
    return out


def train(data, model, objective, n, epochs, seed, width, depth, track_epochs=()):
    real, fake = toy_banks(data, model, n, n, seed=seed)
    torch.manual_seed(seed)
    disc = MLPDiscriminator(width=width, depth=depth)
    batch = min(256, n if objective == "mse" else 2 * n)
    cfg = DGTrainConfig(objective=objective, epochs=epochs, batch=batch, lr=1e-3, seed=seed)
    trace = {}

    def on_epoch(epoch, summary):
        if epoch in track_epochs:
            disc.eval()
            trace[epoch] = kl_bound_error(data, model, vp_logit(disc), 20000, 2000 + seed)["ratio"]

    t = time.time()
    run = train_discriminator(disc, real, fake, cfg, None, NullTracker(), denoise=model.denoiser(), progress=False,
                              on_epoch=on_epoch)
    disc.eval()
    res = evaluate(data, model, vp_logit(disc), seed)
    res["train_s"] = time.time() - t
    res["steps"] = run.epochs[-1]["nimg"] // batch
    res.update({f"kl_ratio@ep{e}": v for e, v in trace.items()})
    if "acc_real" in run.epochs[-1]:
        res["acc_real"], res["acc_fake"] = run.epochs[-1]["acc_real"], run.epochs[-1]["acc_fake"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="fewer epochs (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"# device: cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, MLP depth {args.depth} width {args.width}, seeds {args.seeds}")
    data, model = toy_pair()
    few_epochs = 200 if args.quick else 2000
    track = [e for e in (50, 200, 500, 1000, 2000) if e <= few_epochs]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        t0 = time.time()
        rows.setdefault("unguided", []).append(
            {f"{k}@w0": v for k, v in sample_metrics(data, guided_samples(model, None, 4000, 1000 + seed, w=0,
                                                                          num_steps=18)).items()})
        rows.setdefault("exact d*", []).append(evaluate(data, model, exact_logit(data, model), seed, torch.float64))
        for obj in ("bce", "mse"):
            rows.setdefault(f"ample {obj}", []).append(
                train(data, model, obj, 8192, 2 if args.quick else 10, seed, args.width, args.depth))
            rows.setdefault(f"few {obj}", []).append(
                train(data, model, obj, 64, few_epochs, seed, args.width, args.depth, track))
        print(f"# seed {seed} done in {time.time() - t0:.0f}s", flush=True)
    for name, rs in rows.items():
        print(f"\n{name}")
        for k in rs[0]:
            vals = [r[k] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            print(f"  {k:18s} {statistics.mean(vals):10.4f} +- {sd:8.4f}   per seed: "
                  + " ".join(f"{v:.4f}" for v in vals))


if __name__ == "__main__":
    main()
