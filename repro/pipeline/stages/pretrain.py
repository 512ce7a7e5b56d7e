"""Stage `pretrain`: the base model, trained here with the EDM loss (source 'train', resumable), or a released
checkpoint fetched, verified and converted (source = a registry name; repro.nets.released); then a sample grid."""

from __future__ import annotations

import dataclasses
import logging

from repro.cluster import distributed
from repro.config import Config
from repro.evaluation.metric import load_metric, metric_name
from repro.methods.ddo.rounds import selection_seeds
from repro.methods.pretrain import pretrain
from repro.nets import released
from repro.nets.checkpoint import load_model
from repro.pipeline.common import load_data, log_data_input, require, run_dir, tracked
from repro.sampling.generate import sample_grid
from repro.sampling.var import var_grid
from repro.storage.files import record_sha256, save_png, write_json
from repro.storage.layout import Paths

log = logging.getLogger("repro.pipeline")


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    if cfg.pretrain.source != "train":
        released.check(cfg.pretrain)
    with tracked("pretrain", cfg, paths) as t:
        if cfg.pretrain.source == "train":
            require(paths.data)
            data = load_data(paths)
            rd = run_dir("pretrain", cfg, paths, {"data": paths.data})
            t.set_tags({"run_dir": rd})
            log_data_input(t, paths)
            info = pretrain(cfg.pretrain, data, rd, paths.base, t, progress, ar=cfg.ar,
                            curve_score=_curve_score(cfg, paths, data) if cfg.pretrain.curve_every_nimg else None)
            t.log_metrics({"seconds": info["seconds_this_run"]})
            curve = _curve_record(cfg, info)
        else:
            summary = released.fetch_and_convert(cfg.pretrain, paths.root, paths.base, progress)
            t.set_tags({"checkpoint": cfg.pretrain.source, "checkpoint_sha256": summary["sha256"]})
            curve = {"curve": [], "note": f"released checkpoint {cfg.pretrain.source}: not trained here"}
        if distributed.is_main():
            write_json(paths.base_curve, curve)
            if curve["curve"]:
                _plot_curve(t, curve)
        if distributed.is_main():
            t.set_tags({"base_sha256": record_sha256(paths.base)})  # what later stages check the file against
        t.set_tags({f"{k}_sha256": v for k, v in released.fetch_extras(cfg, paths.root, progress).items()})
        # A sample grid of the base model (seeds 0..n-1), to look at before spending compute on it (rank 0).
        if distributed.is_main():
            net, arch, info = load_model(paths.base)
            if arch.get("precond") == "var":  # token maps through the tokenizer: guidance-free, no sampling tricks
                tok = getattr(net, "tokenizer", None) or released.load_tokenizer(paths.root, info["tokenizer"])
                grid = var_grid(net, tok, n=32, ncol=8)
            else:
                shape = (arch["img_channels"], arch["img_resolution"], arch["img_resolution"])
                extras = released.sampling_extras(cfg, paths.root, arch, info)  # guided / latent: as the evaluation
                grid = sample_grid(net, arch.get("label_dim", 0), shape, cfg.sampler, n=32, ncol=8, **extras)
            save_png(paths.base_grid, grid, scale=max(1, min(4, 128 // (grid.shape[0] // 4))))  # 4 rows; 512 px: x1
            t.log_image(grid, "base_samples.png")
            log.info("pretrain: wrote %s and a sample grid %s", paths.base, paths.base_grid)


def _curve_score(cfg: Config, paths: Paths, data):
    """The pretraining curve's score: the DDO selection metric (the same extractor, reference and seeds that pick
    DDO's checkpoints, so the curve's last point is the base's selection score) of a model, and of each half of
    the seeds (their spread: the seed noise the plateau rule compares against)."""
    require(paths.extractor, paths.reference)
    metric = load_metric(cfg.extractor.kind, paths.extractor, paths.reference)
    seeds = selection_seeds(cfg.ddo)
    sampler = dataclasses.replace(cfg.sampler, guidance=1.0)  # as DDO's selection: the model alone
    label_dim = data.num_classes if cfg.pretrain.network.conditional else 0
    return lambda net: metric.score_parts(net, seeds, label_dim, data.shape, sampler, parts=2)


def _curve_record(cfg: Config, info: dict) -> dict:
    """models/base_curve.json: the points and what they measure (empty when pretrain.curve_every_nimg is 0)."""
    p, d = cfg.pretrain, cfg.ddo
    return {"curve": info["curve"], "metric": metric_name(cfg.extractor.kind),
            "seeds": [d.selection_first_seed, d.selection_first_seed + d.selection_samples],
            "parts": 2, "every_nimg": p.curve_every_nimg, "plateau_window": p.plateau_window,
            "plateau_tol": p.plateau_tol,
            "plateau": info.get("plateau"), "nimg": info["nimg"], "total_nimg": p.total_nimg}


def _plot_curve(tracker, curve: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [c["nimg"] / 1000 for c in pts]
    ax.plot(x, [c["score"] for c in pts], marker="o", label="all selection seeds")
    for k in range(curve["parts"]):
        ax.plot(x, [c["parts"][k] for c in pts], lw=0.8, alpha=0.6, label=f"half {k + 1}")
    ax.set_xlabel("training images (thousands)")
    ax.set_ylabel(f"{curve['metric']} (selection seeds)")
    ax.legend()
    fig.tight_layout()
    tracker.log_figure(fig, "pretrain_curve.png")
    plt.close(fig)


def describe(cfg: Config, paths: Paths) -> dict | None:
    """What a released checkpoint's stage would fetch and write (--dry-run)."""
    if cfg.pretrain.source == "train":
        return None
    return released.plan(cfg.pretrain, paths.root, paths.base, cfg.sampler)
