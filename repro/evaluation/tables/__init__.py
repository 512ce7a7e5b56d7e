"""The papers' result tables next to our own numbers (`repro table`).

Public API:
    FORMATS                                   ("md", "csv", "latex")
    load_paper_tables(path=None) -> dict      parsed and validated paper_tables.yaml
    load_results(results_dir) -> list[dict]   every results/*/ run, validated
    render_paper(paper, results_dir, fmt="md") -> str
    render_run(metrics, fmt="md") -> str
    render_all(paper, results_dir, fmt="md") -> str
"""

from __future__ import annotations

from pathlib import Path

from repro.evaluation.tables.data import FORMATS, STATUSES, _check_fmt, load_paper_tables, load_results
from repro.evaluation.tables.paper import render_paper
from repro.evaluation.tables.runs import render_run

__all__ = ["FORMATS", "STATUSES", "load_paper_tables", "load_results", "render_paper", "render_run", "render_all"]


def render_all(paper: str, results_dir: str | Path, fmt: str = "md", *, paper_tables: dict | None = None) -> str:
    """The paper's tables (:func:`render_paper`), then the table of every run in ``results_dir`` whose
    ``paper`` is ``paper`` (:func:`render_run`), in directory-name order, separated by blank lines."""
    _check_fmt(fmt)
    parts = [render_paper(paper, results_dir, fmt, paper_tables=paper_tables).rstrip("\n")]
    for res in load_results(results_dir):
        if res["paper"] == paper:
            parts.append(render_run(res, fmt).rstrip("\n"))
    return "\n\n".join(parts) + "\n"
