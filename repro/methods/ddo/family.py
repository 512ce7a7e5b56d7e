"""What a DDO round does differently per model family, in one place: diffusion models (the ELBO surrogate of
log p, EDM samplers) and autoregressive VAR models (exact log p of token maps, next-scale sampling).

The rounds (repro.methods.ddo.rounds), sweeps and stage are the same for both; they hand this module the
family's sampling context as their ``sampler`` argument: an EDM :class:`SamplerConfig` for a diffusion model, an
:class:`ARSampling` for a VAR model (:func:`is_ar`). Everything that depends on the family goes through the
functions here: the fake bank, the selection score, the DDO loss and the MLE control's loss of one step.

AR DDO (Zheng et al. 2025, research/ddo.md 1.4): the fakes are the reference's samples (the conditional model,
guidance-free, no top-k/top-p), decoded to uint8 pixels and re-encoded by the tokenizer exactly as the real images
are (the "pixel-encoded space" the author found better), so real and fake token maps come from the same encoder;
the bank keeps both the images and the token maps. The tokenizer is not an exact round trip (a decoded token map
re-encodes to other tokens: the residual quantizer is greedy), so the sampled token maps are not kept as they are.
Label dropout: each pair is scored under the unconditional class with the network's ``cond_drop_rate``; those
pairs keep only the real term (maximum likelihood), and the loss is divided by max(alpha, 1)
(:func:`repro.methods.ddo.loss.ar_ddo_loss`). The MLE control continues next-token cross-entropy (with the same
label dropout) on real token maps, two per pair as diffusion's control sees two real images per pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from repro.cluster import distributed
from repro.config import DDOConfig
from repro.datasets.images import Dataset
from repro.methods.ddo.loss import ar_ddo_loss, ddo_diffusion_loss
from repro.methods.losses import ar_mle_loss, draw_sigma_noise, edm_loss
from repro.methods.training import freeze_uncertainty
from repro.sampling.generate import from_uint8, generate_images, one_hot

AR_BATCH = 250  # token maps per sampling batch (fake bank, selection): the images do not depend on it


@dataclass
class ARSampling:
    """A VAR model's sampling context for DDO rounds: its (frozen) tokenizer; fakes and selection samples are drawn
    from the conditional model, guidance-free, without top-k/top-p. ``tokens``: the real token maps, per data set."""

    tokenizer: torch.nn.Module
    tokens: dict = field(default_factory=dict)

    def real_tokens(self, data: Dataset, device) -> torch.Tensor:
        key = (id(data), str(device))
        if key not in self.tokens:
            self.tokens.clear()
            self.tokens[key] = encode_images(self.tokenizer, data.images, device)
        return self.tokens[key]


def is_ar(sampler) -> bool:
    return isinstance(sampler, ARSampling)


def tokenizer_of(net: torch.nn.Module):
    """The tokenizer a VAR trained here carries (None for a released VAR or a diffusion model)."""
    return getattr(net, "tokenizer", None)


def freeze_extras(net: torch.nn.Module) -> torch.nn.Module:
    """theta's parts that DDO does not train: a VAR's own tokenizer; an EDM2 net's uncertainty head."""
    freeze_uncertainty(net)
    if tokenizer_of(net) is not None:
        net.tokenizer.requires_grad_(False)
    return net


@torch.no_grad()
def encode_images(tokenizer, images: np.ndarray, device, batch: int = 500) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> token maps [N, L] (on ``device``)."""
    tokenizer = tokenizer.to(device)
    return torch.cat([tokenizer.encode(from_uint8(images[i:i + batch]).to(device))
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def _decode(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    return ((tokenizer.decode(tokens) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _ar_batches(net, tokenizer, seeds: np.ndarray, labels: np.ndarray, device, part):
    """(tokens, uint8 images) of the conditional model, guidance-free, whole batches dealt round-robin to ranks."""
    from repro.sampling.var import sample_tokens

    chunks = [np.arange(i, min(i + AR_BATCH, len(seeds))) for i in range(0, len(seeds), AR_BATCH)]
    for idx in chunks[part[0]::part[1]]:
        y = torch.as_tensor(labels[idx], device=device)
        tokens = sample_tokens(net, tokenizer.quantize, y, cfg=1.0, cfg_mode="guidance-free-at-1",
                               seeds=seeds[idx].tolist())
        yield tokens, _decode(tokenizer, tokens)


def make_fake_bank(ref: torch.nn.Module, data: Dataset, label_dim: int, seeds: np.ndarray, sampler, progress: bool,
                   device="cpu") -> dict:
    """One fake per real image, with the real image's label (the 1:1 pairing): {'images': uint8 [N, C, H, W]}, and
    for a VAR model the re-encoded token maps {'tokens': int64 [N, L]}.

    With several processes each rank generates its share of the batches and every rank gets the whole bank.
    """
    part = (distributed.rank(), distributed.world_size())
    if is_ar(sampler):
        tok = sampler.tokenizer.to(device)
        images = [x.cpu().numpy() for _, x in _ar_batches(ref, tok, seeds, data.labels, device, part)]
        images = np.concatenate(distributed.gather_chunks(images))
        return {"images": images, "tokens": encode_images(tok, images, device).cpu().numpy()}
    labels = data.labels if label_dim else None
    batches = generate_images(ref, seeds, img_shape=data.shape, label_dim=label_dim, sampler=sampler, labels=labels,
                              progress=progress and distributed.is_main(), desc="fake bank", device=device, part=part)
    return {"images": np.concatenate(distributed.gather_chunks([imgs.numpy() for _, imgs, _ in batches]))}


def selection_score(metric, net: torch.nn.Module, seeds: np.ndarray, label_dim: int, img_shape, sampler) -> float:
    """The metric of ``net``'s samples of the selection seeds (a VAR model: seed i gets class i mod classes)."""
    if not is_ar(sampler):
        return metric.score(net, seeds, label_dim, img_shape, sampler)
    device = next(net.parameters()).device
    tok = sampler.tokenizer.to(device)
    part = (distributed.rank(), distributed.world_size())
    with torch.no_grad():
        return metric.score_images(x for _, x in _ar_batches(net, tok, seeds, seeds % net.num_classes, device, part))


