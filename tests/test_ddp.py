"""Several processes (torch.distributed over gloo on CPU) against one: the same fake bank and reference score
bit for bit, the same trained weights up to the order of float sums.

The workers are this file run as a script (``python tests/test_ddp.py OUT``) with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set as torchrun sets them; the one-process run is the same script without them.
"""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# Tolerance on trained weights, 2 processes vs 1: 1e-5, about 100 float32 ulps of a weight of order 1. The
# gradients differ only in float32 rounding (each rank sums its half of the batch, then the halves are
# averaged: ~1e-7 relative). Adam divides by sqrt(v), which can enlarge such a difference where a gradient is
# ~0, but a step moves a weight by at most ~lr, so over these few steps (8 at lr 2e-3, 4 at lr 5e-4) the
# differences stay far below the training's own change of the weights, which the test also checks (> 10x the
# tolerance), so the comparison is not vacuous. Measured: ~1e-7 (pretrain), ~3e-8 (DDO, control).
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_data():
    from repro.datasets.images import load_embedded

    d = load_embedded("digits")
    return replace(d, images=d.images[:200], labels=d.labels[:200])  # 7 sampling batches of 32: 4 + 3 per rank


def worker(out: Path) -> None:
    """One rank (or the single process): pretrain briefly (stopped once and resumed), then a DDO round and an
    MLE-control round."""
    from repro.cluster import distributed, preempt
    from repro.config import load_config
    from repro.evaluation.metric import load_metric
    from repro.methods import pretrain as train_mod
    from repro.methods.ddo.rounds import train_round
    from repro.methods.pretrain import pretrain
    from repro.pipeline.tracking import NullTracker
    from repro.storage.files import write_json

    distributed.init_from_env()
    cfg, data, shared = load_config(preset="micro"), small_data(), out.parent
    sampler = replace(cfg.sampler, batch=32)
    metric = load_metric(cfg.extractor.kind, shared / "extractor.safetensors", shared / "reference.npz")
    pcfg = replace(cfg.pretrain, batch=64, total_nimg=512, checkpoint_every_nimg=256)
    # The last rank alone gets a stop request during step 3: every rank must stop after step 3; then resume.
    steps, rampup_lr = [], train_mod.rampup_lr

    def hooked(*a):
        steps.append(1)
        if len(steps) == 3 and distributed.rank() == distributed.world_size() - 1:
            preempt.request()
        return rampup_lr(*a)

    train_mod.rampup_lr = hooked
    try:
        pretrain(pcfg, data, out / "pretrain", out / "pretrain.safetensors", NullTracker(), progress=False)
    except preempt.Preempted as e:
        (out / f"stopped-rank{distributed.rank()}.txt").write_text(str(e))
    train_mod.rampup_lr = rampup_lr
    preempt.reset()
    pretrain(pcfg, data, out / "pretrain", out / "pretrain.safetensors", NullTracker(), progress=False)
    dcfg = replace(cfg.ddo, batch=32, nimg_per_round=128, eval_every_nimg=64, selection_samples=70, lr=5e-4)
    result = {}
    for kind in ("ddo", "control"):
        r = train_round(kind, 1, shared / "base.safetensors", data, dcfg, sampler, cfg.pretrain.sigma_data, metric,
                        out / kind, NullTracker(), progress=False)
        result[kind] = {"ref_score": r.ref_score, "evals": r.evals}
    if distributed.is_main():
        write_json(out / "result.json", result)
    distributed.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same work by 1 process and by 2 (started together), from the same base model and metric."""
    from repro.config import load_config
    from repro.evaluation.extractor import build_extractor
    from repro.methods.pretrain import pretrain
    from repro.pipeline.tracking import NullTracker

    d = tmp_path_factory.mktemp("ddp")
    cfg, data = load_config(preset="micro"), small_data()
    build_extractor(replace(cfg.extractor, steps=30), data, d / "extractor.safetensors", d / "reference.npz",
                    NullTracker(), progress=False)
    pretrain(replace(cfg.pretrain, total_nimg=256), data, d / "base-run", d / "base.safetensors", NullTracker(),
             progress=False)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "REPRO_TRACKING": "off"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID"):
        env.pop(k, None)
    port = str(free_port())
    cmds = [(d / "one", env)] + [(d / "two", {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for out, e in cmds]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    return d


def max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def test_fake_bank_and_reference_score_are_bitwise_those_of_one_process(runs):
    one, two = (np.load(runs / x / "ddo/fakes.npz") for x in ("one", "two"))
    assert one["images"].shape == (200, 1, 8, 8)
    assert np.array_equal(one["images"], two["images"]) and np.array_equal(one["seeds"], two["seeds"])
    r1, r2 = (json.loads((runs / x / "result.json").read_text()) for x in ("one", "two"))
    # the metric's statistics are gathered in one process's batch order: the same number, exactly
    assert r1["ddo"]["ref_score"] == r2["ddo"]["ref_score"] == r1["control"]["ref_score"]


def test_a_stop_seen_by_one_rank_stops_every_rank_at_the_same_step(runs):
    msgs = [(runs / "two" / f"stopped-rank{r}.txt").read_text() for r in (0, 1)]
    assert msgs[0] == msgs[1] and "at 192 images" in msgs[0]  # after step 3 of 64 images, on both ranks
    assert "at 192 images" in (runs / "one" / "stopped-rank0.txt").read_text()


@pytest.mark.parametrize("what", ["pretrain.safetensors", "ddo/best.safetensors", "control/best.safetensors"])
def test_trained_weights_equal_one_process_up_to_float_sum_order(runs, what):
    diff = max_diff(runs / "one" / what, runs / "two" / what)
    assert diff <= ATOL, f"{what}: 2 processes differ from 1 by {diff:.3g} (> {ATOL})"
    # DDO and control start from the base; pretraining starts from the base's initial weights (same seed): in
    # each case training moved the weights far more than the processes disagree
    assert max_diff(runs / "one" / what, runs / "base.safetensors") > 10 * ATOL


def test_selection_scores_are_close(runs):
    r1, r2 = (json.loads((runs / x / "result.json").read_text()) for x in ("one", "two"))
    for kind in ("ddo", "control"):
        e1, e2 = r1[kind]["evals"], r2[kind]["evals"]
        assert [e["nimg"] for e in e1] == [e["nimg"] for e in e2] == [64, 128]
        for a, b in zip(e1, e2):
            assert abs(a["score"] - b["score"]) <= 1e-3 * max(1.0, abs(a["score"]))


def test_torchrun_runs_a_stage_on_two_processes(tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m repro.cli pretrain --preset micro`, as in the README."""
    from repro.config import load_config
    from repro.pipeline.run import run_stage

    sets = {"pretrain.total_nimg": "256", "pretrain.batch": "64"}
    cfg = load_config(preset="micro", overrides=[f"{k}={v}" for k, v in sets.items()])
    monkeypatch.setenv("REPRO_TRACKING", "off")
    for d in ("one", "two"):
        run_stage("data", cfg, tmp_path / d, progress=False)
    run_stage("pretrain", cfg, tmp_path / "one", progress=False)  # the reference: one process
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "repro.cli", "pretrain", "--preset", "micro", "--no-progress",
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    p = subprocess.run(cmd, cwd=tmp_path / "two", env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "batch 64 on 2 process(es)" in p.stderr and p.stderr.count("wrote base model") == 1  # rank 0 speaks
    assert max_diff(tmp_path / "one/models/base.safetensors", tmp_path / "two/models/base.safetensors") <= ATOL
    assert (tmp_path / "two/models/base_grid.png").is_file()


def test_only_rank_0_talks_to_mlflow(tmp_path, monkeypatch):
    from repro.cluster import distributed
    from repro.pipeline.tracking import NullTracker, stage_run

    monkeypatch.delenv("REPRO_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never-created.db'}")
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with stage_run("ddo", root=tmp_path, preset="micro", params={}, config_hash="x") as t:
        assert type(t) is NullTracker
        t.log_metrics({"loss": 1.0})
    assert not (tmp_path / "never-created.db").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_a_config_error(monkeypatch):
    from repro.cluster import distributed
    from repro.config import ConfigError

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    assert distributed.batch_slice(32, "ddo.batch") == slice(24, 32)
    with pytest.raises(ConfigError, match=r"ddo\.batch: 30 does not split evenly over 4 processes.*multiple of 4"):
        distributed.batch_slice(30, "ddo.batch")


def test_sampling_parts_are_whole_batches_of_one_process():
    from repro.config import load_config
    from repro.sampling.generate import generate_images

    sampler = load_config(preset="micro").sampler
    seeds = np.arange(100, 170)  # 5 batches of 16, the last one short

    def denoise(x, sigma, labels):
        return torch.tanh(x) * (1 + labels.argmax(1)[:, None, None, None] / 10)

    def run(part):
        return [(s, x) for s, x, _ in generate_images(denoise, seeds, img_shape=(1, 4, 4), label_dim=10,
                                                      sampler=sampler, batch=16, part=part)]

    whole = run((0, 1))
    parts = [run((r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 1]
    # rank r made batches r, r + 3, ...: dealt back in that order, the same seeds and the same bytes
    merged = [parts[k % 3][k // 3] for k in range(5)]
    assert all(np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, merged))


def test_gather_chunks_restores_the_order_of_one_process(monkeypatch):
    from repro.cluster import distributed

    # 7 chunks dealt round-robin to 3 ranks: rank r made chunks r, r+3, ...
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [[0, 3, 6], [1, 4], [2, 5]])
    assert distributed.gather_chunks(None) == list(range(7))


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
