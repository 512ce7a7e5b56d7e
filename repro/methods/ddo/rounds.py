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
images, so each step sees as many images). It is the fair baseline: "the base trained further".

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
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from repro.cluster import distributed, preempt
from repro.config import SEED_BLOCK, DDOConfig, SamplerConfig
from repro.datasets.images import Dataset
from repro.storage.files import atomic_path, link_or_copy, load_model, load_npz, save_model, save_npz, write_json
from repro.methods.losses import ddo_diffusion_loss, draw_sigma_noise, edm_loss
from repro.nets.edm import disable_dropout
from repro.sampling.edm import from_uint8, generate_images, image_grid, one_hot
from repro.methods.pretrain import ema_beta, ema_update, load_state, rampup_lr, save_state, step_generator

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


def fake_seeds(cfg: DDOConfig, round_: int, n: int) -> np.ndarray:
    return cfg.fake_first_seed + round_ * SEED_BLOCK + np.arange(n)


def selection_seeds(cfg: DDOConfig) -> np.ndarray:
    return cfg.selection_first_seed + np.arange(cfg.selection_samples)


def make_fake_bank(ref: torch.nn.Module, data: Dataset, label_dim: int, seeds: np.ndarray, sampler: SamplerConfig,
                   progress: bool, device="cpu") -> np.ndarray:
    """Generate one fake per real image, with the real image's label (the 1:1 pairing).

    With several processes each rank generates its share of the batches and every rank gets the whole bank.
    """
    labels = data.labels if label_dim else None
    batches = generate_images(ref, seeds, img_shape=data.shape, label_dim=label_dim, sampler=sampler, labels=labels,
                              progress=progress and distributed.is_main(), desc="fake bank", device=device,
                              part=(distributed.rank(), distributed.world_size()))
    return np.concatenate(distributed.gather_chunks([imgs.numpy() for _, imgs, _ in batches]))


