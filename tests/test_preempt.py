"""Preemption: a stop requested at a step boundary saves the whole state and raises Preempted; the rerun ends
bitwise where an uninterrupted run ends, and work that was finished (the fake bank) is not done again."""

import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repro.cluster import preempt
from repro.cluster.preempt import Preempted
from repro.methods import pretrain as train_mod
from repro.methods.ddo import rounds as ddo_mod
from repro.methods.ddo.rounds import train_round
from repro.methods.pretrain import pretrain
from repro.methods.training import load_state
from repro.pipeline.tracking import NullTracker


@pytest.fixture(autouse=True)
def no_pending_stop():
    preempt.reset()
    yield
    preempt.reset()


def stop_during_step(monkeypatch, module, k: int, stop) -> list[int]:
    """Call ``stop()`` during the k-th optimizer step (1-based) of ``module``'s loop; returns the step log."""
    steps, original = [], module.rampup_lr  # rampup_lr runs once per step (one parameter group)

    def hooked(*a):
        steps.append(1)
        if len(steps) == k:
            stop()
        return original(*a)

    monkeypatch.setattr(module, "rampup_lr", hooked)
    return steps


def test_pretrain_stopped_at_a_step_saves_its_state_and_resumes_to_the_same_bytes(tmp_path, cfg, data, monkeypatch):
    pcfg = replace(cfg.pretrain, total_nimg=1280, checkpoint_every_nimg=1280)  # 10 steps, no checkpoint before end
    pretrain(pcfg, data, tmp_path / "a", tmp_path / "a.safetensors", NullTracker(), progress=False)

    steps = stop_during_step(monkeypatch, train_mod, 7, preempt.request)
    with pytest.raises(Preempted, match="at 896 images"):
        pretrain(pcfg, data, tmp_path / "b", tmp_path / "b.safetensors", NullTracker(), progress=False)
    assert len(steps) == 7 and not (tmp_path / "b.safetensors").exists()
    state = load_state(tmp_path / "b/state.pt")  # the full state at the step boundary after step 7
    assert (state["step"], state["nimg"]) == (7, 7 * 128) and len(state["losses"]) == 7
    assert {"net", "ema", "opt"} <= set(state)

    preempt.reset()
    monkeypatch.undo()
    pretrain(pcfg, data, tmp_path / "b", tmp_path / "b.safetensors", NullTracker(), progress=False)
    # same weights and the same metadata (final loss included): the same file
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


class WeightMetric:
    """A cheap deterministic stand-in for the selection metric: a function of the weights."""

    name = "weight_norm"

    def score(self, net, seeds, label_dim, img_shape, sampler):
        return float(sum((p.detach().double() ** 2).sum() for p in net.parameters()).sqrt()) % 1.0


def test_ddo_round_stopped_by_a_signal_resumes_bitwise_without_redoing_the_fake_bank(tmp_path, cfg, data, base,
                                                                                     monkeypatch):
    small = replace(data, images=data.images[:320], labels=data.labels[:320])  # a small fake bank
    dcfg = replace(cfg.ddo, nimg_per_round=256, eval_every_nimg=128, batch=32)  # 8 steps, evaluated after 4 and 8
    args = (small, dcfg, cfg.sampler, 0.5, WeightMetric())
    ref = train_round("ddo", 1, base, *args, tmp_path / "a", NullTracker(), progress=False)

    # 1. Stopped right after the fake bank: the bank is saved, no training state yet.
    banks, make = [], ddo_mod.make_fake_bank

    def bank_then_stop(*a, **k):
        banks.append(1)
        out = make(*a, **k)
        preempt.request(signal.SIGTERM)
        return out

    monkeypatch.setattr(ddo_mod, "make_fake_bank", bank_then_stop)
    with pytest.raises(Preempted, match="SIGTERM.*after the fake bank"):
        train_round("ddo", 1, base, *args, tmp_path / "b", NullTracker(), progress=False)
    assert banks == [1] and (tmp_path / "b/fakes.npz").is_file() and not (tmp_path / "b/state.pt").exists()
    mtime = (tmp_path / "b/fakes.npz").stat().st_mtime_ns
    preempt.reset()

    # 2. A real SIGUSR1 during step 6 (after the first evaluation): saved at the step boundary after step 6.
    stop_during_step(monkeypatch, ddo_mod, 6, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    with preempt.handle(), pytest.raises(Preempted, match="SIGUSR1.*at 192 images") as e:
        train_round("ddo", 1, base, *args, tmp_path / "b", NullTracker(), progress=False)
    assert e.value.signum == signal.SIGUSR1
    preempt.reset()
    state = load_state(tmp_path / "b/state.pt")
    assert (state["step"], state["nimg"]) == (6, 192) and json.loads(state["evals"]) == ref.evals[:1]
    assert not (tmp_path / "b/done.json").exists()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handle() put the default handler back

    # 3. Run again: the round finishes from step 6, with the same bank, and ends bitwise like the uninterrupted one.
    monkeypatch.undo()
    monkeypatch.setattr(ddo_mod, "make_fake_bank", lambda *a, **k: banks.append(1))
    res = train_round("ddo", 1, base, *args, tmp_path / "b", NullTracker(), progress=False)
    assert banks == [1] and (tmp_path / "b/fakes.npz").stat().st_mtime_ns == mtime  # the bank was not made again
    assert res.evals == ref.evals and (res.best_nimg, res.best_score) == (ref.best_nimg, ref.best_score)
    ta, tb = load_file(str(ref.best_path)), load_file(str(res.best_path))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert np.array_equal(np.load(tmp_path / "a/fakes.npz")["images"], np.load(tmp_path / "b/fakes.npz")["images"])
    assert not (tmp_path / "b/state.pt").exists() and (tmp_path / "b/done.json").is_file()


def test_a_preempted_stage_ends_its_mlflow_runs_as_killed(tmp_path, monkeypatch):
    from repro.pipeline.tracking import find_runs, stage_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("REPRO_TRACKING", raising=False)
    with pytest.raises(Preempted):
        with stage_run("ddo", root=tmp_path, preset="micro", params={"a": 1}, config_hash="x") as t:
            with t.child("ddo-round1") as child:
                child.log_metrics({"loss": 1.0}, step=1)
                raise Preempted(signal.SIGUSR1, "in ddo round 1")
    runs = {r["name"]: r["status"] for r in find_runs(tmp_path, "micro")}
    assert runs == {"ddo": "KILLED", "ddo-round1": "KILLED"}
    # any other error still marks them failed
    with pytest.raises(RuntimeError):
        with stage_run("pretrain", root=tmp_path, preset="micro", params={}, config_hash="y"):
            raise RuntimeError("boom")
    assert {r["name"]: r["status"] for r in find_runs(tmp_path, "micro")}["pretrain"] == "FAILED"


def test_the_same_weights_give_the_same_checkpoint_bytes(tmp_path):
    from repro.nets.checkpoint import read_model_meta, save_model

    net = torch.nn.Linear(3, 2)
    blobs = set()
    for i in range(8):  # safetensors' own metadata order is random per call: 8 equal files by chance is 1/128
        save_model(tmp_path / f"{i}.safetensors", net, {"b": 1, "a": "x"}, {"z": 2.5, "y": "é"})
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    # the rewritten header still reads: metadata and tensors
    assert read_model_meta(tmp_path / "0.safetensors") == ({"a": "x", "b": 1}, {"y": "é", "z": 2.5})
    t = load_file(str(tmp_path / "0.safetensors"))
    assert torch.equal(t["weight"], net.weight.detach()) and torch.equal(t["bias"], net.bias.detach())
