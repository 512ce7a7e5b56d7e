"""Stage `extractor`: the metric's feature extractor and the reference statistics (repro.evaluation.extractor)."""

from __future__ import annotations

from repro.config import Config
from repro.evaluation.extractor import build_extractor, inception_weights
from repro.pipeline.common import load_data, log_data_input, require, tracked
from repro.storage.files import sha256_file, write_json
from repro.storage.layout import Paths


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    if cfg.extractor.kind == "inception":
        inception_weights(cfg.extractor, paths.root)  # a missing or changed weights file: an error before any run
    if cfg.extractor.kind != "inception" or not cfg.extractor.reference:
        require(paths.data)  # Inception against a paper's reference file needs no data
    data = load_data(paths) if paths.data.is_file() else None
    with tracked("extractor", cfg, paths) as t:
        log_data_input(t, paths, "training" if cfg.extractor.kind != "inception" else "evaluation")
        info = build_extractor(cfg.extractor, data, paths.extractor, paths.reference, t, progress, root=paths.root)
        write_json(paths.extractor_info, {**info, "kind": cfg.extractor.kind, "sha256": sha256_file(paths.extractor)})
