"""Next-scale sampling for VAR (Tian et al. 2024, Alg. 2): class-conditional, top-k/top-p, classifier-free guidance.

Scale k runs the transformer only on scale k's tokens; the keys and values of coarser scales come from a cache, so
the 10 scales cost 10 forward passes (NFE 10, doubled with guidance). The same stepper scores a given token map
scale by scale (:func:`scalewise_token_logp`), which must equal the one-pass teacher-forced likelihood.

Guidance conventions (research/ddo.md 4, "CFG semantics caveat"), logits = (1 + t) cond - t uncond at scale k of K:

* ``upstream``: t = cfg * k / (K - 1), VAR's released sampler; cfg 1.0 still guides (t reaches 1 at the last scale).
* ``guidance-free-at-1``: t = (cfg - 1) * k / (K - 1), the same ramp shifted so that cfg 1.0 is exactly the
  conditional model (no unconditional pass is run).

Which convention DDO's "1.0 (guidance-free)" used is not known; every preset names the one it uses.
"""

from __future__ import annotations

import torch

from repro.nets.var import VAR

CFG_MODES = ("upstream", "guidance-free-at-1")


# The guidance weight t of scale si (see the module docstring).
def guidance_weight(cfg: float, si: int, n_scales: int, mode: str) -> float:
    if mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {mode!r}")
    ratio = si / (n_scales - 1)
    return cfg * ratio if mode == "upstream" else (cfg - 1.0) * ratio


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits with everything outside the top-k and outside the nucleus set to -inf (0 switches a filter off).

    Nucleus: drop the smallest tokens whose cumulative probability (counted from the least likely) stays <= 1 - p;
    the most likely token is always kept.
    """
    out = logits.clone()
    if top_k > 0:
        kth = out.topk(min(top_k, out.shape[-1]), dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = out.sort(dim=-1)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, -torch.inf)
    return out


class _Stepper:
    """Runs ``net`` one scale at a time with a key/value cache; ``step(x_in)`` returns that scale's logits."""

    def __init__(self, net: VAR, labels: torch.Tensor):
        self.net, self.labels, self.pos = net, labels, 0

    def __enter__(self):
        self.net.kv_cache(True)
        return self

    def __exit__(self, *exc):
        self.net.kv_cache(False)

    def step(self, x_in: torch.Tensor | None) -> torch.Tensor:
        x = self.net.embed(self.labels, x_in, start=self.pos)
        self.pos += x.shape[1]
        return self.net.trunk(x, self.labels, attn_bias=None)


@torch.no_grad()
def scalewise_token_logp(net: VAR, quantizer, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities computed scale by scale with the KV cache (the sampling path); shape [B, L]."""
    out, f_hat = [], None
    B, H = tokens.shape[0], net.patch_nums[-1]
    f_hat = torch.zeros(B, net.Cvae, H, H, device=tokens.device)
    x_in = None
    with _Stepper(net, labels) as s:
        for si, idx in enumerate(quantizer.split(tokens)):
            lp = s.step(x_in).log_softmax(-1)
            out.append(lp.gather(-1, idx.unsqueeze(-1)).squeeze(-1))
            f_hat, x_in = quantizer.next_input(si, f_hat, idx)
    return torch.cat(out, 1)


@torch.no_grad()
def sample_tokens(net: VAR, quantizer, labels: torch.Tensor, *, cfg: float = 1.0, cfg_mode: str = "upstream",
                  top_k: int = 0, top_p: float = 0.0, generator: torch.Generator | None = None,
                  seeds=None, return_logits: bool = False):
    """Sample token maps [B, L] for ``labels`` (VAR Alg. 2 with guidance); ``return_logits`` also returns each
    scale's guided, filtered logits (for tests and diagnostics).

    Randomness: ``seeds`` (one int per row) gives row i its own generator seeded with seeds[i], so token map i
    depends only on seed i and its label, whatever the batch; else one ``generator`` for the batch.
    The conditional and unconditional passes run as one batch of 2B whenever some scale has t != 0.
    """
    B, K, H = labels.shape[0], len(net.patch_nums), net.patch_nums[-1]
    rows = None if seeds is None else [torch.Generator(labels.device).manual_seed(int(s)) for s in seeds]
    ts = [guidance_weight(cfg, si, K, cfg_mode) for si in range(K)]
    guided = any(t != 0 for t in ts)
    both = torch.cat((labels, torch.full_like(labels, net.num_classes))) if guided else labels
    f_hat = torch.zeros(B, net.Cvae, H, H, device=labels.device)
    tokens, logits_all, x_in = [], [], None
    with _Stepper(net, both) as s:
        for si in range(K):
            logits = s.step(None if x_in is None else (x_in.repeat(2, 1, 1) if guided else x_in))
            if guided:
                logits = (1 + ts[si]) * logits[:B] - ts[si] * logits[B:]
            logits = filter_top_k_top_p(logits, top_k, top_p)
            probs = logits.softmax(-1)
            if rows is None:
                idx = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(B, -1)
            else:
                idx = torch.stack([torch.multinomial(p, 1, generator=g)[:, 0] for p, g in zip(probs, rows)])
            tokens.append(idx)
            logits_all.append(logits)
            f_hat, x_in = quantizer.next_input(si, f_hat, idx)
    out = torch.cat(tokens, 1)
    return (out, logits_all) if return_logits else out


@torch.no_grad()
def sample_images(net: VAR, tokenizer, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Sampled token maps decoded by the tokenizer: uint8 images [B, C, H, W] (``kwargs``: :func:`sample_tokens`)."""
    tokens = sample_tokens(net, tokenizer.quantize, labels, **kwargs)
    x = tokenizer.decode(tokens)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def var_grid(net: VAR, tokenizer, n: int = 32, ncol: int = 8, seed: int = 0):
    """A grid to look at (seeds seed..seed+n-1, labels 0..n-1 cycling): the conditional model, no guidance, no
    tricks."""
    from repro.sampling.generate import image_grid

    labels = torch.arange(n) % net.num_classes
    images = sample_images(net, tokenizer, labels, cfg=1.0, cfg_mode="guidance-free-at-1",
                           seeds=range(seed, seed + n))
    return image_grid(images.numpy(), ncol=ncol)


def generate_var_images(net: VAR, tokenizer, seeds, *, ar, batch: int, device="cpu", progress: bool = False,
                        desc: str = "sampling"):
    """Yield (seeds, uint8 images [B, C, H, W], labels) batch by batch, as repro.sampling.generate does for
    diffusion: seed i gets class i mod num_classes (50 per class for 50k seeds, DDO's VAR protocol) and its own
    generator, so image i depends only on seed i. ``ar``: the config's ARConfig (cfg, cfg_mode, top_k, top_p)."""
    import numpy as np
    from tqdm.auto import tqdm

    seeds = np.asarray(seeds, dtype=np.int64)
    bar = tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress, leave=False)
    for i in range(0, len(seeds), batch):
        s = seeds[i:i + batch]
        labels = torch.as_tensor(s % net.num_classes, device=device)
        images = sample_images(net, tokenizer, labels, cfg=ar.cfg, cfg_mode=ar.cfg_mode, top_k=ar.top_k,
                               top_p=ar.top_p, seeds=s.tolist())
        bar.update(len(s))
        yield s, images.cpu(), labels.cpu()
    bar.close()
