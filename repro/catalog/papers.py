"""The paper tables' keys and row ids (repro/catalog/paper_tables.yaml), as the config checks a preset's cells
against them. The tables themselves are rendered by repro.evaluation.tables."""

from __future__ import annotations

import functools
from importlib import resources

import yaml


@functools.lru_cache(maxsize=1)
def paper_rows() -> dict[str, dict[str, tuple[str, ...]]]:
    """{paper key: {row id: the keys of its table's value columns}}."""
    data = yaml.safe_load(resources.files("repro.catalog").joinpath("paper_tables.yaml").read_text(encoding="utf-8"))
    return {key: {row["id"]: tuple(c["key"] for c in table["columns"])
                  for table in paper.get("tables") or [] for row in table["rows"]}
            for key, paper in data["papers"].items()}
