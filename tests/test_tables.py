"""Tests of repro.evaluation.tables and repro/catalog/paper_tables.yaml.

Golden-output tests compare the rendered text exactly with tests/golden/*; on a mismatch they show a
unified diff. After a deliberate change of the output, regenerate the goldens with

    REPRO_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_tables.py

and review the diff of tests/golden/ before committing it.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
from pathlib import Path

import pytest
import yaml

from repro.evaluation import tables as T
from repro.evaluation.tables import render as R
from repro.evaluation.tables.data import read_result, write_result

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "results"
GOLDEN = HERE / "golden"
# the project's research notes (not shipped with the repo); REPRO_RESEARCH_TABLES points elsewhere
SHARED_TABLES = Path(os.environ.get("REPRO_RESEARCH_TABLES", "/work/shared/research/paper_tables.yaml"))


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with tests/golden/<name> exactly (or rewrite it if REPRO_UPDATE_GOLDEN=1)."""
    path = GOLDEN / name
    if os.environ.get("REPRO_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; create it with REPRO_UPDATE_GOLDEN=1", pytrace=False)
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), text.splitlines(keepends=True),
                fromfile=f"tests/golden/{name}", tofile="rendered",
            )
        )
        pytest.fail(
            f"rendered output differs from tests/golden/{name} "
            f"(if the change is intended, regenerate with REPRO_UPDATE_GOLDEN=1):\n{diff}",
            pytrace=False,
        )


def fixture_metrics(preset: str) -> dict:
    doc = read_result(FIXTURES / preset)
    doc.pop("_path")
    return doc


# --------------------------------------------------------------------------------------------------
# golden outputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix", [("md", "md"), ("csv", "csv"), ("latex", "tex")])
def test_render_paper_ddo_golden(fmt, suffix):
    check_golden(f"ddo_paper.{suffix}", T.render_paper("ddo", FIXTURES, fmt))


@pytest.mark.parametrize("preset", ["tiny", "cifar10-cond-ddo"])
def test_render_run_golden(preset):
    check_golden(f"run_{preset}.md", T.render_run(fixture_metrics(preset)))


def test_render_all_dg_golden():
    # the dg fixture names its columns explicitly ("row:column"), one run filling two columns
    check_golden("dg_all.md", T.render_all("dg", FIXTURES))


# --------------------------------------------------------------------------------------------------
# behaviour
# --------------------------------------------------------------------------------------------------


def test_paper_values_printed_exactly_and_ours_beside_them():
    md = T.render_paper("ddo", FIXTURES)
    # the fixture is a reduced run (10k samples, mean of 3 ranges): marked, with the differences, not placed
    assert "| **EDM + DDO** | 35 | 1.38 | 1.30 | (3.34) (cond) | +2.04 |" in md
    assert ("NOT the paper's protocol: 10000 samples (paper 50000); mean of 3 seed ranges (paper one seed "
            "range)") in md
    assert "| DDPM | 250 | 11.0 |" in md  # ImageNet-64 DDPM keeps its one decimal
    assert "| SiT-XL | 250 | 8.3 | 2.06 |" in md
    assert "Paper protocol (ddo-cifar10-fid50k)" in md and "Row EDM: protocol edm-cifar10-fid50k" in md
    assert "Sources:" in md and "[H] arXiv HTML v1" in md


def test_render_paper_without_results(tmp_path):
    md = T.render_paper("ddo", tmp_path / "does-not-exist")
    assert "| **EDM + DDO** | 35 | 1.38 | 1.30 | – | – |  |" in md
    assert "full run" not in md and "reduced run" not in md


def test_render_all_includes_only_runs_of_that_paper():
    ddo = T.render_all("ddo", FIXTURES)
    assert "### Run `tiny` (ddo)" in ddo and "### Run `cifar10-cond-ddo` (ddo)" in ddo
    assert "dg-cifar10-uncond" not in ddo
    assert ddo.index("### Table 1.") < ddo.index("### Run `cifar10-cond-ddo`") < ddo.index("### Run `tiny`")
    dg = T.render_all("dg", FIXTURES)
    assert "### Run `dg-cifar10-uncond` (dg)" in dg and "Run `tiny`" not in dg


