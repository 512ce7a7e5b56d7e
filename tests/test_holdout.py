"""The held-out split of the digits (data.holdout), what the training stages read, the copy check and the table's
columns for them."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import numpy as np
import pytest

from repro.config import load_config
from repro.datasets.images import indices_sha256, load_prepared, prepare, split_indices
from repro.evaluation.copycheck import CopyCheck
from repro.evaluation.tables import render_run
from repro.evaluation.tables.data import read_result
from repro.storage.files import load_npz

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny preset's data stage output (digits, data.holdout 0.2) in a temporary data folder."""
    d = tmp_path_factory.mktemp("data")
    cfg = load_config(preset="tiny").data
    assert cfg.holdout == 0.2
    manifest = prepare(cfg, d / "digits.npz", d / "manifest.json", root=d, progress=False)
    return d, manifest


def test_split_is_deterministic_disjoint_and_covers_the_data():
    a_train, a_held = split_indices(1797, 0.2, 0)
    b_train, b_held = split_indices(1797, 0.2, 0)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_held, b_held)
    assert len(a_held) == 359 and len(a_train) == 1438
    assert not set(a_train.tolist()) & set(a_held.tolist())
    assert sorted(a_train.tolist() + a_held.tolist()) == list(range(1797))
    assert not np.array_equal(split_indices(1797, 0.2, 1)[1], a_held)  # the seed picks the split
    with pytest.raises(ValueError, match="holds out 0"):
        split_indices(1797, 0.0001, 0)


