"""The tuned, equal-compute MLE control (ddo.control_lrs, ddo.control_budget; repro.methods.ddo.control): the compute
count against a hand count, a learning-rate search that keeps the better candidate and goes on from it, the compute
budget's images, the fid note built from rounds.json, bad values refused, and the defaults changing nothing."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from repro.catalog.costs import FWD_BWD
from repro.config import ConfigError, load_config, stage_dict, to_dict
from repro.datasets.images import load_embedded
from repro.methods.ddo import control as ctl
from repro.methods.ddo import rounds as ddo_mod
from repro.methods.ddo import selfplay
from repro.pipeline.stages.fid import control_note
from repro.pipeline.tracking import NullTracker
from repro.storage.layout import RoundDir

OLD_KEYS = ["round", "best_score", "best_nimg", "reference_score", "evals"]  # rounds.json history before this


class MoveMetric:
    """A deterministic stand-in for the selection metric: minus the distance of the weights from the base's, so the
    reference scores 0 and the candidate that moved farthest (here: the larger learning rate) scores best."""

    name = "move"

    def __init__(self, base_path):
        self.base = load_file(str(base_path))

    def score(self, net, seeds, label_dim, img_shape, sampler):
        sd = net.state_dict()
        return -float(sum(((sd[k].double() - v.double()) ** 2).sum() for k, v in self.base.items()
                          if k in sd and v.is_floating_point()).sqrt())


@pytest.fixture(scope="module")
def data():
    d = load_embedded("digits")
    return replace(d, images=d.images[:100], labels=d.labels[:100])


def test_the_compute_count_matches_a_hand_count():
    # tiny: 1438 training digits, Heun 10 steps = 19 NFE, 100 steps of 128 pairs, 4 evaluations of 1000 samples.
    fe = ctl.forward_equivalents(batch=128, nimg_per_round=12800, eval_every_nimg=3200, bank_images=1438, nfe=19,
                                 selection_samples=1000, budget="compute")
    bank = 1438 * 19                           # 27,322: one fake per training image, 19 network calls each
    ddo_step = 128 * (3 + 3 + 1 + 1)           # theta fwd+bwd on real and fake, reference fwd on real and fake
    selection = 4 * 1000 * 19                  # 76,000 (both sides: the same number of evaluations)
    assert fe["ddo"] == bank + 100 * ddo_step + selection == 205_722
    # the control: 2 x 128 real images fwd+bwd = 768 per step; (27,322 + 102,400) / 768 = 168.9 -> 169 steps
    assert (fe["control_steps"], fe["control_nimg_per_round"]) == (169, 169 * 128)
    assert fe["control"] == 169 * 768 + selection == 205_792 and abs(fe["control"] - fe["ddo"]) <= 3 * 128
    assert fe["evaluations"] == 4 and ctl.evaluations(fe["control_nimg_per_round"], fe["control_eval_every_nimg"],
                                                      128) == 4
    steps = ctl.forward_equivalents(batch=128, nimg_per_round=12800, eval_every_nimg=3200, bank_images=1438, nfe=19,
                                    selection_samples=1000, budget="steps")
    assert (steps["control"], steps["control_nimg_per_round"], steps["control_eval_every_nimg"]) == \
        (100 * 768 + selection, 12800, 3200)
    assert ctl.FWD_BWD == FWD_BWD  # the dry-run cost (repro.pipeline.cost) counts with the same unit
    # ... and gives the tiny preset's control the same 169 steps per candidate (bank: the 1438 training digits)
    from repro.pipeline.cost import ddo_cost

    tuned = ddo_cost(load_config(preset="tiny", overrides=["ddo.control_budget=compute",
                                                           "ddo.control_lrs=[5e-5, 2e-4, 1e-3]"]))
    plain = ddo_cost(load_config(preset="tiny", overrides=["ddo.control_budget=steps", "ddo.control_lrs=[]"]))
    assert tuned["control"] == {"lr_candidates": 3, "budget": "compute", "steps_per_candidate": 169}
    assert "control" not in plain
    assert tuned["per_round"]["image_forwards"] - plain["per_round"]["image_forwards"] == \
        3 * (169 * 768 + selection) - (100 * 768 + selection)


def test_evaluations_count_what_the_training_loop_does():
    def loop(nimg_per_round, every, batch):  # train_round's condition, step by step
        n, nimg = 0, 0
        while nimg < nimg_per_round:
            nimg += batch
            n += nimg % every < batch or nimg >= nimg_per_round
        return n

    for nimg, every, batch in [(12800, 3200, 128), (100, 30, 7), (64, 64, 32), (65, 10, 32), (1000, 333, 10),
                               (21632, 5408, 128), (50, 3, 4)]:
        assert ctl.evaluations(nimg, every, batch) == loop(nimg, every, batch), (nimg, every, batch)
    for steps, batch, n in [(169, 128, 4), (10, 32, 4), (9, 32, 4), (14, 32, 2), (5, 8, 5), (7, 3, 1)]:
        every = ctl.eval_every_for(steps, batch, n)
        assert loop(steps * batch, every, batch) == n and every <= steps * batch


def test_bad_control_values_are_refused_by_name():
    for override, field in (("ddo.control_lrs=[1e-4, -1e-3]", "ddo.control_lrs[1]"),
                            ("ddo.control_lrs=[0]", "ddo.control_lrs[0]"),
                            ("ddo.control_lrs=[1e-4, 1e-4]", "ddo.control_lrs"),
                            ("ddo.control_budget=flops", "ddo.control_budget")):
        with pytest.raises(ConfigError) as e:
            load_config(preset="micro", overrides=[override])
        assert field in str(e.value) and "Fix:" in str(e.value), (override, str(e.value))
    with pytest.raises(ConfigError, match="ddo.control_budget: is set, but ddo.control is false"):
        load_config(preset="micro", overrides=["ddo.control=false", "ddo.control_budget=compute"])
    with pytest.raises(ConfigError, match="ddo.control_budget: is compute, but the base is a VAR model"):
        load_config(preset="tiny-var", overrides=["ddo.control_budget=compute"])
    ok = load_config(preset="tiny-var", overrides=["ddo.control_lrs=[1e-4, 3e-4]"])  # a search works for VAR
    assert ctl.control_lrs(ok.ddo) == (1e-4, 3e-4)


def test_a_bad_control_budget_exits_2_through_the_cli(tmp_path, monkeypatch):
    from repro.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["ddo", "--preset", "micro", "--set", "ddo.control_budget=flops"],
                           env={"REPRO_TRACKING": "off"})
    assert r.exit_code == 2 and "ddo.control_budget" in r.output and "Fix:" in r.output, r.output
    assert "Traceback" not in r.output and list(tmp_path.iterdir()) == []


def test_the_defaults_change_no_key_and_no_run_directory(tmp_path, cfg, data, base):
    """Defaults: the stage's params (run directory key) have no new field, and rounds.json's history the keys it had;
    the control round is the plain one (no candidate folders)."""
    assert ctl.tuned(load_config(preset="tiny").ddo)  # the embedded default runs the tuned, equal-compute control
    for preset in ("micro", "dg-tiny"):
        c = load_config(preset=preset)
        assert (c.ddo.control_lrs, c.ddo.control_budget) == ((), "steps") and not ctl.tuned(c.ddo)
        old = {k: v for k, v in to_dict(c.ddo).items() if k not in ("control_lrs", "control_budget", "sweep_alpha", "sweep_beta")}
        assert stage_dict(c, "ddo")["ddo"] == old
        assert "control_budget" in stage_dict(replace(c, ddo=replace(c.ddo, control_budget="compute")), "ddo")["ddo"]
    dcfg = replace(cfg.ddo, rounds=1, nimg_per_round=64, eval_every_nimg=32, batch=32)
    history = selfplay.run_rounds(base, data, dcfg, cfg.sampler, 0.5, MoveMetric(base), tmp_path / "run",
                                  tmp_path / "out", NullTracker(), progress=False)
    saved = json.loads((tmp_path / "out" / "rounds.json").read_text())["history"]
    assert saved == history and [list(x) for x in saved["control"]] == [OLD_KEYS] == [list(x) for x in saved["ddo"]]
    rd = tmp_path / "run" / "control-round1"
    assert sorted(p.name for p in rd.iterdir()) == ["best.safetensors", "done.json"]
    assert control_note(saved["control"], 1, "EDM loss") == (
        "MLE control: the same rounds, steps, optimizer and selection as DDO, with the EDM loss on real images "
        "instead of the DDO loss")  # today's text
    # The search with ddo.lr alone is exactly the plain round (same draws, same selection), in a sub-folder.
    one = ctl.run_round("control", 1, base, data, replace(dcfg, control_lrs=(dcfg.lr,)), cfg.sampler, 0.5,
                              MoveMetric(base), tmp_path / "one", NullTracker(), progress=False)
    assert one.best_path.read_bytes() == (rd / "best.safetensors").read_bytes()
    assert one.best_score == history["control"][0]["best_score"] and one.evals == history["control"][0]["evals"]
    assert (tmp_path / "one" / f"lr{dcfg.lr:g}" / "done.json").is_file()


def test_a_tuned_equal_compute_control_keeps_the_better_lr_and_goes_on_from_it(tmp_path, cfg, data, base,
                                                                                monkeypatch):
    dcfg = replace(cfg.ddo, rounds=2, nimg_per_round=64, eval_every_nimg=32, batch=32, control_lrs=(1e-4, 1e-2),
                   control_budget="compute")
    run_dir, out = tmp_path / "run", tmp_path / "out"
    history = selfplay.run_rounds(base, data, dcfg, cfg.sampler, 0.5, MoveMetric(base), run_dir, out, NullTracker(),
                                  progress=False)
    # hand count (micro sampler: 4 Heun steps = 7 NFE; 100 images; 2 DDO steps of 32 pairs; 2 evaluations of 64):
    # DDO 100*7 + 2*32*8 + 2*64*7 = 700 + 512 + 896 = 2108; control (700 + 512) / (6*32) = 6.3 -> 6 steps
    want_fe = {"ddo": 2108, "control": 6 * 6 * 32 + 896}
    saved = json.loads((out / "rounds.json").read_text())["history"]
    assert saved == history and [list(x)[:5] for x in saved["control"]] == [OLD_KEYS] * 2
    assert [list(x) for x in saved["ddo"]] == [OLD_KEYS] * 2  # DDO's history is as before
    for r in (1, 2):
        rd = RoundDir.of(run_dir, "control", r)
        done = json.loads(rd.done.read_text())
        h = saved["control"][r - 1]
        assert [c["lr"] for c in done["candidates"]] == [1e-4, 1e-2]
        scores = {c["lr"]: c["best_score"] for c in done["candidates"]}
        assert scores[1e-2] < scores[1e-4] and scores[1e-2] < done["ref_score"]  # the larger lr moved farther
        assert done["chosen"] == {"lr": 1e-2} and done["lr"] == h["lr"] == 1e-2
        assert done["best_score"] == h["best_score"] == scores[1e-2]
        assert rd.best.read_bytes() == rd.lr_candidate(1e-2).best.read_bytes()
        assert (out / f"control-round{r}.safetensors").read_bytes() == rd.best.read_bytes()
        assert h["candidates"] == [{k: c[k] for k in ("lr", "best_score", "best_nimg")} for c in done["candidates"]]
        # equal compute: 6 steps (192 images), as many evaluations as DDO's 2, the counts recorded
        assert (done["budget"], done["nimg_per_round"], h["nimg_per_round"]) == ("compute", 192, 192)
        assert done["forward_equivalents"] == h["forward_equivalents"] == want_fe
        for lr in (1e-4, 1e-2):
            evals = json.loads(rd.lr_candidate(lr).done.read_text())["evals"]
            assert [e["nimg"] for e in evals] == [96, 192]
        assert [e["nimg"] for e in saved["ddo"][r - 1]["evals"]] == [32, 64]
    # round 2 starts from round 1's choice: its reference and reference score
    prep2 = json.loads(RoundDir.of(run_dir, "control", 2).prepared.read_text())
    assert prep2["reference"] == str(RoundDir.of(run_dir, "control", 1).best)
    assert prep2["ref_score"] == saved["control"][0]["best_score"] == saved["control"][1]["reference_score"]
    w1, w2 = (load_file(str(RoundDir.of(run_dir, "control", r).best)) for r in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    # the fid note says what the control was, from rounds.json
    note = control_note(saved["control"], 2, "EDM loss")
    assert note == ("MLE control: EDM loss on real images from the same base, lr tuned over {0.0001, 0.01} per round "
                    "by the selection seeds (chosen: r1 0.01, r2 0.01), equal compute (2,048 network "
                    "forward-equivalents per round, DDO's 2,108: 192 images per round, as many selection "
                    "evaluations)")
    # Finished candidates are reused: a round stopped after them chooses again without training anything.
    rd2 = RoundDir.of(run_dir, "control", 2)
    done2 = json.loads(rd2.done.read_text())
    rd2.done.unlink()
    rd2.best.unlink()
    monkeypatch.setattr(ddo_mod, "load_model", lambda *a, **k: pytest.fail("trained again"))
    res = ctl.control_round(2, RoundDir.of(run_dir, "control", 1).best, data, dcfg, cfg.sampler, 0.5, None, rd2.dir,
                            NullTracker())
    assert json.loads(rd2.done.read_text()) == done2
    assert {"round": 2, "best_score": res.best_score, "best_nimg": res.best_nimg, "reference_score": res.ref_score,
            "evals": res.evals, **res.info} == saved["control"][1]
