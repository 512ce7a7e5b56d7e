"""AR DDO through the pipeline's stages (issue 13): a micro tiny-var (a tiny tokenizer and VAR trained by the
pretrain stage on the digits, AR DDO rounds and the MLE control, sampled and scored), without DVC; the rounds'
alpha/beta sweep and resume for AR models; the tiny-var preset's dry runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny networks run faster on one thread than on two contended ones (the suite shares 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# ----------------------------------------------------------------------------------------------------------
# The rounds machinery with a VAR: sweeps and resume (a random tiny VAR with its tokenizer; selection by a
# cheap stand-in score of the weights, as tests/test_resume.py does for diffusion).


class Killed(Exception):
    pass


class WeightScore:
    """selection_score's stand-in: a function of the weights; can 'kill' the run at its n-th call."""

    def __init__(self, kill_at_call: int | None = None):
        self.calls, self.kill_at_call = 0, kill_at_call

    def __call__(self, metric, net, seeds, label_dim, img_shape, sampler):
        self.calls += 1
        if self.calls == self.kill_at_call:
            raise Killed()
        return float(sum((p.detach().double() ** 2).sum() for p in net.parameters()).sqrt()) % 1.0


@pytest.fixture(scope="module")
def ar_base(tmp_path_factory):
    from dataclasses import replace

    from repro.datasets.images import load_embedded
    from repro.nets.checkpoint import save_model
    from repro.nets.factory import build_network

    tok = dict(vocab_size=16, z_channels=4, ch=8, ch_mult=[1, 2], patch_nums=[1, 2, 3, 4], in_channels=1)
    arch = dict(precond="var", depth=1, embed_dim=32, num_heads=2, num_classes=10, vocab_size=16, Cvae=4,
                patch_nums=[1, 2, 3, 4], cond_drop_rate=0.25, tokenizer=tok)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_network(arch)
    path = tmp_path_factory.mktemp("arbase") / "base.safetensors"
    save_model(path, net, arch)
    d = load_embedded("digits")
    return path, replace(d, images=d.images[:96], labels=d.labels[:96])


def _ar(base_path):
    from repro.methods.ddo.family import ARSampling
    from repro.nets.checkpoint import load_model

    return ARSampling(load_model(base_path)[0].tokenizer)


def test_ar_rounds_train_each_sweep_candidate_with_its_alpha_and_beta(tmp_path, ar_base, monkeypatch):
    from dataclasses import replace

    from repro.methods.ddo import family, selfplay
    from repro.methods.ddo import rounds as rounds_mod
    from repro.methods.ddo import sweep as sweep_mod
    from repro.pipeline.tracking import NullTracker
    from repro.storage.layout import RoundDir

    base, data = ar_base
    seen = []
    loss = family.ar_ddo_loss
    monkeypatch.setattr(family, "ar_ddo_loss", lambda *a, **k: seen.append((k["alpha"], k["beta"])) or loss(*a, **k))
    for mod in (rounds_mod, sweep_mod):
        monkeypatch.setattr(mod, "selection_score", WeightScore())
    dcfg = replace(_cfg().ddo, rounds=1, control=False, batch=16, nimg_per_round=32, eval_every_nimg=16, lr=0.003,
                   sweep_alpha=(1.0, 8.0), sweep_beta=(0.5,))
    history = selfplay.run_rounds(base, data, dcfg, _ar(base), 0.5, SimpleNamespace(name="w"), tmp_path / "run",
                                  tmp_path / "out",
                                  NullTracker(), progress=False)
    assert seen == [(1.0, 0.5)] * 2 + [(8.0, 0.5)] * 2  # two steps per candidate, each with its own alpha/beta
    rd = tmp_path / "run" / "ddo-round1"
    done = json.loads((rd / "done.json").read_text())
    assert [(c["alpha"], c["beta"]) for c in done["candidates"]] == [(1.0, 0.5), (8.0, 0.5)]
    e1, e8 = (json.loads(RoundDir(rd).candidate(a, 0.5).done.read_text())["evals"] for a in (1.0, 8.0))
    assert e1 != e8  # alpha changed the training
    assert history["ddo"][0]["best_score"] == done["best_score"] == min(
        [done["ref_score"]] + [e["score"] for e in e1 + e8])
    bank = load_npz(rd / "fakes.npz")
    assert bank["tokens"].shape == (96, 30) and np.array_equal(bank["seeds"][:2], [dcfg.fake_first_seed + 10 ** 6,
                                                                                     dcfg.fake_first_seed + 10 ** 6 + 1])
    # a candidate is exactly the plain round with its alpha and beta
    plain = rounds_mod.train_round("ddo", 1, base, data, replace(dcfg, alpha=8.0, beta=0.5, sweep_alpha=(),
                                                                  sweep_beta=()), _ar(base), 0.5, None,
                                   tmp_path / "plain", NullTracker(), progress=False)
    assert plain.evals == e8


def test_an_interrupted_ar_round_resumes_and_matches_an_uninterrupted_one(tmp_path, ar_base, monkeypatch):
    from dataclasses import replace

    from safetensors.torch import load_file

    from repro.methods.ddo import rounds as rounds_mod
    from repro.pipeline.tracking import NullTracker

    base, data = ar_base
    dcfg = replace(_cfg().ddo, batch=16, nimg_per_round=48, eval_every_nimg=16, lr=0.003)

    def run(kind, where, score):
        monkeypatch.setattr(rounds_mod, "selection_score", score)
        return rounds_mod.train_round(kind, 1, base, data, dcfg, _ar(base), 0.5, None, tmp_path / where,
                                      NullTracker(), progress=False)

    for kind in ("ddo", "control"):
        ref = run(kind, f"{kind}-a", WeightScore())
        with pytest.raises(Killed):  # killed during the third evaluation, after two saved checkpoints
            run(kind, f"{kind}-b", WeightScore(kill_at_call=3))
        assert (tmp_path / f"{kind}-b/state.pt").is_file() and not (tmp_path / f"{kind}-b/done.json").exists()
        if kind == "ddo":
            bank = (tmp_path / "ddo-b/fakes.npz").stat().st_mtime_ns
            monkeypatch.setattr(rounds_mod, "make_fake_bank", lambda *a, **k: pytest.fail("bank made again"))
        res = run(kind, f"{kind}-b", WeightScore())
        assert res.evals == ref.evals and res.best_nimg == ref.best_nimg and len(res.evals) == 3
        ta, tb = load_file(str(ref.best_path)), load_file(str(res.best_path))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert any(k.startswith("tokenizer.") for k in ta)  # the round's model carries the tokenizer on
    assert (tmp_path / "ddo-b/fakes.npz").stat().st_mtime_ns == bank
    assert load_npz(tmp_path / "ddo-a/fakes.npz")["tokens"].tolist() == load_npz(tmp_path / "ddo-b/fakes.npz")[
        "tokens"].tolist()
