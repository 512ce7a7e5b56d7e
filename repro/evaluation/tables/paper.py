"""A paper's result tables with our numbers beside the paper's (`repro table --paper X`).

A run of ours fills a paper cell when one of its model entries names the row ("cell": "<row id>", optionally
"<row id>:<column key>"; the fid stage writes it from the preset's ``paper.cells``). Each table (or row) names the
evaluation protocol of the paper's numbers (repro.catalog.protocols); a run whose protocol differs from it (samples,
seed ranges and their reduction, labels, NFE, reference statistics, metric) is shown marked, in parentheses, with
the differences in the protocol column: it is not the paper's measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.catalog import protocols
from repro.evaluation.tables.data import DASH, _check_fmt, _get_paper, _is_number, load_paper_tables, load_results
from repro.evaluation.tables.render import _csv_text, _fmt_delta, _fmt_ours, _Grid, _grid_latex, _grid_md, _num_repr, _tex

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


def _ranges_text(k: int, reduce: str) -> str:
    return "one seed range" if k == 1 else f"{'min' if reduce == 'min' else 'mean'} of {k} seed ranges"


def protocol_differences(res: dict, table: dict, row: dict) -> list[str]:
    """How a run's evaluation differs from the protocol of a paper cell's number (empty: the same measurement).

    The cell's protocol is the row's ``eval_protocol`` or its table's (repro.catalog.protocols); compared are the
    number of samples, the seed ranges and how they reduce, the labels, the NFE, the reference statistics and the
    metric. A table without a named protocol is compared on its ``n_samples`` and metric only.
    """
    prot = res["protocol"]
    diffs = []
    if res["metric"] != table["metric"]:
        diffs.append(f"metric {res['metric']} (paper {table['metric']})")
    name = row.get("eval_protocol") or table.get("eval_protocol")
    if not name:
        if table.get("n_samples") and int(prot["n_samples"]) != table["n_samples"]:
            diffs.append(f"{int(prot['n_samples'])} samples (paper {table['n_samples']})")
        return diffs
    want = protocols.get(name)
    if int(prot["n_samples"]) != want.n_samples:
        diffs.append(f"{int(prot['n_samples'])} samples (paper {want.n_samples})")
    ranges = prot.get("seed_ranges") or []
    k, reduce = len(ranges), prot.get("reduce", "mean")
    if k != len(want.seed_ranges) or (k > 1 and reduce != want.reduce):
        diffs.append(f"{_ranges_text(k, reduce)} (paper {_ranges_text(len(want.seed_ranges), want.reduce)})")
    elif ranges and int(ranges[0][0]) != want.seed_ranges[0][0]:
        diffs.append(f"seeds from {int(ranges[0][0])} (paper {want.seed_ranges[0][0]})")
    labels = prot.get("label_mode")
    if prot.get("cond", labels not in (None, "none")) and want.label_mode != "none" and labels != want.label_mode:
        diffs.append(f"labels {labels} (paper {want.label_mode})")
    sampler = prot.get("sampler") if isinstance(prot.get("sampler"), dict) else {}
    nfe = sampler.get("nfe")
    if nfe is not None and nfe != (row.get("nfe") or want.nfe):
        diffs.append(f"NFE {nfe} (paper {row.get('nfe') or want.nfe})")
    if _ref_name(prot.get("reference", "")) != _ref_name(want.reference):
        diffs.append(f"ref {_ref_name(prot.get('reference', ''))} (paper {_ref_name(want.reference)})")
    return diffs


def _protocol_short(match: _Match, table: dict, row: dict) -> str:
    """The protocol column: the run, its evaluation, and where it differs from the paper's (then marked)."""
    res = match.result
    prot = res["protocol"]
    diffs = protocol_differences(res, table, row)
    k = len(prot.get("seed_ranges") or [])
    parts = [f"{int(prot['n_samples'])} samples" + (f" × {k} seed ranges ({prot.get('reduce', 'mean')})"
                                                    if k > 1 else "")]
    if prot.get("name") and prot["name"] != "custom":
        parts.append(f"protocol {prot['name']}")
    parts.append(f"ref {_ref_name(prot['reference'])}")
    if diffs:
        parts.append("NOT the paper's protocol: " + "; ".join(diffs))
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
        named = f" ({table['eval_protocol']})" if table.get("eval_protocol") else ""
        grid.preamble.append(f"Paper protocol{named}: {table['protocol']}.")
    for row in table["rows"]:
        if row.get("eval_protocol") and row["eval_protocol"] != table.get("eval_protocol"):
            grid.preamble.append(f"Row {row['model']}: protocol {row['eval_protocol']} "
                                 f"({protocols.get(row['eval_protocol']).cell}).")
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
            text = _fmt_ours(value)
            if protocol_differences(m.result, table, row):
                text = f"({text})"  # marked, not placed: another measurement than the paper's
            ours.append(text + suffix)
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
        "reduction over its seed ranges), in parentheses when our protocol differs from the paper's (the protocol "
        "column says how); Δ = ours − paper; – = no value"
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