def test_render_run_reduced_and_control():
    md = T.render_run(fixture_metrics("cifar10-cond-ddo"))
    assert "REDUCED run" in md
    tiny = T.render_run(fixture_metrics("tiny"))
    assert "full run" in tiny and "Δ vs control" in tiny
    assert "| ddo-r1 | 1 | 5.00 | 4.90 | 5.10 | -1.10 (-18.0%) | -0.90 (-15.3%) |  |" in tiny


def test_a_guided_model_is_compared_with_the_model_it_guides():
    m = fixture_metrics("tiny")
    assert "Δ vs unguided" not in T.render_run(m)  # no guided model: no column
    r1 = next(x for x in m["models"] if x["name"] == "ddo-r1")
    m["models"].append({"name": "ddo-r1+dg", "round": 1, "value": 4.0, "values": [3.9, 4.1],
                        "guided": {"model": "ddo-r1", "variant": "dg"}, "note": "DG on ddo-r1 (w = 2)"})
    md = T.render_run(m)
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.split(" | ")[-3:] == ["Δ vs control", "Δ vs unguided", "note |"]
    row = next(line for line in md.splitlines() if line.startswith("| ddo-r1+dg |"))
    assert f"| {R._fmt_delta(4.0 - r1['value'])} ({100 * (4.0 - r1['value']) / r1['value']:+.1f}%) | DG on ddo-r1" in row
    rows = list(csv.DictReader(io.StringIO(T.render_run(m, "csv"))))
    assert [r["delta_vs_unguided"] for r in rows][-2:] == ["", R._num_repr(4.0 - r1["value"])]


def test_protocol_line_says_which_devices_sampled_and_flags_a_mix():
    m = fixture_metrics("tiny")
    assert "sampled on" not in T.render_run(m)  # not recorded: nothing said
    for model in m["models"]:
        model["sample_devices"] = ["cuda"]
    assert "; sampled on cuda; full run." in T.render_run(m)
    m["models"][1]["sample_devices"] = ["cpu", "cuda"]
    assert "; sampled on cpu and cuda (MIXED: a seed's image differs by device); full run." in T.render_run(m)


def test_protocol_line_shows_the_base_curve_and_the_plateau_rule():
    m = fixture_metrics("tiny")
    assert "its selection score" not in T.render_run(m)  # no curve recorded (a released base, or curve off): nothing said
    m["protocol"]["base_curve"] = {"metric": "fd_digits", "seeds": [50000, 51000], "every_nimg": 25600,
                                   "plateau_window": 4, "plateau_tol": 0.1, "plateau": True, "nimg": 307200, "total_nimg": 819200,
                                   "points": [[25600, 157.2, 155.6, 160.9], [256000, 3.41, 3.79, 4.59],
                                              [281600, 3.38, 3.7, 4.5], [307200, 3.37, 3.69, 4.49]]}
    md = T.render_run(m)
    assert ("base trained 307,200 images, its selection score (fd_digits, seeds 50000–50999) every 25,600 images: "
            "157.20 first, 3.41 → 3.38 → 3.37 at the last three points; plateau rule (window 4, tolerance 0.1) held;") in md
    m["protocol"]["base_curve"].update(plateau=False, nimg=819200, plateau_tol=0)
    assert "plateau rule (window 4, tolerance the seed noise) did not hold by 819,200 images;" in T.render_run(m)


def test_csv_and_latex_render():
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(T.render_paper("ddo", FIXTURES, "csv"))))
    ours = [r for r in rows if r["ours"]]
    assert [(r["row_id"], r["column"], r["ours"], r["delta"]) for r in ours] == [
        ("cifar10/edm-retested", "fid_cond", "3.9134", "2.0634"),
        ("cifar10/edm-ddo", "fid_cond", "3.3367", "2.0367"),
    ]
    assert {r["paper_value"] for r in rows if r["row_id"] == "imagenet64/ddpm"} == {"11.0"}
    run_rows = list(csv.DictReader(io.StringIO(T.render_run(fixture_metrics("tiny"), "csv"))))
    assert [r["model"] for r in run_rows] == ["base", "ddo-r1", "ddo-r2", "ddo-r3", "mle-control"]

    tex = T.render_paper("ddo", FIXTURES, "latex")
    assert tex.count(r"\begin{tabular}") == 4 and tex.count(r"\end{table}") == 4
    assert r"\textbf{EDM + DDO} & 35 & 1.38 & 1.30 & (3.34) (cond) & +2.04 &" in tex
    assert "SiD$^{2}$A" in tex
    run_tex = T.render_run(fixture_metrics("tiny"), "latex")
    assert r"fd\_digits (mean)" in run_tex and r"$\Delta$ vs base" in run_tex


