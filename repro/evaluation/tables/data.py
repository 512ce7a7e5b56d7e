"""The papers' result tables (repro/catalog/paper_tables.yaml) and our results (results/<preset>/), loaded and
validated.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from repro.catalog import protocols
from repro.storage.layout import METRICS_FILE, PROTOCOL_FILE

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
            for where_p, name in [(tw, table.get("eval_protocol"))] + [
                    (f"{tw}.rows[{ri}]", r.get("eval_protocol")) for ri, r in enumerate(table["rows"])]:
                if name is not None and name not in protocols.PROTOCOLS:
                    fail(f"{where_p}: eval_protocol {name!r} is not a protocol of repro/catalog/protocols.py "
                         f"(known: {', '.join(protocols.PROTOCOLS)})")
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


_ROW_KEYS = {"id", "group", "model", "nfe", "values", "source", "status", "target", "note", "details",
             "eval_protocol"}


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
        # training-seed replicates (ddo.seeds > 1): the training seed of a DDO / control entry, and for replicates
        # k >= 1 the name of replicate 0's entry of the same kind and round
        if "seed" in model and not (isinstance(model["seed"], int) and not isinstance(model["seed"], bool)
                                    and model["seed"] >= 0):
            fail(f"field 'models[{i}].seed' must be a training seed (an integer >= 0), got {model['seed']!r}")
        if "replicate_of" in model:
            names = {m.get("name") for m in models if isinstance(m, dict)}
            if "seed" not in model:
                fail(f"field 'models[{i}].replicate_of' needs 'models[{i}].seed' (the replicate's training seed)")
            if not isinstance(model["replicate_of"], str) or model["replicate_of"] not in names \
                    or model["replicate_of"] == model["name"]:
                fail(f"field 'models[{i}].replicate_of' must name another model entry (replicate 0's), got "
                     f"{model['replicate_of']!r}")


# ----------------------------------------------------------------------------------------------------
# A run of ours on disk: results/<preset>/metrics.json holds its numbers only (what `dvc metrics show` prints and
# compares) and protocol.json beside it what they measure. In memory the two are one "result document": the run's
# preset, paper, metric, protocol, run facts and one entry per model (name, round, value, values per seed range,
# selection score, extra metrics, cell, note, devices).

_MODEL_NUMBERS = ("value", "values", "selection_score", "extra")


def _per_range(values: list, ranges: list) -> dict:
    keys = [f"seeds {int(lo)}-{int(hi) - 1}" for lo, hi in ranges] if len(ranges) == len(values) else \
        [f"range {i}" for i in range(len(values))]
    return dict(zip(keys, values))


def split_result(doc: dict) -> tuple[dict, dict]:
    """A result document -> (numbers for metrics.json, description for protocol.json)."""
    metric, ranges = doc["metric"], doc["protocol"].get("seed_ranges") or []
    numbers: dict[str, dict] = {metric: {}, f"{metric}_per_range": {}}
    models = []
    for m in doc["models"]:
        name = m.get("name")
        if "value" in m:
            numbers[metric][name] = m["value"]
            numbers[f"{metric}_per_range"][name] = _per_range(m.get("values") or [m["value"]], ranges)
        if "selection_score" in m:
            numbers.setdefault("selection_score", {})[name] = m["selection_score"]
        for key, e in (m.get("extra") or {}).items():
            numbers.setdefault(key, {})[name] = e["value"]
            numbers.setdefault(f"{key}_per_range", {})[name] = _per_range(e["values"], ranges)
        desc = {k: v for k, v in m.items() if k not in _MODEL_NUMBERS}
        if m.get("extra"):
            desc["extra_metrics"] = sorted(m["extra"])
        models.append(desc)
    description = {k: v for k, v in doc.items() if k not in ("models", "final") and not k.startswith("_")}
    description["models"] = models
    return numbers, description


def merge_result(numbers: dict, description: dict) -> dict:
    """(metrics.json, protocol.json) -> the result document (inverse of :func:`split_result`)."""
    metric = description["metric"]
    doc = {k: v for k, v in description.items() if k != "models"}
    models = []
    for m in description["models"]:
        name = m.get("name")
        entry = {k: v for k, v in m.items() if k != "extra_metrics"}
        if name in numbers.get(metric, {}):  # else the validation names the missing value
            entry["value"] = numbers[metric][name]
            entry["values"] = list(numbers[f"{metric}_per_range"][name].values())
        if name in numbers.get("selection_score", {}):
            entry["selection_score"] = numbers["selection_score"][name]
        if m.get("extra_metrics"):
            entry["extra"] = {k: {"value": numbers[k][name], "values": list(numbers[f"{k}_per_range"][name].values())}
                              for k in m["extra_metrics"]}
        models.append(entry)
    doc["models"] = models
    return doc


def write_result(results: Path, doc: dict) -> None:
    """Write a run's result document as metrics.json (numbers) + protocol.json, each atomically."""
    from repro.storage.files import write_json

    numbers, description = split_result(doc)
    write_json(Path(results) / PROTOCOL_FILE, description)
    write_json(Path(results) / METRICS_FILE, numbers)


def read_result(results: Path) -> dict:
    """One run's result document from results/<preset>/ (validated; ``_path`` = its protocol.json)."""
    results = Path(results)
    docs = []
    for name in (PROTOCOL_FILE, METRICS_FILE):
        path = results / name
        try:
            docs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read {name}: {' '.join(str(exc).split())}. Fix: rerun the fid stage "
                             f"(`repro fid`) that writes it, or remove the folder {results}") from exc
    try:
        doc = merge_result(docs[1], docs[0])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{results}: {METRICS_FILE} and {PROTOCOL_FILE} do not fit together (missing {exc}); "
                         "rerun `repro fid`") from None
    _validate_metrics(doc, str(results / PROTOCOL_FILE))
    doc["_path"] = str(results / PROTOCOL_FILE)
    return doc


def load_results(results_dir: str | Path) -> list[dict]:
    """Every run of ours under ``results_dir`` (each ``<preset>/`` with protocol.json and metrics.json), sorted by
    directory name, as result documents (:func:`read_result`). A missing ``results_dir`` gives an empty list.

    Raises:
        ValueError: a file is not valid JSON, or a required field is missing or has the wrong type.
            The message names the file and the field (e.g. ``models[1].value``).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    return [read_result(path.parent) for path in sorted(results_dir.glob(f"*/{PROTOCOL_FILE}"))]


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def _get_paper(tables: dict, paper: str) -> dict:
    papers = tables["papers"]
    if paper not in papers:
        raise ValueError(f"unknown paper {paper!r}; valid papers: {', '.join(papers)}")
    return papers[paper]
