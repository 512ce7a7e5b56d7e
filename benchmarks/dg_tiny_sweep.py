"""How the dg-tiny preset's discriminator epochs and DG weight were chosen: FD-digits on the *selection* seeds.

In a project where `dvc repro` (or the stages up to `repro fakes`) ran with the dg-tiny params, this trains each
guided model's discriminator in memory as the discriminator stage would (the same settings, data, fake bank and
draws), and after chosen epochs samples the selection seeds (ddo.selection_first_seed.., the seeds DDO selects its
checkpoints on, disjoint from the final evaluation's) with DG at several weights, printing FD-digits for each
(epoch, w) beside the unguided model's. The final evaluation's seeds are never used here.

    cd PROJECT && PYTHONPATH=REPO python REPO/benchmarks/dg_tiny_sweep.py --guided base+dg --epochs 5 10 20 40 \
        --w 0.5 1 2 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from repro.config import load_config  # noqa: E402
from repro.evaluation.metric import load_metric  # noqa: E402
from repro.methods.dg_train import DGTrainConfig, train_discriminator  # noqa: E402
from repro.methods.guidance import (build_correction, dg_train_settings, guided_models, load_bank,  # noqa: E402
                                    needs_fakes, new_discriminator, sampler_settings)
from repro.nets.checkpoint import load_model  # noqa: E402
from repro.pipeline.common import load_data  # noqa: E402
from repro.pipeline.stages.fakes import bank_shards  # noqa: E402
from repro.pipeline.tracking import NullTracker  # noqa: E402
from repro.sampling.generate import generate_images  # noqa: E402
from repro.storage.layout import Paths  # noqa: E402


def fd(metric, net, arch, sampler, seeds, correction=None) -> float:
    batches = (x for _, x, _ in generate_images(net, seeds, img_shape=(arch["img_channels"], arch["img_resolution"],
                                                                       arch["img_resolution"]),
                                                label_dim=arch["label_dim"], sampler=sampler, correction=correction))
    return metric.distance(metric.statistics(batches))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--guided", nargs="+", required=True, help="guided models of guidance.evaluate (resolved names)")
    ap.add_argument("--epochs", type=int, nargs="+", required=True, help="evaluate after these epochs")
    ap.add_argument("--w", type=float, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, default=0, help="selection seeds to sample (0: ddo.selection_samples)")
    args = ap.parse_args()
    cfg = load_config(Path(args.params))
    cfg = dataclasses.replace(cfg, discriminator=dataclasses.replace(cfg.discriminator, epochs=max(args.epochs)))
    paths = Paths.of(cfg, Path(args.params).resolve().parent)
    metric = load_metric(cfg.extractor.kind, paths.extractor, paths.reference)
    data = load_data(paths)
    n = args.seeds or cfg.ddo.selection_samples
    seeds = np.arange(cfg.ddo.selection_first_seed, cfg.ddo.selection_first_seed + n)
    print(f"# {cfg.preset}: FD-digits on selection seeds {seeds[0]}-{seeds[-1]}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    for gm in [g for g in guided_models(cfg, paths) if g.name in args.guided]:
        net, arch, _ = load_model(gm.path)
        net = net.float().eval()
        print(f"{gm.name}: unguided {fd(metric, net, arch, cfg.sampler, seeds):.4f}", flush=True)
        disc, _ = new_discriminator(cfg, arch, paths.root, progress=False)
        fake, fake_labels = load_bank(bank_shards(cfg, paths, gm.model)) if needs_fakes(cfg, gm) else (None, None)
        settings = dg_train_settings(cfg, gm.variant.objective)
        t0 = time.time()

        def on_epoch(epoch: int, summary: dict) -> None:
            if epoch not in args.epochs:
                return
            disc.eval()
            row = []
            for w in args.w:
                corr = build_correction(gm.variant, dataclasses.replace(sampler_settings(cfg, gm.variant), w=w),
                                        cfg.sampler, disc)
                row.append(f"w={w:g}: {fd(metric, net, arch, cfg.sampler, seeds, corr):.4f}")
            print(f"  epoch {epoch:4d} ({time.time() - t0:5.0f} s, loss {summary['loss']:.4f}"
                  + (f", acc real/fake {summary['acc_real']:.2f}/{summary['acc_fake']:.2f}" if "acc_real" in summary
                     else "") + "): " + "  ".join(row), flush=True)

        train_discriminator(disc, data.images, fake, DGTrainConfig(**settings), None, NullTracker(),
                            real_labels=data.labels, fake_labels=fake_labels,
                            label_dim=arch["label_dim"] if cfg.discriminator.conditional else 0,
                            denoise=net.requires_grad_(False) if settings["objective"] == "mse" else None,
                            progress=False, on_epoch=on_epoch)


if __name__ == "__main__":
    main()
