"""Training-seed replicates (ddo.seeds): replicate k trains DDO and the MLE control again from the same base with
training seed ddo.seed + k; seeds 1 is the run without replicates (same names, directories, history keys)."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from repro.cli import main
from repro.config import ConfigError, load_config
from repro.datasets.images import load_embedded
from repro.evaluation.tables.runs import render_run
from repro.methods.ddo import rounds as ddo_mod
from repro.methods.ddo.selfplay import replicates
from repro.pipeline.cost import ddo_cost, sample_cost
from repro.pipeline.stages import ddo as ddo_stage
from repro.pipeline.stages.fid import parse_round_name, replicate_fields
from repro.pipeline.stages.sample import eval_models
from repro.storage.layout import Paths


class LaterIsBetter:
    """A cheap stand-in for the selection metric: each evaluation scores better (lower) than the one before, so a
    round's best is its last checkpoint, never the reference; records the seeds it is asked to evaluate on."""

    name = "later_is_better"

    def __init__(self):
        self.seeds = []

    def score(self, net, seeds, label_dim, img_shape, sampler):
        self.seeds.append(tuple(int(s) for s in seeds))
        return 1.0 / len(self.seeds)


@pytest.fixture(scope="module")
def data():
    d = load_embedded("digits")
    return replace(d, images=d.images[:300], labels=d.labels[:300])


def test_seeds_zero_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        load_config(preset="micro", overrides=["ddo.seeds=0"])
    assert "ddo.seeds" in str(e.value)
    r = CliRunner().invoke(main, ["ddo", "--preset", "micro", "--set", "ddo.seeds=0", "--dry-run"])
    assert r.exit_code == 2, r.output
    assert "ddo.seeds" in r.output and "Traceback" not in r.output


def test_one_seed_keeps_todays_names_and_run_directory(tmp_path):
    cfg = load_config(preset="tiny", overrides=["ddo.seeds=1"])
    assert cfg.ddo.seeds == 1
    (rep,) = replicates(cfg.ddo)
    assert rep.cfg is cfg.ddo and rep.name("ddo", 2) == "ddo-round2" and rep.key("control") == "control"
    assert rep.run_dir(tmp_path) == tmp_path
    paths = Paths.of(cfg, tmp_path)
    assert list(eval_models(cfg, paths)) == ["base", "ddo-round1", "ddo-round2", "control-round2"]
    for p in (paths.data, paths.base, paths.extractor, paths.reference):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(p.name.encode())
    two = replace(cfg, ddo=replace(cfg.ddo, seeds=3))
    # raising ddo.seeds keeps the run directory (replicate 0's rounds are reused; the others get seed<s>/)
    assert ddo_stage.ddo_run_dir(two, paths) == ddo_stage.ddo_run_dir(cfg, paths)
    assert list(eval_models(two, paths)) == ["base", "ddo-round1", "ddo-round2", "control-round2",
                                             "ddo-round2-seed1", "control-round2-seed1",
                                             "ddo-round2-seed2", "control-round2-seed2"]
    assert eval_models(two, paths)["ddo-round2-seed2"] == paths.ddo / "ddo-round2-seed2.safetensors"
    reps = replicates(two.ddo)
    assert [r.seed for r in reps] == [0, 1, 2]
    assert {r.cfg.selection_first_seed for r in reps} == {cfg.ddo.selection_first_seed}
    assert len({r.cfg.fake_first_seed for r in reps}) == 3
    assert reps[2].run_dir(tmp_path) == tmp_path / "seed2" and reps[1].key("ddo") == "ddo-seed1"
    micro = load_config(preset="micro")
    micro2 = replace(micro, ddo=replace(micro.ddo, seeds=2))
    assert ddo_cost(micro2)["image_forwards"] == 2 * ddo_cost(micro)["image_forwards"]
    assert ddo_cost(micro2)["training_seeds"] == 2 and "training_seeds" not in ddo_cost(micro)
    assert sample_cost(micro2)["models"] == sample_cost(micro)["models"] + 2  # the replicate's last DDO and control
    assert replicate_fields(two, "ddo-round2") == {"seed": 0}
    assert replicate_fields(two, "control-round2-seed2") == {"seed": 2, "replicate_of": "control-round2"}
    assert replicate_fields(two, "base") == {} and replicate_fields(cfg, "ddo-round2") == {}
    assert parse_round_name("control-round2-seed7") == ("control", 2, 7)
    assert parse_round_name("ddo-round2") == ("ddo", 2, None) and parse_round_name("base") is None


