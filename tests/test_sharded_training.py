"""Training on sharded data (repro.datasets.sharded): the seeded per-epoch order, per-rank reads, resumable loops,
and the DDO fake bank as shards paired with the data shards."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repro.datasets.sharded import FakeShards, ShardedDataset, ShardOrder, write_array_shards
from repro.methods.ddo import rounds as ddo_mod
from repro.methods.ddo.rounds import train_round
from repro.methods.pretrain import pretrain
from repro.pipeline.tracking import NullTracker


def _same(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data):
    """The digits as 7 shards of up to 270 items (the last one shorter), in the data stage's format."""
    d = tmp_path_factory.mktemp("sharded") / "data"
    write_array_shards(d / "digits.npz", d / "manifest.json", len(data.images), 270, data.shape, 10,
                       lambda a, b: (data.images[a:b], data.labels[a:b]))
    return ShardedDataset(d / "manifest.json")


def test_the_order_visits_every_item_once_per_epoch_shard_by_shard():
    sizes = [5, 7, 3, 6]
    order = ShardOrder(sizes, seed=(1, 2))
    n = sum(sizes)
    for epoch in range(2):
        runs = order.positions(epoch * n, n)
        assert sorted((s, int(o)) for s, offs in runs for o in offs) == [(s, o) for s in range(4) for o in range(sizes[s])]
        assert [s for s, _ in runs] == order.shard_order(epoch).tolist()  # one run per shard: shard by shard
    assert not np.array_equal(order.shard_order(0), order.shard_order(1)) or not np.array_equal(
        order.within(0, 1), order.within(1, 1))  # a new permutation each epoch
    other = [(s, o.tolist()) for s, o in ShardOrder(sizes, seed=(1, 3)).positions(0, n)]
    assert other != [(s, o.tolist()) for s, o in order.positions(0, n)]  # the seed matters


def test_a_step_is_the_same_on_any_number_of_ranks_and_after_a_resume():
    sizes = [40, 40, 40, 17]

    def flat(runs):
        return [(s, int(o)) for s, offs in runs for o in offs]

    one = ShardOrder(sizes, seed=7)
    for step in (0, 3, 11):  # step 11 crosses into the second epoch (137 items, batch 16)
        whole = flat(one.step(step, 16, slice(0, 16)))
        halves = flat(one.step(step, 16, slice(0, 8))) + flat(one.step(step, 16, slice(8, 16)))
        fresh = ShardOrder(sizes, seed=7)  # a resumed process: nothing but (seed, step)
        assert whole == halves == flat(fresh.step(step, 16, slice(0, 16)))
        assert len({s for s, _ in one.step(step, 16, slice(0, 8))}) <= 2  # a rank touches at most 2 shards


def test_reads_are_verified_and_only_a_few_shards_stay_mapped(sharded, data, tmp_path):
    runs = sharded.order(0).step(0, 64, slice(0, 64))
    items, labels = sharded.read(runs)
    flat = [sum(sharded.sizes[:s]) + int(o) for s, offs in runs for o in offs]
    assert np.array_equal(items, data.images[flat]) and np.array_equal(labels, data.labels[flat])
    for step in range(40):  # a whole epoch and more
        sharded.read(sharded.order(0).step(step, 64, slice(0, 64)))
    assert len(sharded._images._open) <= 2
    # A changed shard is refused by a process that opens it.
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(sharded.source.folder, copy / "digits")
    shutil.copy(sharded.source.manifest_path, copy / "manifest.json")
    shard = copy / "digits" / sharded.source.manifest["shards"][1]["images"]
    arr = np.load(shard)
    arr[0, 0, 0, 0] ^= 1
    np.save(shard, arr)
    with pytest.raises(ValueError, match="sha256 does not match"):
        ShardedDataset(copy / "manifest.json").read([(1, np.arange(3))])


