"""Stage `pretrain`: the base model, trained here with the EDM loss (source 'train', resumable), or a released
checkpoint fetched, verified and converted (source = a registry name; repro.nets.released); then a sample grid."""

from __future__ import annotations

import logging

from repro.cluster import distributed
from repro.config import Config
from repro.methods.pretrain import pretrain
from repro.nets import released
from repro.nets.checkpoint import load_model
from repro.pipeline.common import load_data, log_data_input, require, run_dir, tracked
from repro.sampling.generate import sample_grid
from repro.sampling.var import var_grid
from repro.storage.files import record_sha256, save_png
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
            info = pretrain(cfg.pretrain, data, rd, paths.base, t, progress, ar=cfg.ar)
            t.log_metrics({"seconds": info["seconds_this_run"]})
        else:
            summary = released.fetch_and_convert(cfg.pretrain, paths.root, paths.base, progress)
            t.set_tags({"checkpoint": cfg.pretrain.source, "checkpoint_sha256": summary["sha256"]})
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


def describe(cfg: Config, paths: Paths) -> dict | None:
    """What a released checkpoint's stage would fetch and write (--dry-run)."""
    if cfg.pretrain.source == "train":
        return None
    return released.plan(cfg.pretrain, paths.root, paths.base, cfg.sampler)
