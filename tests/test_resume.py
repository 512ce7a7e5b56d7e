"""Resumability: an interrupted pretraining or DDO round, run again, ends exactly where an uninterrupted one does."""

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repro.methods.ddo import rounds as ddo_mod
from repro.methods.ddo.rounds import train_round
from repro.methods.pretrain import pretrain
from repro.pipeline.tracking import NullTracker


def _same(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_pretrain_resumes_bitwise(tmp_path, cfg, data, caplog):
    full = replace(cfg.pretrain, total_nimg=1280, checkpoint_every_nimg=640)
    pretrain(full, data, tmp_path / "a", tmp_path / "a.safetensors", NullTracker(), progress=False)
    # "interrupted" after the first checkpoint: the same run directory, stopped at 640 images ...
    pretrain(replace(full, total_nimg=640), data, tmp_path / "b", tmp_path / "b_half.safetensors", NullTracker(),
             progress=False)
    assert not _same(tmp_path / "a.safetensors", tmp_path / "b_half.safetensors")
    # ... then the same command again continues from there.
    with caplog.at_level(logging.INFO, logger="repro.methods.pretrain"):
        pretrain(full, data, tmp_path / "b", tmp_path / "b.safetensors", NullTracker(), progress=False)
    assert "resuming pretraining" in caplog.text and "at 640 images" in caplog.text
    assert _same(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


class Killed(Exception):
    pass


class WeightMetric:
    """A cheap deterministic stand-in for the metric: a function of the weights; can 'kill' the run."""

    name = "weight_norm"

    def __init__(self, kill_at_call: int | None = None):
        self.calls = 0
        self.kill_at_call = kill_at_call

    def score(self, net, seeds, label_dim, img_shape, sampler):
        self.calls += 1
        if self.kill_at_call is not None and self.calls == self.kill_at_call:
            raise Killed()
        return float(sum((p.detach().double() ** 2).sum() for p in net.parameters()).sqrt()) % 1.0


def test_ddo_round_resumes_after_a_kill_and_matches_an_uninterrupted_round(tmp_path, cfg, data, base, monkeypatch):
    dcfg = replace(cfg.ddo, nimg_per_round=256, eval_every_nimg=64, batch=32)
    args = (data, dcfg, cfg.sampler, 0.5)
    ref = train_round("ddo", 1, base, *args, WeightMetric(), tmp_path / "a", NullTracker(), progress=False)

    # Killed during the third evaluation (after the first two checkpoints were saved).
    with pytest.raises(Killed):
        train_round("ddo", 1, base, *args, WeightMetric(kill_at_call=3), tmp_path / "b", NullTracker(), progress=False)
    assert (tmp_path / "b/state.pt").is_file() and not (tmp_path / "b/done.json").exists()
    bank = (tmp_path / "b/fakes.npz").stat().st_mtime_ns

    calls = []
    monkeypatch.setattr(ddo_mod, "make_fake_bank", lambda *a, **k: calls.append(1))
    res = train_round("ddo", 1, base, *args, WeightMetric(), tmp_path / "b", NullTracker(), progress=False)
    assert calls == [] and (tmp_path / "b/fakes.npz").stat().st_mtime_ns == bank  # the fake bank was reused
    assert res.evals == ref.evals and res.best_nimg == ref.best_nimg and res.best_score == ref.best_score
    assert _same(ref.best_path, res.best_path)
    assert np.array_equal(np.load(tmp_path / "a/fakes.npz")["images"], np.load(tmp_path / "b/fakes.npz")["images"])

    # A finished round is not run again.
    again = train_round("ddo", 1, base, *args, WeightMetric(kill_at_call=1), tmp_path / "b", NullTracker(),
                        progress=False)
    assert again.evals == ref.evals


def test_fakes_are_paired_with_the_real_labels_and_differ_per_round(cfg, data, base):
    from repro.nets.checkpoint import load_model

    net, arch, _ = load_model(base)
    sub = replace(data, images=data.images[:12], labels=data.labels[:12])
    f1 = ddo_mod.make_fake_bank(net, sub, 10, ddo_mod.fake_seeds(cfg.ddo, 1, 12), cfg.sampler, progress=False)
    f2 = ddo_mod.make_fake_bank(net, sub, 10, ddo_mod.fake_seeds(cfg.ddo, 2, 12), cfg.sampler, progress=False)
    assert list(f1) == ["images"]  # a diffusion model's bank: images only (an AR model's also holds token maps)
    f1, f2 = f1["images"], f2["images"]
    assert f1.shape == (12, 1, 8, 8) and f1.dtype == np.uint8
    assert not np.array_equal(f1, f2)
    # fake i is generated with real image i's label: same as sampling those seeds with those labels
    from repro.sampling.generate import generate_images

    direct = np.concatenate([x.numpy() for _, x, _ in generate_images(
        net, ddo_mod.fake_seeds(cfg.ddo, 1, 12), img_shape=(1, 8, 8), label_dim=10, sampler=cfg.sampler,
        labels=sub.labels)])
    assert np.abs(direct.astype(int) - f1.astype(int)).max() <= 1