def test_unknown_paper_and_format():
    with pytest.raises(ValueError, match=r"unknown paper 'nope'; valid papers: ddo, dg, dcd, improved_dg, ipm_kernel"):
        T.render_paper("nope", FIXTURES)
    with pytest.raises(ValueError, match=r"unknown paper"):
        T.render_all("nope", FIXTURES)
    with pytest.raises(ValueError, match=r"unknown format 'html'; valid formats: md, csv, latex"):
        T.render_paper("ddo", FIXTURES, "html")
    with pytest.raises(ValueError, match=r"valid formats"):
        T.render_run(fixture_metrics("tiny"), "html")


def test_papers_without_tables_render_their_note():
    md = T.render_paper("improved_dg", FIXTURES)
    assert "No result numbers" in md and "| model |" not in md


def _write(tmp_path: Path, preset: str, data) -> Path:
    """A run's result files (metrics.json + protocol.json) from a result document, or raw text in both."""
    d = tmp_path / "results" / preset
    d.mkdir(parents=True)
    if isinstance(data, str):
        for name in ("metrics.json", "protocol.json"):
            (d / name).write_text(data, encoding="utf-8")
    else:
        write_result(d, data)
    return d / "protocol.json"


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda m: m.pop("preset"), "'preset'"),
        (lambda m: m["protocol"].pop("full"), "'protocol.full'"),
        (lambda m: m["protocol"].pop("n_samples"), "'protocol.n_samples'"),
        (lambda m: m["models"][1].pop("value"), "'models[1].value'"),
        (lambda m: m["models"][0].pop("round"), "'models[0].round'"),
        (lambda m: m["models"][2].__setitem__("value", "4.6"), "'models[2].value' must be a number"),
        (lambda m: m["models"][0].__setitem__("sample_devices", "cpu"), "'models[0].sample_devices' must be a list"),
    ],
)
def test_malformed_metrics_names_file_and_field(tmp_path, mutate, field):
    data = fixture_metrics("tiny")
    mutate(data)
    path = _write(tmp_path, "broken", data)
    with pytest.raises(ValueError) as exc:
        T.load_results(tmp_path / "results")
    assert str(path) in str(exc.value) and field in str(exc.value)
    with pytest.raises(ValueError, match="broken"):
        T.render_paper("ddo", tmp_path / "results")


def test_invalid_json_names_file(tmp_path):
    path = _write(tmp_path, "garbled", "{not json")
    with pytest.raises(ValueError, match="garbled") as exc:
        T.load_results(tmp_path / "results")
    assert str(path) in str(exc.value)


def test_unknown_and_ambiguous_cells(tmp_path):
    data = fixture_metrics("cifar10-cond-ddo")
    data["models"][0]["cell"] = "cifar10/no-such-row"
    _write(tmp_path, "bad-cell", data)
    with pytest.raises(ValueError, match=r"bad-cell.*'cifar10/no-such-row' is not a row id"):
        T.render_paper("ddo", tmp_path / "results")

    data = fixture_metrics("cifar10-cond-ddo")
    del data["protocol"]["label_mode"]  # uncond or cond? cannot tell
    _write(tmp_path, "ambiguous", data)
    with pytest.raises(ValueError, match=r"ambiguous.*cifar10/edm-retested:<column>"):
        T.render_paper("ddo", tmp_path / "results")


