"""VAR's multi-scale residual VQ tokenizer (Tian et al. 2024, Alg. 1/2), parameter-compatible with
``vae_ch160v4096z32.pth``: a convolutional encoder/decoder (channel multipliers 1,1,2,2,4, two residual blocks per
level, attention at the lowest resolution; 256 px <-> 16x16x32), a codebook of 4096 vectors of size 32 shared by
all scales, and four 3x3 "phi" convolutions that refine each upsampled scale before it is added to the residual sum.

Encoding (Alg. 1): f = quant_conv(encoder(img)); for each scale k, the residual f - f_hat is area-downsampled to
pn_k x pn_k, quantized to its nearest codes, the codes are upsampled (bicubic) to 16x16, passed through phi_k and
added to f_hat. Decoding (Alg. 2) rebuilds f_hat from the token maps and runs decoder(post_quant_conv(f_hat)).
Images are in [-1, 1]. Written from the paper and the parameter layout, not from upstream code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repro.nets.state import load_state_strict, read_torch_state
from repro.nets.var import PATCH_NUMS

PRESETS = {"var-vqvae": dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4))}


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if ch % 32 == 0 else 1, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).unbind(1)
        w = (q.transpose(1, 2) @ k * C ** -0.5).softmax(-1)          # [B, HW(query), HW(key)]
        return x + self.proj_out((v @ w.transpose(1, 2)).view(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    def __init__(self, blocks, attn, resample):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
        if resample is not None:
            setattr(self, "downsample" if isinstance(resample, Downsample2x) else "upsample", resample)

    def forward(self, x):
        for i, b in enumerate(self.block):
            x = b(x)
            if len(self.attn):
                x = self.attn[i](x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult, z_channels: int, num_res_blocks: int = 2, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        cin, levels, n = ch, [], len(ch_mult)
        for i, m in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m))
                cin = ch * m
            attn = [AttnBlock(cin) for _ in range(num_res_blocks)] if i == n - 1 else []
            levels.append(_Level(blocks, attn, Downsample2x(cin) if i != n - 1 else None))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult, z_channels: int, num_res_blocks: int = 2, out_channels: int = 3):
        super().__init__()
        n = len(ch_mult)
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = _Mid(cin)
        levels = [None] * n
        for i in reversed(range(n)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
            attn = [AttnBlock(cin) for _ in range(num_res_blocks + 1)] if i == n - 1 else []
            levels[i] = _Level(blocks, attn, Upsample2x(cin) if i != 0 else None)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """h -> (1 - r) h + r conv3x3(h), r = 0.5: the refinement applied to each upsampled scale."""

    def __init__(self, ch: int, ratio: float = 0.5):
        super().__init__(ch, ch, 3, 1, 1)
        self.ratio = ratio

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiShared(nn.Module):
    """K phi convolutions shared by the scales: scale k of K' uses the one whose tick is nearest to k / (K' - 1)."""

    def __init__(self, ch: int, k: int = 4):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(ch) for _ in range(k))
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def at(self, si: int, n_scales: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (n_scales - 1))))]


class VectorQuantizer(nn.Module):
    """The multi-scale residual quantizer: codebook ``embedding``, phi convs ``quant_resi``."""

    def __init__(self, vocab_size: int, Cvae: int, patch_nums=PATCH_NUMS, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, Cvae, tuple(patch_nums)
        self.quant_resi = PhiShared(Cvae, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def _up(self, h: torch.Tensor, si: int) -> torch.Tensor:
        """Scale si's code vectors [B, C, pn, pn] -> their phi-refined contribution at full resolution."""
        n, H = len(self.patch_nums), self.patch_nums[-1]
        if si != n - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        return self.quant_resi.at(si, n)(h)

    def codes(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.Cvae, pn, pn)

    @torch.no_grad()
    def tokenize(self, f: torch.Tensor) -> torch.Tensor:
        """Alg. 1: features [B, C, 16, 16] -> tokens [B, 680] (scales concatenated coarse to fine)."""
        B, C, H, W = f.shape
        rest, out, n = f.float().clone(), [], len(self.patch_nums)
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if si != n - 1 else rest
            z = z.permute(0, 2, 3, 1).reshape(-1, C)
            d = (z * z).sum(1, keepdim=True) + (self.embedding.weight ** 2).sum(1) - 2 * z @ self.embedding.weight.T
            idx = d.argmin(1).view(B, pn * pn)
            rest = rest - self._up(self.codes(idx, pn), si)
            out.append(idx)
        return torch.cat(out, 1)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        from repro.nets.var import scale_slices

        return [tokens[:, s] for s in scale_slices(self.patch_nums)]

    def var_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced VAR inputs [B, L - 1, C]: the partial sum f_hat after scale k, area-downsampled to scale k+1."""
        B, H = tokens.shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, H, H, device=tokens.device)
        nxt = []
        for si, idx in enumerate(self.split(tokens)[:-1]):
            f_hat = f_hat + self._up(self.codes(idx, self.patch_nums[si]), si)
            pn = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(nxt, 1)

    def next_input(self, si: int, f_hat: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampling step: add scale si's tokens to f_hat; return (f_hat, next scale's input [B, pn'^2, C] or None)."""
        f_hat = f_hat + self._up(self.codes(idx, self.patch_nums[si]), si)
        if si == len(self.patch_nums) - 1:
            return f_hat, None
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def to_fhat(self, tokens: torch.Tensor) -> torch.Tensor:
        B, H = tokens.shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, H, H, device=tokens.device)
        for si, idx in enumerate(self.split(tokens)):
            f_hat = f_hat + self._up(self.codes(idx, self.patch_nums[si]), si)
        return f_hat


class VQVAE(nn.Module):
    """Images in [-1, 1] <-> 680 tokens. ``encode(img)`` -> tokens [B, 680]; ``decode(tokens)`` -> img."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160, ch_mult=(1, 1, 2, 2, 4),
                 patch_nums=PATCH_NUMS, in_channels: int = 3, share_quant_resi: int = 4):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, z_channels, in_channels=in_channels)
        self.decoder = Decoder(ch, ch_mult, z_channels, out_channels=in_channels)
        self.quantize = VectorQuantizer(vocab_size, z_channels, patch_nums, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    @torch.no_grad()
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        return self.quantize.tokenize(self.quant_conv(self.encoder(img)))

    @torch.no_grad()
    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_fhat(self.quantize.to_fhat(tokens))


def build_vqvae(arch: str | dict) -> VQVAE:
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise ValueError(f"unknown tokenizer architecture {arch!r}; known: {', '.join(PRESETS)}")
        arch = PRESETS[arch]
    return VQVAE(**arch)


def load_vqvae(path: Path, arch: str | dict = "var-vqvae", device="cpu") -> VQVAE:
    """Build the tokenizer and copy a released state dict in (``weights_only=True``, strict keys and shapes)."""
    net = build_vqvae(arch)
    load_state_strict(net, read_torch_state(path), str(path))
    return net.to(device).eval()