def train_round(kind: str, round_: int, ref_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig,
                sigma_data: float, metric, run_dir: Path, tracker, progress: bool = True,
                ref_score: float | None = None) -> RoundResult:
    """Run (or resume, or reuse if finished) one round of ``kind`` ('ddo' or 'control') in ``run_dir``."""
    from tqdm.auto import tqdm

    assert kind in KINDS, kind
    run_dir.mkdir(parents=True, exist_ok=True)
    done_path, best_path, state_path = run_dir / "done.json", run_dir / "best.safetensors", run_dir / "state.pt"
    if done_path.is_file():
        d = json.loads(done_path.read_text())
        log.info("%s round %d already finished (%s): best %.4f at %d images", kind, round_, run_dir,
                 d["best_score"], d["best_nimg"])
        return RoundResult(kind, round_, best_path, d["best_score"], d["best_nimg"], d.get("ref_score"), d["evals"],
                           d["seconds"])

    t0 = time.time()
    mine = distributed.batch_slice(cfg.batch, "ddo.batch")  # this rank's part of each step's batch
    device = distributed.device()
    ref, arch, _ = load_model(ref_path, device)
    disable_dropout(ref)
    ref.requires_grad_(False)
    label_dim = arch["label_dim"]
    n = len(data.images)

    # 1. The fake bank of this round, from the reference (DDO only); saved as soon as it is complete.
    fakes = None
    if kind == "ddo":
        bank = run_dir / "fakes.npz"
        if bank.is_file():
            fakes = load_npz(bank)["images"]
        else:
            log.info("ddo round %d: generating %d fakes from the reference into %s", round_, n, bank)
            fakes = make_fake_bank(ref, data, label_dim, fake_seeds(cfg, round_, n), sampler, progress, device)
            if distributed.is_main():
                save_npz(bank, images=fakes, seeds=fake_seeds(cfg, round_, n))
        tracker.log_image(image_grid(fakes[:128]), f"fakes_round{round_}.png")
        preempt.check(lambda: None, f"in {kind} round {round_} after the fake bank")  # nothing else to save yet

    # 2. theta starts from the reference; fresh optimizer; dropout off; fp32.
    net = copy.deepcopy(ref).train().requires_grad_(True)
    disable_dropout(net)
    train_net = distributed.wrap_ddp(net)  # several processes: averaged gradients
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_halflife_nimg > 0 else None
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    nimg, step, evals = 0, 0, []
    best = {"score": float("inf"), "nimg": -1}
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

    if ref_score is None:
        ref_score = metric.score(ref, selection_seeds(cfg), label_dim, data.shape, sampler)

    beta_ema = ema_beta(cfg.batch, cfg.ema_halflife_nimg)
    kind_id = KINDS.index(kind)
    bar = tqdm(total=cfg.nimg_per_round, initial=nimg, desc=f"{kind} round {round_}", unit="img",
               disable=not progress or not distributed.is_main())
    while nimg < cfg.nimg_per_round:
        preempt.check(save, f"in {kind} round {round_} at {nimg} images")
        # 2a. Draws depend on (seed, kind, round, step) only: resumable and reproducible. Every rank draws the
        #     whole batch, then takes its slice.
        g = step_generator(cfg.seed, kind_id, round_, step)
        idx = torch.randint(n, [cfg.batch], generator=g)
        if kind == "ddo":
            sigma, eps = draw_sigma_noise((cfg.batch, *data.shape), cfg.P_mean, cfg.P_std, generator=g)
            i = idx[mine].numpy()
            x_real, x_fake = from_uint8(data.images[i]).to(device), from_uint8(fakes[i]).to(device)
            y_real = one_hot(torch.as_tensor(data.labels[i]), label_dim)  # fake i is paired with real i: same label
            y_real = y_real.to(device) if y_real is not None else None
            loss, stats = ddo_diffusion_loss(train_net, ref, x_real, y_real, x_fake, y_real, sigma[mine].to(device),
                                             eps[mine].to(device), alpha=cfg.alpha, beta=cfg.beta,
                                             sigma_data=sigma_data)
        else:
            idx2 = torch.randint(n, [cfg.batch], generator=g)
            sigma, eps = draw_sigma_noise((2 * cfg.batch, *data.shape), cfg.P_mean, cfg.P_std, generator=g)
            mine2 = distributed.batch_slice(2 * cfg.batch, "ddo.batch")
            i = torch.cat([idx, idx2])[mine2].numpy()
            x = from_uint8(data.images[i]).to(device)
            y = one_hot(torch.as_tensor(data.labels[i]), label_dim)
            y = y.to(device) if y is not None else None
            loss = edm_loss(train_net, x, y, sigma[mine2].to(device), eps[mine2].to(device), sigma_data).mean()
            stats = {}
        # 2b. Adam step with warm-up (the loss is this rank's mean; DDP averages the gradients), EMA.
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = rampup_lr(cfg.lr, nimg, cfg.lr_rampup_nimg)
        opt.step()
        if ema is not None:
            ema_update(ema, net, beta_ema)
        nimg, step = nimg + cfg.batch, step + 1
        bar.update(cfg.batch)
        if step % 10 == 0 or nimg >= cfg.nimg_per_round:
            names = ["loss", *stats]
            tracker.log_metrics(dict(zip(names, distributed.all_mean([loss.item(), *stats.values()]))), step=nimg)
        # 3. Evaluate a checkpoint on the selection seeds; keep the best; save the state to resume from.
        if nimg % cfg.eval_every_nimg < cfg.batch or nimg >= cfg.nimg_per_round:
            model = ema if ema is not None else net
            score = metric.score(model.eval(), selection_seeds(cfg), label_dim, data.shape, sampler)
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


def sweep_grid(cfg: DDOConfig) -> list[tuple[float, float]]:
    """The (alpha, beta) candidates of a swept round, in grid order (alpha outer); [] when nothing is swept."""
    if not cfg.sweep_alpha and not cfg.sweep_beta:
        return []
    return [(a, b) for a in cfg.sweep_alpha or (cfg.alpha,) for b in cfg.sweep_beta or (cfg.beta,)]


def candidate_dir(round_dir: Path, alpha: float, beta: float) -> Path:
    return Path(round_dir) / f"a{alpha:g}-b{beta:g}"


def prepared(round_dir: Path) -> dict | None:
    """What prepare_round saved for this round ({"ref_score", "reference"}), or None if it has not finished."""
    p = Path(round_dir) / "prepare.json"
    return json.loads(p.read_text()) if p.is_file() and (Path(round_dir) / "fakes.npz").is_file() else None


def prepare_round(round_: int, ref_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig, metric,
                  round_dir: Path, progress: bool = True, ref_score: float | None = None) -> float:
    """A swept round's shared work: its fake bank (``fakes.npz``) and the reference's selection score
    (``prepare.json``), made once and reused. Returns the reference's score."""
    round_dir = Path(round_dir)
    done = prepared(round_dir)
    if done is not None:
        return done["ref_score"]
    round_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.device()
    ref, arch, _ = load_model(ref_path, device)
    disable_dropout(ref)
    ref.requires_grad_(False)
    bank, n = round_dir / "fakes.npz", len(data.images)
    if not bank.is_file():
        log.info("ddo round %d (sweep): generating %d fakes from the reference into %s", round_, n, bank)
        fakes = make_fake_bank(ref, data, arch["label_dim"], fake_seeds(cfg, round_, n), sampler, progress, device)
        if distributed.is_main():
            save_npz(bank, images=fakes, seeds=fake_seeds(cfg, round_, n))
        distributed.barrier()
    preempt.check(lambda: None, f"in ddo round {round_} after the fake bank")  # the bank is saved
    if ref_score is None:
        ref_score = metric.score(ref, selection_seeds(cfg), arch["label_dim"], data.shape, sampler)
    if distributed.is_main():
        write_json(round_dir / "prepare.json", {"ref_score": ref_score, "reference": str(ref_path)})
    distributed.barrier()
    return ref_score