def test_cell_column_selection(tmp_path):
    data = fixture_metrics("cifar10-cond-ddo")
    data["preset"] = "cifar10-uncond-ddo"
    data["protocol"]["label_mode"] = "none"
    _write(tmp_path, "cifar10-uncond-ddo", data)
    var = fixture_metrics("cifar10-cond-ddo")
    var["preset"] = "var-d16-ddo"
    var["protocol"]["guidance"] = {"kind": "cfg", "scale": 1.4}
    var["models"] = [{"name": "ddo-r2", "round": 2, "value": 2.61, "cell": "imagenet256/var-d16-ddo"}]
    _write(tmp_path, "var-d16-ddo", var)
    md = T.render_paper("ddo", tmp_path / "results")
    assert "| **EDM + DDO** | 35 | 1.38 | 1.30 | (3.34) (uncond) | +1.96 |" in md
    assert "| **VAR-d16 + DDO** | 10 | 3.12 | 2.54 | (2.61) (w/ G) | +0.07 |" in md


def test_number_formats():
    assert R._fmt_ours(1.3) == "1.30"
    assert R._fmt_ours(0.97341) == "0.973"
    assert R._fmt_ours(0.5) == "0.500"
    assert R._fmt_ours(16.2449) == "16.24"
    assert R._fmt_delta(1.41 - 1.30) == "+0.11"
    assert R._fmt_delta(-0.58) == "-0.58"
    assert R._fmt_delta(0.0) == "+0.00"
    assert R._fmt_delta(0.003) == "+0.0030"


# --------------------------------------------------------------------------------------------------
# the package data
# --------------------------------------------------------------------------------------------------


def test_package_tables_schema_and_targets():
    data = T.load_paper_tables()
    assert set(data["papers"]) == {"ddo", "dg", "dcd", "improved_dg", "ipm_kernel"}
    ddo = data["papers"]["ddo"]
    assert [t["id"] for t in ddo["tables"]] == ["cifar10", "imagenet64", "imagenet256_var", "imagenet512"]
    rows = [r for t in ddo["tables"] for r in t["rows"]]
    assert len(rows) == 21 + 22 + 18 + 3
    assert {r["id"] for r in rows if r.get("target")} == {
        "cifar10/edm-retested", "cifar10/edm-ddo",
        "imagenet64/edm2-s-retested", "imagenet64/edm2-s-ddo",
        "imagenet256/var-d16-no-tricks", "imagenet256/var-d16-ddo",
        "imagenet256/var-d30-no-tricks", "imagenet256/var-d30-ddo",
        "imagenet512/edm2-l-retested", "imagenet512/edm2-l-ddo", "imagenet512/edm2-l-ddo-ag",
    }
    for paper in data["papers"].values():
        for table in paper["tables"]:
            for row in table["rows"]:
                assert row["status"] in T.STATUSES and row["source"]
    assert data["papers"]["improved_dg"]["tables"] == [] and data["papers"]["improved_dg"]["note"]
    assert data["papers"]["ipm_kernel"]["tables"] == [] and data["papers"]["ipm_kernel"]["note"]


