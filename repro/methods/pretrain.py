"""Training: the `pretrain` stage (EDM loss, EMA weights) and the pieces every training loop shares.

Resumable by construction: the random draws of step k come from a generator seeded with (seed, k), and the
loop checkpoints (network, EMA, optimizer, images seen) into its run directory, so running the same command
again continues where it stopped and ends with the same weights as an uninterrupted run. A preemption signal
(repro.cluster.preempt) makes the loop save that state at the next step boundary and stop.

Several processes (repro.cluster.distributed): every rank draws the whole global batch of a step as one process does,
trains on its contiguous slice, and DDP averages the gradients; so the weights equal one process's up to the
order of float sums. Only rank 0 writes files. (Dropout masks come from torch's global generator: with
dropout > 0 a resumed or multi-process run matches one process only in distribution.)
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from repro.cluster import distributed, preempt
from repro.config import PretrainConfig
from repro.config.schema import ARConfig, ARTokenizerConfig
from repro.datasets.images import Dataset
from repro.config.errors import ConfigError
from repro.datasets.sharded import ShardedDataset
from repro.methods.plateau import plateau_reached
from repro.methods.losses import ar_mle_loss, draw_sigma_noise, edm_loss
from repro.methods.training import (
    ema_beta,
    ema_update,
    freeze_uncertainty,
    load_state,
    rampup_lr,
    save_state,
    sharded_batch,
    step_generator,
)
from repro.nets.checkpoint import save_model
from repro.nets.factory import build_network
from repro.sampling.generate import from_uint8, one_hot

log = logging.getLogger(__name__)


def _curve_point(model: torch.nn.Module, nimg: int, curve_score) -> dict:
    """One point of the pretraining curve: ``curve_score`` of ``model`` in eval mode (its mode is kept)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        score, parts = curve_score(model)
    model.train(was)
    log.info("pretrain: %d images, curve score %.4f (parts %s)", nimg, score, " ".join(f"{v:.4f}" for v in parts))
    return {"nimg": nimg, "score": float(score), "parts": [float(v) for v in parts]}


def arch_from_config(cfg: PretrainConfig, data: Dataset | ShardedDataset, ar: ARConfig | None = None) -> dict:
    """The JSON architecture of the network for a data set (what build_network and checkpoints carry); a VAR
    (network.precond var): the transformer's, with ``ar``'s sizes (its tokenizer is added when it is saved)."""
    c, h, _ = data.shape
    net = cfg.network
    if net.precond == "var":
        ar, t = ar or ARConfig(), (ar or ARConfig()).tokenizer
        return {"precond": "var", "depth": ar.model.depth, "embed_dim": ar.model.embed_dim,
                "num_heads": ar.model.heads, "num_classes": data.num_classes, "vocab_size": t.vocab_size,
                "Cvae": t.z_channels, "patch_nums": list(t.patch_nums), "cond_drop_rate": ar.model.cond_drop_rate}
    return {
        "precond": net.precond,
        "img_resolution": h,
        "img_channels": c,
        "label_dim": data.num_classes if net.conditional else 0,
        "model_channels": net.model_channels,
        "channel_mult": list(net.channel_mult),
        "num_blocks": net.num_blocks,
        "attn_resolutions": list(net.attn_resolutions),
        "dropout": net.dropout,
        "sigma_data": cfg.sigma_data,
    }


