"""The papers' result tables (repro/catalog/paper_tables.yaml) and our results (results/<preset>/), loaded and
validated.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

FORMATS = ("md", "csv", "latex")


STATUSES = ("confirmed", "third_party")


DASH = "–"


def load_paper_tables(path: str | Path | None = None) -> dict:
    """Load and validate the paper tables.

    Args:
        path: a YAML file with the schema of ``repro/catalog/paper_tables.yaml``. The default (None) reads the
            copy shipped inside the package (importlib.resources), so it works from an installed wheel.

    Returns:
        The parsed document: ``{"schema": 1, "papers": {key: {...}}}``.

    Raises:
        ValueError: the document breaks the schema (the message names the file and the offending entry).
    """
    if path is None:
        text = resources.files("repro.catalog").joinpath("paper_tables.yaml").read_text(encoding="utf-8")
        origin = "repro/catalog/paper_tables.yaml"
    else:
        text = Path(path).read_text(encoding="utf-8")
        origin = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{origin}: not valid YAML: {exc}") from exc
    _validate_paper_tables(data, origin)
    return data


def _validate_paper_tables(data: Any, origin: str) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"{origin}: {msg}")

    if not isinstance(data, dict) or not isinstance(data.get("papers"), dict):
        fail("expected a mapping with a 'papers' mapping")
    if data.get("schema") != 1:
        fail(f"unsupported schema {data.get('schema')!r} (expected 1)")
    for pkey, paper in data["papers"].items():
        where = f"papers.{pkey}"
        if not isinstance(paper, dict):
            fail(f"{where}: expected a mapping")
        for key in ("title", "citation", "sources", "tables"):
            if key not in paper:
                fail(f"{where}: missing field '{key}'")
        sources = paper["sources"] or {}
        if not isinstance(sources, dict):
            fail(f"{where}.sources: expected a mapping TAG -> text")
        if not isinstance(paper["tables"], list):
            fail(f"{where}.tables: expected a list")
        if not paper["tables"] and not paper.get("note"):
            fail(f"{where}: a paper without tables needs a 'note' saying why")

        def check_tags(tags: Any, at: str) -> None:
            if not isinstance(tags, list) or not tags:
                fail(f"{at}: 'source' must be a non-empty list of source tags")
            for tag in tags:
                if tag not in sources:
                    fail(f"{at}: unknown source tag {tag!r} (known: {', '.join(sources)})")

        row_ids: set[str] = set()
        table_ids: set[str] = set()
        for ti, table in enumerate(paper["tables"]):
            tw = f"{where}.tables[{ti}]"
            for key in ("id", "title", "source", "metric", "columns", "rows"):
                if key not in table:
                    fail(f"{tw}: missing field '{key}'")
            if table["id"] in table_ids:
                fail(f"{tw}: duplicate table id {table['id']!r}")
            table_ids.add(table["id"])
            check_tags(table["source"], tw)
            col_keys = []
            for ci, col in enumerate(table["columns"]):
                if not isinstance(col, dict) or "key" not in col or "label" not in col:
                    fail(f"{tw}.columns[{ci}]: needs 'key' and 'label'")
                col_keys.append(col["key"])
            for ri, row in enumerate(table["rows"]):
                rw = f"{tw}.rows[{ri}]"
                for key in ("id", "model", "values", "source", "status"):
                    if key not in row:
                        fail(f"{rw}: missing field '{key}'")
                rw = f"{tw}.rows[{ri}] ({row['id']})"
                unknown = set(row) - _ROW_KEYS
                if unknown:
                    # also catches `{model: A (b, c)}`: an unquoted comma in a flow mapping splits the name
                    fail(f"{rw}: unknown field(s) {', '.join(map(repr, sorted(map(str, unknown))))} "
                         f"(known: {', '.join(sorted(_ROW_KEYS))}; quote names that contain commas)")
                if row["id"] in row_ids:
                    fail(f"{rw}: duplicate row id")
                row_ids.add(row["id"])
                if row["status"] not in STATUSES:
                    fail(f"{rw}: status must be one of {', '.join(STATUSES)}, not {row['status']!r}")
                check_tags(row["source"], rw)
                if not isinstance(row["values"], dict):
                    fail(f"{rw}: 'values' must be a mapping column -> string")
                for ckey, val in row["values"].items():
                    if ckey not in col_keys:
                        fail(f"{rw}: value for unknown column {ckey!r} (columns: {', '.join(col_keys)})")
                    if not isinstance(val, str):
                        fail(f"{rw}: value {ckey}={val!r} must be a quoted string to keep its printed precision")
                    try:
                        float(val)
                    except ValueError:
                        fail(f"{rw}: value {ckey}={val!r} is not a number")
                nfe = row.get("nfe")
                if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int)):
                    fail(f"{rw}: nfe must be an integer or null")
                for dname, detail in (row.get("details") or {}).items():
                    if isinstance(detail, dict):
                        if "value" not in detail:
                            fail(f"{rw}: details.{dname} needs 'value'")
                        if detail.get("status", row["status"]) not in STATUSES:
                            fail(f"{rw}: details.{dname}: bad status {detail.get('status')!r}")
                        if "source" in detail:
                            check_tags(detail["source"], f"{rw}.details.{dname}")


_ROW_KEYS = {"id", "group", "model", "nfe", "values", "source", "status", "target", "note", "details"}


_REQUIRED_TOP = ("preset", "paper", "metric", "protocol", "models")


_REQUIRED_PROTOCOL = ("n_samples", "full", "reference")


_REQUIRED_MODEL = ("name", "round", "value")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate_metrics(data: Any, origin: str) -> None:
    """Check one metrics.json document; raise ValueError naming ``origin`` and the bad field."""

    def fail(msg: str) -> None:
        raise ValueError(f"{origin}: {msg}")

    if not isinstance(data, dict):
        fail("expected a JSON object")
    for key in _REQUIRED_TOP:
        if key not in data:
            fail(f"missing field '{key}'")
    for key in ("preset", "paper", "metric"):
        if not isinstance(data[key], str):
            fail(f"field '{key}' must be a string")
    protocol = data["protocol"]
    if not isinstance(protocol, dict):
        fail("field 'protocol' must be an object")
    for key in _REQUIRED_PROTOCOL:
        if key not in protocol:
            fail(f"missing field 'protocol.{key}'")
    if not _is_number(protocol["n_samples"]):
        fail("field 'protocol.n_samples' must be a number")
    if not isinstance(protocol["full"], bool):
        fail("field 'protocol.full' must be true or false")
    for i, rng in enumerate(protocol.get("seed_ranges") or []):
        if not (isinstance(rng, list) and len(rng) == 2 and all(_is_number(v) for v in rng)):
            fail(f"field 'protocol.seed_ranges[{i}]' must be [start, end]")
    models = data["models"]
    if not isinstance(models, list) or not models:
        fail("field 'models' must be a non-empty list")
    for i, model in enumerate(models):
        if not isinstance(model, dict):
            fail(f"field 'models[{i}]' must be an object")
        for key in _REQUIRED_MODEL:
            if key not in model:
                fail(f"missing field 'models[{i}].{key}'")
        if not _is_number(model["value"]):
            fail(f"field 'models[{i}].value' must be a number")
        if not _is_number(model["round"]):
            fail(f"field 'models[{i}].round' must be a number")
        if "values" in model:
            vals = model["values"]
            if not isinstance(vals, list) or not all(_is_number(v) for v in vals):
                fail(f"field 'models[{i}].values' must be a list of numbers")
        if "cell" in model and not isinstance(model["cell"], str):
            fail(f"field 'models[{i}].cell' must be a row id string")
        devices = model.get("sample_devices", [])
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            fail(f"field 'models[{i}].sample_devices' must be a list of device names, e.g. [\"cuda\"]")


def load_results(results_dir: str | Path) -> list[dict]:
    """Read every ``<results_dir>/*/metrics.json``, sorted by directory name.

    Each returned dict is the parsed JSON plus ``"_path"`` (the file it came from, as a string). A
    missing ``results_dir`` gives an empty list.

    Raises:
        ValueError: a file is not valid JSON, or a required field is missing or has the wrong type.
            The message names the file and the field (e.g. ``models[1].value``).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    out = []
    for path in sorted(results_dir.glob("*/metrics.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read metrics.json: {exc}") from exc
        _validate_metrics(data, str(path))
        data["_path"] = str(path)
        out.append(data)
    return out


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def _get_paper(tables: dict, paper: str) -> dict:
    papers = tables["papers"]
    if paper not in papers:
        raise ValueError(f"unknown paper {paper!r}; valid papers: {', '.join(papers)}")
    return papers[paper]