def train_candidate(round_: int, ref_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig,
                    sigma_data: float, metric, round_dir: Path, alpha: float, beta: float, tracker,
                    progress: bool = True) -> RoundResult:
    """One candidate of a swept round: a DDO round with this (alpha, beta), on the round's fake bank, with the
    reference score prepare_round saved (run that first)."""
    prep = prepared(round_dir)
    if prep is None:
        raise FileNotFoundError(f"ddo round {round_}: {round_dir} has no fake bank / prepare.json; run "
                                "prepare_round first")
    out = candidate_dir(round_dir, alpha, beta)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "fakes.npz").is_file() and not (out / "done.json").is_file() and distributed.is_main():
        link_or_copy(Path(round_dir) / "fakes.npz", out / "fakes.npz")  # train_round finds it: not made again
    distributed.barrier()
    return train_round("ddo", round_, ref_path, data, dataclasses.replace(cfg, alpha=alpha, beta=beta), sampler,
                       sigma_data, metric, out, tracker, progress, ref_score=prep["ref_score"])


def select_round(round_: int, round_dir: Path, cfg: DDOConfig, tracker=None) -> RoundResult:
    """The swept round's result: the candidate with the lowest selection score (ties: the first in grid order);
    its checkpoint becomes the round's ``best.safetensors`` and ``done.json`` lists every candidate."""
    round_dir = Path(round_dir)
    done_path, best_path = round_dir / "done.json", round_dir / "best.safetensors"
    if not done_path.is_file():
        cands, missing = [], []
        for a, b in sweep_grid(cfg):
            p = candidate_dir(round_dir, a, b) / "done.json"
            if not p.is_file():
                missing.append(str(p.parent))
                continue
            d = json.loads(p.read_text())
            cands.append({"alpha": a, "beta": b, "best_score": d["best_score"], "best_nimg": d["best_nimg"],
                          "evals": d["evals"], "seconds": d["seconds"]})
        if missing:
            raise FileNotFoundError(f"ddo round {round_}: candidates not finished: {', '.join(missing)}")
        chosen = min(cands, key=lambda c: c["best_score"])  # min keeps the first of equal scores
        prep = prepared(round_dir) or {}
        if distributed.is_main():
            with atomic_path(best_path) as tmp:
                tmp.write_bytes((candidate_dir(round_dir, chosen["alpha"], chosen["beta"])
                                 / "best.safetensors").read_bytes())
            write_json(done_path, {"best_score": chosen["best_score"], "best_nimg": chosen["best_nimg"],
                                   "ref_score": prep.get("ref_score"), "evals": chosen["evals"],
                                   "seconds": round(sum(c["seconds"] for c in cands), 1),
                                   "candidates": [{k: c[k] for k in ("alpha", "beta", "best_score", "best_nimg")}
                                                  for c in cands],
                                   "chosen": {"alpha": chosen["alpha"], "beta": chosen["beta"]}})
        distributed.barrier()
        log.info("ddo round %d: chose alpha %g, beta %g (selection score %.4f) among %s", round_, chosen["alpha"],
                 chosen["beta"], chosen["best_score"],
                 ", ".join(f"(alpha {c['alpha']:g}, beta {c['beta']:g}): {c['best_score']:.4f}" for c in cands))
    d = json.loads(done_path.read_text())
    if tracker is not None:
        tracker.log_params({"chosen_alpha": d["chosen"]["alpha"], "chosen_beta": d["chosen"]["beta"]})
    return RoundResult("ddo", round_, best_path, d["best_score"], d["best_nimg"], d.get("ref_score"), d["evals"],
                       d["seconds"])


def run_candidates_here(round_: int, ref_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig,
                        sigma_data: float, metric, round_dir: Path, tracker, progress: bool = True) -> None:
    """The candidates of a swept round, one after another in this process, each a nested MLflow run."""
    for a, b in sweep_grid(cfg):
        with tracker.child(f"ddo-round{round_}-a{a:g}-b{b:g}", params={"round": round_, "alpha": a, "beta": b},
                           tags={"round": round_, "kind": "ddo", "candidate": f"a{a:g}-b{b:g}"}) as child:
            res = train_candidate(round_, ref_path, data, cfg, sampler, sigma_data, metric, round_dir, a, b, child,
                                  progress)
            child.log_metrics({"best_selection_score": res.best_score, "best_nimg": res.best_nimg})


