"""One run of ours as a table: the base model against each DDO round (and the MLE control), and each guided model
against the model it guides.
"""

from __future__ import annotations

from repro.evaluation.tables.data import DASH, _check_fmt, _is_number, _validate_metrics
from repro.evaluation.tables.render import _csv_text, _fmt_delta, _fmt_ours, _Grid, _grid_latex, _grid_md, _num_repr


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


def _unguided(m: dict, by_name: dict) -> dict | None:
    """The entry of the model a guided model guides (its ``guided.model``), if the run has it."""
    g = m.get("guided")
    return by_name.get(g.get("model")) if isinstance(g, dict) else None


def _curve_bit(curve: dict) -> str:
    """The base's pretraining curve in a protocol line: where it ended and whether the plateau rule held."""
    scores = [_fmt_ours(p[1]) for p in curve["points"]]
    b = (f"base trained {curve['nimg']:,} images, its selection score ({curve['metric']}, seeds "
         f"{curve['seeds'][0]}–{curve['seeds'][1] - 1}) every {curve['every_nimg']:,} images: {scores[0]} first, "
         + " → ".join(scores[-3:]) + " at the last three points")
    if curve.get("plateau_window"):
        tol = curve.get("plateau_tol") or 0
        b += (f"; plateau rule (window {curve['plateau_window']}, "
              + (f"tolerance {tol:g}" if tol else "tolerance the seed noise") + ") "
              + ("held" if curve.get("plateau") else f"did not hold by {curve['total_nimg']:,} images"))
    return b


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
    held = prot.get("heldout")
    if isinstance(held, dict):
        h = (f"held-out part {held.get('n_heldout')} images (data.holdout {held.get('fraction')}, seed "
             f"{held.get('seed')}; nothing trained or selected on them)")
        if _is_number(held.get("floor")):
            h += f", floor {_fmt_ours(held['floor'])} (training part vs held-out part"
            same = held.get("floor_same_size")
            if isinstance(same, list) and same and all(_is_number(v) for v in same):
                h += (f"; random training subsets of the held-out size vs the rest: {_fmt_ours(min(same))}–"
                      f"{_fmt_ours(max(same))}")
            h += ")"
        if _is_number(held.get("kid_floor")):
            h += f"; KID ×10³ in the same features, training part vs held-out part: {1e3 * held['kid_floor']:.2f}"
        bits.append(h)
        cc = held.get("copy_check")
        if isinstance(cc, dict) and _is_number(cc.get("percentile")):
            bits.append(f"copies = fraction of samples nearer (pixel L2) to a training image than the "
                        f"{cc['percentile']:g}th percentile of the held-out images' nearest-training-image distances "
                        f"(held-out images: ~{cc['percentile']:g}%, training images: 100%)")
    curve = prot.get("base_curve")
    if isinstance(curve, dict) and curve.get("points"):
        bits.append(_curve_bit(curve))
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


def _extra_value(m: dict, key: str):
    e = (m.get("extra") or {}).get(key)
    return e.get("value") if isinstance(e, dict) and _is_number(e.get("value")) else None


def _rel_delta(d: float, base: float) -> str:
    text = _fmt_delta(d)
    if base:
        text += f" ({100.0 * d / base:+.1f}%)"
    return text


def _spread(values: list[float], fmt) -> str:
    """Mean and min–max of ``values`` (no standard error: a handful of seeds shows spread, not significance)."""
    mean = sum(values) / len(values)
    return f"mean {fmt(mean)} (min–max {fmt(min(values))} – {fmt(max(values))})"