def test_round_then_whole_stage_trains_each_replicate_once(project, cfg, data, base, monkeypatch):
    """`repro ddo --round 1` trains round 1 of both kinds and both replicates; `repro ddo` then trains nothing and
    writes every replicate's models; the replicates differ in weights and share the selection seeds."""
    c = replace(cfg, ddo=replace(cfg.ddo, rounds=1, control=True, seeds=2, nimg_per_round=64, eval_every_nimg=32,
                                 batch=32))
    paths = Paths.of(c, project)
    for p in (paths.data, paths.extractor, paths.reference):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(p.name.encode())
    shutil.copy(base, paths.base)
    metric = LaterIsBetter()
    monkeypatch.setattr(ddo_stage, "_inputs", lambda cfg_, paths_: (data, metric, cfg_.sampler))
    monkeypatch.setattr(ddo_stage, "log_data_input", lambda *a, **k: None)
    banks = []
    make = ddo_mod.make_fake_bank
    monkeypatch.setattr(ddo_mod, "make_fake_bank", lambda *a, **k: banks.append(1) or make(*a, **k))

    ddo_stage.run(c, paths, False, round=1)
    rd = ddo_stage.ddo_run_dir(c, paths)
    for where in (rd, rd / "seed1"):
        for kind in ("ddo", "control"):
            assert (where / f"{kind}-round1" / "done.json").is_file()
    assert len(banks) == 2  # one fake bank per DDO replicate
    assert not paths.ddo.exists()

    ddo_stage.run(c, paths, False)
    assert len(banks) == 2  # nothing trained twice
    names = sorted(p.name for p in paths.ddo.glob("*.safetensors"))
    assert names == ["control-round1-seed1.safetensors", "control-round1.safetensors",
                     "ddo-round1-seed1.safetensors", "ddo-round1.safetensors"]
    rounds = json.loads(paths.rounds_json.read_text())
    assert sorted(rounds["history"]) == ["control", "control-seed1", "ddo", "ddo-seed1"]
    assert rounds["training_seeds"] == [0, 1]
    for kind in ("ddo", "control"):
        a, b = (load_file(str(paths.ddo / f"{kind}-round1{s}.safetensors")) for s in ("", "-seed1"))
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), kind
    assert len(set(metric.seeds)) == 1  # every selection evaluation on the same seeds


def _entry(name, rnd, value, held, seed=None, of=None):
    e = {"name": name, "round": rnd, "value": value, "values": [value],
         "extra": {"fd_heldout": {"value": held}, "kid_heldout": {"value": held / 1000}}}
    if seed is not None:
        e["seed"] = seed
    if of:
        e["replicate_of"] = of
    return e


def test_the_table_summarises_the_replicates_last_rounds():
    metrics = {
        "preset": "micro", "paper": "ddo", "metric": "fd",
        "protocol": {"n_samples": 96, "seed_ranges": [[0, 96]], "reference": "digits", "full": False},
        "models": [_entry("base", 0, 3.0, 7.5),
                   _entry("ddo-round2", 2, 1.0, 7.0, 0), _entry("control-round2", 2, 2.0, 8.0, 0),
                   _entry("ddo-round2-seed1", 2, 1.5, 7.2, 1, "ddo-round2"),
                   _entry("control-round2-seed1", 2, 2.5, 7.6, 1, "control-round2"),
                   _entry("ddo-round2-seed2", 2, 2.0, 7.4, 2, "ddo-round2"),
                   _entry("control-round2-seed2", 2, 2.6, 7.8, 2, "control-round2")],
    }
    table = render_run(metrics)
    assert "Over 3 training seeds (0, 1, 2): only the training seed varied" in table
    assert "no significance test" in table
    line = next(x for x in table.splitlines() if x.startswith("- fd vs training part over 3 training seeds"))
    assert "DDO last round mean 1.50 (min–max 1.00 – 2.00)" in line, line
    assert "control last round mean 2.37 (min–max 2.00 – 2.60)" in line, line
    assert "DDO − control per seed mean -0.867 (min–max -1.00 – -0.600)" in line, line
    held = next(x for x in table.splitlines() if x.startswith("- fd vs held-out over 3 training seeds"))
    assert "DDO last round mean 7.20 (min–max 7.00 – 7.40)" in held, held
    # each replicate's DDO row is compared with its own seed's control
    row = next(x for x in table.splitlines() if x.startswith("| ddo-round2-seed2 "))
    assert "-0.60 (-23.1%)" in row, row  # against control-round2 (seed 0) it would be 0.00
    bad = dict(metrics, models=metrics["models"][:3] + [_entry("ddo-round2-seed1", 2, 1.5, 7.2, 1, "nosuch")])
    with pytest.raises(ValueError, match="replicate_of"):
        render_run(bad)
    neg = dict(metrics, models=metrics["models"][:2] + [dict(metrics["models"][3], seed=-1)])
    with pytest.raises(ValueError, match="seed"):
        render_run(neg)
    # without replicates no summary
    plain = dict(metrics, models=[{k: v for k, v in m.items() if k != "seed"} for m in metrics["models"][:3]])
    assert "training seeds" not in render_run(plain)
