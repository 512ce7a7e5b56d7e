"""DDPM++ U-Net with EDM / VP preconditioning (clean-room reimplementation).

This module provides the denoiser networks used throughout :mod:`repro`:

* :class:`SongUNet` -- the DDPM++ U-Net of Song et al. (2021), "Score-Based
  Generative Modeling through Stochastic Differential Equations", in the form
  used by Karras et al. (2022), "Elucidating the Design Space of
  Diffusion-Based Generative Models" (EDM).
* :class:`EDMPrecond` -- EDM preconditioning (EDM paper, Table 1, "Ours").
* :class:`VPPrecond` -- variance-preserving preconditioning (EDM paper,
  Table 1, "VP").

The code is written from the papers and from *facts* about the reference
implementation (parameter names and shapes, constants, initialisation and the
order of operations); it does not reuse the reference code.  Parameter and
buffer names/shapes are identical to the reference ``state_dict`` so that the
released EDM weights can be copied in with a strict key + shape check.

Model contract of the package: every denoiser exposes
``denoise(x, sigma, labels=None) -> D(x; sigma)`` (float32), where ``labels``
are one-hot class vectors ``[N, label_dim]`` (or ``None``).

Only the DDPM++ variant of the U-Net is implemented (positional noise
embedding, standard encoder/decoder, one attention head); NCSN++ options raise
``ValueError``.  Computation is always float32.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repro.nets.layers import check_levels

__all__ = [
    "Linear",
    "Conv2d",
    "GroupNorm",
    "UNetBlock",
    "SongUNet",
    "EDMPrecond",
    "VPPrecond",
    "EDM_CIFAR10_DDPMPP",
    "EDM_CIFAR10_DDPMPP_COND",
    "EDM_CIFAR10_DDPMPP_UNCOND",
    "BASELINE_CIFAR10_DDPMPP_VP",
    "TINY_8X8_COND",
]


# ---------------------------------------------------------------------------
# Primitive layers.  All weights use Xavier-uniform initialisation scaled by a
# per-layer gain (1 for ordinary layers, 1e-5 for the "almost zero" output
# layers of each residual branch, sqrt(0.2) for the attention qkv projection);
# all biases start at zero.  This is the initialisation of the DDPM++ net.
# ---------------------------------------------------------------------------


def _xavier_uniform(shape: Sequence[int], fan_in: int, fan_out: int, gain: float) -> torch.Tensor:
    """Uniform(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(*shape).uniform_(-bound, bound)


class Linear(nn.Module):
    """Fully connected layer ``y = x W^T + b`` with parameters ``weight`` [out, in], ``bias`` [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(_xavier_uniform([out_features, in_features], in_features, out_features, gain))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """Square convolution with optional 2x FIR up- or down-sampling in front.

    ``kernel == 0`` gives a pure resampling layer without parameters.  When
    resampling, the separable FIR filter ``f f^T / (sum f)^2`` is stored as the
    buffer ``resample_filter`` of shape [1, 1, len(f), len(f)]; it is applied
    depthwise with stride 2 (scaled by 4 for up-sampling so that the filter
    [1, 1] gives nearest-neighbour up-sampling and 2x2 average pooling).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        gain: float = 1.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.up = up
        self.down = down
        if kernel:
            k2 = kernel * kernel
            w = _xavier_uniform([out_channels, in_channels, kernel, kernel], in_channels * k2, out_channels * k2, gain)
            self.weight = nn.Parameter(w)
            self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        else:
            self.weight = None
            self.bias = None
        if up or down:
            taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
            fir = torch.outer(taps, taps) / taps.sum() ** 2
            self.register_buffer("resample_filter", fir[None, None])
        else:
            self.resample_filter = None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        fir = self.resample_filter.to(x.dtype)
        pad = (fir.shape[-1] - 1) // 2
        depthwise = fir.repeat(channels, 1, 1, 1)
        if self.up:
            return F.conv_transpose2d(x, depthwise * 4, stride=2, padding=pad, groups=channels)
        return F.conv2d(x, depthwise, stride=2, padding=pad, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_filter is not None:
            x = self._resample(x)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(32, C // 4)`` groups (at least 4 channels per group)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, max_groups: int = 32, min_channels_per_group: int = 4):
        super().__init__()
        self.num_groups = min(max_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {num_channels} channels cannot be split into {self.num_groups} groups; "
                "use channel counts that are multiples of 4 (and of 32 above 128 channels)"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------------------
# DDPM++ residual block (Song et al. 2021, "BigGAN-style" ResNet block with
# additive noise-embedding conditioning, skip rescaling by 1/sqrt(2) and an
# optional single-head self-attention layer), as configured in EDM.
#
#   h   = conv0( silu(norm0(x)) )                      (optionally resampled)
#   h   = silu( norm1(h + affine(emb)) )
#   h   = conv1( dropout(h) )
#   out = (h + skip(x)) / sqrt(2)                      (skip: 1x1 conv if needed)
#   attention (if enabled):
#   q,k,v = qkv(norm2(out));  out = (proj(softmax(q^T k / sqrt(d)) v) + out) / sqrt(2)
# ---------------------------------------------------------------------------


class UNetBlock(nn.Module):
    """DDPM++ residual block with optional up/down-sampling and self-attention.

    Submodules (names match the reference state_dict): ``norm0``, ``conv0``,
    ``affine``, ``norm1``, ``conv1``, optional ``skip``, and when attention is
    enabled ``norm2``, ``qkv``, ``proj``.  The dropout probability is the plain
    float attribute ``dropout`` so that :func:`disable_dropout` can zero it.

    Example::

        blk = UNetBlock(64, 128, emb_channels=256, down=True, attention=True)
        y = blk(torch.randn(2, 64, 16, 16), torch.randn(2, 256))   # -> [2, 128, 8, 8]
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[float] = (1, 1),
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = num_heads if attention else 0
        self.dropout = float(dropout)
        self.skip_scale = skip_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, gain=1e-5)
        # DDPM++ always projects the shortcut with a 1x1 conv when the shape changes.
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError("UNetBlock: out_channels must be divisible by num_heads")
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, gain=1e-5)

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        n, c, height, width = h.shape
        heads = self.num_heads
        # Output channels of qkv are laid out as [head, channel-in-head, (q|k|v)].
        qkv = self.qkv(self.norm2(h)).reshape(n, heads, c // heads, 3, height * width)
        q, k, v = (qkv[:, :, :, i, :].transpose(-1, -2) for i in range(3))  # [n, heads, HW, d]
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        a = a.transpose(-1, -2).reshape(n, c, height, width)
        return (self.proj(a) + h) * self.skip_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.affine(emb)[:, :, None, None]
        h = F.silu(self.norm1(h))
        h = F.dropout(h, p=self.dropout, training=self.training)
        h = self.conv1(h)
        shortcut = x if self.skip is None else self.skip(x)
        h = (h + shortcut) * self.skip_scale
        if self.num_heads:
            h = self._attend(h)
        return h


# ---------------------------------------------------------------------------
# DDPM++ U-Net: Song et al. 2021 ("Score-Based Generative Modeling through
# SDEs", DDPM++ architecture), as re-implemented and configured in Karras et al.
# 2022 (EDM), Appendix F.2 / Table 7 ("DDPM++" column).
# ---------------------------------------------------------------------------


class SongUNet(nn.Module):
    """DDPM++ U-Net ``F_theta(x, c_noise, class_labels, augment_labels)``.

    Layout (``res = img_resolution >> level`` for each entry of ``channel_mult``):

    * mapping network: sinusoidal embedding of the noise label (``map_noise``),
      plus ``map_label`` (one-hot labels scaled by sqrt(label_dim)) and
      ``map_augment`` (augmentation labels, no bias), then ``map_layer0`` and
      ``map_layer1`` with SiLU;
    * encoder ``enc``: ``{res}x{res}_conv`` (level 0) or ``{res}x{res}_down``,
      then ``{res}x{res}_block{i}`` for ``i < num_blocks``;
    * decoder ``dec``: ``{res}x{res}_in0`` (with attention) and ``_in1`` at the
      lowest resolution, ``{res}x{res}_up`` elsewhere, then
      ``{res}x{res}_block{i}`` for ``i <= num_blocks`` (each consumes one
      encoder skip), and at full resolution ``_aux_norm`` + ``_aux_conv``.

    Example::

        unet = SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=10,
                        model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
        y = unet(torch.randn(4, 1, 8, 8), torch.zeros(4), torch.eye(10)[:4])   # -> [4, 1, 8, 8]
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Iterable[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        if embedding_type != "positional":
            raise ValueError(f"SongUNet: embedding_type={embedding_type!r} is not supported (only DDPM++ 'positional')")
        if encoder_type != "standard":
            raise ValueError(f"SongUNet: encoder_type={encoder_type!r} is not supported (only DDPM++ 'standard')")
        if decoder_type != "standard":
            raise ValueError(f"SongUNet: decoder_type={decoder_type!r} is not supported (only DDPM++ 'standard')")
        if int(channel_mult_noise) < 1:
            raise ValueError("SongUNet: channel_mult_noise must be a positive integer")
        channel_mult = check_levels("SongUNet", channel_mult, img_resolution)
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = float(label_dropout)
        attn_resolutions = {int(r) for r in attn_resolutions}
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * int(channel_mult_noise)
        self.noise_channels = noise_channels

        def block(cin: int, cout: int, **kw: Any) -> UNetBlock:
            return UNetBlock(cin, cout, emb_channels, dropout=dropout, resample_filter=resample_filter, **kw)

        # Mapping network.  map_noise has no parameters; it is a module so that
        # the attribute exists as in the reference layout.
        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder: remember the channel count of every activation pushed on the skip stack.
        self.enc = nn.ModuleDict()
        skip_channels = []
        ch = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(ch, model_channels, 3)
                ch = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = block(ch, ch, down=True)
            skip_channels.append(ch)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = block(ch, model_channels * mult, attention=res in attn_resolutions)
                ch = model_channels * mult
                skip_channels.append(ch)

        # Decoder: blocks named *_block{i} take the concatenation [x, skip].
        self.dec = nn.ModuleDict()
        self._takes_skip = set()
        for level in reversed(range(len(channel_mult))):
            res = img_resolution >> level
            mult = channel_mult[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(ch, ch, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(ch, ch)
            else:
                self.dec[f"{res}x{res}_up"] = block(ch, ch, up=True)
            for i in range(num_blocks + 1):
                name = f"{res}x{res}_block{i}"
                attn = i == num_blocks and res in attn_resolutions
                self.dec[name] = block(ch + skip_channels.pop(), model_channels * mult, attention=attn)
                self._takes_skip.add(name)
                ch = model_channels * mult
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(ch, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(ch, out_channels, 3, gain=1e-5)
        assert not skip_channels

    def _embed(
        self,
        noise_labels: torch.Tensor,
        batch: int,
        class_labels: Optional[torch.Tensor],
        augment_labels: Optional[torch.Tensor],
    ) -> torch.Tensor:
        emb = self.map_noise(noise_labels.reshape(-1))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(batch, self.label_dim, device=emb.device, dtype=emb.dtype)
            y = class_labels.to(emb.dtype)
            if self.training and self.label_dropout > 0:
                keep = torch.rand(y.shape[0], 1, device=y.device) >= self.label_dropout
                y = y * keep.to(y.dtype)
            emb = emb + self.map_label(y * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        augment_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        emb = self._embed(noise_labels, x.shape[0], class_labels, augment_labels)

        stack = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            stack.append(x)

        aux_norm = None
        out = None
        for name, module in self.dec.items():
            if name.endswith("_aux_norm"):
                aux_norm = module
            elif name.endswith("_aux_conv"):
                out = module(F.silu(aux_norm(x)))
            else:
                if name in self._takes_skip:
                    x = torch.cat([x, stack.pop()], dim=1)
                x = module(x, emb)
        return out


class PositionalEmbedding(nn.Module):
    """Transformer-style embedding [sin(c w_i), cos(c w_i)] with w_i = 10000^(-i/(C/2 - 1)), i < C/2.

    (The frequencies include both end points 1 and 1/10000; the sine half comes first.)
    """

    def __init__(self, num_channels: int, max_period: float = 10000.0):
        super().__init__()
        if num_channels % 2 or num_channels < 4:
            raise ValueError("noise embedding needs an even number of channels >= 4")
        self.num_channels = num_channels
        self.max_period = max_period

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=c.device) / (half - 1)
        freqs = self.max_period ** (-exponent)
        angles = c.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


# ---------------------------------------------------------------------------
# Shared plumbing of the preconditioning wrappers.
# ---------------------------------------------------------------------------

def _make_unet(img_resolution: int, img_channels: int, label_dim: int, unet_kwargs: dict) -> SongUNet:
    unet_kwargs = dict(unet_kwargs)
    model_type = unet_kwargs.pop("model_type", "SongUNet")
    if model_type != "SongUNet":
        raise ValueError(f"model_type={model_type!r} is not supported (only 'SongUNet')")
    return SongUNet(
        img_resolution=img_resolution,
        in_channels=img_channels,
        out_channels=img_channels,
        label_dim=label_dim,
        **unet_kwargs,
    )


class _Precond(nn.Module):
    """Common input handling: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)."""

    img_resolution: int
    img_channels: int
    label_dim: int

    def _check_fp16(self, use_fp16: bool) -> None:
        if use_fp16:
            raise ValueError("use_fp16=True is not supported: this implementation always computes in float32")
        self.use_fp16 = False

    def _sigma_column(self, sigma: Any, x: torch.Tensor) -> torch.Tensor:
        """Return sigma as a float32 tensor of shape [N, 1, 1, 1]."""
        n = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(n)
        elif s.numel() != n:
            raise ValueError(f"sigma has {s.numel()} entries but the batch has {n} images")
        return s.reshape(n, 1, 1, 1)

    def _labels(self, labels: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.label_dim == 0:
            return None  # unconditional net: labels are ignored
        n = x.shape[0]
        if labels is None:
            return torch.zeros(n, self.label_dim, device=x.device)
        labels = torch.as_tensor(labels, device=x.device)
        if labels.ndim == 1 and not labels.is_floating_point():
            labels = F.one_hot(labels.long(), self.label_dim)  # class indices -> one-hot
        labels = labels.to(torch.float32).reshape(-1, self.label_dim)
        if labels.shape[0] == 1 and n > 1:
            labels = labels.expand(n, -1)
        elif labels.shape[0] != n:
            raise ValueError(f"labels have {labels.shape[0]} rows but the batch has {n} images")
        return labels

    def coefficients(self, sigma: torch.Tensor):
        """Return (c_skip, c_out, c_in, c_noise) for a float32 sigma tensor."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        sigma: Any,
        labels: Optional[torch.Tensor] = None,
        augment_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = self._sigma_column(sigma, x)
        labels = self._labels(labels, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model(c_in * x, c_noise.reshape(-1), class_labels=labels, augment_labels=augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def denoise(self, x: torch.Tensor, sigma: Any, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The package's model contract: D(x; sigma) for one-hot ``labels`` (or None)."""
        return self(x, sigma, labels)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        """Continuous-time nets accept any sigma: identity (kept for sampler compatibility)."""
        return torch.as_tensor(sigma)


# ---------------------------------------------------------------------------
# EDM preconditioning: Karras et al. 2022, Table 1 ("Ours") / Eq. (7):
#   c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
#   c_out  = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
#   c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
#   c_noise = ln(sigma) / 4
#   D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
# ---------------------------------------------------------------------------


class EDMPrecond(_Precond):
    """EDM-preconditioned denoiser ``D(x; sigma)`` around a DDPM++ :class:`SongUNet` (``.model``).

    ``sigma_min``/``sigma_max`` are informational (the supported noise range),
    as in the reference.  ``sigma`` must be > 0 (c_noise = ln(sigma)/4); it may
    be a float, a 0-d tensor, or per-sample ``[N]`` / ``[N, 1, 1, 1]``.
    ``labels``: one-hot ``[N, label_dim]`` (integer class indices ``[N]`` are
    converted), ``None`` = all-zero labels; ignored when ``label_dim == 0``.

    Example::

        net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                         channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
        x = torch.randn(4, 1, 8, 8)
        d = net.denoise(x, torch.full((4,), 2.0), torch.eye(10)[:4])   # -> [4, 1, 8, 8]
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        use_fp16: bool = False,
        **unet_kwargs: Any,
    ):
        super().__init__()
        self._check_fp16(use_fp16)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _make_unet(img_resolution, img_channels, label_dim, unet_kwargs)

    def coefficients(self, sigma: torch.Tensor):
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2).sqrt()
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / norm
        c_in = 1 / norm
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


# ---------------------------------------------------------------------------
# VP preconditioning: Karras et al. 2022, Table 1 ("VP" column), the variance
# preserving SDE of Song et al. 2021 with linear beta(t) = beta_min + beta_d t:
#   sigma(t)       = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
#   sigma^{-1}(s)  = (sqrt(beta_min^2 + 2 beta_d ln(1 + s^2)) - beta_min) / beta_d
#   c_skip = 1,  c_out = -sigma,  c_in = 1 / sqrt(sigma^2 + 1),
#   c_noise = (M - 1) sigma^{-1}(sigma)
# ---------------------------------------------------------------------------


class VPPrecond(_Precond):
    """VP-preconditioned denoiser ``D(x; sigma)`` around a DDPM++ :class:`SongUNet` (``.model``).

    ``sigma_min = sigma(epsilon_t)`` and ``sigma_max = sigma(1)`` as in the
    reference.  (``sigma``/``sigma_inv`` use expm1/log1p, i.e. they are more
    accurate than a naive float32 evaluation at very small sigma.)

    Example::

        net = VPPrecond(img_resolution=8, img_channels=1, model_channels=16,
                        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
        d = net.denoise(torch.randn(2, 1, 8, 8), 0.5)   # -> [2, 1, 8, 8]
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        use_fp16: bool = False,
        **unet_kwargs: Any,
    ):
        super().__init__()
        self._check_fp16(use_fp16)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Python floats (double precision; also works under a meta-device context).
        vp_sigma = lambda t: math.sqrt(math.expm1(0.5 * beta_d * t**2 + beta_min * t))  # noqa: E731
        self.sigma_min = vp_sigma(epsilon_t)
        self.sigma_max = vp_sigma(1.0)
        self.model = _make_unet(img_resolution, img_channels, label_dim, unet_kwargs)

    def sigma(self, t: Any) -> torch.Tensor:
        """Noise level sigma(t) of the VP SDE."""
        t = torch.as_tensor(t)
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def sigma_inv(self, sigma: Any) -> torch.Tensor:
        """Inverse of :meth:`sigma`: the time t with sigma(t) = sigma."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


# ---------------------------------------------------------------------------
# Architecture dictionaries and helpers.
# ---------------------------------------------------------------------------

# EDM config F, released as edm-cifar10-32x32-{cond,uncond}-vp.pkl.  The "vp" in
# the file names refers to the DDPM++ architecture (from the VP-SDE paper): the
# nets were trained with `train.py --cond={1,0} --arch=ddpmpp` and the default
# `--precond=edm`, i.e. they are EDMPrecond networks.  train.py's ddpmpp preset:
# model_channels=128, channel_mult=[2,2,2], resample_filter=[1,1], positional
# embedding, standard encoder/decoder; defaults dropout=0.13, --augment=0.12 ->
# augment_dim=9; SongUNet defaults num_blocks=4, attn_resolutions=[16].
EDM_CIFAR10_DDPMPP_COND = dict(
    precond="edm",
    img_resolution=32,
    img_channels=3,
    label_dim=10,
    model_channels=128,
    channel_mult=[2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    label_dropout=0.0,
    augment_dim=9,
    sigma_data=0.5,
)
EDM_CIFAR10_DDPMPP_UNCOND = dict(EDM_CIFAR10_DDPMPP_COND, label_dim=0)
# Short name for the class-conditional one; use dict(EDM_CIFAR10_DDPMPP, label_dim=0) for uncond.
EDM_CIFAR10_DDPMPP = EDM_CIFAR10_DDPMPP_COND

# EDM config A baseline (Song et al.'s DDPM++ "cont." VP model, converted by
# EDM; baseline-cifar10-32x32-uncond-vp.pkl).  Assumed to use the SongUNet
# defaults (channel_mult [1,2,2,2], dropout 0.1, no augmentation) with
# VPPrecond -- NOT verified against the pickle; a strict loader will tell.
BASELINE_CIFAR10_DDPMPP_VP = dict(
    precond="vp",
    img_resolution=32,
    img_channels=3,
    label_dim=0,
    model_channels=128,
    channel_mult=[1, 2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.10,
    label_dropout=0.0,
    augment_dim=0,
)

# Tiny class-conditional net for 8x8 single-channel digit images (CPU tests and smoke runs).
TINY_8X8_COND = dict(
    precond="edm",
    img_resolution=8,
    img_channels=1,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2],
    channel_mult_emb=4,
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
    label_dropout=0.0,
    augment_dim=0,
    sigma_data=0.5,
)



PRESETS = {
    "edm-cifar10-32x32-cond-vp": EDM_CIFAR10_DDPMPP_COND,
    "edm-cifar10-32x32-uncond-vp": EDM_CIFAR10_DDPMPP_UNCOND,
    "baseline-cifar10-32x32-uncond-vp": BASELINE_CIFAR10_DDPMPP_VP,
    "tiny-8x8-cond": TINY_8X8_COND,
}
