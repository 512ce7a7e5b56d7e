"""Stage `data`: the data set as one uint8 array file + a manifest with its sha256 (repro.datasets); ImageNet as
uint8 shards data/<dataset>/shard-*.npz + a manifest with each shard's sha256 (repro.datasets.imagenet)."""

from __future__ import annotations

from repro.config import Config
from repro.datasets.imagenet import prepare_imagenet
from repro.datasets.images import prepare
from repro.pipeline.common import tracked
from repro.storage.layout import Paths


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    with tracked("data", cfg, paths) as t:
        if cfg.data.dataset.startswith("imagenet"):
            manifest = prepare_imagenet(cfg.data, paths.data, paths.manifest)
        else:
            manifest = prepare(cfg.data, paths.data, paths.manifest, root=paths.root, progress=progress)
        t.log_params({"sha256": manifest["sha256"], "n": manifest["n"]})
        t.log_artifact(paths.manifest)
