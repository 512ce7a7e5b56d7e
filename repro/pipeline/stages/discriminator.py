"""Stage `discriminator`: one noise-conditioned discriminator per guided model (repro.methods.guidance), then
models/guidance/.

A trained discriminator learns real images (the data set) against its model's fake bank (DG's BCE), or the real
images through the frozen model (improved DG's objective), with repro.methods.dg_train: resumable and preemptible in
its run directory (keyed by the settings, the model, the data and the bank), on several processes under torchrun.
A released one (discriminator.head) is fetched, verified and converted. DCD's critic (variant dcd) is a fresh
discriminator of the same kind trained here with the WGAN-GP loss on the data vs the fake bank
(repro.methods.guidance.train_dcd_critic: in memory, retrained when the stage reruns). Kernel guidance (variant
kernel) has nothing to train: its index entry says so and no file is written. Each other is written as
models/guidance/<model+variant>.safetensors with its spec, and models/guidance/discriminators.json says what each
is. With guidance off it writes the empty index at once. On a cluster the discriminators still to train go out as
one job array (:func:`waves`), then the stage publishes them here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from repro.cluster import distributed
from repro.cluster.launcher import Wave
from repro.config import Config, config_hash
from repro.methods.dg_train import OBJECTIVES, DGTrainConfig, load_trainable, train_discriminator
from repro.methods.guidance import (GuidedModel, dg_train_settings, guided_models, load_bank, needs_fakes,
                                    needs_training, new_discriminator, released_discriminator, released_head,
                                    train_dcd_critic)
from repro.nets.checkpoint import load_model, read_model_meta
from repro.nets.discriminators import save_discriminator, spec_of
from repro.pipeline.common import in_memory, load_data, log_data_input, require, stage_context, tracked
from repro.pipeline.cost import guidance_cost
from repro.pipeline.stages.fakes import bank_shards
from repro.sampling.shards import model_sha256
from repro.storage.files import atomic_dir, read_json, sha256_file, write_json
from repro.storage.layout import Paths

log = logging.getLogger("repro.pipeline")


@dataclass
class _Job:
    """One discriminator to train: its model's network, a fresh discriminator, its run directory and inputs."""

    gm: GuidedModel
    disc: object
    info: dict
    settings: dict
    run_dir: Path
    fakes: list


def _plan(cfg: Config, paths: Paths, gm: GuidedModel, progress: bool) -> _Job:
    arch, _ = read_model_meta(gm.path)
    disc, info = new_discriminator(cfg, arch, paths.root, progress)
    settings = dg_train_settings(cfg, gm.variant.objective)
    if settings["objective"] == "mse" and arch.get("label_dim") and not cfg.discriminator.conditional:
        raise ValueError(f"{gm.name}: improved DG trains through the model's denoiser, which is class-conditional "
                         "here, so the discriminator must see the labels too. Fix: set discriminator.conditional: true")
    fakes = bank_shards(cfg, paths, gm.model) if needs_fakes(cfg, gm) else []
    key = config_hash({"train": settings, "spec": spec_of(disc), "info": info, "model": model_sha256(gm.path),
                       "data": sha256_file(paths.data), "fakes": [sha256_file(s.out) for s in fakes]})
    return _Job(gm, disc, info, settings, paths.run_dir("discriminator", key), fakes)