def test_the_data_stage_records_the_split_in_the_file_and_the_manifest(prepared, tmp_path):
    d, manifest = prepared
    split = manifest["split"]
    held = np.asarray(load_npz(d / "digits.npz")["heldout"])
    assert split["n_heldout"] == len(held) == 359 and split["n_train"] == 1438 and manifest["n"] == 1797
    assert split["heldout_indices"] == held.tolist() and split["heldout_sha256"] == indices_sha256(held)
    assert json.loads((d / "manifest.json").read_text())["split"] == split
    # the same params write the same bytes (the split is part of the data file's sha256)
    again = prepare(load_config(preset="tiny").data, tmp_path / "digits.npz", tmp_path / "manifest.json",
                    root=tmp_path, progress=False)
    assert again["sha256"] == manifest["sha256"]
    # the parts: disjoint, together every image, each image where its index says
    m = json.loads((d / "manifest.json").read_text())
    train, heldout, every = (load_prepared(d / "digits.npz", m, part=p) for p in ("train", "heldout", "all"))
    assert not set(train.indices.tolist()) & set(heldout.indices.tolist())
    assert len(train.images) + len(heldout.images) == len(every.images) == 1797
    assert np.array_equal(heldout.images, every.images[held]) and np.array_equal(train.labels,
                                                                                   np.delete(every.labels, held))
    # a manifest that does not match the file's split is refused
    bad = copy.deepcopy(m)
    bad["split"]["heldout_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="held-out indices do not match"):
        load_prepared(d / "digits.npz", bad)


def test_without_holdout_the_data_file_is_as_before(tmp_path):
    cfg = load_config(preset="tiny-var").data
    assert cfg.holdout == 0
    manifest = prepare(cfg, tmp_path / "digits.npz", tmp_path / "manifest.json", root=tmp_path, progress=False)
    assert "split" not in manifest and set(load_npz(tmp_path / "digits.npz")) == {"images", "labels"}
    data = load_prepared(tmp_path / "digits.npz", manifest)
    assert len(data.images) == 1797 and data.indices is None
    with pytest.raises(ValueError, match="no held-out part"):
        load_prepared(tmp_path / "digits.npz", manifest, part="heldout")


def test_only_tiny_and_its_test_stand_in_hold_data_out():
    from repro.config import preset_names

    on = {n for n in preset_names() if load_config(preset=n).data.holdout > 0}
    assert on == {"tiny", "micro"}  # guidance-tiny, dg-tiny, tiny-var, cifar10-*: their committed results as before


def test_the_pretrain_stage_trains_on_the_training_part_only(prepared, project, monkeypatch):
    """The pretrain stage, run on the tiny preset's data: the data it hands to training has no held-out image."""
    import shutil

    from repro.pipeline.stages import pretrain as stage
    from repro.storage.layout import Paths

    d, manifest = prepared
    # no curve: it would score the base with the extractor stage's files, which this test does not make
    cfg = load_config(preset="tiny", overrides=["pretrain.curve_every_nimg=0", "pretrain.plateau_window=0"])
    paths = Paths.of(cfg, project)
    paths.data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(d / "digits.npz", paths.data)
    shutil.copy(d / "manifest.json", paths.manifest)
    seen = {}

    class Stop(Exception):
        pass

    def fake_pretrain(pcfg, data, *args, **kwargs):
        seen["data"] = data
        raise Stop

    monkeypatch.setattr(stage, "pretrain", fake_pretrain)
    with pytest.raises(Stop):
        stage.run(cfg, paths, progress=False)
    data, held = seen["data"], set(manifest["split"]["heldout_indices"])
    assert len(data.images) == 1438 and not held & set(data.indices.tolist())
    all_images = load_prepared(paths.data, manifest, part="all").images
    held_rows = {all_images[i].tobytes() for i in held}
    # no held-out image among the training images (digits has a few exact duplicates: compare with that in mind)
    dup = {all_images[i].tobytes() for i in set(range(1797)) - held}
    assert not {x.tobytes() for x in data.images} & (held_rows - dup)


def test_every_training_stage_reads_the_default_training_part():
    """load_data(paths) without a part reads the training part; only the fid stage asks for other parts."""
    for path in sorted((ROOT / "repro/pipeline/stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_data":
                other = len(node.args) > 1 or any(k.arg == "part" for k in node.keywords)
                assert not other or path.name == "fid.py", f"{path.name}:{node.lineno} reads another part"


def test_copy_check_flags_training_images_and_not_held_out_ones(prepared):
    d, manifest = prepared
    m = json.loads((d / "manifest.json").read_text())
    train, heldout = load_prepared(d / "digits.npz", m), load_prepared(d / "digits.npz", m, part="heldout")
    check = CopyCheck(train.images, heldout.images)
    for i in range(0, 1438, 300):  # streamed in batches
        check.update(train.images[i:i + 300])
    assert check.n == 1438 and check.rate == 1.0  # a model that returns its training images
    check.reset()
    check.update(heldout.images)
    assert check.rate == pytest.approx(0.05, abs=0.01)  # real unseen digits: the percentile, by construction
    check.reset()
    rng = np.random.default_rng(0)  # training images, slightly perturbed: still copies
    noisy = np.clip(train.images.astype(np.int16) + rng.integers(-3, 4, train.images.shape), 0, 255).astype(np.uint8)
    check.update(noisy)
    assert check.rate > 0.95
    check.reset()
    check.update(rng.integers(0, 256, (200, 1, 8, 8), dtype=np.uint8))  # noise: far from every training image
    assert check.rate == 0.0
    with pytest.raises(ValueError, match="needs training and held-out"):
        CopyCheck(train.images, heldout.images[:0])


def test_table_shows_the_held_out_value_and_the_copy_rate():
    doc = read_result(ROOT / "results/tiny-var")
    plain = render_run(doc)
    assert "held-out" not in plain and "copies" not in plain  # no split: the table as before
    doc = copy.deepcopy(doc)
    for i, m in enumerate(doc["models"]):
        m["extra"] = {"fd_digits_heldout": {"value": 5.0 + i, "values": [5.0 + i, 5.0 + i]},
                      "copy_rate": {"value": 0.01 * (i + 1), "values": [0.01 * (i + 1)] * 2},
                      "kid_train": {"value": 0.002, "values": [0.002, 0.002]},
                      "kid_heldout": {"value": 0.003, "values": [0.003, 0.003]}}
    doc["protocol"]["heldout"] = {"n_heldout": 359, "n_train": 1438, "fraction": 0.2, "seed": 0, "floor": 1.5,
                                  "copy_check": {"percentile": 5.0}}
    md = render_run(doc)
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "vs held-out (mean)" in header and "Δ held-out vs base" in header and "copies" in header
    base_row = next(line for line in md.splitlines() if line.startswith("| base "))
    assert "| 5.00 |" in base_row and "| 1.0% |" in base_row and "| 2.00 | 3.00 |" in base_row
    assert "KID×10³ train" in header and "KID×10³ held-out" in header
    assert "held-out part 359 images" in md and "floor 1.50" in md
    last = [line for line in md.splitlines() if line.startswith("| ")][-1]
    assert f"| {5.0 + len(doc['models']) - 1:.2f} |" in last
    csv = render_run(doc, "csv")
    assert all(k in csv.splitlines()[0] for k in ("value_heldout", "kid_train", "kid_heldout", "copy_rate"))


@pytest.mark.parametrize("value,words", [(-0.1, "must be >= 0"), (1.0, "must be < 1"), (0.0001, "holds out 0")])
def test_bad_holdout_is_a_config_error_naming_the_field(value, words):
    from repro.config import ConfigError
    from repro.config.errors import validate
    from repro.config.schema import DataConfig

    with pytest.raises(ConfigError) as e:
        validate(DataConfig, {"dataset": "digits", "holdout": value}, loc=("data",))
    assert "data.holdout" in str(e.value) and words in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(ConfigError, match="data.holdout.*not built"):  # no split of sharded ImageNet
        validate(DataConfig, {"dataset": "imagenet64", "holdout": 0.2}, loc=("data",))
