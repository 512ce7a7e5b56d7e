"""VAR: next-scale autoregressive transformer (Tian et al. 2024), parameter-compatible with the released weights.

The image is a pyramid of token maps (``patch_nums`` 1,2,3,4,5,6,8,10,13,16: 680 tokens, vocabulary 4096) from the
multi-scale VQ tokenizer (repro.nets.vqvae). Scale k is predicted from the class token and all coarser scales: a
block-causal mask lets every token of scale k see the tokens of scales <= k. Blocks are pre-norm transformer blocks
whose layer norms are modulated by the class embedding (adaptive layer norm, 6 vectors per block); the class
table has one extra row, the unconditional class, used by label dropout and classifier-free guidance.

Names of parameters and buffers follow the released ``var_d16.pth`` / ``var_d30.pth`` (built as upstream's
``build_vae_var``: width 64*depth, heads = depth, l2-normalised attention, unshared adaLN), so those files load with a
strict key and shape check (:func:`load_var`). Written from the paper and the parameter layout, not from upstream code.
Drop-path and dropout are not implemented (DDO disables them; research/ddo.md 1.3).

The model contract for AR methods: :func:`token_logp` (one teacher-forced pass, all 680 log-probabilities).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repro.nets.state import load_state_strict, read_torch_state

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# Architectures by name (the registry's ``arch`` field); width and heads follow from depth as in upstream's builder.
PRESETS = {
    "var-d16": dict(depth=16),
    "var-d30": dict(depth=30),
}


def scale_slices(patch_nums=PATCH_NUMS) -> list[slice]:
    """Token index range of each scale in the flattened 680-token sequence."""
    out, start = [], 0
    for pn in patch_nums:
        out.append(slice(start, start + pn * pn))
        start += pn * pn
    return out


class SelfAttention(nn.Module):
    """Multi-head attention with l2-normalised queries and keys and a learned per-head temperature (clamped at 100).

    Keys have no bias (``zero_k_bias`` is a buffer); ``kv_cache`` switches on key/value caching for scale-by-scale
    inference (each call appends its keys and values; queries then attend to everything cached so far).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.cache: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        temp = self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
        q, k = F.normalize(q, dim=-1) * temp, F.normalize(k, dim=-1)
        if self.cache is not None:
            if self.cache:
                k, v = torch.cat((self.cache[0], k), 2), torch.cat((self.cache[1], v), 2)
            self.cache[:] = [k, v]
        att = (q @ k.transpose(-2, -1))
        if attn_bias is not None:
            att = att + attn_bias
        out = att.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """x += g1 * attn(LN(x)(1 + s1) + b1); x += g2 * ffn(LN(x)(1 + s2) + b2), (g, s, b) from the class embedding."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.C = dim
        self.attn = SelfAttention(dim, heads)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, cond, attn_bias):
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x) * (1 + s1) + b1, attn_bias) * g1
        return x + self.ffn(self.ln_wo_grad(x) * (1 + s2) + b2) * g2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class VAR(nn.Module):
    """Class-conditional next-scale transformer; ``forward(labels, x_in)`` returns logits [B, L, V].

    ``x_in`` [B, L - 1, Cvae]: the teacher-forced inputs of scales 2..K (the tokenizer's
    ``VectorQuantizer.var_input``); label ``num_classes`` is the unconditional class.

    Example::

        net = VAR(depth=2, embed_dim=32, num_heads=2, num_classes=10, vocab_size=16, Cvae=4, patch_nums=(1, 2, 3))
    """

    def __init__(self, depth: int = 16, embed_dim: int | None = None, num_heads: int | None = None,
                 num_classes: int = 1000, vocab_size: int = 4096, Cvae: int = 32, patch_nums=PATCH_NUMS,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-6, cond_drop_rate: float = 0.1):
        super().__init__()
        C = embed_dim or 64 * depth
        self.depth, self.C, self.heads = depth, C, num_heads or depth
        self.num_classes, self.V, self.Cvae = num_classes, vocab_size, Cvae
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.cond_drop_rate = cond_drop_rate
        self.word_embed = nn.Linear(Cvae, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(C, self.heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", level.view(1, self.L))
        mask = torch.where(level.view(-1, 1) >= level.view(1, -1), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, self.L, self.L))
        if not self.pos_1LC.is_meta:
            self.init_weights()

    def init_weights(self, std: float = 0.02, adaln_gamma: float = 1e-5, generator: torch.Generator | None = None):
        """Random init for training from scratch: truncated normal weights, small adaLN gains (upstream's scheme)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=math.sqrt(1 / self.C / 3), generator=generator)
        for b in self.blocks:
            w = b.ada_lin[1].weight.data
            w[: 2 * self.C].mul_(adaln_gamma)   # gains of the residual branches start near zero
            w[2 * self.C:].mul_(0.5)

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Label dropout: each label becomes the unconditional class with probability ``cond_drop_rate``."""
        u = torch.rand(labels.shape, generator=generator, device=labels.device)
        return torch.where(u < self.cond_drop_rate, torch.full_like(labels, self.num_classes), labels)

    def embed(self, labels: torch.Tensor, x_in: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """Token embeddings of positions [start, start + n): the class token (position 0) and the scale inputs."""
        B = labels.shape[0]
        parts = []
        if start == 0:
            parts.append(self.class_emb(labels).unsqueeze(1) + self.pos_start.expand(B, 1, -1))
        if x_in is not None:
            parts.append(self.word_embed(x_in.float()))
        x = torch.cat(parts, 1)
        end = start + x.shape[1]
        return x + self.lvl_embed(self.lvl_1L[:, start:end].expand(B, -1)) + self.pos_1LC[:, start:end]

    def trunk(self, x: torch.Tensor, labels: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        cond = self.class_emb(labels)
        for b in self.blocks:
            x = b(x, cond, attn_bias)
        return self.head(self.head_nm(x.float(), cond)).float()

    def forward(self, labels: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        x = self.embed(labels, x_in)
        return self.trunk(x, labels, self.attn_bias_for_masking[:, :, : x.shape[1], : x.shape[1]])

    def kv_cache(self, on: bool) -> None:
        for b in self.blocks:
            b.attn.cache = [] if on else None


# One teacher-forced pass (VAR Eq. 6; DDO Eq. 1): log p(x | c) = sum over all tokens of log p(x_n | scales < k, c).
def token_logp(net: VAR, quantizer, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every token of ``tokens`` [B, L] under ``net`` given ``labels``; shape [B, L].

    ``quantizer``: the tokenizer's ``VectorQuantizer`` (builds the teacher-forced inputs). Labels equal to
    ``net.num_classes`` score under the unconditional class. Sum over dim 1 for the exact log-likelihood.
    """
    logits = net(labels, quantizer.var_input(tokens))
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logp(net: VAR, quantizer, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact log p(tokens | labels), summed over all tokens; shape [B]."""
    return token_logp(net, quantizer, tokens, labels).sum(1)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def build_var(arch: str | dict) -> VAR:
    """A VAR from a preset name (``var-d16``, ``var-d30``) or a dict of constructor arguments."""
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise ValueError(f"unknown VAR architecture {arch!r}; known: {', '.join(PRESETS)}")
        arch = PRESETS[arch]
    return VAR(**arch)


def load_var(path: Path, arch: str | dict, device="cpu") -> VAR:
    """Build ``arch`` and copy a released state dict in with a strict key and shape check."""
    net = build_var(arch)
    load_state_strict(net, read_torch_state(path), str(path))
    return net.to(device).eval()
