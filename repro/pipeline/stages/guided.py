"""Stage `guided`: every guided model's images on the final evaluation's seeds (repro.methods.guidance).

The same seeds, labels and sampler as the unguided models (stage sample), with the variant's correction added inside
each Heun step (repro.sampling.edm Correction; the sampler is not edited). Shards are made in a run directory keyed by
the discriminator file and the guidance settings (runs/guided-<key>/; a rerun continues, a finished shard is never
made twice), then published as samples-guided/<model+variant>/ with samples-guided/guided.json, which says what each
guided model is (generator, discriminator, settings) for the fid stage. With guidance off it writes the empty index
at once. Kernel guidance builds its correction here from the data set and the model's fake bank (no discriminator
file; its run directory is keyed by the banks instead); DCD samples unguided and refines each batch with Langevin
steps along its critic's gradient (the sampler's ``decoder`` hook: pixel-space models only). On a cluster the shards
not yet made go out as one job array (:func:`waves`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from repro.cluster import distributed
from repro.cluster.launcher import Wave
from repro.config import Config, config_hash
from repro.methods.guidance import (GuidedModel, build_correction, dcd_decoder, guidance_settings, guided_models,
                                    kernel_correction, load_bank, sampler_settings)
from repro.nets.checkpoint import load_model, read_model_meta
from repro.nets.discriminators import load_discriminator
from repro.nets.released import sampling_extras
from repro.pipeline.common import in_memory, load_data, require, stage_context, tracked
from repro.pipeline.cost import guidance_cost
from repro.pipeline.stages.fakes import bank_shards
from repro.sampling.generate import image_grid
from repro.sampling.shards import Shard, model_sha256, plan_shards, run_shard, shard_done
from repro.storage.files import atomic_dir, link_or_copy, load_npz, read_json, sha256_file, write_json
from repro.storage.layout import Paths


def _record(cfg: Config, paths: Paths, gm: GuidedModel) -> dict:
    """What the guided model's samples depend on: generator, discriminator (file and what it is) or, for kernel
    guidance, the banks; settings."""
    if gm.variant.method == "kernel":
        require(gm.path, paths.data)
        fakes = bank_shards(cfg, paths, gm.model)
        return {"model": gm.model, "variant": gm.variant.name, "method": gm.variant.title,
                "generator": str(gm.path.relative_to(paths.root)), "generator_sha256": model_sha256(gm.path),
                "discriminator": None, "discriminator_sha256": None, "discriminator_info": {"source": "closed-form"},
                "banks": {"real": str(paths.data.relative_to(paths.root)), "real_sha256": sha256_file(paths.data),
                          "fake": f"fakes/{gm.model}", "fake_sha256": [sha256_file(s.out) for s in fakes]},
                "guidance": guidance_settings(gm.variant, sampler_settings(cfg, gm.variant), cfg.sampler)}
    disc = paths.discriminator(gm.name)
    require(gm.path, disc, paths.discriminators_index)
    index = read_json(paths.discriminators_index)["discriminators"]
    if gm.name not in index:
        raise FileNotFoundError(f"{paths.discriminators}: no discriminator for {gm.name}; run `repro discriminator`")
    return {"model": gm.model, "variant": gm.variant.name, "method": gm.variant.title,
            "generator": str(gm.path.relative_to(paths.root)), "generator_sha256": model_sha256(gm.path),
            "discriminator": str(disc.relative_to(paths.root)), "discriminator_sha256": sha256_file(disc),
            "discriminator_info": index[gm.name], "guidance": guidance_settings(gm.variant, sampler_settings(cfg, gm.variant),
                                                                        cfg.sampler)}


def _work(cfg: Config, paths: Paths, gm: GuidedModel, record: dict) -> list[Shard]:
    """The guided model's shards in the run directory of its discriminator and settings."""
    key = config_hash({"discriminator": record["discriminator_sha256"], "guidance": record["guidance"],
                       **({"banks": record["banks"]} if "banks" in record else {})})
    return plan_shards({gm.name: gm.path}, cfg.sample, cfg.sampler, paths.guided_work(key))


