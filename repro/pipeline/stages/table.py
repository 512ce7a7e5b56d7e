"""Stage `table`: the run's table (results/<preset>/table.md) and the DDO paper's tables with our numbers."""

from __future__ import annotations

from repro.config import Config
from repro.evaluation.tables import render_paper, render_run
from repro.evaluation.tables.data import read_result
from repro.pipeline.common import require, tracked
from repro.storage.files import write_text
from repro.storage.layout import Paths


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    require(paths.metrics, paths.protocol)
    result = read_result(paths.results)
    with tracked("table", cfg, paths) as t:
        run_md = render_run(result, "md")
        write_text(paths.table, run_md)
        paper = cfg.paper.name  # the paper's tables, with every run of ours under results/ that fills a cell
        write_text(paths.paper_tables(paper), render_paper(paper, paths.results_root, "md"))
        t.log_artifact(paths.table)
        print(run_md)
