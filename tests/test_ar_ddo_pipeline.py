"""AR DDO through the pipeline's stages (issue 13): a micro tiny-var (a tiny tokenizer and VAR trained by the
pretrain stage on the digits, AR DDO rounds and the MLE control, sampled and scored), without DVC; the rounds'
alpha/beta sweep and resume for AR models; the tiny-var preset's dry runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from repro.cli import main
from repro.config import load_config
from repro.storage.files import load_npz
from repro.storage.layout import Paths

MICRO = ["extractor.steps=60", "pretrain.total_nimg=1280", "pretrain.checkpoint_every_nimg=640",
         "pretrain.lr_rampup_nimg=0", "pretrain.ema_halflife_nimg=0", "ar.tokenizer.steps=30",
         "ar.tokenizer.ch=8", "ar.tokenizer.vocab_size=16", "ar.tokenizer.z_channels=4", "ar.model.depth=1",
         "ar.model.embed_dim=32", "ar.model.heads=2", "ddo.batch=32", "ddo.lr=0.002", "ddo.nimg_per_round=64",
         "ddo.lr_rampup_nimg=0", "ddo.eval_every_nimg=32", "ddo.selection_samples=40", "sample.protocol=custom",
         "sample.n_samples=40", "sample.batch=40"]


def _cfg(*sets):
    return load_config(preset="tiny-var", overrides=[*MICRO, *sets])


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Every stage of a micro tiny-var in order, in one project: (cfg, paths)."""
    from repro.pipeline.stages import data, ddo, extractor, fid, pretrain, sample, table

    mp = pytest.MonkeyPatch()
    mp.setenv("REPRO_TRACKING", "off")
    cfg = _cfg()
    paths = Paths.of(cfg, tmp_path_factory.mktemp("tinyvar"))
    for stage in (data, extractor, pretrain, ddo, sample, fid, table):
        stage.run(cfg, paths, progress=False)
    yield cfg, paths
    mp.undo()


def test_micro_tiny_var_gives_a_table_with_base_ar_ddo_and_control(micro):
    from repro.evaluation.tables.data import read_result
    from repro.nets.checkpoint import load_model
    from repro.nets.var import VAR

    cfg, paths = micro
    net, arch, _ = load_model(paths.base)
    assert isinstance(net, VAR) and arch["precond"] == "var" and arch["patch_nums"] == [1, 2, 3, 4]
    assert arch["tokenizer"]["vocab_size"] == 16 and net.tokenizer.quantize.vocab_size == 16  # carried in the file
    result = read_result(paths.results)
    models = {m["name"]: m for m in result["models"]}
    assert list(models) == ["base", "ddo-round1", "ddo-round2", "control-round2"]
    assert all(len(m["values"]) == 2 and np.isfinite(m["value"]) and m["value"] > 0 for m in models.values())
    assert result["protocol"]["sampler"]["name"] == "var-next-scale" and result["protocol"]["sampler"]["nfe"] == 4
    table = paths.table.read_text()
    assert "| ddo-round2 |" in table and "| control-round2 |" in table and "FD-digits" in table
    # the DDO round trained on the reference's fakes, re-encoded to token maps; the control on none
    rd = json.loads(paths.rounds_json.read_text())
    assert len(rd["history"]["ddo"]) == 2 and len(rd["history"]["control"]) == 2
    for h in rd["history"]["ddo"]:
        assert h["best_score"] == min([h["reference_score"]] + [e["score"] for e in h["evals"]])
    banks = sorted(paths.root.glob("runs/ddo-*/ddo-round1/fakes.npz"))
    assert len(banks) == 1 and not list(paths.root.glob("runs/ddo-*/control-round1/fakes.npz"))
    bank = load_npz(banks[0])
    assert bank["tokens"].shape == (1797, 30) and bank["images"].shape == (1797, 1, 8, 8)
    # the tokens are the images' encoding (decoded, then re-encoded as real images are)
    from repro.methods.ddo.family import encode_images
    assert torch.equal(encode_images(net.tokenizer, bank["images"][:50], "cpu"), torch.as_tensor(bank["tokens"][:50]))
    # both kinds trained: checkpoints that score otherwise than their reference (the best may be the reference)
    for kind in ("ddo", "control"):
        hs = rd["history"][kind]
        assert all(len(h["evals"]) == 2 for h in hs)
        assert any(e["score"] != h["reference_score"] for h in hs for e in h["evals"]), (kind, hs)


def test_tiny_var_dry_runs_with_plan_protocol_and_cost(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plans = {}
    for stage in ("pretrain", "ddo", "sample", "fid"):
        r = CliRunner().invoke(main, [stage, "--preset", "tiny-var", "--dry-run"])
        assert r.exit_code == 0, r.output
        plans[stage] = r.output
    assert list(tmp_path.iterdir()) == []
    assert "var-next-scale" in plans["sample"] and "trained here" in plans["sample"]
    assert "tiny-fd-digits" in plans["sample"] and "image_forwards" in plans["ddo"]
    cfg = load_config(preset="tiny-var")
    assert cfg.is_ar and cfg.ddo.rounds == 2 and cfg.ddo.control and cfg.pretrain.network.precond == "var"