def _seed_summary(metrics: dict, models: list[dict]) -> list[str]:
    """Lines under the table for training-seed replicates (ddo.seeds > 1: entries with ``seed``): per training seed
    the last DDO round and the control's last round; their mean and min–max over the seeds, and the paired
    difference DDO − control of each seed. Empty without replicates (fewer than two seeds)."""
    last: dict[str, dict[int, dict]] = {"ddo": {}, "control": {}}
    for m in models:
        if "seed" not in m or m.get("guided"):
            continue
        kind = "control" if _is_control(m) else "ddo"
        prev = last[kind].get(m["seed"])
        if prev is None or m["round"] > prev["round"]:
            last[kind][m["seed"]] = m
    seeds = sorted(last["ddo"])
    if len(seeds) < 2:
        return []
    paired = [s for s in seeds if s in last["control"]]
    metric = metrics["metric"]
    columns = [(f"{metric} vs training part", lambda m: m["value"], _fmt_ours),
               (f"{metric} vs held-out", lambda m: _extra_value(m, f"{metric}_heldout"), _fmt_ours),
               ("KID×10³ held-out", lambda m: _extra_value(m, "kid_heldout"), lambda v: f"{1e3 * v:.2f}"),
               ("copies", lambda m: _extra_value(m, "copy_rate"), lambda v: f"{100.0 * v:.1f}%")]
    rounds = sorted({m["round"] for m in last["ddo"].values()})
    lines = [f"Over {len(seeds)} training seeds ({', '.join(str(s) for s in seeds)}): only the training seed varied "
             "(ddo.seed + k: each step's draws, the data order and the fake-bank seeds); the same base model, "
             "selection seeds and evaluation seeds for every seed. Mean and min–max over the seeds, no "
             "significance test" + (f"; last DDO round {', '.join(str(r) for r in rounds)}" if rounds else "") + "."]
    for label, get, fmt in columns:
        ddo = [get(last["ddo"][s]) for s in seeds]
        if any(v is None for v in ddo):
            continue
        parts = [f"DDO last round {_spread(ddo, fmt)}"]
        ctl = [get(last["control"][s]) for s in paired]
        if paired and all(v is not None for v in ctl):
            parts.append(f"control last round {_spread(ctl, fmt)}")
            diff = [get(last["ddo"][s]) - get(last["control"][s]) for s in paired]
            parts.append(f"DDO − control per seed {_spread(diff, fmt)}")
        lines.append(f"{label} over {len(seeds)} training seeds: " + "; ".join(parts) + ".")
    return lines