def test_pretrain_on_shards_resumes_bitwise(tmp_path, cfg, sharded):
    full = replace(cfg.pretrain, total_nimg=256, checkpoint_every_nimg=128, batch=32)
    pretrain(full, sharded, tmp_path / "a", tmp_path / "a.safetensors", NullTracker(), progress=False)
    pretrain(replace(full, total_nimg=128), sharded, tmp_path / "b", tmp_path / "b_half.safetensors", NullTracker(),
             progress=False)
    pretrain(full, sharded, tmp_path / "b", tmp_path / "b.safetensors", NullTracker(), progress=False)
    assert _same(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert not _same(tmp_path / "a.safetensors", tmp_path / "b_half.safetensors")


class Killed(Exception):
    pass


class WeightMetric:
    """A cheap deterministic stand-in for the metric (a function of the weights) that can 'kill' the run."""

    name = "weight_norm"

    def __init__(self, kill_at_call: int | None = None):
        self.calls, self.kill_at_call = 0, kill_at_call

    def score(self, net, seeds, label_dim, img_shape, sampler):
        self.calls += 1
        if self.kill_at_call is not None and self.calls == self.kill_at_call:
            raise Killed()
        return float(sum((p.detach().double() ** 2).sum() for p in net.parameters()).sqrt()) % 1.0


def test_ddo_round_on_shards_writes_a_paired_fake_bank_and_resumes_bitwise(tmp_path, cfg, sharded, base,
                                                                           monkeypatch):
    dcfg = replace(cfg.ddo, nimg_per_round=128, eval_every_nimg=32, batch=32)
    sampler = replace(cfg.sampler, num_steps=2, batch=300)
    args = (sharded, dcfg, sampler, 0.5)
    ref = train_round("ddo", 1, base, *args, WeightMetric(), tmp_path / "a", NullTracker(), progress=False)
    bank = FakeShards(tmp_path / "a/fakes.npz", sharded)
    folder = tmp_path / "a/fakes"
    assert sorted(p.name for p in folder.iterdir()) == [f"shard-{j:05d}.npy" for j in range(len(sharded.sizes))]
    assert [len(np.load(p, mmap_mode="r")) for p in sorted(folder.iterdir())] == sharded.sizes
    # Fake (j, i) has real (j, i)'s label and seed first_seed + its position: shard 2's first fake is item 540's.
    first = bank.first_seed + 540
    from repro.sampling.generate import generate_images

    ref_net = ddo_mod.load_model(base)[0].float()
    (_, img, y), = generate_images(ref_net, [first], img_shape=sharded.shape, label_dim=10, sampler=sampler,
                                   labels=sharded.labels_of(2)[:1])
    assert np.abs(bank.take([(2, np.array([0]))]).astype(int) - img.numpy().astype(int)).max() <= 1

    with pytest.raises(Killed):
        train_round("ddo", 1, base, *args, WeightMetric(kill_at_call=3), tmp_path / "b", NullTracker(), progress=False)
    monkeypatch.setattr(ddo_mod, "write_fake_shards", lambda *a, **k: pytest.fail("the bank was made again"))
    res = train_round("ddo", 1, base, *args, WeightMetric(), tmp_path / "b", NullTracker(), progress=False)
    assert res.evals == ref.evals and _same(ref.best_path, res.best_path)
    # The MLE control on shards runs too (twice the items per step, no bank).
    ctl = train_round("control", 1, base, *args, WeightMetric(), tmp_path / "c", NullTracker(), progress=False)
    assert len(ctl.evals) == 4 and not (tmp_path / "c/fakes.npz").exists()


def test_stages_that_hold_the_real_images_in_memory_refuse_shards_naming_the_field(sharded, data):
    from repro.config import ConfigError
    from repro.pipeline.common import in_memory

    assert in_memory(data, "x") is data
    with pytest.raises(ConfigError, match="data.dataset.*discriminator stage"):
        in_memory(sharded, "the discriminator stage")


def test_latent_shards_train_on_whitened_draws_and_the_ddo_stage_decodes_only_with_the_encoding_vae(
        tmp_path, monkeypatch):
    from repro.config import ConfigError, load_config
    from repro.nets.sd_vae import edm2_scale_bias
    from repro.pipeline.stages import ddo as ddo_stage
    from repro.storage.layout import Paths

    rng = np.random.default_rng(0)
    stored = rng.normal(size=(6, 8, 4, 4)).astype(np.float32)
    stored[:, 4:] = np.abs(stored[:, 4:])  # std channels
    d = tmp_path / "data"
    write_array_shards(d / "imagenet512.npz", d / "manifest.json", 6, 4, (8, 4, 4), 2,
                       lambda a, b: (stored[a:b], np.arange(a, b) % 2), dtype=np.float32, dataset="imagenet512")
    scale, bias = edm2_scale_bias()
    lat = ShardedDataset(d / "manifest.json", scale_bias=(scale, bias))
    assert lat.latent and lat.shape == (4, 4, 4)
    items, _ = lat.read([(1, np.array([1, 0]))])
    noise = torch.ones(2, 4, 4, 4)
    want = (stored[[5, 4], :4] + stored[[5, 4], 4:]) * scale[:, None, None] + bias[:, None, None]
    assert torch.allclose(lat.to_model(items, noise), torch.as_tensor(want), atol=1e-5)

    # The ddo stage: latents need a decoder (pretrain.decoder for a base trained here), and it must be the VAE the
    # data stage encoded with (the manifest's record), checked before the metric is built.
    cfg = load_config(preset="micro")
    for name in ("require", "check_recorded"):
        monkeypatch.setattr(ddo_stage, name, lambda *a, **k: None)
    monkeypatch.setattr(ddo_stage, "read_model_meta", lambda *a, **k: ({"precond": "edm"}, {}))
    monkeypatch.setattr(ddo_stage, "load_data", lambda paths: lat)
    monkeypatch.setattr(ddo_stage, "load_metric", lambda *a, **k: pytest.fail("no metric without the decoder"))
    with pytest.raises(ConfigError, match="pretrain.decoder: is empty"):
        ddo_stage._inputs(cfg, Paths.of(cfg, tmp_path))
    cfg = load_config(preset="imagenet512-l", overrides=["pretrain.source=train", "pretrain.decoder=sd-vae-tiny"])
    paths = Paths.of(cfg, tmp_path)
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    paths.manifest.write_text(json.dumps({"latents": {"encoder": "sd-vae-tiny sha256 " + "0" * 64}}))
    paths.decoder("sd-vae-tiny").parent.mkdir(parents=True)
    paths.decoder("sd-vae-tiny").write_bytes(b"another VAE")
    with pytest.raises(ValueError, match="encoded with sd-vae-tiny sha256 0000.*decoder here is sd-vae-tiny sha256"):
        ddo_stage._inputs(cfg, paths)


def test_a_swept_round_on_shards_shares_one_sharded_bank_among_its_candidates(tmp_path, cfg, sharded, base,
                                                                               monkeypatch):
    from repro.methods.ddo import sweep

    dcfg = replace(cfg.ddo, nimg_per_round=32, eval_every_nimg=32, batch=32, sweep_alpha=(0.5, 1.0))
    sampler = replace(cfg.sampler, num_steps=2, batch=300)
    rd = tmp_path / "round"
    sweep.prepare_round(1, base, sharded, dcfg, sampler, WeightMetric(), rd, progress=False)
    assert (rd / "fakes.npz").is_file() and len(list((rd / "fakes").iterdir())) == len(sharded.sizes)
    monkeypatch.setattr(ddo_mod, "write_fake_shards", lambda *a, **k: pytest.fail("the bank was made again"))
    for alpha in (0.5, 1.0):
        res = sweep.train_candidate(1, base, sharded, dcfg, sampler, 0.5, WeightMetric(), rd, alpha, dcfg.beta,
                                    NullTracker(), progress=False)
        assert res.evals and (res.best_path.parent / "fakes").resolve() == (rd / "fakes").resolve()
