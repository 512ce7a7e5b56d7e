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

import numpy as np
import torch

from repro.cluster import distributed, preempt
from repro.config import PretrainConfig
from repro.datasets.images import Dataset
from repro.datasets.sharded import ShardedDataset
from repro.methods.losses import draw_sigma_noise, edm_loss
from repro.methods.training import (
    ema_beta,
    ema_update,
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


def arch_from_config(cfg: PretrainConfig, data: Dataset | ShardedDataset) -> dict:
    """The JSON architecture of the network for a data set (what build_network and checkpoints carry)."""
    c, h, _ = data.shape
    net = cfg.network
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


def pretrain(cfg: PretrainConfig, data: Dataset | ShardedDataset, run_dir: Path, out: Path, tracker, progress: bool = True) -> dict:
    """Train the base model with the EDM loss; write its EMA weights to ``out``. Returns a summary.

    Raises :class:`repro.cluster.preempt.Preempted` after saving the state if a stop was requested (run again to resume).
    """
    from tqdm.auto import tqdm

    arch = arch_from_config(cfg, data)
    mine = distributed.batch_slice(cfg.batch, "pretrain.batch")
    device = distributed.device()
    with torch.random.fork_rng():  # the initial weights depend on the seed only
        torch.manual_seed(cfg.seed)
        net = build_network(arch).train().to(device)
    train_net = distributed.wrap_ddp(net)  # several processes: rank 0's weights everywhere, averaged gradients
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    n_params = sum(p.numel() for p in net.parameters())
    state_path = run_dir / "state.pt"
    nimg, step, losses = 0, 0, []
    if state_path.is_file():
        s = load_state(state_path)
        net.load_state_dict(s["net"]), ema.load_state_dict(s["ema"]), opt.load_state_dict(s["opt"])
        nimg, step, losses = int(s["nimg"]), int(s["step"]), list(s.get("losses", []))
        log.info("resuming pretraining from %s at %d images", state_path, nimg)

    def save() -> None:  # the whole state at this step boundary (every rank calls it, rank 0 writes it)
        recent = distributed.all_mean(losses) if losses else []  # the global batches' losses
        if distributed.is_main():
            save_state(state_path, net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), nimg=nimg,
                       step=step, losses=recent)

    log.info("pretraining %s (%d params) for %d images, batch %d on %d process(es); checkpoints in %s",
             arch["precond"], n_params, cfg.total_nimg, cfg.batch, distributed.world_size(), run_dir)
    beta = ema_beta(cfg.batch, cfg.ema_halflife_nimg)
    label_dim = arch["label_dim"]
    bar = tqdm(total=cfg.total_nimg, initial=nimg, desc="pretrain", unit="img",
               disable=not progress or not distributed.is_main())
    t0 = time.time()
    order = data.order(cfg.seed) if isinstance(data, ShardedDataset) else None
    while nimg < cfg.total_nimg:
        preempt.check(save, f"pretraining at {nimg} images")
        # 1. The draws of this step depend only on (seed, step): the whole batch, whatever this rank's slice.
        g = step_generator(cfg.seed, step)
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
        if nimg % cfg.checkpoint_every_nimg < cfg.batch or nimg >= cfg.total_nimg:
            save()
    bar.close()
    final = ema if cfg.ema_halflife_nimg > 0 else net
    final_loss = distributed.all_mean([np.mean(losses)])[0] if losses else None
    info = {"nimg": nimg, "params": n_params, "final_loss": final_loss}
    if distributed.is_main():  # no timings in the file: same weights, same bytes (DVC caches by hash)
        save_model(out, final, arch, info)
    distributed.barrier()  # the others may read it next
    info["seconds_this_run"] = round(time.time() - t0, 1)
    log.info("wrote base model %s (%s weights)", out, "EMA" if cfg.ema_halflife_nimg > 0 else "raw")
    return info
