# =====================================================================================================
# repro.evaluation.tables: the papers' result tables next to our own numbers.
#
# Two inputs:
#   * repro/catalog/paper_tables.yaml (package data): each seed paper's tables, row by row. Values are
#     strings, so "1.30" prints as the paper printed it. Every row has a stable id ("cifar10/edm-ddo"),
#     a source tag and a status (confirmed / third_party). The schema is described at the top of the
#     YAML file.
#   * results/<preset>/metrics.json (written by the pipeline's `fid` stage): one run of ours, with one
#     entry per model (base, each DDO round, an optional control). A model entry with
#     "cell": "<row id>" (optionally "<row id>:<column key>") puts its number into that paper row.
#
# Three renderers, each producing "md", "csv" or "latex" text (no I/O apart from reading the inputs,
# no click):
#   render_paper(paper, results_dir)  the paper's tables with columns ours / Δ / protocol
#   render_run(metrics)               one run of ours: base vs each DDO round (and control)
#   render_all(paper, results_dir)    both: the paper tables, then every run that belongs to the paper
#
# Number formatting: paper values exactly as stored; ours with 2 decimals (3 significant digits when
# |x| < 1); Δ with 2 decimals and an explicit sign.
# =====================================================================================================
"""Load the papers' result tables and our results, and render them side by side.

Public API:
    FORMATS                                   ("md", "csv", "latex")
    load_paper_tables(path=None) -> dict      parsed and validated paper_tables.yaml
    load_results(results_dir) -> list[dict]   every results/*/metrics.json, validated
    render_paper(paper, results_dir, fmt="md") -> str
    render_run(metrics, fmt="md") -> str
    render_all(paper, results_dir, fmt="md") -> str
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = [
    "FORMATS",
    "STATUSES",
    "load_paper_tables",
    "load_results",
    "render_paper",
    "render_run",
    "render_all",
]

FORMATS = ("md", "csv", "latex")
STATUSES = ("confirmed", "third_party")
DASH = "–"

# ----------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Number formatting
# ----------------------------------------------------------------------------------------------------


def _fmt_ours(x: float) -> str:
    """Our value: 2 decimals, or 3 significant digits when |x| < 1."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0.00"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:#.3g}"


def _fmt_delta(d: float) -> str:
    """A difference with explicit sign: 2 decimals (2 significant digits if it would print as 0.00)."""
    d = round(float(d), 12)
    if not math.isfinite(d):
        return str(d)
    if d == 0:
        return "+0.00"
    if abs(d) >= 0.005:
        return f"{d:+.2f}"
    return f"{d:+#.2g}"


def _num_repr(x: float) -> str:
    """Machine-readable number for csv (shortest repr, float noise rounded away)."""
    x = round(float(x), 10)
    return repr(x)


# ----------------------------------------------------------------------------------------------------
# A small table model shared by the md and latex writers
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    title: str
    header: list[str]
    align: list[str]  # "l" or "r" per column
    body: list[tuple[str, list[str], bool]] = field(default_factory=list)  # (kind, cells, bold)
    preamble: list[str] = field(default_factory=list)  # lines between the title and the table
    notes: list[str] = field(default_factory=list)  # lines under the table


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _grid_md(grid: _Grid, level: int = 3) -> str:
    lines = [f"{'#' * level} {grid.title}"]
    if grid.preamble:
        lines += [""] + grid.preamble
    lines.append("")
    lines.append("| " + " | ".join(_md_cell(h) for h in grid.header) + " |")
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in grid.align) + "|")
    for kind, cells, bold in grid.body:
        if kind == "group":
            cells = [f"*{cells[0]}*"] + [""] * (len(grid.header) - 1)
        elif bold:
            cells = [f"**{cells[0]}**"] + cells[1:]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if grid.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in grid.notes]
    return "\n".join(lines)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_LATEX_UNICODE = {
    "–": "--", "—": "---", "Δ": r"$\Delta$", "²": r"$^{2}$", "†": r"$^{\dagger}$",
    "‡": r"$^{\ddagger}$", "×": r"$\times$", "−": r"$-$", "≈": r"$\approx$", "…": r"\dots{}",
    "±": r"$\pm$", "é": r"\'e", "“": "``", "”": "''",
}


