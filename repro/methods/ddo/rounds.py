"""DDO self-play rounds (Zheng et al. 2025, Section 3.3 and Appendix C/D), for diffusion models.

Round r (reference = the previous round's best, round 1's = the base model):
  1. the reference generates a fresh bank of fake samples, offline, paired 1:1 with the real images
     (fake i carries real image i's label, seed fake_first_seed + r * SEED_BLOCK + i);
  2. theta starts from the reference (dropout off, fp32, a fresh optimizer) and trains on pairs with the DDO loss
     for the round's budget;
  3. every ``eval_every_nimg`` images the metric is measured on the selection seeds (disjoint from the final
     evaluation's); the best checkpoint of the round becomes the next reference.

The optional MLE control runs the same rounds, optimizer, steps, seeds and selection with one thing changed:
the EDM loss on real images replaces the DDO loss (the fake half of each pair is replaced by more real
images, so each step sees as many images). It is the fair baseline: "the base trained further". Tuned
(ddo.control_lrs: a learning-rate search per round) and at DDO's compute rather than its steps
(ddo.control_budget: compute), it is the strongest such baseline: repro.methods.ddo.control.

Every round resumes where it stopped: its run directory holds the fake bank, the training state at the last
evaluation (or at the step where a preemption signal stopped it, see repro.cluster.preempt), the best checkpoint, and a
``done.json`` once the round is finished.

Several processes (repro.cluster.distributed): the fake bank and the selection scores are split over the ranks by
whole sampling batches and gathered, so they are bitwise those of one process; each step's global batch is
drawn whole on every rank, each rank trains on its contiguous slice and DDP averages the gradients, so the
weights equal one process's up to the order of float sums. Only rank 0 writes files and logs.

An alpha/beta sweep (ddo.sweep_alpha / ddo.sweep_beta) makes a DDO round three steps, each resumable:
``prepare_round`` (the round's fake bank and the reference's selection score, once per round), one
``train_candidate`` per (alpha, beta) of the grid (a plain round in its own directory, on the shared bank: the
candidates differ only in alpha and beta, with the same data order and noise), and ``select_round`` (the candidate
with the best selection score becomes the round's best, in the round directory where an unswept round keeps it,
so the next round and everything downstream read it unchanged). The candidates are independent: on a cluster
they go out as one job array (repro.cluster.launcher); here they run one after another.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from repro.cluster import distributed, preempt
from repro.config import SEED_BLOCK, DDOConfig, SamplerConfig
from repro.datasets.images import Dataset
from repro.methods.ddo.family import (
    control_step_loss,
    ddo_step_loss,
    freeze_extras,
    make_fake_bank,
    selection_score,
)
from repro.datasets.sharded import FakeShards, ShardedDataset, index_fake_shards, write_fake_shards
from repro.methods.ddo.loss import ddo_diffusion_loss
from repro.methods.losses import draw_sigma_noise, edm_loss
from repro.methods.training import (
    ema_beta,
    ema_update,
    for_training,
    load_state,
    lr_decay,
    power_ema_beta,
    power_ema_gamma,
    rampup_lr,
    save_state,
    sharded_batch,
    step_generator,
    training_precision,
)
from repro.nets.checkpoint import load_model, save_model
from repro.nets.layers import disable_dropout
from repro.sampling.generate import from_uint8, generate_images, image_grid
from repro.storage.files import atomic_path, load_npz, read_json, save_npz, write_json
from repro.storage.layout import RoundDir

log = logging.getLogger(__name__)

KINDS = ("ddo", "control")


@dataclass
class RoundResult:
    kind: str
    round: int
    best_path: Path
    best_score: float
    best_nimg: int
    ref_score: float | None
    evals: list[dict]
    seconds: float
    info: dict = field(default_factory=dict)  # what rounds.json's history adds (a tuned control round's choice)


def P_std_of_round(cfg: DDOConfig, round_: int) -> float:
    """The noise-level spread of round ``round_``: ddo.P_std, or the value ddo.P_std_rounds sets from an earlier
    round on (DDO widens it in late rounds: EDM2-S 1.6 -> 3.0 from round 17, per a third-party transcription)."""
    later = [r for r in cfg.P_std_rounds if int(r) <= round_]
    return float(cfg.P_std_rounds[max(later, key=int)]) if later else cfg.P_std


def fake_seeds(cfg: DDOConfig, round_: int, n: int) -> np.ndarray:
    return cfg.fake_first_seed + round_ * SEED_BLOCK + np.arange(n)


def selection_seeds(cfg: DDOConfig) -> np.ndarray:
    return cfg.selection_first_seed + np.arange(cfg.selection_samples)


def eval_forward(net: torch.nn.Module, *args):
    """``net(*args)`` in eval mode (gradients still flow), then back to the mode it was in."""
    mode = net.training
    net.eval()
    try:
        return net(*args)
    finally:
        net.train(mode)


def make_fake_shards(ref: torch.nn.Module, data: ShardedDataset, label_dim: int, first_seed: int, bank: Path,
                     sampler: SamplerConfig, progress: bool, device="cpu") -> FakeShards:
    """The fake bank of sharded data, as shards beside ``bank`` (repro.datasets.sharded): each rank makes its data
    shards' fakes, one shard in memory at a time; fakes of a latent model stay latents (float32). No collective
    moves images; rank 0 writes the index once every rank is done."""
    def generate(seeds: np.ndarray, labels: np.ndarray) -> np.ndarray:
        batches = generate_images(ref, seeds, img_shape=data.shape, label_dim=label_dim, sampler=sampler,
                                  labels=labels if label_dim else None, progress=progress and distributed.is_main(),
                                  desc="fake shard", device=device,
                                  decoder=(lambda x: x.float()) if data.latent else None)
        return np.concatenate([imgs.numpy() for _, imgs, _ in batches])

    if not bank.is_file():
        write_fake_shards(bank, data, generate, first_seed, distributed.rank(), distributed.world_size())
        distributed.barrier()
        if distributed.is_main():
            index_fake_shards(bank, data, first_seed)
        distributed.barrier()
    return FakeShards(bank, data)


def train_round(kind: str, round_: int, ref_path: Path, data: Dataset | ShardedDataset, cfg: DDOConfig, sampler: SamplerConfig,
                sigma_data: float, metric, run_dir: Path, tracker, progress: bool = True,
                ref_score: float | None = None) -> RoundResult:
    """Run (or resume, or reuse if finished) one round of ``kind`` ('ddo' or 'control') in ``run_dir``.

    A plain round: a tuned control round (ddo.control_lrs, ddo.control_budget: compute) is a learning-rate search
    over these; callers go through repro.methods.ddo.control.run_round, which picks."""
    from tqdm.auto import tqdm

    assert kind in KINDS, kind
    run_dir.mkdir(parents=True, exist_ok=True)
    rd = RoundDir(run_dir)
    done_path, best_path, state_path = rd.done, rd.best, rd.state
    if done_path.is_file():
        d = read_json(done_path)
        log.info("%s round %d already finished (%s): best %.4f at %d images", kind, round_, run_dir,
                 d["best_score"], d["best_nimg"])
        return RoundResult(kind, round_, best_path, d["best_score"], d["best_nimg"], d.get("ref_score"), d["evals"],
                           d["seconds"])

    t0 = time.time()
    mine = distributed.batch_slice(cfg.batch, "ddo.batch")  # this rank's part of each step's batch
    device = distributed.device()
    ref, arch, _ = load_model(ref_path, device)
    ref = for_training(ref)  # float32 (the paper disables mixed precision); released EDM2 weights are float16
    disable_dropout(ref)
    ref.requires_grad_(False)
    label_dim = arch.get("label_dim", 0)  # a VAR model: classes are its own (num_classes)
    sharded = isinstance(data, ShardedDataset)
    n = len(data) if sharded else len(data.images)

    # 1. The fake bank of this round, from the reference (DDO only); saved as soon as it is complete.
    fakes = None
    if kind == "ddo" and sharded:  # as shards beside the index rd.fakes, each rank its own
        fakes = make_fake_shards(ref, data, label_dim, int(fake_seeds(cfg, round_, 1)[0]), rd.fakes, sampler,
                                 progress, device)
        if not data.latent:
            tracker.log_image(image_grid(fakes.first(128)), f"fakes_round{round_}.png")
        preempt.check(lambda: None, f"in {kind} round {round_} after the fake bank")
    elif kind == "ddo":
        bank = rd.fakes
        if bank.is_file():
            fakes = dict(load_npz(bank))
        else:
            log.info("ddo round %d: generating %d fakes from the reference into %s", round_, n, bank)
            fakes = make_fake_bank(ref, data, label_dim, fake_seeds(cfg, round_, n), sampler, progress, device)
            if distributed.is_main():
                save_npz(bank, **fakes, seeds=fake_seeds(cfg, round_, n))
        tracker.log_image(image_grid(fakes["images"][:128]), f"fakes_round{round_}.png")
        preempt.check(lambda: None, f"in {kind} round {round_} after the fake bank")  # nothing else to save yet

    # 2. theta starts from the reference; fresh optimizer; dropout off; fp32.
    net = freeze_extras(copy.deepcopy(ref).train().requires_grad_(True))
    disable_dropout(net)
    train_net = distributed.wrap_ddp(net)  # several processes: averaged gradients
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_halflife_nimg > 0 or cfg.ema_std else None
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    if ref_score is None:
        ref_score = selection_score(metric, ref, selection_seeds(cfg), label_dim, data.shape, sampler)
    # The reference is a candidate of its own round: a round whose checkpoints are all worse keeps it.
    nimg, step, evals = 0, 0, []
    best = {"score": ref_score, "nimg": 0}
    if distributed.is_main() and not state_path.is_file():
        with atomic_path(best_path) as tmp:
            tmp.write_bytes(Path(ref_path).read_bytes())
    if state_path.is_file():
        s = load_state(state_path)
        net.load_state_dict(s["net"]), opt.load_state_dict(s["opt"])
        if ema is not None:
            ema.load_state_dict(s["ema"])
        nimg, step = int(s["nimg"]), int(s["step"])
        evals = json.loads(s["evals"])
        best = json.loads(s["best"])
        log.info("%s round %d: resuming from %s at %d images", kind, round_, state_path, nimg)

    def save() -> None:  # the whole state at this step boundary (rank 0 writes it)
        if distributed.is_main():
            save_state(state_path, net=net.state_dict(), opt=opt.state_dict(), nimg=nimg, step=step,
                       evals=json.dumps(evals), best=json.dumps(best),
                       **({"ema": ema.state_dict()} if ema is not None else {}))

    beta_ema = ema_beta(cfg.batch, cfg.ema_halflife_nimg)
    gamma = power_ema_gamma(cfg.ema_std) if cfg.ema_std else None
    P_std = P_std_of_round(cfg, round_)
    kind_id = KINDS.index(kind)
    order = data.order((cfg.seed, kind_id, round_)) if sharded else None  # sharded: a seeded order, per rank
    bar = tqdm(total=cfg.nimg_per_round, initial=nimg, desc=f"{kind} round {round_}", unit="img",
               disable=not progress or not distributed.is_main())
    with training_precision(cfg.precision, device) as autocast:  # fp32, TF32 off, unless ddo.precision
        while nimg < cfg.nimg_per_round:
            preempt.check(save, f"in {kind} round {round_} at {nimg} images")
            # 2a. Draws depend on (seed, kind, round, step) only: resumable and reproducible. Every rank draws the
            #     whole batch, then takes its slice.
            g = step_generator(cfg.seed, kind_id, round_, step)
            if order is not None and kind == "ddo":  # sharded (diffusion): this rank reads only its items
                sigma, eps = draw_sigma_noise((cfg.batch, *data.shape), cfg.P_mean, P_std, generator=g)
                runs = order.step(step, cfg.batch, mine)  # this rank's items only; fake (j, i) pairs real (j, i)
                x_real, y_real = sharded_batch(data, runs, label_dim, g, cfg.batch, mine)
                fake = torch.as_tensor(fakes.take(runs))
                x_fake = (fake.float() if data.latent else from_uint8(fake)).to(device)
                x_real, y_real = x_real.to(device), (y_real.to(device) if y_real is not None else None)
                with autocast():
                    loss, stats = ddo_diffusion_loss(train_net, ref, x_real, y_real, x_fake, y_real,
                                                     sigma[mine].to(device), eps[mine].to(device), alpha=cfg.alpha,
                                                     beta=cfg.beta, sigma_data=sigma_data,
                                                     net_fake=partial(eval_forward, train_net))
            elif order is not None:  # the control on shards: twice the items per step, as in memory
                mine2 = distributed.batch_slice(2 * cfg.batch, "ddo.batch")
                sigma, eps = draw_sigma_noise((2 * cfg.batch, *data.shape), cfg.P_mean, P_std, generator=g)
                x, y = sharded_batch(data, order.step(step, 2 * cfg.batch, mine2), label_dim, g, 2 * cfg.batch, mine2)
                x = x.to(device)
                y = y.to(device) if y is not None else None
                with autocast():
                    loss = edm_loss(train_net, x, y, sigma[mine2].to(device), eps[mine2].to(device),
                                    sigma_data).mean()
                stats = {}
            else:  # in memory: both families (repro.methods.ddo.family)
                idx = torch.randint(n, [cfg.batch], generator=g)
                with autocast():
                    if kind == "ddo":
                        loss, stats = ddo_step_loss(train_net, ref, data, fakes, idx, mine, g, cfg, sampler, P_std,
                                                    sigma_data, label_dim, device, partial(eval_forward, train_net))
                    else:
                        loss, stats = control_step_loss(train_net, data, idx, g, cfg, sampler, P_std, sigma_data,
                                                        label_dim, device), {}
            # 2b. Adam step with warm-up (the loss is this rank's mean; DDP averages the gradients), EMA.
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = rampup_lr(cfg.lr, nimg, cfg.lr_rampup_nimg) * (
                    lr_decay(nimg, cfg.lr_decay_nimg) if cfg.lr_schedule == "inverse-sqrt" else 1.0)
            opt.step()
            if ema is not None:
                ema_update(ema, net, power_ema_beta(gamma, nimg + cfg.batch, cfg.batch) if gamma else beta_ema)
            nimg, step = nimg + cfg.batch, step + 1
            bar.update(cfg.batch)
            if step % 10 == 0 or nimg >= cfg.nimg_per_round:
                names = ["loss", *stats]
                tracker.log_metrics(dict(zip(names, distributed.all_mean([loss.item(), *stats.values()]))), step=nimg)
            # 3. Evaluate a checkpoint on the selection seeds; keep the best; save the state to resume from.
            if nimg % cfg.eval_every_nimg < cfg.batch or nimg >= cfg.nimg_per_round:
                model = ema if ema is not None else net
                score = selection_score(metric, model.eval(), selection_seeds(cfg), label_dim, data.shape, sampler)
                net.train()
                evals.append({"nimg": nimg, "score": score})
                tracker.log_metrics({"selection_score": score}, step=nimg)
                bar.set_postfix(score=f"{score:.3f}", best=f"{min(best['score'], score):.3f}")
                if score < best["score"]:
                    best = {"score": score, "nimg": nimg}
                    if distributed.is_main():
                        save_model(best_path, model, arch, {"kind": kind, "round": round_, "nimg": nimg, "score": score})
                save()
    bar.close()
    seconds = round(time.time() - t0, 1)
    result = RoundResult(kind, round_, best_path, best["score"], best["nimg"], ref_score, evals, seconds)
    if distributed.is_main():
        write_json(done_path, {"best_score": best["score"], "best_nimg": best["nimg"], "ref_score": ref_score,
                               "evals": evals, "seconds": seconds})
        state_path.unlink(missing_ok=True)  # the best checkpoint and done.json are all a finished round needs
    distributed.barrier()  # the other ranks read best_path next
    log.info("%s round %d: best selection score %.4f at %d images (reference %.4f), %.0fs", kind, round_,
             best["score"], best["nimg"], ref_score, seconds)
    return result


# ----------------------------------------------------------------------------------------------------------
# Alpha/beta sweeps inside a DDO round.


