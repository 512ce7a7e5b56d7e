"""Alpha/beta sweeps inside a DDO round: one fake bank per round, one candidate per (alpha, beta), the best one
becomes the round's best and the next reference; an empty sweep changes nothing."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from repro.config import ConfigError, config_hash, load_config, preset_dict, stage_dict, to_dict
from repro.datasets.images import load_embedded
from repro.methods.ddo import rounds as ddo_mod
from repro.methods.ddo import selfplay
from repro.methods.ddo import sweep as sweep_mod
from repro.pipeline.tracking import NullTracker
from repro.storage.layout import RoundDir


class WeightMetric:
    """A cheap deterministic stand-in for the selection metric: a function of the weights."""

    name = "weight_norm"

    def score(self, net, seeds, label_dim, img_shape, sampler):
        return float(sum((p.detach().double() ** 2).sum() for p in net.parameters()).sqrt()) % 1.0


@pytest.fixture(scope="module")
def data():
    d = load_embedded("digits")
    return replace(d, images=d.images[:300], labels=d.labels[:300])


def _tensors(p: Path) -> dict:
    return load_file(str(p))


def test_sweep_values_are_checked():
    for override, field in (("ddo.sweep_beta=[0.1, -0.3]", "ddo.sweep_beta[1]"),
                            ("ddo.sweep_beta=[0.1, 0.1]", "ddo.sweep_beta"),
                            ("ddo.sweep_alpha=[0]", "ddo.sweep_alpha[0]"),
                            ("ddo.sweep_beta=0.1", "ddo.sweep_beta")):
        with pytest.raises(ConfigError) as e:
            load_config(preset="micro", overrides=[override])
        assert field in str(e.value), (override, str(e.value))
    ok = load_config(preset="micro", overrides=["ddo.sweep_beta=[0.1, 0.3]"])
    assert sweep_mod.sweep_grid(ok.ddo) == [(ok.ddo.alpha, 0.1), (ok.ddo.alpha, 0.3)]
    both = load_config(preset="micro", overrides=["ddo.sweep_alpha=[1, 2]", "ddo.sweep_beta=[0.1, 0.3]"])
    assert sweep_mod.sweep_grid(both.ddo) == [(1, 0.1), (1, 0.3), (2, 0.1), (2, 0.3)]
    assert sweep_mod.sweep_grid(load_config(preset="micro").ddo) == []


def test_an_empty_sweep_keys_run_directories_as_before():
    """The ddo stage's params (its run directory key, MLflow hash) are those without the new fields when they are
    empty, so existing run directories and results stay valid; a sweep gets its own run directory."""
    for preset in ("micro", "dg-tiny"):  # (tiny itself runs the tuned control: its key has those two fields)
        cfg = load_config(preset=preset)
        before = stage_dict(cfg, "ddo")
        old = {k: v for k, v in to_dict(cfg.ddo).items()
               if k not in ("sweep_alpha", "sweep_beta", "control_lrs", "control_budget")}  # test_control: the last two
        assert before["ddo"] == old
        swept = stage_dict(replace(cfg, ddo=replace(cfg.ddo, sweep_beta=(0.1, 0.3))), "ddo")
        assert swept["ddo"]["sweep_beta"] == [0.1, 0.3] and config_hash(swept) != config_hash(before)


def test_a_swept_round_trains_every_candidate_on_one_bank_and_keeps_the_best(tmp_path, cfg, data, base, monkeypatch):
    dcfg = replace(cfg.ddo, rounds=2, control=False, nimg_per_round=64, eval_every_nimg=32, batch=32,
                   sweep_beta=(0.1, 0.3))
    banks = []
    make = ddo_mod.make_fake_bank
    monkeypatch.setattr(sweep_mod, "make_fake_bank", lambda *a, **k: banks.append(1) or make(*a, **k))
    run_dir, out = tmp_path / "run", tmp_path / "out"
    history = selfplay.run_rounds(base, data, dcfg, cfg.sampler, 0.5, WeightMetric(), run_dir, out, NullTracker(),
                                 progress=False)
    assert len(banks) == 2  # one fake bank per round, shared by its two candidates
    for r in (1, 2):
        rd = run_dir / f"ddo-round{r}"
        done = json.loads((rd / "done.json").read_text())
        cands = {(c["alpha"], c["beta"]): c for c in done["candidates"]}
        assert list(cands) == [(dcfg.alpha, 0.1), (dcfg.alpha, 0.3)]
        scores = {}
        for a, b in cands:
            cd = RoundDir(rd).candidate(a, b).dir
            assert cd.name == f"a{a:g}-b{b:g}"
            cdone = json.loads((cd / "done.json").read_text())
            assert cdone["best_score"] == cands[(a, b)]["best_score"] and cdone["ref_score"] == done["ref_score"]
            assert (cd / "fakes.npz").read_bytes() == (rd / "fakes.npz").read_bytes()
            scores[(a, b)] = cdone["best_score"]
        e1, e3 = (json.loads(RoundDir(rd).candidate(dcfg.alpha, b).done.read_text())["evals"] for b in (0.1, 0.3))
        assert e1 != e3  # beta did change the training (the best may be the reference in both: it is a candidate)
        chosen = min(scores, key=scores.get)
        assert done["best_score"] == min(scores.values()) == history["ddo"][r - 1]["best_score"]
        if scores[chosen] < done["ref_score"]:  # a candidate beat the reference: it is the round's best
            assert done["chosen"] == {"alpha": chosen[0], "beta": chosen[1]}
        else:  # no candidate beat it: the reference stays (each candidate kept it too)
            assert done["chosen"] == "reference" and scores[chosen] == done["ref_score"]
        assert (rd / "best.safetensors").read_bytes() == \
            (RoundDir(rd).candidate(*chosen).dir / "best.safetensors").read_bytes()
        assert (out / f"ddo-round{r}.safetensors").read_bytes() == (rd / "best.safetensors").read_bytes()
    # round 2 starts from round 1's chosen checkpoint: its reference score is round 1's best score
    prep2 = json.loads((run_dir / "ddo-round2" / "prepare.json").read_text())
    assert prep2["reference"] == str(run_dir / "ddo-round1" / "best.safetensors")
    assert prep2["ref_score"] == history["ddo"][0]["best_score"] == history["ddo"][1]["reference_score"]

    # A candidate is exactly the plain round with that beta (same bank, same draws): the sweep changes nothing else.
    plain = ddo_mod.train_round("ddo", 1, base, data, replace(dcfg, beta=0.3, sweep_beta=()), cfg.sampler, 0.5,
                                WeightMetric(), tmp_path / "plain", NullTracker(), progress=False)
    swept = RoundDir(run_dir / "ddo-round1").candidate(dcfg.alpha, 0.3).dir / "best.safetensors"
    assert plain.best_path.read_bytes() == swept.read_bytes()

    # Finished: run again, nothing is trained or generated.
    banks.clear()
    for mod in (ddo_mod, sweep_mod):  # control.run_round reads rounds.train_round at call time
        monkeypatch.setattr(mod, "train_round", lambda *a, **k: pytest.fail("trained again"))
    again = selfplay.run_rounds(base, data, dcfg, cfg.sampler, 0.5, WeightMetric(), run_dir, tmp_path / "out2",
                               NullTracker(), progress=False)
    assert again == history and banks == []


def test_candidates_can_run_elsewhere_and_selection_waits_for_all(tmp_path, cfg, data, base):
    dcfg = replace(cfg.ddo, rounds=1, control=False, nimg_per_round=32, eval_every_nimg=32, batch=32,
                   sweep_alpha=(0.5, 2.0))
    rd = tmp_path / "ddo-round1"
    seen = []

    def only_first(round_, ref_path, grid):  # a "job array" that loses its second task
        seen.append((round_, ref_path, grid))
        a, b = grid[0]
        sweep_mod.train_candidate(round_, ref_path, data, dcfg, cfg.sampler, 0.5, WeightMetric(), rd, a, b,
                                NullTracker(), progress=False)

    with pytest.raises(FileNotFoundError, match="candidates not finished"):
        sweep_mod.swept_round(1, base, data, dcfg, cfg.sampler, 0.5, WeightMetric(), rd, NullTracker(), False,
                            run_candidates=only_first)
    assert seen == [(1, base, [(0.5, dcfg.beta), (2.0, dcfg.beta)])] and not (rd / "done.json").exists()
    res = sweep_mod.swept_round(1, base, data, dcfg, cfg.sampler, 0.5, WeightMetric(), rd, NullTracker(), False)
    assert res.best_path == rd / "best.safetensors" and res.best_path.is_file()
    assert (RoundDir(rd).candidate(0.5, dcfg.beta).dir / "done.json").is_file()


def test_the_debug_executor_orchestrates_a_swept_round(tmp_path, monkeypatch):
    """`repro ddo --round 1` with a sweep through submitit (debug executor): prepare job, candidate array, select,
    then the stage's own job (the MLE control round)."""
    from repro.cli import main

    monkeypatch.setenv("REPRO_TRACKING", "off")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("REPRO_IN_JOB", raising=False)
    raw = preset_dict("micro")
    raw["extractor"]["steps"] = 10
    raw["pretrain"]["total_nimg"] = 256
    raw["ddo"].update(nimg_per_round=32, eval_every_nimg=32, batch=32, selection_samples=16)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    args = ["--params", str(tmp_path / "params.yaml"), "--no-progress"]
    for stage in ("data", "extractor", "pretrain"):
        r = CliRunner().invoke(main, [stage, *args])
        assert r.exit_code == 0, r.output
    sets = ["--set", "launcher.executor=debug", "--set", "launcher.poll_s=0.1", "--set", "ddo.sweep_beta=[0.1, 0.3]"]
    r = CliRunner().invoke(main, ["ddo", "--round", "2", *args, *sets], input="")  # round 1 first: nothing submitted
    assert r.exit_code == 2 and "round 1 is not finished" in r.output and not (tmp_path / "runs" / "slurm").exists()
    r = CliRunner().invoke(main, ["ddo", "--round", "1", *args, *sets], input="")
    assert r.exit_code == 0, r.output
    (rd,) = tmp_path.glob("runs/ddo-*/ddo-round1")
    done = json.loads((rd / "done.json").read_text())
    assert [(c["beta"]) for c in done["candidates"]] == [0.1, 0.3]
    assert ((rd.parent / "control-round1" / "done.json")).is_file()  # the stage's own job ran the control
    assert len(list((tmp_path / "runs" / "slurm").iterdir())) >= 4  # prepare, 2 candidates, the stage: submitit
