"""Stage `sample`: the final evaluation's images of every model, as shard files of seeds (repro.sampling.shards).

Shards are made in a resumable work directory, then published atomically as samples/ (exactly the shards of this
plan). On a cluster the shards not yet made go out as one job array (:func:`waves`), then the stage publishes them
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from repro.catalog import protocols, registry
from repro.cluster.launcher import Wave
from repro.config import Config
from repro.nets.checkpoint import read_model_meta
from repro.nets.released import sampling_extras
from repro.pipeline.common import require, stage_context, tracked
from repro.pipeline.cost import is_ar, sample_cost
from repro.sampling.shards import Shard, plan_shards, run_shard, sample_models, shard_done
from repro.storage.files import atomic_dir, check_recorded, link_or_copy
from repro.storage.layout import Paths, round_name


def eval_models(cfg: Config, paths: Paths) -> dict[str, Path]:
    """The models the final evaluation compares: base, each DDO round's best (or only the last: sample.models),
    the control's last round; with training-seed replicates (ddo.seeds > 1), then each further replicate's last DDO
    round and its control's last round (``ddo-round<R>-seed<s>``, ``control-round<R>-seed<s>``). A replicate's
    intermediate rounds are not sampled: each model costs one more full evaluation, and the table's spread over
    seeds is of the last rounds (their selection scores along the rounds are in rounds.json)."""
    models = {"base": paths.base}
    first = cfg.ddo.rounds if cfg.sample.models == "base-and-last" else 1
    for r in range(max(first, 1), cfg.ddo.rounds + 1):
        models[round_name("ddo", r)] = paths.round_model("ddo", r)
    if cfg.ddo.control:
        models[round_name("control", cfg.ddo.rounds)] = paths.round_model("control", cfg.ddo.rounds)
    if cfg.ddo.rounds:
        for k in range(1, cfg.ddo.seeds):
            seed = cfg.ddo.seed + k
            for kind in ("ddo", "control") if cfg.ddo.control else ("ddo",):
                models[round_name(kind, cfg.ddo.rounds, seed)] = paths.round_model(kind, cfg.ddo.rounds, seed)
    return models


def _sampling_setup(cfg: Config, paths: Paths) -> tuple[str, dict]:
    """The device the sample stage uses, and its guide / latent decoder on that device (if the preset has them)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch, info = read_model_meta(paths.base)
    return device, sampling_extras(cfg, paths.root, arch, info, device=device)


def shard_sampler(cfg: Config):
    """The settings a shard's images depend on (recorded in each shard): EDM's sampler, or a VAR model's ``ar``."""
    return cfg.ar if is_ar(cfg) else cfg.sampler


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    models = eval_models(cfg, paths)
    require(*models.values())
    for path in models.values():  # every model as its stage wrote it, readable, before any shard is made
        check_recorded(path)
        read_model_meta(path)
    device, extras = _sampling_setup(cfg, paths)  # guide (sampler.guidance != 1), latent decoder
    with tracked("sample", cfg, paths) as t:
        # Shards of another shard size or seed range left in the work directory are not published.
        written = sample_models(models, cfg.sample, shard_sampler(cfg), paths.samples_work, t, progress, device, **extras)
        with atomic_dir(paths.samples) as tmp:
            for name, files in written.items():
                (tmp / name).mkdir()
                for f in map(Path, files):
                    link_or_copy(f, tmp / name / f.name)


def shards(cfg: Config, paths: Paths, missing_only: bool = True) -> list[Shard]:
    """The stage's shards (not yet finished ones by default)."""
    models = eval_models(cfg, paths)
    require(*models.values())
    planned = plan_shards(models, cfg.sample, shard_sampler(cfg), paths.samples_work)
    return [s for s in planned if not (missing_only and shard_done(s, shard_sampler(cfg)))]


@dataclass(frozen=True)
class ShardJob:
    """Job: one shard of the sample stage (one task of its job array)."""

    cfg: Config
    root: str
    shard: Shard

    def __call__(self) -> str:
        with stage_context("sample", self.cfg, self.root) as paths:
            device, extras = _sampling_setup(self.cfg, paths)
            return str(run_shard(self.shard, shard_sampler(self.cfg), self.cfg.sample.batch, progress=False, device=device,
                                 **extras))


def describe(cfg: Config, paths: Paths) -> dict:
    """The protocol and cost of the stage (--dry-run)."""
    out = {"models": list(eval_models(cfg, paths)), "cost": sample_cost(cfg)}
    if is_ar(cfg):
        a = cfg.ar
        tokenizer = registry.get(cfg.pretrain.source).tokenizer if cfg.pretrain.source != "train" else \
            "trained here (in the model file)"
        out["sampler"] = {"name": "var-next-scale (repro.sampling.var)", "tokenizer": tokenizer, "cfg": a.cfg,
                          "cfg_mode": a.cfg_mode, "guided": a.guided, "top_k": a.top_k, "top_p": a.top_p}
    if cfg.sample.protocol != "custom":
        out["protocol"] = protocols.get(cfg.sample.protocol).to_dict()
    return out


def waves(cfg: Config, root: Path, whole: Callable[[bool], Wave]) -> Iterator[Wave]:
    """The shards not yet made as one job array, then the stage here (it only publishes them)."""
    todo = shards(cfg, Paths.of(cfg, root))
    if todo:
        yield Wave("sample-shards", "sample", tuple(ShardJob(cfg, str(root), s) for s in todo))
    yield whole(True)
