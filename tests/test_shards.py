"""Sharded, resumable sampling: per-seed images whatever the shard size, a killed run resumes without recomputing
finished shards and gives exactly the statistics of an uninterrupted run, and shards spread over ranks."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.cluster import distributed
from repro.config import SampleConfig, SamplerConfig
from repro.evaluation.fidelity import FeatureStats
from repro.nets.checkpoint import save_model
from repro.nets.factory import build_network
from repro.sampling import shards as shards_mod
from repro.sampling.shards import Shard, plan_shards, range_batches, range_shards, run_shard, sample_models
from repro.storage.files import load_npz

SAMPLER = SamplerConfig(num_steps=2, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0,
                        S_max=float("inf"), S_noise=1.0, batch=16, label_mode="random")


class NoTracker:
    def log_image(self, *a, **k):
        pass


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    arch = dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    path = tmp_path_factory.mktemp("model") / "base.safetensors"
    save_model(path, build_network(arch), arch)
    return path


def _cfg(shard_size: int, n: int = 30, repeats: int = 2, batch: int = 8) -> SampleConfig:
    return SampleConfig(n_samples=n, first_seed=5, repeats=repeats, batch=batch, shard_size=shard_size)


def _images_by_seed(shards: list[Shard]) -> tuple[np.ndarray, np.ndarray]:
    d = [load_npz(s.out) for s in sorted(shards, key=lambda s: s.lo)]
    return np.concatenate([x["seeds"] for x in d]), np.concatenate([x["images"] for x in d])


def _stats(shards: list[Shard], model: str, lo: int, hi: int) -> FeatureStats:
    st = FeatureStats()
    for x in range_batches(range_shards(shards, model, lo, hi), batch=11):
        st.update(x.reshape(len(x), -1).to(torch.float32) / 255)
    return st


def test_shard_names_cover_the_ranges_and_are_unique(model, tmp_path):
    shards = plan_shards({"base": model, "other": model}, _cfg(7), SAMPLER, tmp_path)
    assert len(shards) == 2 * 2 * 5  # 2 models x 2 ranges of 30 seeds x ceil(30 / 7) shards
    assert len({s.out for s in shards}) == len(shards)
    base = [s for s in shards if s.model == "base"]
    assert [(s.lo, s.hi) for s in base[:5]] == [(5, 12), (12, 19), (19, 26), (26, 33), (33, 35)]
    assert base[0].out == tmp_path / "base" / "seeds-000000005-000000012.npz"
    assert pickle.loads(pickle.dumps(base[3])) == base[3]  # the SLURM launcher ships shards to array tasks


def test_images_do_not_depend_on_the_shard_size(model, tmp_path):
    a = sample_models({"base": model}, _cfg(7), SAMPLER, tmp_path / "a", NoTracker(), progress=False)
    b = sample_models({"base": model}, _cfg(50, batch=13), SAMPLER, tmp_path / "b", NoTracker(), progress=False)
    assert len(a["base"]) == 10 and len(b["base"]) == 2
    sa = plan_shards({"base": model}, _cfg(7), SAMPLER, tmp_path / "a")
    sb = plan_shards({"base": model}, _cfg(50), SAMPLER, tmp_path / "b")
    seeds_a, imgs_a = _images_by_seed(sa)
    seeds_b, imgs_b = _images_by_seed(sb)
    assert np.array_equal(seeds_a, np.arange(5, 65)) and np.array_equal(seeds_a, seeds_b)
    assert imgs_a.dtype == np.uint8 and imgs_a.shape == (60, 1, 8, 8) and imgs_a.std() > 0
    assert np.array_equal(imgs_a, imgs_b)
    # Statistics from the stream of shards: bit for bit the same whatever the shard size.
    for lo, hi in shards_mod.eval_ranges(_cfg(7)):
        x, y = _stats(sa, "base", lo, hi), _stats(sb, "base", lo, hi)
        assert x.n == hi - lo and np.array_equal(x.mu, y.mu) and np.array_equal(x.sigma, y.sigma)


def test_killed_run_resumes_without_recomputing_and_gives_the_same_statistics(model, tmp_path, monkeypatch):
    cfg = _cfg(7, batch=4)
    real = shards_mod.generate_images
    started = []

    def crashing(*args, **kwargs):  # dies in the middle of the 4th shard, after its first batch
        started.append(1)
        for k, out in enumerate(real(*args, **kwargs)):
            if len(started) == 4 and k == 1:
                raise KeyboardInterrupt("killed")
            yield out

    monkeypatch.setattr(shards_mod, "generate_images", crashing)
    with pytest.raises(KeyboardInterrupt):
        sample_models({"base": model}, cfg, SAMPLER, tmp_path / "run", NoTracker(), progress=False)
    shards = plan_shards({"base": model}, cfg, SAMPLER, tmp_path / "run")
    finished = [s for s in shards if s.out.is_file()]
    assert finished == shards[:3]
    assert sorted(p.name for p in (tmp_path / "run" / "base").iterdir()) == [s.out.name for s in shards[:3]]
    before = {s.out: (os.stat(s.out).st_ino, os.stat(s.out).st_mtime_ns) for s in finished}

    made = []

    def counting(*args, **kwargs):
        made.append(tuple(np.asarray(args[1])[[0, -1]]))
        yield from real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "generate_images", counting)
    sample_models({"base": model}, cfg, SAMPLER, tmp_path / "run", NoTracker(), progress=False)
    assert made == [(s.lo, s.hi - 1) for s in shards[3:]]  # only the unfinished shards were generated
    assert {s.out: (os.stat(s.out).st_ino, os.stat(s.out).st_mtime_ns) for s in finished} == before

    made.clear()  # a third run has nothing left to do
    sample_models({"base": model}, cfg, SAMPLER, tmp_path / "run", NoTracker(), progress=False)
    assert made == []

    monkeypatch.setattr(shards_mod, "generate_images", real)
    sample_models({"base": model}, cfg, SAMPLER, tmp_path / "clean", NoTracker(), progress=False)
    clean = plan_shards({"base": model}, cfg, SAMPLER, tmp_path / "clean")
    for lo, hi in shards_mod.eval_ranges(cfg):
        x, y = _stats(shards, "base", lo, hi), _stats(clean, "base", lo, hi)
        assert np.array_equal(x.mu, y.mu) and np.array_equal(x.sigma, y.sigma)


def test_a_shard_from_other_settings_or_damaged_is_made_again(model, tmp_path):
    cfg = _cfg(50, n=6, repeats=1)
    (shard,) = plan_shards({"base": model}, cfg, SAMPLER, tmp_path)
    run_shard(shard, SAMPLER, 4)
    first = load_npz(shard.out)
    assert shards_mod.shard_done(shard, SAMPLER)
    other = SamplerConfig(**{**SAMPLER.__dict__, "num_steps": 3})
    assert not shards_mod.shard_done(shard, other)
    run_shard(shard, other, 4)
    assert not np.array_equal(load_npz(shard.out)["images"], first["images"])
    shard.out.write_bytes(b"not an npz")
    assert not shards_mod.shard_done(shard, SAMPLER)
    run_shard(shard, SAMPLER, 4)
    assert np.array_equal(load_npz(shard.out)["images"], first["images"])


def test_gaps_and_foreign_shards_are_refused(model, tmp_path):
    cfg = _cfg(7, n=14, repeats=1)
    shards = plan_shards({"base": model}, cfg, SAMPLER, tmp_path)
    for s in shards:
        run_shard(s, SAMPLER, 7)
    with pytest.raises(ValueError, match="expected"):
        list(range_batches([shards[1], shards[0]]))
    with pytest.raises(ValueError, match="another model"):
        list(range_batches(shards, model_sha="0" * 64))
    shards[1].out.unlink()
    with pytest.raises(FileNotFoundError, match="repro sample"):
        list(range_batches(shards))


def test_ranks_split_the_shards(model, tmp_path, monkeypatch):
    cfg = _cfg(7, n=14, repeats=1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    made = {}
    for r in (1, 0):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        sample_models({"base": model}, cfg, SAMPLER, tmp_path / f"rank{r}", NoTracker(), progress=False)
        made[r] = sorted(p.name for p in (tmp_path / f"rank{r}" / "base").iterdir())
    assert made == {0: ["seeds-000000005-000000012.npz"], 1: ["seeds-000000012-000000019.npz"]}


def test_export_as_one_npz_or_pngs(model, tmp_path):
    from PIL import Image

    cfg = _cfg(7, n=10, repeats=1)
    shards = plan_shards({"base": model}, cfg, SAMPLER, tmp_path / "s")
    for s in shards:
        run_shard(s, SAMPLER, 5)
    seeds, imgs = _images_by_seed(shards)
    assert shards_mod.export_samples(shards, tmp_path / "all.npz", "npz") == 10
    with np.load(tmp_path / "all.npz") as z:
        assert np.array_equal(z["arr_0"], imgs.transpose(0, 2, 3, 1)) and np.array_equal(z["seeds"], seeds)
    shards_mod.export_samples(shards, tmp_path / "png", "png")
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{s:06d}.png" for s in range(5, 15)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000007.png")), imgs[2, 0])
    with pytest.raises(ValueError, match="format"):
        shards_mod.export_samples(shards, tmp_path / "x", "jpg")


def test_the_devices_that_made_the_shards_are_read_back(model, tmp_path):
    shards = plan_shards({"base": model}, _cfg(10, n=20, repeats=1), SAMPLER, tmp_path)
    for s in shards:
        run_shard(s, SAMPLER, 8, device="cpu")
    assert shards_mod.sample_devices(shards) == ["cpu"]
    # a shard as a GPU would record it, and one written before devices were recorded
    d = load_npz(shards[1].out)
    np.savez(shards[1].out, **{**d, "device": np.array("cuda")})
    assert shards_mod.sample_devices(shards) == ["cpu", "cuda"]
    np.savez(shards[1].out, **{k: v for k, v in d.items() if k != "device"})
    assert shards_mod.sample_devices(shards) == ["cpu", "unknown"]
