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
evaluation, the best checkpoint, and a ``done.json`` once the round is finished.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from repro.config import SEED_BLOCK, DDOConfig, SamplerConfig
from repro.data import Dataset
from repro.files import load_model, load_npz, save_model, save_npz, write_json
from repro.losses import ddo_diffusion_loss, draw_sigma_noise, edm_loss
from repro.networks import disable_dropout
from repro.sampler import from_uint8, generate_images, image_grid, one_hot
from repro.train import ema_beta, ema_update, load_state, rampup_lr, save_state, step_generator

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
                   progress: bool) -> np.ndarray:
    """Generate one fake per real image, with the real image's label (the 1:1 pairing)."""
    labels = data.labels if label_dim else None
    batches = generate_images(ref, seeds, img_shape=data.shape, label_dim=label_dim, sampler=sampler, labels=labels,
                              progress=progress, desc="fake bank")
    return np.concatenate([imgs.numpy() for _, imgs, _ in batches])


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
    ref, arch, _ = load_model(ref_path)
    disable_dropout(ref)
    ref.requires_grad_(False)
    label_dim = arch["label_dim"]
    n = len(data.images)

    # 1. The fake bank of this round, from the reference (DDO only).
    fakes = None
    if kind == "ddo":
        bank = run_dir / "fakes.npz"
        if bank.is_file():
            fakes = load_npz(bank)["images"]
        else:
            log.info("ddo round %d: generating %d fakes from the reference into %s", round_, n, bank)
            fakes = make_fake_bank(ref, data, label_dim, fake_seeds(cfg, round_, n), sampler, progress)
            save_npz(bank, images=fakes, seeds=fake_seeds(cfg, round_, n))
        tracker.log_image(image_grid(fakes[:128]), f"fakes_round{round_}.png")

    # 2. theta starts from the reference; fresh optimizer; dropout off; fp32.
    net = copy.deepcopy(ref).train().requires_grad_(True)
    disable_dropout(net)
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
    if ref_score is None:
        ref_score = metric.score(ref, selection_seeds(cfg), label_dim, data.shape, sampler)

    beta_ema = ema_beta(cfg.batch, cfg.ema_halflife_nimg)
    kind_id = KINDS.index(kind)
    bar = tqdm(total=cfg.nimg_per_round, initial=nimg, desc=f"{kind} round {round_}", unit="img",
               disable=not progress)
    while nimg < cfg.nimg_per_round:
        # 2a. Draws depend on (seed, kind, round, step) only: resumable and reproducible.
        g = step_generator(cfg.seed, kind_id, round_, step)
        idx = torch.randint(n, [cfg.batch], generator=g)
        x_real = from_uint8(data.images[idx.numpy()])
        y_real = one_hot(torch.as_tensor(data.labels[idx.numpy()]), label_dim)
        if kind == "ddo":
            x_fake = from_uint8(fakes[idx.numpy()])  # fake i is paired with real i: same label
            sigma, eps = draw_sigma_noise(x_real.shape, cfg.P_mean, cfg.P_std, generator=g)
            loss, stats = ddo_diffusion_loss(net, ref, x_real, y_real, x_fake, y_real, sigma, eps, alpha=cfg.alpha,
                                             beta=cfg.beta, sigma_data=sigma_data)
        else:
            idx2 = torch.randint(n, [cfg.batch], generator=g)
            x2, y2 = from_uint8(data.images[idx2.numpy()]), one_hot(torch.as_tensor(data.labels[idx2.numpy()]),
                                                                      label_dim)
            x = torch.cat([x_real, x2])
            y = torch.cat([y_real, y2]) if y_real is not None else None
            sigma, eps = draw_sigma_noise(x.shape, cfg.P_mean, cfg.P_std, generator=g)
            loss = edm_loss(net, x, y, sigma, eps, sigma_data).mean()
            stats = {}
        # 2b. Adam step with warm-up, EMA.
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
            tracker.log_metrics({"loss": loss.item(), **stats}, step=nimg)
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
                save_model(best_path, model, arch, {"kind": kind, "round": round_, "nimg": nimg, "score": score})
            save_state(state_path, net=net.state_dict(), opt=opt.state_dict(), nimg=nimg, step=step,
                       evals=json.dumps(evals), best=json.dumps(best),
                       **({"ema": ema.state_dict()} if ema is not None else {}))
    bar.close()
    seconds = round(time.time() - t0, 1)
    result = RoundResult(kind, round_, best_path, best["score"], best["nimg"], ref_score, evals, seconds)
    write_json(done_path, {"best_score": best["score"], "best_nimg": best["nimg"], "ref_score": ref_score,
                           "evals": evals, "seconds": seconds})
    state_path.unlink(missing_ok=True)  # the best checkpoint and done.json are all a finished round needs
    log.info("%s round %d: best selection score %.4f at %d images (reference %.4f), %.0fs", kind, round_,
             best["score"], best["nimg"], ref_score, seconds)
    return result


def run_rounds(base_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig, sigma_data: float, metric,
               run_dir: Path, out_dir: Path, tracker, progress: bool = True) -> dict:
    """The `ddo` stage: all DDO rounds (and the MLE control) with nested MLflow runs; writes ``out_dir``."""
    from repro.files import atomic_dir

    history: dict[str, list[dict]] = {}
    results: dict[str, list[RoundResult]] = {}
    for kind in KINDS if cfg.control else ("ddo",):
        ref_path, ref_score = base_path, None
        results[kind] = []
        for r in range(1, cfg.rounds + 1):
            with tracker.child(f"{kind}-round{r}", params={"round": r, "kind": kind},
                               tags={"round": r, "kind": kind}) as child:
                res = train_round(kind, r, ref_path, data, cfg, sampler, sigma_data, metric,
                                  run_dir / f"{kind}-round{r}", child, progress, ref_score=ref_score)
                child.log_metrics({"best_selection_score": res.best_score, "reference_score": res.ref_score})
                best, arch, _ = load_model(res.best_path)
                grid = sample_grid(best, arch["label_dim"], data.shape, sampler)
                child.log_image(grid, f"{kind}_round{r}_samples.png")
            results[kind].append(res)
            ref_path, ref_score = res.best_path, res.best_score
        history[kind] = [{"round": x.round, "best_score": x.best_score, "best_nimg": x.best_nimg,
                          "reference_score": x.ref_score, "evals": x.evals, "seconds": x.seconds}
                         for x in results[kind]]
    # Outputs (atomically as one directory): each round's best, and the selection history.
    with atomic_dir(out_dir) as tmp:
        for kind, rs in results.items():
            for x in rs:
                (tmp / f"{kind}-round{x.round}.safetensors").write_bytes(x.best_path.read_bytes())
        write_json(tmp / "rounds.json", {"selection_metric": metric.name, "selection_seeds":
                                         [int(cfg.selection_first_seed), int(cfg.selection_first_seed
                                                                             + cfg.selection_samples)],
                                         "history": history})
    tracker.log_metrics({f"{k}_final_selection_score": v[-1]["best_score"] for k, v in history.items()})
    return history


def sample_grid(net, label_dim: int, img_shape, sampler: SamplerConfig, n: int = 80, ncol: int = 20) -> np.ndarray:
    """A fixed-seed sample grid (seeds 0..n-1; labels 0..9 cycling when conditional) for MLflow artifacts."""
    labels = np.arange(n) % label_dim if label_dim else None
    images = np.concatenate([b.numpy() for _, b, _ in generate_images(net, np.arange(n), img_shape=img_shape,
                                                                      label_dim=label_dim, sampler=sampler,
                                                                      labels=labels)])
    return image_grid(images, ncol=ncol)
