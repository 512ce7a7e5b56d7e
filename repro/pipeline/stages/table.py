"""Stage `table`: the run's table (results/<preset>/table.md) and the DDO paper's tables with our numbers."""

from __future__ import annotations

import json

from repro.config import Config
from repro.evaluation.tables import render_paper, render_run
from repro.pipeline.common import require, tracked
from repro.storage.files import write_text
from repro.storage.layout import Paths


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    require(paths.metrics)
    metrics = json.loads(paths.metrics.read_text())
    with tracked("table", cfg, paths) as t:
        run_md = render_run(metrics, "md")
        write_text(paths.table, run_md)
        write_text(paths.paper_tables("ddo"), render_paper("ddo", paths.results_root, "md"))
        t.log_artifact(paths.table)
        print(run_md)
