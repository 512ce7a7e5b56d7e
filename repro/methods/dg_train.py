"""Training the noise-conditioned discriminator of Discriminator Guidance (DG) or improved DG.

DG's recipe (Kim et al. 2023; research/dg.md a.2, confirmed in alsdudrla10/DG train.py): the real bank and the
model's fake bank (uint8 images, scaled to [-1, 1]; the first ``num_data`` of each) are pooled with labels 1 / 0
and shuffled every epoch (batches of 128, the last partial batch dropped); each sample is noised in VP
coordinates at a time t from DG's importance sampler (density proportional to g^2 / sigma_t^2 on [1e-5, 1]);
a frozen feature extractor (ADM's classifier to its middle block) runs without gradient, and only the head is
trained, with binary cross-entropy, Adam (lr 3e-4, weight decay 1e-7). DG saves the head after every epoch,
and the epoch matters (DG issue #11: FID 1.66 at epoch 10 but 1.735 at epoch 50), so every epoch's head is kept.

``objective='mse'`` trains the same discriminator with improved DG's objective instead
(:func:`repro.methods.dg.improved_dg_loss`, RECONSTRUCTED, see there): denoising score matching of the refined
score on the real bank only, through the frozen pretrained denoiser ``denoise``; the gradient runs through the
extractor to the input (its weights stay frozen) and is differentiated again for the head's update.

Resumable, preemptible, DDP-ready, like the other training loops (repro.methods.pretrain, repro.methods.ddo): the shuffle of epoch
e comes from a generator seeded with (seed, objective, e) and the draws (t, eps) of step k of epoch e from
(seed, objective, e, k), so a resumed run draws exactly what an uninterrupted one would and ends with the same
weights; the state is saved at every epoch's end and on a preemption signal at the next step boundary
(repro.cluster.preempt); every rank draws the whole batch, trains on its contiguous slice, and DDP averages the
gradients; only rank 0 writes. Run directory::

    state.pt                                 resume state (removed when finished)
    discriminator_0001.safetensors, ...      the trained module's state dict after each epoch (all kept)
    done.json                                per-epoch statistics, once finished

For the 2-D toys the same loop runs in memory (``run_dir=None``: no files, no preemption).

Example::

    disc = ADMDiscriminator.from_files("checkpoints/32x32_classifier.pt")           # a fresh DG head
    run = train_discriminator(disc, real_images, fake_images, DGTrainConfig(epochs=60), Path("runs/dg"),
                              NullTracker())
    run.checkpoints[-1]    # runs/dg/discriminator_0060.safetensors (DG's head layout)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from repro.cluster import distributed, preempt
from repro.config import ConfigError
from repro.methods.dg import dg_bce_loss, improved_dg_loss, sample_tau, sigma_from_tau, vp_alpha, vp_logit, vp_std
from repro.methods.training import load_state, save_state, step_generator
from repro.nets.adm import load_adm_state
from repro.nets.state import load_state_strict
from repro.nets.discriminators import NoiseConditionedDiscriminator
from repro.sampling.generate import from_uint8, one_hot
from repro.storage.files import read_json, save_safetensors, write_json

log = logging.getLogger(__name__)

OBJECTIVES = ("bce", "mse")
FORMAT = "repro.dg.discriminator/1"


@dataclass(frozen=True, kw_only=True)
class DGTrainConfig:
    """Discriminator training settings; the defaults are DG's CIFAR-10 ones (train.py), except ``epochs``:
    DG's default is 50, its released heads are epoch 60 (uncond) and 250 (cond).

    Example::

        DGTrainConfig(objective="mse", epochs=10)
    """

    objective: str = "bce"         # 'bce' (DG) or 'mse' (improved DG, reconstructed)
    epochs: int = 50
    batch: int = 128               # real and fake pooled and shuffled (DG); 'mse': real only
    lr: float = 3e-4
    weight_decay: float = 1e-7
    t_min: float = 1e-5
    importance_sampling: bool = True
    num_data: int = 0              # use the first num_data of each bank (0: all); DG: 50,000
    seed: int = 0
    log_every: int = 10            # steps between tracker logs

    def __post_init__(self):
        p = []
        if self.objective not in OBJECTIVES:
            p.append(("objective", f"{self.objective!r} is not one of {OBJECTIVES}",
                      "use 'bce' (DG) or 'mse' (improved DG)"))
        for name in ("epochs", "batch", "log_every"):
            if int(getattr(self, name)) < 1:
                p.append((name, f"{getattr(self, name)} must be >= 1", "use a positive integer"))
        if not self.lr > 0:
            p.append(("lr", f"{self.lr} must be > 0", "DG uses 3e-4"))
        if self.weight_decay < 0:
            p.append(("weight_decay", f"{self.weight_decay} must be >= 0", "DG uses 1e-7"))
        if not 0 < self.t_min < 1:
            p.append(("t_min", f"{self.t_min} must be in (0, 1)", "DG uses 1e-5"))
        if self.num_data < 0:
            p.append(("num_data", f"{self.num_data} must be >= 0", "0 uses every sample"))
        if p:
            raise ConfigError(p, "dg_train")


@dataclass
class DiscriminatorRun:
    """What a training run produced: per-epoch statistics and the per-epoch checkpoints (none in memory)."""

    epochs: list[dict]
    checkpoints: list[Path]
    seconds: float


def _floats(bank: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images to [-1, 1] float32 (DG's 2x - 1 of ToTensor); float arrays (toys) as float32."""
    t = torch.as_tensor(bank)
    return from_uint8(t) if t.dtype == torch.uint8 else t.to(torch.float32)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def discriminator_loss(disc: Callable, x0: torch.Tensor, labels: torch.Tensor | None, real: torch.Tensor,
                       tau: torch.Tensor, eps: torch.Tensor, objective: str,
                       denoise: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample loss of one batch, and the logits ('bce'; None for 'mse'). The draws ``tau``, ``eps`` are
    arguments (see :func:`train_discriminator` for how they are made).

    'bce': x_vp = alpha(t) x0 + s(t) eps, frozen features without gradient, head with gradient, BCE against
    ``real`` (1 data, 0 model). 'mse': :func:`repro.methods.dg.improved_dg_loss` with sigma = s / alpha (the
    same noised sample in EDM coordinates); ``denoise`` is the frozen pretrained model, ``real`` is unused.
    """
    if objective == "bce":
        x_vp = _col(vp_alpha(tau), x0) * x0 + _col(vp_std(tau), x0) * eps
        logit = disc(x_vp, tau, labels, grad_features=False)
        return dg_bce_loss(logit, real), logit.detach()
    if denoise is None:
        raise ValueError("denoise: the improved-DG objective needs the frozen pretrained model. Fix: pass "
                         "denoise=net (its D(x, sigma, labels))")
    return improved_dg_loss(denoise, vp_logit(disc), x0, labels, sigma_from_tau(tau), eps), None


def train_discriminator(disc: NoiseConditionedDiscriminator, real: np.ndarray, fake: np.ndarray | None,
                        cfg: DGTrainConfig, run_dir: Path | None, tracker, *,
                        real_labels: np.ndarray | None = None, fake_labels: np.ndarray | None = None,
                        label_dim: int = 0, denoise: Callable | None = None, progress: bool = True,
                        on_epoch: Callable[[int, dict], None] | None = None) -> DiscriminatorRun:
    """Train ``disc.trainable`` (or resume it, or return the finished run) in ``run_dir``; see the module doc.

    ``real``, ``fake``: banks [N, C, H, W] uint8 (images) or float arrays (toys); ``fake`` may be None for
    'mse'. ``real_labels`` / ``fake_labels``: int class labels (conditional discriminators; ``label_dim`` =
    number of classes); the discriminator and ``denoise`` get them one-hot. ``tracker``: the interface of
    :class:`repro.pipeline.tracking.NullTracker`. With ``run_dir=None`` it trains in memory (toys): no state, no
    checkpoints, no preemption check. ``on_epoch(epoch, summary)``: called after each epoch (e.g. to evaluate
    the discriminator of every epoch in memory; it must leave the discriminator's weights and mode as it found
    them). Raises :class:`repro.cluster.preempt.Preempted` after saving the state if a
    stop was requested (run again to resume).
    """
    from tqdm.auto import tqdm

    # 1. The pool: real (1) and fake (0) for 'bce', real only for 'mse'; the first num_data of each bank.
    cut = cfg.num_data or None
    if cfg.objective == "bce" and fake is None:
        raise ValueError("fake: the BCE objective needs the model's sample bank. Fix: generate it first")
    if cfg.objective == "mse" and denoise is None:
        raise ValueError("denoise: the improved-DG objective (objective='mse') needs the frozen pretrained model")
    if label_dim and (real_labels is None or (cfg.objective == "bce" and fake_labels is None)):
        raise ValueError("real_labels/fake_labels: label_dim > 0 needs the labels of both banks. Fix: pass them, "
                         "or label_dim=0 for an unconditional discriminator")
    banks = [(real[:cut], real_labels[:cut] if real_labels is not None else None, 1.0)]
    if cfg.objective == "bce":
        banks.append((fake[:cut], fake_labels[:cut] if fake_labels is not None else None, 0.0))
    if len({tuple(b.shape[1:]) for b, _, _ in banks}) != 1:
        raise ValueError(f"real/fake: the banks' sample shapes differ ({[tuple(b.shape[1:]) for b, _, _ in banks]})."
                         " Fix: generate fakes at the data's resolution")
    X = torch.cat([_floats(b) for b, _, _ in banks])
    Y = torch.cat([torch.as_tensor(y, dtype=torch.long) for _, y, _ in banks]) if label_dim else None
    target = torch.cat([torch.full([len(b)], v) for b, _, v in banks])
    pool, shape = len(X), tuple(X.shape[1:])
    steps_per_epoch = pool // cfg.batch
    if steps_per_epoch == 0:
        raise ConfigError([("batch", f"{cfg.batch} is larger than the pool of {pool} samples",
                            "use a smaller batch or more samples")], "dg_train")

    files = run_dir is not None
    if files:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        done_path, state_path = run_dir / "done.json", run_dir / "state.pt"
        if done_path.is_file():
            d = read_json(done_path)
            log.info("discriminator training already finished in %s (%d epochs)", run_dir, len(d["epochs"]))
            return DiscriminatorRun(d["epochs"], [run_dir / c for c in d["checkpoints"]], d["seconds"])

    # 2. The trained module, Adam (DG: lr 3e-4, weight decay 1e-7), DDP over ranks.
    t0 = time.time()
    device = distributed.device() if files else next(disc.parameters()).device
    mine = distributed.batch_slice(cfg.batch, "dg_train.batch") if files else slice(None)
    disc.to(device).train()
    module = disc.trainable
    # Improved DG trains through grad_x d only, so a parameter that only shifts the logit by a constant (the
    # output bias) gets no gradient: it is left out (frozen for the run; Adam would skip it anyway, and DDP
    # needs every trained parameter to get one).
    idle = _idle_parameters(disc, X[:2].to(device), None if Y is None else one_hot(Y[:2], label_dim).to(device),
                            cfg.objective, denoise)
    if idle:
        log.info("discriminator training (%s): %s get no gradient from this objective; not trained", cfg.objective,
                 ", ".join(idle))
    frozen = [p for n, p in module.named_parameters() if n in idle]
    for p in frozen:
        p.requires_grad_(False)
    train_disc = distributed.wrap_ddp(disc) if files else disc
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    epoch, step, nimg, history, acc = 0, 0, 0, [], {}
    checkpoints: list[Path] = []
    if files and state_path.is_file():
        s = load_state(state_path)
        load_state_strict(module, s["net"], str(state_path))
        opt.load_state_dict(s["opt"])
        epoch, step, nimg = int(s["epoch"]), int(s["step"]), int(s["nimg"])
        history, acc, checkpoints = json.loads(s["history"]), json.loads(s["acc"]), \
            [run_dir / c for c in json.loads(s["checkpoints"])]
        log.info("discriminator training: resuming from %s at epoch %d step %d", state_path, epoch, step)

    def save() -> None:  # the whole state at this step boundary (rank 0 writes it)
        if files and distributed.is_main():
            save_state(state_path, net=module.state_dict(), opt=opt.state_dict(), epoch=epoch, step=step, nimg=nimg,
                       history=json.dumps(history), acc=json.dumps(acc),
                       checkpoints=json.dumps([c.name for c in checkpoints]))

    kind = OBJECTIVES.index(cfg.objective)
    bar = tqdm(total=cfg.epochs * steps_per_epoch * cfg.batch, initial=nimg, desc=f"discriminator ({cfg.objective})",
               unit="img", disable=not progress or not distributed.is_main())
    try:
        while epoch < cfg.epochs:
            perm = torch.randperm(pool, generator=step_generator(cfg.seed, kind, epoch))
            while step < steps_per_epoch:
                if files:
                    preempt.check(save, f"in discriminator training at epoch {epoch + 1} step {step}")
                # 2a. The draws of (epoch, step): the whole batch on every rank, then this rank's slice.
                idx = perm[step * cfg.batch:(step + 1) * cfg.batch]
                g = step_generator(cfg.seed, kind, epoch, step)
                tau = sample_tau(cfg.batch, g, cfg.t_min, cfg.importance_sampling)
                eps = torch.randn([cfg.batch, *shape], generator=g)
                i = idx[mine]
                x0, real_t, tau_t, eps_t = (t.to(device) for t in (X[i], target[i], tau[mine], eps[mine]))
                y = one_hot(Y[i], label_dim).to(device) if Y is not None else None
                # 2b. Loss (this rank's mean; DDP averages the gradients), Adam step.
                loss_vec, logit = discriminator_loss(train_disc, x0, y, real_t, tau_t, eps_t, cfg.objective, denoise)
                loss = loss_vec.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step, nimg = step + 1, nimg + cfg.batch
                bar.update(cfg.batch)
                stats = _stats(loss.item(), logit, real_t)
                for k, v in stats.items():
                    acc[k] = acc.get(k, 0.0) + v
                if step % cfg.log_every == 0:
                    names = sorted(stats)
                    means = distributed.all_mean([stats[k] for k in names]) if files else [stats[k] for k in names]
                    tracker.log_metrics(_ratios(dict(zip(names, means))), step=nimg)
            # 3. End of an epoch: its statistics, its checkpoint (kept), the state to resume from.
            epoch, step = epoch + 1, 0
            names = sorted(acc)
            totals = dict(zip(names, distributed.all_mean([acc[k] for k in names]) if files else [acc[k] for k in names]))
            summary = {"epoch": epoch, "nimg": nimg, **_ratios(totals)}
            history.append(summary)
            acc = {}
            tracker.log_metrics({f"epoch_{k}": v for k, v in summary.items() if k not in ("epoch", "nimg")}, step=nimg)
            bar.set_postfix(loss=f"{summary['loss']:.4f}")
            if on_epoch is not None:
                on_epoch(epoch, summary)
                disc.train()
            if files:
                path = run_dir / f"discriminator_{epoch:04d}.safetensors"
                if distributed.is_main():
                    save_safetensors(path, module.state_dict(), {
                        "format": FORMAT, "epoch": str(epoch), "nimg": str(nimg), "objective": cfg.objective,
                        "train": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
                        "module": json.dumps(_describe(module), sort_keys=True)})
                checkpoints.append(path)
                save()
    finally:
        bar.close()
        for p in frozen:  # as found, also when stopped
            p.requires_grad_(True)
    seconds = round(time.time() - t0, 1)
    if files:
        if distributed.is_main():
            write_json(done_path, {"epochs": history, "checkpoints": [c.name for c in checkpoints],
                                   "seconds": seconds})
            state_path.unlink(missing_ok=True)  # the per-epoch checkpoints and done.json are what a run leaves
        distributed.barrier()
    return DiscriminatorRun(history, checkpoints, seconds)


def _idle_parameters(disc, x0: torch.Tensor, labels: torch.Tensor | None, objective: str,
                     denoise: Callable | None) -> list[str]:
    """Names of the trained module's parameters that the objective gives no gradient (a structural property,
    found on two samples at one noise level)."""
    module = disc.trainable
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    tau = torch.full([len(x0)], 0.5, device=x0.device)
    loss, _ = discriminator_loss(disc, x0, labels, torch.ones(len(x0), device=x0.device), tau, torch.zeros_like(x0),
                                 objective, denoise)
    grads = torch.autograd.grad(loss.sum(), [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is None]


def _stats(loss: float, logit: torch.Tensor | None, real: torch.Tensor) -> dict:
    """Sums over one step: the loss, and for BCE the correct calls on real and fake samples and their counts."""
    out = {"loss": loss, "steps": 1.0}
    if logit is not None:
        is_real = real > 0.5
        hit = (logit > 0) == is_real
        out.update(hit_real=float((hit & is_real).sum()), n_real=float(is_real.sum()),
                   hit_fake=float((hit & ~is_real).sum()), n_fake=float((~is_real).sum()))
    return out


def _ratios(sums: dict) -> dict:
    """Mean loss per step and the accuracies on real / fake samples (DG's 'correction rate', split by class)."""
    out = {"loss": sums["loss"] / max(sums.get("steps", 1.0), 1.0)}
    if "n_real" in sums:
        out["acc_real"] = sums["hit_real"] / max(sums["n_real"], 1.0)
        out["acc_fake"] = sums["hit_fake"] / max(sums["n_fake"], 1.0)
    return out


def _describe(module: torch.nn.Module) -> dict:
    config = getattr(module, "config", None)
    return {"class": type(module).__name__, **(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {})}


def load_trainable(disc: NoiseConditionedDiscriminator, path: str | Path, sha256: str | None = None) -> None:
    """Copy a checkpoint into ``disc.trainable`` with a strict key and shape check: one of this trainer's
    ``discriminator_XXXX.safetensors`` or DG's released head (``discriminator_60.pt``, ``discriminator_250.pt``:
    the head's state dict, read with ``torch.load(weights_only=True)``).

    Example::

        disc = ADMDiscriminator.from_files("32x32_classifier.pt")
        load_trainable(disc, "runs/dg/discriminator_0010.safetensors")
    """
    load_state_strict(disc.trainable, load_adm_state(path, sha256), str(path))