def swept_round(round_: int, ref_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig,
                sigma_data: float, metric, round_dir: Path, tracker, progress: bool = True,
                ref_score: float | None = None, run_candidates=None) -> RoundResult:
    """A swept DDO round: prepare, the candidates, select (a finished round is reused).

    ``run_candidates(round_, ref_path, grid)`` runs the candidates elsewhere (e.g. as a job array) and returns once
    they are finished; None: one after another here (run_candidates_here).
    """
    if not (Path(round_dir) / "done.json").is_file():
        prepare_round(round_, ref_path, data, cfg, sampler, metric, round_dir, progress, ref_score)
        if run_candidates is None:
            run_candidates_here(round_, ref_path, data, cfg, sampler, sigma_data, metric, round_dir, tracker,
                                progress)
        else:
            run_candidates(round_, ref_path, sweep_grid(cfg))
    return select_round(round_, round_dir, cfg, tracker)


def run_rounds(base_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig, sigma_data: float, metric,
               run_dir: Path, out_dir: Path, tracker, progress: bool = True, run_candidates=None) -> dict:
    """The `ddo` stage: all DDO rounds (and the MLE control) with nested MLflow runs; writes ``out_dir``.

    With a sweep (ddo.sweep_alpha / sweep_beta) each DDO round is swept_round (``run_candidates``: see there).
    """
    from repro.storage.files import atomic_dir

    history: dict[str, list[dict]] = {}
    results: dict[str, list[RoundResult]] = {}
    for kind in KINDS if cfg.control else ("ddo",):
        ref_path, ref_score = base_path, None
        results[kind] = []
        for r in range(1, cfg.rounds + 1):
            with tracker.child(f"{kind}-round{r}", params={"round": r, "kind": kind},
                               tags={"round": r, "kind": kind}) as child:
                if kind == "ddo" and sweep_grid(cfg):
                    res = swept_round(r, ref_path, data, cfg, sampler, sigma_data, metric, run_dir / f"ddo-round{r}",
                                      child, progress, ref_score, run_candidates)
                else:
                    res = train_round(kind, r, ref_path, data, cfg, sampler, sigma_data, metric,
                                      run_dir / f"{kind}-round{r}", child, progress, ref_score=ref_score)
                child.log_metrics({"best_selection_score": res.best_score, "reference_score": res.ref_score,
                                   "round_seconds": res.seconds})
                if distributed.is_main():  # a picture for MLflow: rank 0's job
                    best, arch, _ = load_model(res.best_path)
                    grid = sample_grid(best, arch["label_dim"], data.shape, sampler)
                    child.log_image(grid, f"{kind}_round{r}_samples.png")
            results[kind].append(res)
            ref_path, ref_score = res.best_path, res.best_score
        # No wall-clock times in this output (they are in MLflow and each round's done.json): the same rounds
        # must give the same bytes, or DVC would rerun sampling after every rerun of this stage.
        history[kind] = [{"round": x.round, "best_score": x.best_score, "best_nimg": x.best_nimg,
                          "reference_score": x.ref_score, "evals": x.evals}
                         for x in results[kind]]
    # Outputs (atomically as one directory, by rank 0): each round's best, and the selection history.
    if distributed.is_main():
        with atomic_dir(out_dir) as tmp:
            for kind, rs in results.items():
                for x in rs:
                    (tmp / f"{kind}-round{x.round}.safetensors").write_bytes(x.best_path.read_bytes())
            write_json(tmp / "rounds.json", {"selection_metric": metric.name, "selection_seeds":
                                             [int(cfg.selection_first_seed), int(cfg.selection_first_seed
                                                                                 + cfg.selection_samples)],
                                             "history": history})
    tracker.log_metrics({f"{k}_final_selection_score": v[-1]["best_score"] for k, v in history.items()})
    distributed.barrier()
    return history


def sample_grid(net, label_dim: int, img_shape, sampler: SamplerConfig, n: int = 80, ncol: int = 20,
                **extras) -> np.ndarray:
    """A fixed-seed sample grid (seeds 0..n-1; labels 0..9 cycling when conditional) for MLflow artifacts.

    ``extras``: ``guide`` / ``decoder`` for generate_images (a guided or latent model's grid).
    """
    labels = np.arange(n) % label_dim if label_dim else None
    images = np.concatenate([b.numpy() for _, b, _ in generate_images(net, np.arange(n), img_shape=img_shape,
                                                                      label_dim=label_dim, sampler=sampler,
                                                                      labels=labels, **extras)])
    return image_grid(images, ncol=ncol)