def ddo_step_loss(train_net, ref, data: Dataset, bank: dict, idx: torch.Tensor, mine: slice, g: torch.Generator,
                  cfg: DDOConfig, sampler, P_std: float, sigma_data: float, label_dim: int, device, net_fake):
    """The DDO loss of one step's pairs (this rank's slice ``mine`` of the batch ``idx``); returns (loss, stats).

    Draws after ``idx`` from ``g``: diffusion the (sigma, eps) of each pair, AR the label-dropout mask."""
    i = idx[mine].numpy()
    y = torch.as_tensor(data.labels[i]).to(device)  # fake i is paired with real i: same label
    if is_ar(sampler):
        uncond = (torch.rand(cfg.batch, generator=g) < ref.cond_drop_rate)[mine].to(device)
        real = sampler.real_tokens(data, device)[torch.as_tensor(i, device=device)]
        fake = torch.as_tensor(bank["tokens"][i]).to(device)
        return ar_ddo_loss(train_net, ref, sampler.tokenizer.quantize, real, y, fake, y, uncond, alpha=cfg.alpha,
                           beta=cfg.beta)
    sigma, eps = draw_sigma_noise((cfg.batch, *data.shape), cfg.P_mean, P_std, generator=g)
    x_real, x_fake = from_uint8(data.images[i]).to(device), from_uint8(bank["images"][i]).to(device)
    y_real = one_hot(y.cpu(), label_dim)
    y_real = y_real.to(device) if y_real is not None else None
    return ddo_diffusion_loss(train_net, ref, x_real, y_real, x_fake, y_real, sigma[mine].to(device),
                              eps[mine].to(device), alpha=cfg.alpha, beta=cfg.beta, sigma_data=sigma_data,
                              net_fake=net_fake)


def control_step_loss(train_net, data: Dataset, idx: torch.Tensor, g: torch.Generator, cfg: DDOConfig, sampler,
                      P_std: float, sigma_data: float, label_dim: int, device) -> torch.Tensor:
    """The MLE control's loss of one step: the pretraining loss on 2 x batch real images (EDM loss; AR: next-token
    cross-entropy per token, with label dropout), this rank's slice."""
    idx2 = torch.randint(len(data.images), [cfg.batch], generator=g)
    mine2 = distributed.batch_slice(2 * cfg.batch, "ddo.batch")
    i = torch.cat([idx, idx2])[mine2].numpy()
    if is_ar(sampler):
        uncond = (torch.rand(2 * cfg.batch, generator=g) < _module(train_net).cond_drop_rate)[mine2].to(device)
        tokens = sampler.real_tokens(data, device)[torch.as_tensor(i, device=device)]
        return ar_mle_loss(train_net, sampler.tokenizer.quantize, tokens, torch.as_tensor(data.labels[i]).to(device),
                           uncond)
    sigma, eps = draw_sigma_noise((2 * cfg.batch, *data.shape), cfg.P_mean, P_std, generator=g)
    x = from_uint8(data.images[i]).to(device)
    y = one_hot(torch.as_tensor(data.labels[i]), label_dim)
    y = y.to(device) if y is not None else None
    return edm_loss(train_net, x, y, sigma[mine2].to(device), eps[mine2].to(device), sigma_data).mean()


def _module(net):
    return getattr(net, "module", net)  # DDP's wrapped network