def test_load_paper_tables_rejects_unquoted_numbers(tmp_path):
    text = (Path(T.__file__).parents[2] / "catalog" / "paper_tables.yaml").read_text(encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace('fid_uncond: "2.92"', "fid_uncond: 2.92", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.yaml.*cifar10/stylegan2-ada.*quoted string"):
        T.load_paper_tables(bad)


# (section, model, cond) of the research notes' paper_tables.yaml -> (row id, value column)
_DDO_ROWS = {
    ("cifar10", "EDM (retested)", False): ("cifar10/edm-retested", "fid_uncond"),
    ("cifar10", "EDM (retested)", True): ("cifar10/edm-retested", "fid_cond"),
    ("cifar10", "EDM + DDO", False): ("cifar10/edm-ddo", "fid_uncond"),
    ("cifar10", "EDM + DDO", True): ("cifar10/edm-ddo", "fid_cond"),
    ("cifar10", "EDM (original paper)", False): ("cifar10/edm", "fid_uncond"),
    ("cifar10", "EDM (original paper)", True): ("cifar10/edm", "fid_cond"),
    ("cifar10", "EDM + DG", False): ("cifar10/edm-dg", "fid_uncond"),
    ("cifar10", "EDM + DG", True): ("cifar10/edm-dg", "fid_cond"),
    ("imagenet64", "EDM2-S (retested, class-balanced)", None): ("imagenet64/edm2-s-retested", "fid"),
    ("imagenet64", "EDM2-S + DDO", None): ("imagenet64/edm2-s-ddo", "fid"),
    ("imagenet64", "EDM2-S (original paper)", None): ("imagenet64/edm2-s", "fid"),
    ("imagenet64", "EDM2-S + autoguidance", None): ("imagenet64/edm2-s-ag", "fid"),
    ("imagenet256_var", "VAR-d16 (no sampling tricks)", None): ("imagenet256/var-d16-no-tricks", None),
    ("imagenet256_var", "VAR-d16 + DDO", None): ("imagenet256/var-d16-ddo", None),
    ("imagenet256_var", "VAR-d30 (no sampling tricks)", None): ("imagenet256/var-d30-no-tricks", None),
    ("imagenet256_var", "VAR-d30 + CCA", None): ("imagenet256/var-d30-cca", None),
    ("imagenet256_var", "VAR-d30 + DDO", None): ("imagenet256/var-d30-ddo", None),
    ("imagenet512", "EDM2-L (retested, class-balanced)", None): ("imagenet512/edm2-l-retested", "fid"),
    ("imagenet512", "EDM2-L + DDO", None): ("imagenet512/edm2-l-ddo", "fid"),
    ("imagenet512", "EDM2-L + DDO + autoguidance", None): ("imagenet512/edm2-l-ddo-ag", "fid"),
}
_DG_ROWS = {
    ("cifar10", False, "EDM (VP)"): "cifar10/edm-uncond",
    ("cifar10", True, "EDM (VP)"): "cifar10/edm-cond",
    ("cifar10", False, "LSGM"): "cifar10/lsgm-uncond",
    ("ffhq64", False, "EDM"): "ffhq64/edm",
    ("celeba64", False, "Soft-Truncation"): "celeba64/soft-truncation",
    ("imagenet256", True, "ADM-G"): "imagenet256/adm-g",
    ("imagenet256", True, "DiT-XL/2"): "imagenet256/dit-xl2",
}
_DCD_ROWS = {
    ("cifar10", "pixel Langevin"): "cifar10/sngan-dcd-pixel",
    ("cifar10", "latent Langevin"): "cifar10/sngan-dcd-latent",
    ("stl10", "pixel Langevin"): "stl10/sngan-dcd-pixel",
    ("stl10", "latent Langevin"): "stl10/sngan-dcd-latent",
}


def _repair_flow_comma(entry: dict) -> dict:
    """Undo a YAML pitfall of the notes file: in ``{model: EDM2-S (retested, class-balanced), ...}`` the
    unquoted comma splits the name, leaving ``model: "EDM2-S (retested"`` and a key
    ``"class-balanced)"`` with value None. Rejoin such pieces."""
    entry = dict(entry)
    for key in [k for k, v in entry.items() if v is None and isinstance(k, str) and k.endswith(")")]:
        if "(" in entry.get("model", "") and ")" not in entry["model"]:
            entry["model"] = f"{entry['model']}, {key}"
            del entry[key]
    return entry


def _rows_by_id(paper: dict) -> dict:
    return {r["id"]: r for t in paper["tables"] for r in t["rows"]}


def _detail_value(row: dict, name: str):
    detail = (row.get("details") or {})[name]
    return detail["value"] if isinstance(detail, dict) else detail


@pytest.mark.skipif(not SHARED_TABLES.exists(), reason=f"{SHARED_TABLES} (project research notes) is absent")
def test_headline_cells_match_research_notes():
    """Every cell of the research notes' paper_tables.yaml is in repro/catalog/paper_tables.yaml, same number."""
    shared = yaml.safe_load(SHARED_TABLES.read_text(encoding="utf-8"))
    ours = T.load_paper_tables()["papers"]
    checked = 0

    ddo = _rows_by_id(ours["ddo"])
    for section, entries in shared["ddo"].items():
        for e in map(_repair_flow_comma, entries):
            row_id, col = _DDO_ROWS[(section, e["model"], e.get("cond"))]
            row = ddo[row_id]
            assert row["status"] == e["status"], row_id
            for key, val in e.items():
                if key in ("model", "cond", "status"):
                    continue
                if key == "fid":
                    got = row["values"][col]
                elif key in ("fid_no_guidance", "fid_guidance"):
                    got = row["values"][key]
                elif key == "nfe":
                    got = row["nfe"]
                elif key == "rounds":
                    got = _detail_value(row, "rounds")
                    got = got[col] if isinstance(got, dict) else got
                else:
                    pytest.fail(f"unmapped field {key!r} of ddo.{section} {e['model']!r}")
                assert float(got) == float(val), (row_id, key, got, val)
                checked += 1

    dg = _rows_by_id(ours["dg"])
    for e in map(_repair_flow_comma, shared["dg"]):
        row = dg[_DG_ROWS[(e["dataset"], e["cond"], e["backbone"])]]
        assert row["status"] == e["status"]
        for key, val in e.items():
            if key in ("dataset", "cond", "backbone", "status"):
                continue
            if key == "nfe":
                got = row["nfe"]
            elif key == "weight":
                got = _detail_value(row, "dg_weight")
            elif key == "boosting":
                assert _detail_value(row, "boosting") == ("yes" if val else "no")
                continue
            else:
                got = row["values"][key]
            assert float(got) == float(val), (row["id"], key, got, val)
            checked += 1

    dcd = _rows_by_id(ours["dcd"])
    for e in map(_repair_flow_comma, shared["dcd"]):
        row = dcd[_DCD_ROWS[(e["dataset"], e["variant"])]]
        assert row["status"] == e["status"]
        for key in ("is", "fid"):
            assert float(row["values"][key]) == float(e[key]), (row["id"], key)
            checked += 1

    for key in ("improved_dg", "ipm_kernel"):
        assert shared[key] == [] and ours[key]["tables"] == []
    assert checked >= 78  # every numeric field of the notes file (78 when this test was written)


def test_a_run_with_the_papers_protocol_is_placed_and_each_difference_is_named(tmp_path):
    data = fixture_metrics("cifar10-cond-ddo")
    data["protocol"].update(n_samples=50000, seed_ranges=[[0, 50000]], reduce="mean", cond=True, label_mode="random",
                            name="ddo-cifar10-fid50k")
    _write(tmp_path, "cifar10-cond-ddo", data)
    md = T.render_paper("ddo", tmp_path / "results")
    assert "| **EDM + DDO** | 35 | 1.38 | 1.30 | 3.34 (cond) | +2.04 |" in md  # placed: the paper's measurement
    assert "NOT the paper's protocol" not in md.split("Table 2")[0]
    # each field that differs is named, one at a time
    paper = T.load_paper_tables()["papers"]["ddo"]
    table = next(t for t in paper["tables"] if t["id"] == "cifar10")
    row = next(r for r in table["rows"] if r["id"] == "cifar10/edm-ddo")
    for change, said in [({"label_mode": "balanced"}, "labels balanced (paper random)"),
                         ({"seed_ranges": [[1000, 51000]]}, "seeds from 1000 (paper 0)"),
                         ({"sampler": {"nfe": 19}}, "NFE 19 (paper 35)"),
                         ({"reference": "data/cifar10.npz (all real images)"}, "ref cifar10.npz (paper cifar10-32x32.npz)"),
                         ({"seed_ranges": [[0, 50000], [50000, 100000], [100000, 150000]], "reduce": "min"},
                          "min of 3 seed ranges (paper one seed range)")]:
        res = {**data, "protocol": {**data["protocol"], **change}}
        assert T.paper.protocol_differences(res, table, row) == [said]
    # the EDM row is EDM's own measurement (min of three ranges): our one-range run differs from it
    edm = next(r for r in table["rows"] if r["id"] == "cifar10/edm")
    assert T.paper.protocol_differences(data, table, edm) == ["one seed range (paper min of 3 seed ranges)"]
