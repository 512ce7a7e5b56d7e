"""Stage `fakes`: the fake bank of every model whose guided variant trains on one (repro.methods.guidance).

Each bank is one seed range (guidance.fake_first_seed + i, i < guidance.fakes or one per real image) of the sharded
sampler (repro.sampling.shards): made once in runs/fakes-work/, reused by every later run with the same model and
sampler, and published as fakes/<model>/ with an index (fakes/banks.json). With guidance off (guidance.evaluate
empty) or nothing to train, it writes the empty index and nothing else. On a cluster the shards not yet made go
out as one job array (:func:`waves`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from repro.cluster import distributed
from repro.cluster.launcher import Wave
from repro.config import Config
from repro.methods.guidance import fake_config, fake_models, plan_fakes
from repro.nets.checkpoint import read_model_meta
from repro.nets.released import sampling_extras
from repro.pipeline.common import require, stage_context, tracked
from repro.pipeline.cost import guidance_cost
from repro.sampling.generate import image_grid
from repro.sampling.shards import Shard, model_sha256, run_shard, sampler_hash, shard_done
from repro.storage.files import atomic_dir, link_or_copy, load_npz, read_json, write_json
from repro.storage.layout import Paths


def n_data(paths: Paths) -> int:
    """The number of real images (the data stage's manifest): the default bank size."""
    require(paths.manifest)
    return int(read_json(paths.manifest)["n"])


def _setup(cfg: Config, paths: Paths) -> tuple[str, dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch, info = read_model_meta(paths.base)
    return device, sampling_extras(cfg, paths.root, arch, info, device=device)  # the guide, as the evaluation


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    models = fake_models(cfg, paths)
    if not models:  # guidance off, or nothing to train on fakes: an empty index, at once
        if not distributed.is_main():
            return
        with atomic_dir(paths.fakes) as tmp:
            write_json(tmp / paths.fakes_index.name, {"banks": {}})
        return
    require(*models.values())
    n = n_data(paths)
    shards = plan_fakes(cfg, paths, n, paths.fakes_work)
    device, extras = _setup(cfg, paths)
    with tracked("fakes", cfg, paths) as t:
        rank, world = distributed.rank(), distributed.world_size()
        for i, s in enumerate(shards):  # finished shards (same model file and sampler) are kept; rank r: i % world
            if i % world == rank:
                run_shard(s, cfg.sampler, cfg.sample.batch, progress, device, **extras)
        distributed.barrier()
        if not distributed.is_main():
            return
        bank = fake_config(cfg, n)
        index = {}
        with atomic_dir(paths.fakes) as tmp:
            for name, path in models.items():
                (tmp / name).mkdir()
                mine = [s for s in shards if s.model == name]
                for s in mine:
                    link_or_copy(s.out, tmp / name / s.out.name)
                index[name] = {"model_sha256": model_sha256(path), "sampler": sampler_hash(cfg.sampler),
                               "seeds": [bank.first_seed, bank.first_seed + bank.n_samples],
                               "shards": [s.out.name for s in mine]}
                t.log_image(image_grid(load_npz(mine[0].out)["images"][:80], ncol=20), f"fakes_{name}.png")
            write_json(tmp / paths.fakes_index.name, {"banks": index})
        t.log_metrics({"fake_images": bank.n_samples * len(models)})


def bank_shards(cfg: Config, paths: Paths, model: str) -> list[Shard]:
    """The published shards of ``model``'s bank (fakes/<model>/), checked against the index."""
    require(paths.fakes_index)
    index = read_json(paths.fakes_index)["banks"]
    if model not in index:
        raise FileNotFoundError(f"{paths.fakes}: no fake bank of {model}; run the fakes stage (`repro fakes`)")
    shards = [s for s in plan_fakes(cfg, paths, n_data(paths), paths.fakes) if s.model == model]
    for s in shards:
        if not s.out.is_file():
            raise FileNotFoundError(f"{s.out} not found: run the fakes stage (`repro fakes`)")
    return shards


@dataclass(frozen=True)
class FakeShardJob:
    """Job: one shard of a fake bank (one task of the stage's job array)."""

    cfg: Config
    root: str
    shard: Shard

    def __call__(self) -> str:
        with stage_context("fakes", self.cfg, self.root) as paths:
            device, extras = _setup(self.cfg, paths)
            return str(run_shard(self.shard, self.cfg.sampler, self.cfg.sample.batch, progress=False, device=device,
                                 **extras))


def describe(cfg: Config, paths: Paths) -> dict:
    """The banks and their cost (--dry-run)."""
    from repro.methods.guidance import describe as guided

    models = fake_models(cfg, paths)
    return {"banks": list(models), "seeds_from": cfg.guidance.fake_first_seed,
            "images_per_bank": cfg.guidance.fakes or "one per real image", "cost": guidance_cost(cfg, guided(cfg, paths))["fakes"]}


def waves(cfg: Config, root: Path, whole: Callable[[bool], Wave]) -> Iterator[Wave]:
    """The shards not yet made as one job array, then the stage here (it only publishes them)."""
    paths = Paths.of(cfg, root)
    if fake_models(cfg, paths):
        todo = [s for s in plan_fakes(cfg, paths, n_data(paths), paths.fakes_work) if not shard_done(s, cfg.sampler)]
        if todo:
            yield Wave("fakes-shards", "fakes", tuple(FakeShardJob(cfg, str(root), s) for s in todo))
    yield whole(True)