def _tex(s: str) -> str:
    """Escape text for LaTeX (special characters and the few non-ASCII symbols we print)."""
    out = []
    for ch in s:
        out.append(_LATEX_SPECIAL.get(ch) or _LATEX_UNICODE.get(ch) or ch)
    text = "".join(out)
    # `code` spans from the markdown notes become \texttt{...}
    parts = text.split("`")
    if len(parts) > 1 and len(parts) % 2 == 1:
        text = "".join(p if i % 2 == 0 else r"\texttt{" + p + "}" for i, p in enumerate(parts))
    return text


def _grid_latex(grid: _Grid) -> str:
    n = len(grid.header)
    lines = [
        f"% {grid.title}",
        r"\begin{table}[htbp]",
        r"\centering",
        r"\caption{" + _tex(grid.title) + "}",
        r"\begin{tabular}{" + "".join(grid.align) + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in grid.header) + r" \\",
        r"\midrule",
    ]
    for kind, cells, bold in grid.body:
        if kind == "group":
            lines.append(rf"\multicolumn{{{n}}}{{l}}{{\textit{{{_tex(cells[0])}}}}} \\")
            continue
        tex_cells = [_tex(c) for c in cells]
        if bold:
            tex_cells[0] = r"\textbf{" + tex_cells[0] + "}"
        lines.append(" & ".join(tex_cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    extra = list(grid.preamble) + [f"Note: {n_}" for n_ in grid.notes]
    if extra:
        lines.append(r"\par\smallskip")
        lines.append(r"{\footnotesize " + r" \\ ".join(_tex(x) for x in extra) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines)


def _csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().rstrip("\n")


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def _get_paper(tables: dict, paper: str) -> dict:
    papers = tables["papers"]
    if paper not in papers:
        raise ValueError(f"unknown paper {paper!r}; valid papers: {', '.join(papers)}")
    return papers[paper]


# ----------------------------------------------------------------------------------------------------
# Matching our results to paper rows
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Match:
    result: dict  # one metrics.json
    model: dict  # the model entry inside it
    column: dict  # the paper column the value belongs to


def _guidance_on(g: Any) -> bool:
    if g is None or g is False:
        return False
    if isinstance(g, str):
        return g.strip().lower() not in ("", "none", "off", "false", "no")
    if _is_number(g):
        return g != 0
    return bool(g)


def _run_facts(metrics: dict) -> dict:
    """Facts about a run that pick a paper column: ``cond`` (if known) and ``guidance``."""
    protocol = metrics.get("protocol") or {}
    facts: dict[str, Any] = {}
    if isinstance(protocol.get("cond"), bool):
        facts["cond"] = protocol["cond"]
    elif "label_mode" in protocol:
        mode = protocol["label_mode"]
        facts["cond"] = mode is not None and str(mode).lower() not in ("none", "uncond", "unconditional", "")
    sampler = protocol.get("sampler") if isinstance(protocol.get("sampler"), dict) else {}
    facts["guidance"] = _guidance_on(protocol.get("guidance", sampler.get("guidance")))
    return facts


def _match_results(paper_key: str, paper: dict, results: list[dict]) -> dict[str, list[_Match]]:
    """Map row id -> our matches, for every model entry of a run of ``paper_key`` that has a ``cell``."""
    rows: dict[str, tuple[dict, dict]] = {}
    for table in paper["tables"]:
        for row in table["rows"]:
            rows[row["id"]] = (table, row)
    matches: dict[str, list[_Match]] = {}
    for res in results:
        if res.get("paper") != paper_key:
            continue
        origin = res.get("_path", res.get("preset", "?"))
        for i, model in enumerate(res["models"]):
            cell = model.get("cell")
            if not cell:
                continue
            row_id, _, col_key = cell.partition(":")
            col_key = col_key or model.get("column") or ""
            if row_id not in rows:
                raise ValueError(
                    f"{origin}: models[{i}].cell {cell!r} is not a row id of paper {paper_key!r} "
                    f"(see repro/catalog/paper_tables.yaml)"
                )
            table, _row = rows[row_id]
            columns = table["columns"]
            if col_key:
                chosen = [c for c in columns if c["key"] == col_key]
                if not chosen:
                    raise ValueError(
                        f"{origin}: models[{i}].cell {cell!r}: column {col_key!r} not in table "
                        f"{table['id']!r} (columns: {', '.join(c['key'] for c in columns)})"
                    )
            elif len(columns) == 1:
                chosen = columns
            else:
                facts = _run_facts(res)
                chosen = [
                    c for c in columns
                    if c.get("select") and all(k in facts and facts[k] == v for k, v in c["select"].items())
                ]
                if len(chosen) != 1:
                    raise ValueError(
                        f"{origin}: models[{i}].cell {cell!r} is ambiguous: table {table['id']!r} has "
                        f"columns {', '.join(c['key'] for c in columns)}; write '{row_id}:<column>' "
                        f"(or set protocol.label_mode / protocol.guidance)"
                    )
            matches.setdefault(row_id, []).append(_Match(res, model, chosen[0]))
    return matches


def _ref_name(reference: Any) -> str:
    """Short name of a reference: 'data/digits.npz (all 1797 images)' -> 'digits.npz'."""
    text = str(reference).strip()
    head = text.split(" (")[0].split()[0] if text else "?"
    return head.rstrip("/").rsplit("/", 1)[-1] or head


def _protocol_short(match: _Match, table: dict, row: dict) -> str:
    res = match.result
    prot = res["protocol"]
    n = int(prot["n_samples"])
    k = len(prot.get("seed_ranges") or [])
    parts = [f"{n} samples" + (f" × {k} seed ranges ({prot.get('reduce', 'mean')})" if k > 1 else "")]
    parts.append("full run" if prot["full"] else "reduced run")
    parts.append(f"ref {_ref_name(prot['reference'])}")
    if res["metric"] != table["metric"]:
        parts.append(f"metric {res['metric']}")
    sampler = prot.get("sampler") if isinstance(prot.get("sampler"), dict) else {}
    nfe = sampler.get("nfe")
    if nfe is not None and row.get("nfe") is not None and nfe != row["nfe"]:
        parts.append(f"NFE {nfe}")
    return f"{res['preset']}: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Paper tables
# ----------------------------------------------------------------------------------------------------


def _table_title(table: dict) -> str:
    number = table.get("number") or ""
    src = ", ".join(f"[{t}]" for t in table["source"])
    return f"{number + '. ' if number else ''}{table['title']} (source: {src})"


def _detail_text(name: str, detail: Any, columns: list[dict]) -> str:
    shorts = {c["key"]: c.get("short") or c["label"] for c in columns}
    label = name.replace("_", " ")
    if isinstance(detail, dict):
        value = detail["value"]
        if isinstance(value, dict):
            value = ", ".join(f"{shorts.get(k, k)} {v}" for k, v in value.items())
        extra = []
        if "status" in detail or "source" in detail:
            bits = []
            if "status" in detail:
                bits.append(str(detail["status"]).replace("_", "-"))
            if "source" in detail:
                bits.append(" ".join(f"[{t}]" for t in detail["source"]))
            extra.append(" ".join(bits))
        if detail.get("note"):
            extra.append(str(detail["note"]))
        return f"{label}: {value}" + (f" ({'; '.join(extra)})" if extra else "")
    return f"{label}: {detail}"


def _paper_grid(table: dict, matches: dict[str, list[_Match]]) -> _Grid:
    """Build the md/latex grid of one paper table."""
    columns = table["columns"]
    multi = len(columns) > 1
    show_nfe = any(r.get("nfe") is not None for r in table["rows"])
    header = ["model"] + (["NFE"] if show_nfe else []) + [c["label"] for c in columns] + ["ours", "Δ", "protocol"]
    align = ["l"] + (["r"] if show_nfe else []) + ["r"] * len(columns) + ["r", "r", "l"]
    grid = _Grid(title=_table_title(table), header=header, align=align)
    if table.get("protocol"):
        grid.preamble.append(f"Paper protocol: {table['protocol']}.")
    grid.notes = list(table.get("notes") or [])
    group = None
    for row in table["rows"]:
        if row.get("group") and row["group"] != group:
            group = row["group"]
            grid.body.append(("group", [group], False))
        third = row["status"] == "third_party"
        model = row["model"] + (" ~" if third else "")
        cells = [model]
        if show_nfe:
            cells.append(DASH if row.get("nfe") is None else str(row["nfe"]))
        for c in columns:
            cells.append(row["values"].get(c["key"], DASH))
        ours, deltas, protos = [], [], []
        for m in matches.get(row["id"], []):
            value = float(m.model["value"])
            suffix = f" ({m.column.get('short') or m.column['label']})" if multi else ""
            ours.append(_fmt_ours(value) + suffix)
            paper_val = row["values"].get(m.column["key"])
            delta = None if paper_val is None else value - float(paper_val)
            deltas.append(DASH if delta is None else _fmt_delta(delta))
            protos.append(_protocol_short(m, table, row))
        unique_protos = list(dict.fromkeys(protos))  # one run filling two columns: say its protocol once
        cells += ["; ".join(ours) or DASH, "; ".join(deltas) or DASH, "; ".join(unique_protos)]
        grid.body.append(("row", cells, bool(row.get("target"))))
        details = [_detail_text(k, v, columns) for k, v in (row.get("details") or {}).items()]
        if row.get("note"):
            details.insert(0, row["note"])
        if details:
            grid.notes.append(f"`{row['id']}`: " + "; ".join(details))
    return grid


def _used_tags(paper: dict) -> list[str]:
    used: set[str] = set()
    for table in paper["tables"]:
        used.update(table["source"])
        for row in table["rows"]:
            used.update(row["source"])
            for detail in (row.get("details") or {}).values():
                if isinstance(detail, dict):
                    used.update(detail.get("source") or [])
    return [t for t in paper["sources"] if t in used]


def _legend(paper: dict) -> str:
    """The legend line under a paper's tables (mentions bold / ~ only when the paper has such rows)."""
    rows = [r for t in paper["tables"] for r in t["rows"]]
    bits = []
    if any(r.get("target") for r in rows):
        bits.append("bold rows are our reproduction targets")
    if any(r["status"] == "third_party" for r in rows):
        bits.append("~ marks a row known only from a third party")
    bits.append(
        "ours = the value of our run that names the row (results/<preset>/metrics.json; the protocol's "
        "reduction over its seed ranges), Δ = ours − paper; – = no value"
    )
    text = "; ".join(bits)
    return "Legend: " + text + "."


def render_paper(paper: str, results_dir: str | Path, fmt: str = "md", *, paper_tables: dict | None = None) -> str:
    """Render one paper's result tables with our numbers beside the paper's.

    Args:
        paper: a paper key of paper_tables.yaml ("ddo", "dg", "dcd", ...).
        results_dir: the ``results/`` directory; runs whose ``paper`` is ``paper`` and whose model
            entries carry a ``cell`` fill the "ours" column of that row.
        fmt: "md" (headings, pipe tables, notes, sources), "csv" (one record per paper row × value
            column, plus one per extra match of ours), or "latex" (booktabs tables).
        paper_tables: an already loaded document (default: the package's paper_tables.yaml).

    Raises:
        ValueError: unknown paper or format (the message lists the valid ones), a malformed
            metrics.json, or a ``cell`` that names no row of this paper.
    """
    _check_fmt(fmt)
    tables = paper_tables if paper_tables is not None else load_paper_tables()
    pdata = _get_paper(tables, paper)
    results = load_results(results_dir)
    matches = _match_results(paper, pdata, results)
    if fmt == "csv":
        return _paper_csv(paper, pdata, matches)
    grids = [_paper_grid(table, matches) for table in pdata["tables"]]

    head_title = f"{paper}: {pdata['title']}"
    sources = [f"[{t}] {pdata['sources'][t]}" for t in _used_tags(pdata)]
    if fmt == "md":
        out = [f"## {head_title}", "", pdata["citation"] + "."]
        if pdata.get("note"):
            out += ["", pdata["note"]]
        for grid in grids:
            out += ["", _grid_md(grid)]
        if grids:
            out += ["", _legend(pdata)]
        if sources:
            out += ["", "Sources:"] + [f"- {s}" for s in sources]
        return "\n".join(out) + "\n"
    # latex
    out = [f"% {head_title}", f"% {pdata['citation']}"]
    if pdata.get("note"):
        out.append(f"% {pdata['note']}")
    for grid in grids:
        out += ["", _grid_latex(grid)]
    if grids:
        out += ["", r"{\footnotesize " + _tex(_legend(pdata)) + "}"]
    if sources:
        out += ["", r"{\footnotesize Sources: " + "; ".join(_tex(s) for s in sources) + "}"]
    return "\n".join(out) + "\n"


_PAPER_CSV_HEADER = [
    "paper", "table", "row_id", "group", "model", "nfe", "column", "paper_value", "status", "source",
    "target", "ours", "delta", "ours_preset", "ours_model", "protocol",
]


def _paper_csv(paper: str, pdata: dict, matches: dict[str, list[_Match]]) -> str:
    records = []
    for table in pdata["tables"]:
        for row in table["rows"]:
            row_matches = matches.get(row["id"], [])
            for col in table["columns"]:
                paper_val = row["values"].get(col["key"])
                col_matches = [m for m in row_matches if m.column["key"] == col["key"]]
                if paper_val is None and not col_matches:
                    continue
                base = [
                    paper, table["id"], row["id"], row.get("group", ""), row["model"], row.get("nfe"),
                    col["key"], paper_val, row["status"], " ".join(row["source"]),
                    "yes" if row.get("target") else "",
                ]
                if not col_matches:
                    records.append(base + [None] * 5)
                for m in col_matches:
                    value = float(m.model["value"])
                    delta = None if paper_val is None else _num_repr(value - float(paper_val))
                    records.append(base + [
                        _num_repr(value), delta, m.result["preset"], m.model["name"],
                        _protocol_short(m, table, row),
                    ])
    return _csv_text(_PAPER_CSV_HEADER, records) + "\n"


# ----------------------------------------------------------------------------------------------------
# One run of ours
# ----------------------------------------------------------------------------------------------------


def _seed_label(rng: list, n_samples: int) -> str:
    start, end = int(rng[0]), int(rng[1])
    if end - start == n_samples:  # half-open [start, end)
        end -= 1
    return f"{start}–{end}"


def _find_base(models: list[dict]) -> dict:
    for m in models:
        if m["name"] == "base":
            return m
    for m in models:
        if m["round"] == 0:
            return m
    return models[0]


def _is_control(m: dict) -> bool:
    return bool(m.get("control")) or "control" in str(m["name"]).lower()


def _run_description(metrics: dict) -> tuple[str, list[str]]:
    """Title and protocol lines of a run table."""
    prot = metrics["protocol"]
    label = metrics.get("metric_label") or metrics["metric"]
    title = f"Run `{metrics['preset']}` ({metrics['paper']}): {metrics['metric']}"
    if label != metrics["metric"]:
        title += f", {label}"
    n = int(prot["n_samples"])
    ranges = prot.get("seed_ranges") or []
    reduce = prot.get("reduce", "mean")
    bits = []
    if ranges:
        seeds = ", ".join(_seed_label(r, n) for r in ranges)
        bits.append(f"{n} samples per seed range, {len(ranges)} seed range{'s' if len(ranges) != 1 else ''} ({seeds}), value = {reduce} over them")
    else:
        bits.append(f"{n} samples")
    if prot.get("label_mode") is not None:
        bits.append(f"labels {prot['label_mode']}")
    sampler = prot.get("sampler")
    if isinstance(sampler, dict):
        s = str(sampler.get("name", "?"))
        if sampler.get("num_steps") is not None:
            s += f", {sampler['num_steps']} steps"
        if sampler.get("nfe") is not None:
            s += f", NFE {sampler['nfe']}"
        if sampler.get("guidance") is not None:
            s += f", guidance {sampler['guidance']}"
        bits.append(f"sampler {s}")
    elif sampler:
        bits.append(f"sampler {sampler}")
    if prot.get("guidance") is not None:
        bits.append(f"guidance {prot['guidance']}")
    if prot.get("extractor"):
        e = f"extractor {prot['extractor']}"
        if prot.get("extractor_sha256"):
            e += f" (sha256 {str(prot['extractor_sha256'])[:12]})"
        bits.append(e)
    r = f"reference {prot['reference']}"
    if prot.get("reference_sha256"):
        r += f" (sha256 {str(prot['reference_sha256'])[:12]})"
    bits.append(r)
    devices = sorted({d for m in metrics.get("models", []) for d in m.get("sample_devices") or []})
    if devices:
        bits.append(f"sampled on {' and '.join(devices)}" + (" (MIXED: a seed's image differs by device)"
                                                            if len(devices) > 1 else ""))
    bits.append("full run" if prot["full"] else "REDUCED run (fewer samples than the full protocol)")
    lines = ["Protocol: " + "; ".join(bits) + "."]
    run = metrics.get("run")
    if isinstance(run, dict):
        rb = []
        if run.get("command"):
            rb.append(f"`{run['command']}`")
        if run.get("git_commit"):
            rb.append(f"commit {run['git_commit']}")
        if run.get("finished"):
            rb.append(f"finished {run['finished']}")
        if _is_number(run.get("seconds")):
            rb.append(f"{run['seconds']:.0f} s")
        if rb:
            lines.append("Run: " + ", ".join(rb) + ".")
    return title, lines


def _rel_delta(d: float, base: float) -> str:
    text = _fmt_delta(d)
    if base:
        text += f" ({100.0 * d / base:+.1f}%)"
    return text


def render_run(metrics: dict, fmt: str = "md") -> str:
    """Render the table of one run of ours: one row per model entry, in file order.

    Columns: model, round, the run's value (the protocol's reduction over seed ranges, "mean" unless
    ``protocol.reduce`` says otherwise), one column per seed range, Δ vs base (absolute and %), Δ vs
    control (only if the run has a control entry: ``control: true`` or "control" in its name), the
    paper row a model fills (only if some entry has a ``cell``) and notes (only if some entry has one).
    A title and a protocol line (n samples, seed ranges, sampler, extractor, reference, full/reduced)
    precede the table.

    Args:
        metrics: one metrics.json document (as returned by :func:`load_results`, or parsed JSON).
        fmt: "md", "csv" or "latex".

    Raises:
        ValueError: unknown format, or a malformed document (missing fields).
    """
    _check_fmt(fmt)
    _validate_metrics(metrics, str(metrics.get("_path", f"metrics of preset {metrics.get('preset', '?')!r}")))
    models = metrics["models"]
    prot = metrics["protocol"]
    reduce = prot.get("reduce", "mean")
    base = _find_base(models)
    controls = [m for m in models if _is_control(m) and m is not base]
    control = controls[0] if controls else None
    n_rep = max((len(m.get("values") or []) for m in models), default=0)
    ranges = prot.get("seed_ranges") or []
    n = int(prot["n_samples"])

    if fmt == "csv":
        header = ["preset", "paper", "metric", "model", "round", "reduce", "value"]
        header += [f"repeat_{i + 1}" for i in range(n_rep)]
        header += ["delta_vs_base"] + (["delta_vs_control"] if control else []) + ["cell", "note", "n_samples", "full"]
        recs = []
        for m in models:
            vals = list(m.get("values") or [])
            rec = [metrics["preset"], metrics["paper"], metrics["metric"], m["name"], m["round"], reduce,
                   _num_repr(m["value"])]
            rec += [_num_repr(v) for v in vals] + [None] * (n_rep - len(vals))
            rec.append(None if m is base else _num_repr(m["value"] - base["value"]))
            if control:
                ddo_row = m is not base and m is not control and not _is_control(m)
                rec.append(_num_repr(m["value"] - control["value"]) if ddo_row else None)
            rec += [m.get("cell"), m.get("note"), n, "yes" if prot["full"] else "no"]
            recs.append(rec)
        return _csv_text(header, recs) + "\n"

    title, lines = _run_description(metrics)
    if len(ranges) == n_rep and n_rep:
        rep_headers = [f"seeds {_seed_label(r, n)}" for r in ranges]
    else:
        rep_headers = [f"repeat {i + 1}" for i in range(n_rep)]
    has_cell = any(m.get("cell") for m in models)
    has_note = any(m.get("note") for m in models)
    header = ["model", "round", f"{metrics['metric']} ({reduce})"] + rep_headers + ["Δ vs base"]
    header += (["Δ vs control"] if control else []) + (["paper row"] if has_cell else []) + (["note"] if has_note else [])
    align = ["l", "r", "r"] + ["r"] * n_rep + ["r"] + (["r"] if control else []) + (["l"] if has_cell else []) + (["l"] if has_note else [])
    grid = _Grid(title=title, header=header, align=align, preamble=lines)
    for m in models:
        vals = list(m.get("values") or [])
        cells = [str(m["name"]), str(m["round"]), _fmt_ours(m["value"])]
        cells += [_fmt_ours(v) for v in vals] + [DASH] * (n_rep - len(vals))
        cells.append(DASH if m is base else _rel_delta(m["value"] - base["value"], base["value"]))
        if control:
            ddo_row = m is not base and m is not control and not _is_control(m)
            cells.append(_rel_delta(m["value"] - control["value"], control["value"]) if ddo_row else DASH)
        if has_cell:
            cells.append(f"`{m['cell']}`" if m.get("cell") else "")
        if has_note:
            cells.append(str(m.get("note") or ""))
        grid.body.append(("row", cells, False))
    if fmt == "md":
        return _grid_md(grid) + "\n"
    return _grid_latex(grid) + "\n"


def render_all(paper: str, results_dir: str | Path, fmt: str = "md", *, paper_tables: dict | None = None) -> str:
    """The paper's tables (:func:`render_paper`), then the table of every run in ``results_dir`` whose
    ``paper`` is ``paper`` (:func:`render_run`), in directory-name order, separated by blank lines."""
    _check_fmt(fmt)
    parts = [render_paper(paper, results_dir, fmt, paper_tables=paper_tables).rstrip("\n")]
    for res in load_results(results_dir):
        if res["paper"] == paper:
            parts.append(render_run(res, fmt).rstrip("\n"))
    return "\n\n".join(parts) + "\n"
