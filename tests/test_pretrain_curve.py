"""The pretraining curve and the plateau rule (issue 15): the pretrain stage scores the EMA net on the selection
seeds along training, stops where the curve is flat within its seed noise, and resumes to the same curve."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repro.methods.pretrain import pretrain
from repro.methods.plateau import plateau_reached
from repro.pipeline.tracking import NullTracker


class Scripted:
    """A stand-in curve score: the i-th call returns scores[i] with parts score -/+ noise; records the nets' modes."""

    def __init__(self, scores, noise=0.5):
        self.scores, self.noise, self.calls, self.modes = list(scores), noise, 0, []

    def __call__(self, net):
        self.modes.append(net.training)
        s = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return s, [s - self.noise, s + self.noise]


def _same(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_plateau_rule_on_parts():
    pts = lambda vals, noise: [{"parts": [v - noise / 2, v + noise / 2]} for v in vals]  # noqa: E731
    falling = [9, 8, 7, 6, 5, 4]  # last three lower than the three before by 3
    assert not plateau_reached(pts(falling, 1.0), 3, "parts")
    assert plateau_reached(pts(falling, 4.0), 3, "parts")  # ... which is inside a seed noise of 4
    assert not plateau_reached(pts([5] * 5, 0.1), 3, "parts")  # fewer than 2 windows
    assert plateau_reached(pts([5] * 6, 0.1), 3, "parts")
    assert not plateau_reached(pts([5] * 6, 0.1), 0, "parts")  # window 0: the rule is off
    assert not plateau_reached(pts(falling, 4.0), 3, "parts", tol=2.0)  # a fixed tolerance instead of the noise
    assert plateau_reached(pts(falling, 0.1), 3, "parts", tol=3.5)


def test_curve_stops_at_the_plateau_and_a_rerun_trains_no_further(tmp_path, cfg, data):
    c = replace(cfg.pretrain, total_nimg=128 * 40, checkpoint_every_nimg=128 * 20, curve_every_nimg=256,
                plateau_window=2)
    score = Scripted([50, 30, 20, 10, 10, 10, 10, 10, 10, 10])  # flat from the 4th point: window 2 holds at the 7th
    info = pretrain(c, data, tmp_path / "a", tmp_path / "a.safetensors", NullTracker(), progress=False,
                    curve_score=score)
    assert info["plateau"] is True and info["nimg"] == 7 * 256 < c.total_nimg
    assert [p["nimg"] for p in info["curve"]] == [256 * k for k in range(1, 8)]
    assert [p["score"] for p in info["curve"]] == [50, 30, 20, 10, 10, 10, 10]
    assert score.modes == [False] * 7  # the EMA net, scored in eval mode
    # run again: the state holds the curve and the stop; nothing more is trained or scored
    again = Scripted([0.0])
    info2 = pretrain(c, data, tmp_path / "a", tmp_path / "a2.safetensors", NullTracker(), progress=False,
                     curve_score=again)
    assert again.calls == 0 and info2["nimg"] == info["nimg"] and info2["curve"] == info["curve"]
    assert _same(tmp_path / "a.safetensors", tmp_path / "a2.safetensors")


def test_without_a_plateau_it_trains_total_nimg_and_the_raw_net_keeps_train_mode(tmp_path, cfg, data):
    c = replace(cfg.pretrain, total_nimg=1024, curve_every_nimg=256, plateau_window=2, ema_halflife_nimg=0)
    score = Scripted([40, 30, 20, 10], noise=0.1)  # falling faster than its noise: never flat
    info = pretrain(c, data, tmp_path / "a", tmp_path / "a.safetensors", NullTracker(), progress=False,
                    curve_score=score)
    assert info["plateau"] is False and info["nimg"] == 1024 and len(info["curve"]) == 4
    assert score.modes == [False] * 4  # scored in eval mode ...


def test_curve_resumes_to_the_uninterrupted_run(tmp_path, cfg, data):
    full = replace(cfg.pretrain, total_nimg=1280, checkpoint_every_nimg=640, curve_every_nimg=256)
    a = pretrain(full, data, tmp_path / "a", tmp_path / "a.safetensors", NullTracker(), progress=False,
                 curve_score=_norm)
    pretrain(replace(full, total_nimg=640), data, tmp_path / "b", tmp_path / "b_half.safetensors", NullTracker(),
             progress=False, curve_score=_norm)
    b = pretrain(full, data, tmp_path / "b", tmp_path / "b.safetensors", NullTracker(), progress=False,
                 curve_score=_norm)
    assert b["curve"] == a["curve"] and len(a["curve"]) == 5
    assert _same(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def _norm(net):  # deterministic in the weights: a curve that tells different nets apart
    n = float(sum((p.double() ** 2).sum() for p in net.parameters()).sqrt())
    return n, [n, n + 1e-3]


def test_a_curve_needs_a_score(tmp_path, cfg, data):
    with pytest.raises(ValueError, match="curve_score"):
        pretrain(replace(cfg.pretrain, curve_every_nimg=256), data, tmp_path / "a", tmp_path / "a.safetensors",
                 NullTracker(), progress=False)


def test_score_parts_are_the_scores_of_the_seed_halves(cfg, data, base, tmp_path_factory):
    """The metric's split: the whole is score() of all seeds, each part the score of its half generated alone."""
    from repro.methods.ddo.rounds import selection_seeds
    from repro.nets.checkpoint import load_model

    d = tmp_path_factory.mktemp("metric")
    metric = _metric(cfg, data, d)
    net = load_model(base)[0].eval()
    seeds = selection_seeds(cfg.ddo)
    shape = data.shape
    whole, parts = metric.score_parts(net, seeds, 10, shape, cfg.sampler, parts=2)
    assert whole == metric.score(net, seeds, 10, shape, cfg.sampler)
    half = len(seeds) // 2
    assert parts[0] == pytest.approx(metric.score(net, seeds[:half], 10, shape, cfg.sampler), rel=1e-9)
    assert parts[1] == pytest.approx(metric.score(net, seeds[half:], 10, shape, cfg.sampler), rel=1e-9)
    assert parts[0] != parts[1] and all(np.isfinite(parts))


def _metric(cfg, data, d: Path):
    """A small digits extractor and the data's reference statistics, made as the extractor stage makes them."""
    from repro.evaluation.extractor import build_extractor
    from repro.evaluation.metric import load_metric

    build_extractor(cfg.extractor, data, d / "extractor.safetensors", d / "reference_stats.npz", NullTracker(),
                    progress=False)

    return load_metric(cfg.extractor.kind, d / "extractor.safetensors", d / "reference_stats.npz")


def test_stage_writes_the_curve_file(tmp_path):
    """`repro pretrain` on the micro preset with a curve: models/base_curve.json holds its points and protocol."""
    import subprocess
    import sys

    import yaml

    from repro.config import preset_dict

    p = preset_dict("micro")
    p["pretrain"].update(curve_every_nimg=1280, plateau_window=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for stage in ("data", "extractor", "pretrain"):
        r = subprocess.run([sys.executable, "-m", "repro.cli", stage, "--no-progress"], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "models" / "base_curve.json").read_text())
    assert [q["nimg"] for q in rec["curve"]] == [1280, 2560] and rec["plateau"] is False
    assert rec["metric"] == "fd_digits" and rec["seeds"] == [50000, 50064] and rec["nimg"] == 2560
    assert all(q["score"] > 0 and len(q["parts"]) == 2 for q in rec["curve"])