def _correction_and_extras(cfg: Config, paths: Paths, gm: GuidedModel, device: str):
    arch, info = read_model_meta(gm.path)
    extras = sampling_extras(cfg, paths.root, arch, info, device=device)
    if gm.variant.method == "kernel":
        fake, _ = load_bank(bank_shards(cfg, paths, gm.model))
        denoise = None
        if cfg.kernel.where == "denoised":
            net, _, _ = load_model(gm.path, device)
            denoise = net.float().eval().requires_grad_(False)
        return kernel_correction(cfg.kernel, in_memory(load_data(paths), "kernel guidance").images, fake, device, denoise), extras
    ext = read_json(paths.discriminators_index)["discriminators"][gm.name]
    extractor = paths.checkpoint(ext["extractor_file"]) if ext.get("extractor_file") else None
    disc, _ = load_discriminator(paths.discriminator(gm.name), extractor, ext.get("extractor_sha256"), device)
    if gm.variant.method == "dcd":
        if "decoder" in extras:
            raise ValueError(f"{gm.name}: DCD is wired in pixel space, and this model samples latents. Fix: use dcd "
                             "with a pixel-space model, or another variant")
        return None, {**extras, "decoder": dcd_decoder(cfg.dcd, disc)}
    correction = build_correction(gm.variant, sampler_settings(cfg, gm.variant), cfg.sampler, disc)
    return correction, extras


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    gms = guided_models(cfg, paths)
    if not gms:  # guidance off: an empty index, at once
        if distributed.is_main():
            with atomic_dir(paths.guided_samples) as tmp:
                write_json(tmp / paths.guided_index.name, {"guided": {}})
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = {gm.name: _record(cfg, paths, gm) for gm in gms}
    shards = {gm.name: _work(cfg, paths, gm, records[gm.name]) for gm in gms}
    rank, world = distributed.rank(), distributed.world_size()
    with tracked("guided", cfg, paths) as t:
        todo = [(gm, s) for gm in gms for s in shards[gm.name] if not shard_done(s, cfg.sampler)]
        made: dict[str, tuple] = {}
        for k, (gm, s) in enumerate(todo):  # rank r makes the unfinished shards k with k % world == r
            if k % world == rank:
                if gm.name not in made:
                    made = {gm.name: _correction_and_extras(cfg, paths, gm, device)}  # one discriminator at a time
                correction, extras = made[gm.name]
                run_shard(s, cfg.sampler, cfg.sample.batch, progress, device, correction=correction, **extras)
        distributed.barrier()
        if not distributed.is_main():
            return
        with atomic_dir(paths.guided_samples) as tmp:
            for gm in gms:
                (tmp / gm.name).mkdir()
                for s in shards[gm.name]:
                    link_or_copy(s.out, tmp / gm.name / s.out.name)
                t.log_image(image_grid(load_npz(shards[gm.name][0].out)["images"][:80], ncol=20),
                            f"{gm.name.replace('+', '_')}.png")
            write_json(tmp / paths.guided_index.name, {"guided": records})
        t.log_metrics({"guided_models": len(gms)})


def guided_shards(cfg: Config, paths: Paths) -> tuple[dict[str, dict], list[Shard]]:
    """The published guided models (samples-guided/guided.json) and their shards, for the fid stage."""
    if not cfg.guidance.evaluate:
        return {}, []
    require(paths.guided_index)
    records = read_json(paths.guided_index)["guided"]
    gms = guided_models(cfg, paths)
    missing = [gm.name for gm in gms if gm.name not in records]
    if missing:
        raise FileNotFoundError(f"{paths.guided_samples}: no samples of {', '.join(missing)}; run `repro guided`")
    shards = plan_shards({gm.name: gm.path for gm in gms}, cfg.sample, cfg.sampler, paths.guided_samples)
    return {gm.name: records[gm.name] for gm in gms}, shards


@dataclass(frozen=True)
class GuidedShardJob:
    """Job: one shard of one guided model (one task of the stage's job array)."""

    cfg: Config
    root: str
    name: str
    shard: Shard

    def __call__(self) -> str:
        with stage_context("guided", self.cfg, self.root) as paths:
            gm = next(g for g in guided_models(self.cfg, paths) if g.name == self.name)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            correction, extras = _correction_and_extras(self.cfg, paths, gm, device)
            return str(run_shard(self.shard, self.cfg.sampler, self.cfg.sample.batch, progress=False, device=device,
                                 correction=correction, **extras))


def describe(cfg: Config, paths: Paths) -> dict:
    """The guided models, their settings and the cost (--dry-run)."""
    from repro.methods.guidance import describe as guided

    return {"guided_models": guided(cfg, paths), "evaluation_protocol": cfg.sample.protocol,
            "cost": guidance_cost(cfg, guided(cfg, paths))["guided"]}


def waves(cfg: Config, root: Path, whole: Callable[[bool], Wave]) -> Iterator[Wave]:
    """The shards not yet made as one job array, then the stage here (it only publishes them)."""
    paths = Paths.of(cfg, root)
    todo = []
    for gm in guided_models(cfg, paths):
        todo += [GuidedShardJob(cfg, str(root), gm.name, s) for s in _work(cfg, paths, gm, _record(cfg, paths, gm))
                 if not shard_done(s, cfg.sampler)]
    if todo:
        yield Wave("guided-shards", "guided", tuple(todo))
    yield whole(True)
