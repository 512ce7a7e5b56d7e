"""ADM's noise-conditioned classifier encoder (the "half U-Net"), clean-room, with the released parameter names.

Source: Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis" (ADM), Section 3 and 4 (the
classifier is the downsampling trunk of the diffusion U-Net with an attention-pooled head, conditioned on the
noise level). Discriminator Guidance (Kim et al., ICML 2023) uses it twice:

* a frozen feature extractor: ``32x32_classifier.pt`` (CIFAR-10; trained by the DG authors with ADM's code)
  run up to the middle block (``feature=True``), giving an 8x8x512 map;
* a small trainable head of the same family on that map (image_size 8, in_channels 512, one level, out 1),
  optionally class-conditional through an ``nn.Embedding(1000, 512)`` added to the time embedding; its
  state dict is what DG releases as ``discriminator_60.pt`` / ``discriminator_250.pt``.

The modules are written from the papers and from facts read in the reference code (guided-diffusion's
``EncoderUNetModel``, DG's modified copy): parameter names and shapes, the order of operations, constants
(GroupNorm with 32 groups computed in float32, sinusoidal time embedding [cos, sin] with max period 10,000,
attention heads of 64 channels, zero-initialised residual output convolutions) and DG's changes (time input
``t`` in [0, 1] multiplied by 999 before the embedding; ``feature=True``; the label embedding). No reference
code is reused. The layer tree reproduces the released ``state_dict`` keys::

    time_embed.{0,2}                      Linear(C, 4C), Linear(4C, 4C)      (1 is SiLU)
    label_emb                             Embedding(num_classes, 4C)          (conditional only)
    input_blocks.0.0                      Conv2d(in, C, 3)
    input_blocks.k.0.in_layers.{0,2}      GroupNorm, Conv2d 3x3               (ResBlock; 1 is SiLU)
    input_blocks.k.0.emb_layers.1         Linear(4C, 2 C_out)                 (scale-shift norm: scale and shift)
    input_blocks.k.0.out_layers.{0,3}     GroupNorm, Conv2d 3x3 (zero init)   (1 SiLU, 2 Dropout)
    input_blocks.k.0.skip_connection      Conv2d 1x1 when the width changes
    input_blocks.k.1.{norm,qkv,proj_out}  AttentionBlock (Conv1d qkv and proj_out; proj_out zero init)
    middle_block.{0,1,2}                  ResBlock, AttentionBlock, ResBlock
    out.0, out.2.{positional_embedding,qkv_proj,c_proj}   GroupNorm, SiLU, AttentionPool2d

Loading (:func:`load_adm`): ``torch.load(weights_only=True)`` (no foreign code runs; a pickled object is
refused), an optional sha256 checked before reading, and a strict key and shape check
(:func:`repro.nets.state.load_state_strict`); any mismatch raises ValueError naming the file and the fix.

Example::

    ext = load_adm("checkpoints/32x32_classifier.pt", DG_CIFAR10_EXTRACTOR)   # frozen extractor
    head = load_adm("checkpoints/discriminator_60.pt", dg_head())             # DG's released head
    h = ext(x_vp, tau, feature=True)              # [N, 512, 8, 8]; tau in [0, 1] (VP time)
    logit = head(h, tau)[:, 0]                    # log(d / (1 - d))
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from repro.nets.state import load_state_strict
from repro.storage.files import load_safetensors, sha256_file

__all__ = [
    "ADMConfig",
    "EncoderUNet",
    "ResBlock",
    "AttentionBlock",
    "AttentionPool2d",
    "timestep_embedding",
    "load_adm",
    "load_adm_state",
    "DG_CIFAR10_EXTRACTOR",
    "ADM_64X64_CLASSIFIER",
    "ADM_256X256_CLASSIFIER",
    "TINY_EXTRACTOR",
    "dg_head",
    "tiny_head",
]

GROUPS = 32  # ADM's normalization(): GroupNorm(32, channels)


@dataclass(frozen=True)
class ADMConfig:
    """The hyper-parameters of one encoder (guided-diffusion's ``create_classifier`` flags, spelled out).

    ``attention_resolutions`` are feature-map resolutions as in the flags (``"32,16,8"``); a level at
    down-sampling factor ``ds`` has attention when ``ds`` is one of ``image_size // r`` (the reference's integer
    division: for the 8x8 DG head, "32,16,8" gives ds in {0, 0, 1}, i.e. attention at its only level).
    ``time_scale``: the time input is multiplied by it before the sinusoidal embedding (999 for DG's
    continuous VP time in [0, 1]; 1 for guided-diffusion's integer steps).
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 1000
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    channel_mult: tuple[float, ...] = (1, 2, 4)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    pool: str = "attention"
    condition: bool = False
    num_classes: int = 1000
    dropout: float = 0.0
    time_scale: float = 999.0

    def __post_init__(self):
        widths = [int(m * self.model_channels) for m in self.channel_mult]
        problems = []
        if not self.channel_mult:
            problems.append("channel_mult: empty. Fix: give one multiplier per level, e.g. (1, 2, 4)")
        for w in [self.model_channels, *widths]:
            if w % GROUPS:
                problems.append(f"width {w} is not a multiple of {GROUPS} (GroupNorm groups). Fix: choose "
                                "model_channels and channel_mult so that every width is a multiple of 32")
                break
        if self.image_size % (2 ** (len(self.channel_mult) - 1)):
            problems.append(f"image_size {self.image_size} is not divisible by 2^(levels-1). Fix: use fewer "
                            "levels in channel_mult or a larger image_size")
        if self.pool not in ("attention", "adaptive"):
            problems.append(f"pool {self.pool!r} is not supported. Fix: use 'attention' (DG, ADM) or 'adaptive'")
        if self.num_head_channels <= 0 or any(w % self.num_head_channels for w in widths):
            problems.append(f"num_head_channels {self.num_head_channels} must divide every width {widths}. "
                            "Fix: use 64 (ADM) or a divisor of the widths")
        if self.num_res_blocks < 1 or self.in_channels < 1 or self.out_channels < 1:
            problems.append("num_res_blocks, in_channels and out_channels must be >= 1. Fix: set positive values")
        if problems:
            raise ValueError("ADMConfig: " + "; ".join(problems))

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape of the middle-block activation (``feature=True``) for one input image: (C, H, W)."""
        ch = int(self.channel_mult[-1] * self.model_channels)
        res = self.image_size // 2 ** (len(self.channel_mult) - 1)
        return ch, res, res


# DG's CIFAR-10 feature extractor ``32x32_classifier.pt`` (classifier_lib.load_classifier): width 128, depth 4,
# channel_mult (1, 2, 4), attention at 32,16,8, scale-shift norm, resblock up/down, attention pool, 1000 outputs.
DG_CIFAR10_EXTRACTOR = ADMConfig(image_size=32, num_res_blocks=4, channel_mult=(1, 2, 4))
# OpenAI's released classifiers (guided-diffusion README flags; DG's FFHQ-64 code path uses the 64x64 one with
# ADM's cosine time, and DG's 256x256 code path the 256x256 one). As used through DG (time in [0,1] x 999).
ADM_64X64_CLASSIFIER = ADMConfig(image_size=64, num_res_blocks=4, channel_mult=(1, 2, 3, 4))
ADM_256X256_CLASSIFIER = ADMConfig(image_size=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4))
# For tests and the 8x8 digits: 1 channel, widths 32/64, one ResBlock per level, attention at 4x4, 4x4x64 features.
TINY_EXTRACTOR = ADMConfig(image_size=8, in_channels=1, model_channels=32, out_channels=10, num_res_blocks=1,
                           attention_resolutions=(4,), channel_mult=(1, 2), num_head_channels=32)


def dg_head(in_channels: int = 512, condition: bool = False, image_size: int = 8) -> ADMConfig:
    """DG's discriminator head (classifier_lib.load_discriminator): on the extractor's 8x8 map, width 128,
    depth 2, one level, attention ("32,16,8" at image_size 8: its only level), attention pool, one output;
    ``condition`` adds ``label_emb = nn.Embedding(1000, 512)``. in_channels 512 (CIFAR-10) or 384 (DiT latents).

    Example::

        >>> dg_head().feature_shape
        (128, 8, 8)
    """
    return ADMConfig(image_size=image_size, in_channels=in_channels, model_channels=128, out_channels=1,
                     num_res_blocks=2, attention_resolutions=(32, 16, 8), channel_mult=(1,), condition=condition)


def tiny_head(in_channels: int = 64, condition: bool = False, image_size: int = 4,
              num_classes: int = 1000) -> ADMConfig:
    """A head of DG's layout for :data:`TINY_EXTRACTOR`'s 4x4x64 features: width 32, depth 1, 32-channel heads."""
    return ADMConfig(image_size=image_size, in_channels=in_channels, model_channels=32, out_channels=1,
                     num_res_blocks=1, attention_resolutions=(image_size,), channel_mult=(1,), num_head_channels=32,
                     condition=condition, num_classes=num_classes)


# ----------------------------------------------------------------------------------------------------------
# Layers.


def _zero(module: nn.Module) -> nn.Module:
    """ADM's zero_module: the residual branch's last layer starts at zero (each block starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and returned in the input's dtype (ADM's normalization)."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


# Vaswani et al. 2017 / ADM: sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / half), i < half.
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] (fractional) times to [N, dim] embeddings, cosines first (a zero column is appended for odd dim).

    Example::

        >>> timestep_embedding(torch.zeros(2), 4)
        tensor([[1., 1., 0., 0.],
                [1., 1., 0., 0.]])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on the embedding (ADM, Section 3: "adaptive group norm"
    AdaGN(h, y) = y_s GroupNorm(h) + y_b, written as GroupNorm(h) (1 + scale) + shift).

    ``down=True``: 2x2 average pooling of both branches between the first SiLU and the first convolution
    (ADM's "resblock updown" down-sampling; no parameters).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.down = down
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels,
                                                             (2 if use_scale_shift_norm else 1) * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # 1. norm, SiLU, (down-sample both branches), conv
        h = self.in_layers[1](self.in_layers[0](x))
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_layers[2](h)
        # 2. the embedding as a per-channel scale and shift of the second norm (or an added bias)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention per head: q, k, v [B*heads, ch, T] -> [B*heads, ch, T] (scale 1/sqrt(ch), softmax in
    float32)."""
    ch = q.shape[1]
    w = torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch)
    w = torch.softmax(w.float(), dim=-1).to(q.dtype)
    return torch.einsum("bts,bcs->bct", w, v)


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions with a residual connection (ADM; heads of ``head_channels``).

    The qkv projection's output channels are grouped head by head, each head's [q; k; v] contiguous (the
    reference's "legacy" order, which its released weights use).
    """

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.num_heads = channels // head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = qkv.chunk(3, dim=1)
        h = _attend(q, k, v).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (ADM's classifier head): the mean of the positions is prepended as a query
    token, a learned positional embedding [C, HW + 1] is added, and the attention output at that token is
    projected to the outputs.

    The qkv projection's output channels are [all q; all k; all v], then split into heads (the reference's
    "new" order for this layer).
    """

    def __init__(self, spatial: int, channels: int, head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial ** 2 + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.num_heads = channels // head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        q, k, v = self.qkv_proj(x).chunk(3, dim=1)
        n = b * self.num_heads
        h = _attend(q.reshape(n, c // self.num_heads, -1), k.reshape(n, c // self.num_heads, -1),
                    v.reshape(n, c // self.num_heads, -1))
        return self.c_proj(h.reshape(b, c, -1))[:, :, 0]


class _Stack(nn.ModuleList):
    """Layers applied in order; those that take the embedding get it (ADM's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class EncoderUNet(nn.Module):
    """ADM's classifier encoder: time embedding, input blocks, middle block, attention-pooled head.

    ``forward(x, t, condition=None, feature=False)``: x [N, in_channels, H, W]; t [N] times (multiplied by
    ``config.time_scale`` before the embedding); ``condition`` (conditional config only): class indices [N] or
    one-hot [N, C] (argmax, as DG). Returns [N, out_channels] logits, or with ``feature=True`` the middle-block
    activation [N, *config.feature_shape] (what DG feeds to its head).

    Example::

        >>> net = EncoderUNet(TINY_EXTRACTOR)
        >>> net(torch.zeros(2, 1, 8, 8), torch.full([2], 0.5), feature=True).shape
        torch.Size([2, 64, 4, 4])
    """

    def __init__(self, config: ADMConfig):
        super().__init__()
        if not isinstance(config, ADMConfig):
            raise ValueError(f"config must be an ADMConfig, got {type(config).__name__}. Fix: build one, e.g. "
                             "repro.nets.adm.DG_CIFAR10_EXTRACTOR or dg_head()")
        self.config = c = config
        C, emb_ch = c.model_channels, 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(C, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if c.condition:
            self.label_emb = nn.Embedding(c.num_classes, emb_ch)
        attention_ds = {c.image_size // r for r in c.attention_resolutions}
        ch = int(c.channel_mult[0] * C)
        blocks = [_Stack([nn.Conv2d(c.in_channels, ch, 3, padding=1)])]
        ds = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                out = int(mult * C)
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, out, c.dropout, c.use_scale_shift_norm)]
                ch = out
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, c.num_head_channels))
                blocks.append(_Stack(layers))
            if level != len(c.channel_mult) - 1:
                if c.resblock_updown:
                    blocks.append(_Stack([ResBlock(ch, emb_ch, ch, c.dropout, c.use_scale_shift_norm, down=True)]))
                else:  # ADM's Downsample with a convolution (conv_resample=True): a strided 3x3 conv, key "op"
                    blocks.append(_Stack([_ConvDown(ch)]))
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = _Stack([ResBlock(ch, emb_ch, ch, c.dropout, c.use_scale_shift_norm),
                                    AttentionBlock(ch, c.num_head_channels),
                                    ResBlock(ch, emb_ch, ch, c.dropout, c.use_scale_shift_norm)])
        if c.pool == "attention":
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                     AttentionPool2d(c.image_size // ds, ch, c.num_head_channels, c.out_channels))
        else:  # "adaptive": norm, SiLU, global average, zero-initialised 1x1 conv, flatten
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     _zero(nn.Conv2d(ch, c.out_channels, 1)), nn.Flatten())

    def embed(self, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The block conditioning: MLP(sinusoidal(t * time_scale)) (+ the class embedding), [N, 4C]."""
        c = self.config
        emb = self.time_embed(timestep_embedding(t * c.time_scale, c.model_channels))
        if c.condition:
            if condition is None:
                raise ValueError("condition: this encoder is class-conditional (config.condition=True) and got no "
                                 "labels. Fix: pass class indices [N] or one-hot labels [N, C]")
            idx = condition if condition.ndim == 1 else condition.argmax(dim=1)
            emb = emb + self.label_emb(idx.long())
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None,
                feature: bool = False) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, condition)
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        return h if feature else self.out(h)


class _ConvDown(nn.Module):
    """Strided 3x3 convolution (ADM's Downsample with use_conv), parameters under ``op``."""

    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


# ----------------------------------------------------------------------------------------------------------
# Loading released and own weights.


def load_adm_state(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an ADM / DG state-dict file: a ``torch.save``d dict of tensors (``.pt``, read with
    ``weights_only=True``, so no pickled code runs) or a ``.safetensors`` file.

    ``sha256``: when given, the file's hash must match before anything is read. A file holding anything but a
    flat mapping of names to tensors (a pickled module, an optimizer state, a nested checkpoint) raises
    ValueError.

    Example::

        tensors = load_adm_state("discriminator_60.pt", sha256="...")
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file. Fix: download it (see research/dg.md a.4) and pass its path")
    if sha256 is not None:
        got = sha256_file(path)
        if got.lower() != sha256.lower():
            raise ValueError(f"{path}: sha256 {got} does not match the expected {sha256}. Fix: download the file "
                             "again, or correct the expected hash")
    if path.suffix == ".safetensors":

        return dict(load_safetensors(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a plain state dict that torch.load(weights_only=True) can read ({first}). "
                         "Fix: give the released state-dict file (e.g. 32x32_classifier.pt, discriminator_60.pt), "
                         "not a pickled model or a file from another source") from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else "a mapping with non-tensor values"
        raise ValueError(f"{path}: expected a flat state dict (names -> tensors), got {kind}. Fix: save "
                         "net.state_dict() itself, not a training checkpoint or a whole module")
    return dict(obj)


def load_adm(path: str | Path, config: ADMConfig, sha256: str | None = None, device="cpu") -> EncoderUNet:
    """Build :class:`EncoderUNet` for ``config`` and copy the file's tensors in with a strict key and shape check.

    A file whose keys or shapes differ (another size, a DG head passed as the extractor, a reshaped tensor)
    raises ValueError naming the first differences. Returns the network in eval mode on ``device``.

    Example::

        ext = load_adm("32x32_classifier.pt", DG_CIFAR10_EXTRACTOR).requires_grad_(False)
    """
    tensors = load_adm_state(path, sha256)
    net = EncoderUNet(config)
    try:
        load_state_strict(net, tensors, str(path))
    except ValueError as e:
        raise ValueError(f"{e}. Fix: check that the file is the one for this config "
                         f"({dataclasses.replace(config)}), e.g. extractor vs head, conditional vs not") from None
    return net.to(device).eval()