def _train(cfg: Config, paths: Paths, job: _Job, tracker, progress: bool) -> Path:
    """Train (or resume, or find finished) one discriminator; its last epoch's checkpoint."""
    done = job.run_dir / "done.json"
    if done.is_file():
        log.info("discriminator %s: already trained in %s", job.gm.name, job.run_dir)
        return job.run_dir / read_json(done)["checkpoints"][-1]
    data = in_memory(load_data(paths), "the discriminator stage")
    label_dim = int(read_model_meta(job.gm.path)[0].get("label_dim") or 0) if cfg.discriminator.conditional else 0
    fake, fake_labels = load_bank(job.fakes) if job.fakes else (None, None)
    denoise = None
    if job.settings["objective"] == "mse":
        net, _, _ = load_model(job.gm.path, distributed.device())
        denoise = net.float().eval().requires_grad_(False)
    log.info("discriminator %s: training (%s, %d epochs) in %s", job.gm.name, job.settings["objective"],
             job.settings["epochs"], job.run_dir)
    run = train_discriminator(job.disc, data.images, fake, DGTrainConfig(**job.settings), job.run_dir, tracker,
                              real_labels=data.labels, fake_labels=fake_labels, label_dim=label_dim, denoise=denoise,
                              progress=progress)
    return run.checkpoints[-1]


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    gms = guided_models(cfg, paths)
    if not gms:  # guidance off: an empty index, at once
        if distributed.is_main():
            with atomic_dir(paths.discriminators) as tmp:
                write_json(tmp / paths.discriminators_index.name, {"discriminators": {}})
        return
    require(*(gm.path for gm in gms))
    index, files = {}, {}
    with tracked("discriminator", cfg, paths) as t:
        if any(needs_training(cfg, gm) for gm in gms):
            require(paths.data)
            log_data_input(t, paths)
        for gm in gms:
            arch, _ = read_model_meta(gm.path)
            entry = {"model": gm.model, "variant": gm.variant.name, "model_sha256": model_sha256(gm.path)}
            if gm.variant.method == "kernel":  # closed form: nothing to train or write
                index[gm.name] = {**entry, "source": "closed-form", "fakes": f"fakes/{gm.model}"}
                continue
            if released_head(cfg, gm):
                disc, info = released_discriminator(cfg, arch, paths.root, progress)
            elif gm.variant.method == "dcd":
                disc, info = _dcd_critic(cfg, paths, gm, arch, t, progress)
            else:
                job = _plan(cfg, paths, gm, progress)
                with t.child(gm.name, params=job.settings, tags={"guided_model": gm.name}) as child:
                    child.set_tags({"run_dir": job.run_dir})
                    last = _train(cfg, paths, job, child, progress)
                disc, info = job.disc, {**job.info, "source": "trained", "objective": job.settings["objective"],
                                        "epochs": job.settings["epochs"], "checkpoint": last.name,
                                        "fakes": f"fakes/{gm.model}" if job.fakes else None}
                load_trainable(disc, last)
            entry.update(info)
            index[gm.name], files[gm.name] = entry, disc
        if distributed.is_main():
            with atomic_dir(paths.discriminators) as tmp:
                for name, disc in files.items():
                    save_discriminator(tmp / paths.discriminator(name).name, disc, index[name])
                    index[name]["sha256"] = sha256_file(tmp / paths.discriminator(name).name)
                write_json(tmp / paths.discriminators_index.name, {"discriminators": index})
            log.info("discriminator: wrote %s (%s)", paths.discriminators, ", ".join(index))
        distributed.barrier()


def _dcd_critic(cfg: Config, paths: Paths, gm: GuidedModel, arch: dict, tracker, progress: bool):
    """DCD's WGAN-GP critic of ``gm``: a fresh discriminator of discriminator.arch (initialised from dcd.seed),
    always unconditional (DCD's critic sees images only; its CIFAR-10 rows are unconditional), trained in memory."""
    import dataclasses

    import torch

    torch.manual_seed(cfg.dcd.seed)
    uncond = dataclasses.replace(cfg, discriminator=dataclasses.replace(cfg.discriminator, conditional=False))
    disc, info = new_discriminator(uncond, arch, paths.root, progress)
    data = in_memory(load_data(paths), "the discriminator stage")
    fake, _ = load_bank(bank_shards(cfg, paths, gm.model))
    log.info("discriminator %s: training DCD's critic (wgan-gp, %d steps)", gm.name, cfg.dcd.critic_steps)
    with tracker.child(gm.name, params={"critic_steps": cfg.dcd.critic_steps}, tags={"guided_model": gm.name}) as c:
        hist = train_dcd_critic(disc, data.images, fake, cfg.dcd, distributed.device(), c)
    return disc, {**info, "source": "trained", "objective": "wgan-gp", "steps": cfg.dcd.critic_steps,
                  "last_wasserstein": hist[-1]["wasserstein"], "fakes": f"fakes/{gm.model}"}


@dataclass(frozen=True)
class TrainJob:
    """Job: train one guided model's discriminator (one task of the stage's job array)."""

    cfg: Config
    root: str
    name: str

    def __call__(self) -> str:
        with stage_context("discriminator", self.cfg, self.root) as paths:
            gm = next(g for g in guided_models(self.cfg, paths) if g.name == self.name)
            job = _plan(self.cfg, paths, gm, progress=False)
            with tracked("discriminator", self.cfg, paths, extra_hash={"guided_model": gm.name}) as t:
                t.set_tags({"run_dir": job.run_dir, "guided_model": gm.name})
                return str(_train(self.cfg, paths, job, t, progress=False))


def describe(cfg: Config, paths: Paths) -> dict:
    """What would be trained or fetched, and the cost (--dry-run)."""
    from repro.methods.guidance import describe as guided

    return {"discriminators": guided(cfg, paths), "cost": guidance_cost(cfg, guided(cfg, paths))["discriminator"]}


def waves(cfg: Config, root: Path, whole: Callable[[bool], Wave]) -> Iterator[Wave]:
    """The discriminators still to train as one job array (their extractor fetched here first), then the stage
    here (it finds them trained and writes models/guidance)."""
    paths = Paths.of(cfg, root)
    todo = []
    for gm in guided_models(cfg, paths):
        if needs_training(cfg, gm) and gm.variant.objective in OBJECTIVES:  # DCD's critic trains in the stage
            job = _plan(cfg, paths, gm, progress=True)  # fetches and pins the extractor here, before any job
            if not (job.run_dir / "done.json").is_file():
                todo.append(TrainJob(cfg, str(root), gm.name))
    if todo:
        yield Wave("discriminators", "discriminator", tuple(todo))
    yield whole(True)