def batch_of(data: Dataset, idx: torch.Tensor, label_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = from_uint8(data.images[idx.numpy()])
    y = one_hot(torch.as_tensor(data.labels[idx.numpy()]), label_dim)
    return x, y


def tokenizer_arch(t: ARTokenizerConfig, data: Dataset) -> dict:
    return {"precond": "var-vqvae", "vocab_size": t.vocab_size, "z_channels": t.z_channels, "ch": t.ch,
            "ch_mult": list(t.ch_mult), "patch_nums": list(t.patch_nums), "in_channels": data.shape[0]}


# VQ-VAE (van den Oord et al. 2017), Eq. 3, with VAR's multi-scale residual quantizer (Tian et al. 2024, Alg. 1):
# ||x - D(f + sg(f_hat - f))||^2 + ||sg(f) - f_hat||^2 + commitment ||f - sg(f_hat)||^2 (straight-through).
def train_tokenizer(t: ARTokenizerConfig, data: Dataset, run_dir: Path, seed: int, tracker,
                    progress: bool = True) -> torch.nn.Module:
    """The tokenizer of a VAR trained here: trained once into ``run_dir/tokenizer.safetensors`` (then reused).

    Every process trains it whole (same draws, same weights on CPU), before the transformer; it is small."""
    from tqdm.auto import tqdm

    from repro.nets.checkpoint import load_model

    path = run_dir / "tokenizer.safetensors"
    arch = tokenizer_arch(t, data)
    if path.is_file():
        return load_model(path)[0].requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tok = build_network(arch).train()
    opt = torch.optim.Adam(tok.parameters(), lr=t.lr)
    q = tok.quantize
    t0 = time.time()
    for step in tqdm(range(t.steps), desc="tokenizer", unit="step", disable=not progress or not distributed.is_main()):
        g = step_generator(seed, -1, step)  # not the transformer's (seed, step) draws
        x = from_uint8(data.images[torch.randint(len(data.images), [t.batch], generator=g).numpy()])
        f = tok.quant_conv(tok.encoder(x))
        f_hat = q.to_fhat(q.tokenize(f))  # tokens without gradient; the codes and phi convs get it here
        vq = ((f_hat - f.detach()) ** 2).mean() + t.commitment * ((f - f_hat.detach()) ** 2).mean()
        rec = ((tok.decoder(tok.post_quant_conv(f + (f_hat - f).detach())) - x) ** 2).mean()
        loss = rec + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            tracker.log_metrics({"tokenizer_rec": rec.item(), "tokenizer_vq": vq.item()}, step=step + 1)
    tok.eval().requires_grad_(False)
    if distributed.is_main():
        save_model(path, tok, arch, {"steps": t.steps, "final_rec": rec.item()})
    log.info("tokenizer: %d steps in %.0fs, reconstruction mse %.4f (images in [-1, 1])", t.steps,
             time.time() - t0, rec.item())
    distributed.barrier()
    return tok


def pretrain(cfg: PretrainConfig, data: Dataset | ShardedDataset, run_dir: Path, out: Path, tracker, progress: bool = True,
             ar: ARConfig | None = None, curve_score: Callable[[torch.nn.Module], tuple[float, list[float]]] | None = None
             ) -> dict:
    """Train the base model with the EDM loss; write its EMA weights to ``out``. Returns a summary.

    The curve (``cfg.curve_every_nimg`` > 0): every that many images, ``curve_score(model)`` of the weights that
    would be saved (EMA or raw, in eval mode) gives the score and its per-part scores (the seed noise); the points
    go into the summary's ``curve``, the MLflow metric ``curve_score`` and the resumable state. With
    ``cfg.plateau_window`` > 0 training stops at the first point where :func:`plateau_reached` holds on the parts
    (``plateau`` in the summary), else at ``cfg.total_nimg``. Every rank calls ``curve_score`` (it may gather).

    A VAR (network.precond var, sizes from ``ar``): first its tokenizer (:func:`train_tokenizer`), then the
    transformer with VAR's loss (next-scale cross-entropy, label dropout) on the data's token maps, through the same
    loop (optimizer, warm-up, EMA, checkpoints, resume); the saved model carries its tokenizer.

    Raises :class:`repro.cluster.preempt.Preempted` after saving the state if a stop was requested (run again to resume).
    """
    from tqdm.auto import tqdm

    arch = arch_from_config(cfg, data, ar)
    mine = distributed.batch_slice(cfg.batch, "pretrain.batch")
    device = distributed.device()
    tokenizer = tokens = None
    if arch["precond"] == "var":
        if isinstance(data, ShardedDataset):
            raise ConfigError([("data.dataset", "this data set is "
                                "sharded, and a VAR trained here reads its data in memory",
                                "train a VAR on an in-memory data set (digits, cifar10)")])
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer((ar or ARConfig()).tokenizer, data, run_dir, cfg.seed, tracker, progress).to(device)
        with torch.no_grad():
            tokens = torch.cat([tokenizer.encode(from_uint8(data.images[i:i + 500]).to(device))
                                for i in range(0, len(data.images), 500)])
    with torch.random.fork_rng():  # the initial weights depend on the seed only
        torch.manual_seed(cfg.seed)
        net = freeze_uncertainty(build_network(arch).train().to(device))  # an EDM2 net: its logvar head unused
    train_net = distributed.wrap_ddp(net)  # several processes: rank 0's weights everywhere, averaged gradients
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    n_params = sum(p.numel() for p in net.parameters())
    state_path = run_dir / "state.pt"
    nimg, step, losses, curve = 0, 0, [], []
    if state_path.is_file():
        s = load_state(state_path)
        net.load_state_dict(s["net"]), ema.load_state_dict(s["ema"]), opt.load_state_dict(s["opt"])
        nimg, step, losses = int(s["nimg"]), int(s["step"]), list(s.get("losses", []))
        curve = list(s.get("curve", []))
        log.info("resuming pretraining from %s at %d images", state_path, nimg)
    if cfg.curve_every_nimg and curve_score is None:
        raise ValueError("pretrain.curve_every_nimg > 0 needs a curve_score (the stage passes the selection metric)")
    plateau = plateau_reached(curve, cfg.plateau_window, "parts", cfg.plateau_tol)

    def save() -> None:  # the whole state at this step boundary (every rank calls it, rank 0 writes it)
        recent = distributed.all_mean(losses) if losses else []  # the global batches' losses
        if distributed.is_main():
            save_state(state_path, net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), nimg=nimg,
                       step=step, losses=recent, curve=curve)

    log.info("pretraining %s (%d params) for %d images, batch %d on %d process(es); checkpoints in %s",
             arch["precond"], n_params, cfg.total_nimg, cfg.batch, distributed.world_size(), run_dir)
    beta = ema_beta(cfg.batch, cfg.ema_halflife_nimg)
    label_dim = arch.get("label_dim", 0)
    bar = tqdm(total=cfg.total_nimg, initial=nimg, desc="pretrain", unit="img",
               disable=not progress or not distributed.is_main())
    t0 = time.time()
    order = data.order(cfg.seed) if isinstance(data, ShardedDataset) else None
    while nimg < cfg.total_nimg and not plateau:
        preempt.check(save, f"pretraining at {nimg} images")
        # 1. The draws of this step depend only on (seed, step): the whole batch, whatever this rank's slice.
        g = step_generator(cfg.seed, step)
        if tokens is not None:  # VAR: the label-dropout mask of the batch, then cross-entropy of its token maps
            idx = torch.randint(len(data.images), [cfg.batch], generator=g)
            uncond = (torch.rand(cfg.batch, generator=g) < net.cond_drop_rate)[mine].to(device)
            i = idx[mine].to(device)
            y = torch.as_tensor(data.labels[idx[mine].numpy()]).to(device)
            loss = ar_mle_loss(train_net, tokenizer.quantize, tokens[i], y, uncond)
        else:
            if order is None:
                idx = torch.randint(len(data.images), [cfg.batch], generator=g)
            sigma, eps = draw_sigma_noise((cfg.batch, *data.shape), cfg.P_mean, cfg.P_std, generator=g)
            if order is None:
                x, y = batch_of(data, idx[mine], label_dim)
            else:  # sharded: this rank reads only its slice of the step's items (repro.datasets.sharded)
                x, y = sharded_batch(data, order.step(step, cfg.batch, mine), label_dim, g, cfg.batch, mine)
            x, y, sigma, eps = (t.to(device) if t is not None else None for t in (x, y, sigma[mine], eps[mine]))
            # 2. EDM loss (this rank's mean; DDP averages the gradients over the ranks), Adam step with warm-up, EMA.
            loss = edm_loss(train_net, x, y, sigma, eps, cfg.sigma_data).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = rampup_lr(cfg.lr, nimg, cfg.lr_rampup_nimg)
        opt.step()
        ema_update(ema, net, beta)
        nimg, step = nimg + cfg.batch, step + 1
        losses = losses[-19:] + [loss.item()]
        bar.update(cfg.batch)
        if step % 20 == 0:
            mean_loss = distributed.all_mean([np.mean(losses)])[0]
            tracker.log_metrics({"loss": mean_loss}, step=nimg)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if cfg.curve_every_nimg and nimg % cfg.curve_every_nimg == 0:  # before save(): the state holds the point
            curve.append(_curve_point(ema if cfg.ema_halflife_nimg > 0 else net, nimg, curve_score))
            tracker.log_metrics({"curve_score": curve[-1]["score"]}, step=nimg)
            plateau = plateau_reached(curve, cfg.plateau_window, "parts", cfg.plateau_tol)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", curve=f"{curve[-1]['score']:.3f}")
            if plateau:
                log.info("pretrain: the plateau rule holds at %d images (window %d): stopping", nimg,
                         cfg.plateau_window)
        if nimg % cfg.checkpoint_every_nimg < cfg.batch or nimg >= cfg.total_nimg or plateau:
            save()
    bar.close()
    final = ema if cfg.ema_halflife_nimg > 0 else net
    final_loss = distributed.all_mean([np.mean(losses)])[0] if losses else None
    info = {"nimg": nimg, "params": n_params, "final_loss": final_loss}
    if cfg.curve_every_nimg:
        info["plateau"] = plateau
    if tokenizer is not None:  # the model file carries its tokenizer: sampling and DDO need nothing else
        final.tokenizer = tokenizer
        tok_arch = tokenizer_arch((ar or ARConfig()).tokenizer, data)
        arch = {**arch, "tokenizer": {k: v for k, v in tok_arch.items() if k != "precond"}}
    if distributed.is_main():  # no timings in the file: same weights, same bytes (DVC caches by hash)
        save_model(out, final, arch, info)
    distributed.barrier()  # the others may read it next
    info["seconds_this_run"] = round(time.time() - t0, 1)
    info["curve"] = curve
    log.info("wrote base model %s (%s weights)", out, "EMA" if cfg.ema_halflife_nimg > 0 else "raw")
    return info