def render_run(metrics: dict, fmt: str = "md") -> str:
    """Render the table of one run of ours: one row per model entry, in file order.

    Columns: model, round, the run's value (the protocol's reduction over seed ranges, "mean" unless
    ``protocol.reduce`` says otherwise), one column per seed range, Δ vs base (absolute and %), Δ vs
    control (only if the run has a control entry: ``control: true`` or "control" in its name), the
    paper row a model fills (only if some entry has a ``cell``) and notes (only if some entry has one).
    A run with guided models (entries with ``guided: {model: ...}``) has a Δ vs unguided column: each guided
    model against the model it guides, measured on the same seeds.
    With a held-out split (entries with ``extra.<metric>_heldout`` and ``extra.copy_rate``, written by the fid stage
    when data.holdout > 0), more columns: the value against the held-out part, its Δ vs base, KID ×10³ against the
    training part and the held-out part (``extra.kid_train``, ``extra.kid_heldout``) and the copy rate
    (repro.evaluation.copycheck); the protocol line then names the split and the floors.
    A title and a protocol line (n samples, seed ranges, sampler, extractor, reference, full/reduced)
    precede the table.
    Training-seed replicates (ddo.seeds > 1: entries with ``seed``, ``replicate_of``): one row each, a DDO row's
    Δ vs control against the control of its own seed, and notes under the table (md, latex; not csv) with the
    mean and min–max over the seeds of the last DDO round, the control's last round and the paired difference
    DDO − control per seed (:func:`_seed_summary`); no significance test.

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
    # training-seed replicates: a DDO entry's Δ vs control is against the control of its own training seed
    seed_control = {m["seed"]: m for m in controls if "seed" in m}
    by_name = {m["name"]: m for m in models}
    guided = any(_unguided(m, by_name) is not None for m in models)
    n_rep = max((len(m.get("values") or []) for m in models), default=0)
    ranges = prot.get("seed_ranges") or []
    n = int(prot["n_samples"])
    heldout_key = f"{metrics['metric']}_heldout"
    has_held = any(_extra_value(m, heldout_key) is not None for m in models)
    has_copy = any(_extra_value(m, "copy_rate") is not None for m in models)
    has_kid = any(_extra_value(m, "kid_heldout") is not None for m in models)

    if fmt == "csv":
        header = ["preset", "paper", "metric", "model", "round", "reduce", "value"]
        header += [f"repeat_{i + 1}" for i in range(n_rep)]
        header += ["delta_vs_base"] + (["delta_vs_control"] if control else [])
        header += (["delta_vs_unguided"] if guided else []) + (["value_heldout"] if has_held else [])
        header += (["kid_train", "kid_heldout"] if has_kid else [])
        header += (["copy_rate"] if has_copy else []) + ["cell", "note", "n_samples", "full"]
        recs = []
        for m in models:
            vals = list(m.get("values") or [])
            rec = [metrics["preset"], metrics["paper"], metrics["metric"], m["name"], m["round"], reduce,
                   _num_repr(m["value"])]
            rec += [_num_repr(v) for v in vals] + [None] * (n_rep - len(vals))
            rec.append(None if m is base else _num_repr(m["value"] - base["value"]))
            if control:
                ddo_row = m is not base and m is not control and not _is_control(m)
                c = seed_control.get(m.get("seed"), control)
                rec.append(_num_repr(m["value"] - c["value"]) if ddo_row else None)
            if guided:
                u = _unguided(m, by_name)
                rec.append(_num_repr(m["value"] - u["value"]) if u is not None else None)
            for key, on in ((heldout_key, has_held), ("kid_train", has_kid), ("kid_heldout", has_kid),
                            ("copy_rate", has_copy)):
                if on:
                    v = _extra_value(m, key)
                    rec.append(None if v is None else _num_repr(v))
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
    header += (["Δ vs control"] if control else []) + (["Δ vs unguided"] if guided else [])
    header += ([f"vs held-out ({reduce})", "Δ held-out vs base"] if has_held else [])
    header += (["KID×10³ train", "KID×10³ held-out"] if has_kid else []) + (["copies"] if has_copy else [])
    header += (["paper row"] if has_cell else []) + (["note"] if has_note else [])
    align = ["l", "r", "r"] + ["r"] * n_rep + ["r"] + (["r"] if control else []) + (["r"] if guided else [])
    align += (["r", "r"] if has_held else []) + (["r", "r"] if has_kid else []) + (["r"] if has_copy else [])
    align += (["l"] if has_cell else []) + (["l"] if has_note else [])
    grid = _Grid(title=title, header=header, align=align, preamble=lines)
    for m in models:
        vals = list(m.get("values") or [])
        cells = [str(m["name"]), str(m["round"]), _fmt_ours(m["value"])]
        cells += [_fmt_ours(v) for v in vals] + [DASH] * (n_rep - len(vals))
        cells.append(DASH if m is base else _rel_delta(m["value"] - base["value"], base["value"]))
        if control:
            ddo_row = m is not base and m is not control and not _is_control(m)
            c = seed_control.get(m.get("seed"), control)
            cells.append(_rel_delta(m["value"] - c["value"], c["value"]) if ddo_row else DASH)
        if guided:
            u = _unguided(m, by_name)
            cells.append(_rel_delta(m["value"] - u["value"], u["value"]) if u is not None else DASH)
        if has_held:
            v, b = _extra_value(m, heldout_key), _extra_value(base, heldout_key)
            cells.append(DASH if v is None else _fmt_ours(v))
            cells.append(DASH if m is base or v is None or b is None else _rel_delta(v - b, b))
        if has_kid:
            for key in ("kid_train", "kid_heldout"):
                v = _extra_value(m, key)
                cells.append(DASH if v is None else f"{1e3 * v:.2f}")
        if has_copy:
            v = _extra_value(m, "copy_rate")
            cells.append(DASH if v is None else f"{100.0 * v:.1f}%")
        if has_cell:
            cells.append(f"`{m['cell']}`" if m.get("cell") else "")
        if has_note:
            cells.append(str(m.get("note") or ""))
        grid.body.append(("row", cells, False))
    grid.notes += _seed_summary(metrics, models)
    if fmt == "md":
        return _grid_md(grid) + "\n"
    return _grid_latex(grid) + "\n"
