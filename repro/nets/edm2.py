"""EDM2 magnitude-preserving U-Net with EDM preconditioning (clean-room reimplementation).

Source of the design: Karras, Aittala, Lehtinen, Hellsten, Aila, Laine (2024),
"Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2,
CVPR 2024).  The paper's final configuration ("config G", Section 3 and
Appendix B, Figure 21) replaces every layer of the ADM-style U-Net by a
*magnitude-preserving* (MP) counterpart so that, with unit-variance inputs and
weights of any scale, activations keep (approximately) unit magnitude:

* :class:`MPConv`  -- convolution / fully connected layer whose weight is
  normalised per output channel and divided by sqrt(fan_in) before use
  (Eq. 47, "magnitude-preserving learned layers"), with forced weight
  normalisation of the stored weight during training (Eq. 66);
* :func:`mp_silu`  -- SiLU divided by 0.596, the RMS of silu(z) for
  z ~ N(0, 1) (Eq. 81);
* :func:`mp_sum`   -- weighted sum ``((1-t) a + t b) / sqrt((1-t)^2 + t^2)``
  (Eq. 88);
* :func:`mp_cat`   -- concatenation that re-weights both parts so the result
  has unit magnitude and the parts contribute in the ratio (1-t) : t (Eq. 103);
* :class:`MPFourier` -- random Fourier features ``sqrt(2) cos(2 pi (f c + p))``
  for the noise embedding (Eq. 75);
* pixel normalisation of the encoder activations and of q/k/v in attention;
  learned scalar gains (``emb_gain``, ``out_gain``) that start at zero.

The wrapper :class:`Precond` applies the EDM preconditioning of Karras et
al. (2022), "Elucidating the Design Space of Diffusion-Based Generative
Models", Table 1 (c_skip, c_out, c_in, c_noise = ln(sigma)/4, sigma_data 0.5)
and carries the EDM2 uncertainty head ``u(sigma)`` (EDM2 Eq. 21, Section 2 /
Appendix B.2: ``logvar_fourier`` + ``logvar_linear``).  DDO drops the learned
uncertainty during fine-tuning, but the head is kept so that the state_dict
keys match the released checkpoints.

Written from the paper and from *facts* about the reference implementation
(module and parameter names, shapes, constants, the order of operations); the
reference code is not reused.  Parameter and buffer names/shapes are identical
to the reference ``state_dict`` (``training/networks_edm2.py:Precond``) for the
same configuration, so released EDM2 weights can be copied in with a strict
key + shape check.

Model contract of the package: ``denoise(x, sigma, labels=None) -> D(x; sigma)``
(float32), with ``labels`` one-hot ``[N, label_dim]`` or ``None``.
Computation is float32 by default; ``use_fp16=True`` runs the U-Net in
float16 on CUDA only (CPU always computes in float32).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repro.nets.layers import check_levels, count_parameters

__all__ = [
    "mp_silu",
    "mp_sum",
    "mp_cat",
    "pixel_norm",
    "MPFourier",
    "MPConv",
    "Block",
    "UNet",
    "Precond",
    "PRESETS",
    "count_parameters",
]


# ---------------------------------------------------------------------------
# Magnitude-preserving primitives (EDM2 Section 2.3-2.4, Appendix B).
# ---------------------------------------------------------------------------

_SILU_RMS = 0.596  # E[silu(z)^2]^(1/2) for z ~ N(0, 1), EDM2 Eq. 81.


def _unit_rms(x: torch.Tensor, dims: Sequence[int], eps: float = 1e-4) -> torch.Tensor:
    """Scale ``x`` so that its root-mean-square over ``dims`` is (about) one.

    ``x / (eps + ||x||_dims / sqrt(#elements over dims))``; the norm is taken
    in float32 and the result keeps the dtype of ``x``.
    """
    count = 1
    for d in dims:
        count *= x.shape[d]
    length = torch.linalg.vector_norm(x, dim=list(dims), keepdim=True, dtype=torch.float32)
    rms = length * (1.0 / math.sqrt(count)) + eps
    return x / rms.to(x.dtype)


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-4) -> torch.Tensor:
    """Pixel normalisation: unit RMS over the channel axis ``dim`` at every position."""
    return _unit_rms(x, [dim], eps)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, EDM2 Eq. 81: ``silu(x) / 0.596``."""
    return F.silu(x) / _SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend, EDM2 Eq. 88: ``lerp(a, b, t) / sqrt((1-t)^2 + t^2)``.

    ``t = 0`` returns ``a``, ``t = 1`` returns ``b``; for uncorrelated unit
    inputs the output has unit variance.

    Example::

        y = mp_sum(torch.randn(1000), torch.randn(1000), t=0.3)   # y.std() ~ 1
    """
    return torch.lerp(a, b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation, EDM2 Eq. 103.

    With ``Na``/``Nb`` channels, ``s = sqrt((Na + Nb) / ((1-t)^2 + t^2))``;
    ``a`` is scaled by ``s (1-t) / sqrt(Na)`` and ``b`` by ``s t / sqrt(Nb)``
    so that unit-RMS inputs give a unit-RMS output.
    """
    na, nb = a.shape[dim], b.shape[dim]
    s = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (s * (1 - t) / math.sqrt(na)), b * (s * t / math.sqrt(nb))], dim=dim)


def _resample2x(x: torch.Tensor, taps: Sequence[float], mode: str) -> torch.Tensor:
    """2x up/down-sampling with the separable FIR ``taps`` (``mode`` in keep/up/down).

    The 2-D filter is ``outer(taps, taps) / sum(taps)^2``, applied depthwise with
    stride 2 (times 4 for up-sampling).  ``taps = [1, 1]`` gives 2x2 average
    pooling and nearest-neighbour up-sampling.
    """
    if mode == "keep":
        return x
    if mode not in ("up", "down"):
        raise ValueError(f"resample mode must be 'keep', 'up' or 'down', got {mode!r}")
    taps_t = torch.as_tensor([float(v) for v in taps], dtype=torch.float32)
    if taps_t.ndim != 1 or taps_t.numel() % 2:
        raise ValueError("resample filter must be 1-D with an even number of taps")
    kernel = torch.outer(taps_t, taps_t) / taps_t.sum() ** 2
    channels = x.shape[1]
    kernel = kernel.to(device=x.device, dtype=x.dtype).expand(channels, 1, -1, -1)
    pad = (taps_t.numel() - 1) // 2
    if mode == "down":
        return F.conv2d(x, kernel, stride=2, padding=pad, groups=channels)
    return F.conv_transpose2d(x, kernel * 4, stride=2, padding=pad, groups=channels)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features (EDM2 Eq. 75).

    Buffers ``freqs`` (``2 pi * N(0, 1) * bandwidth``) and ``phases``
    (``2 pi * U(0, 1)``), both ``[num_channels]``, are fixed at construction.
    ``forward(c)`` maps a vector ``[N]`` to ``sqrt(2) cos(c f + p)`` of shape
    ``[N, num_channels]`` (unit RMS per row for random phases), computed in
    float32 and returned in ``c``'s dtype.

    Example::

        feats = MPFourier(128)(torch.log(torch.tensor([0.5, 2.0])) / 4)   # -> [2, 128]
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.register_buffer("freqs", torch.randn(num_channels) * (2 * math.pi * bandwidth))
        self.register_buffer("phases", torch.rand(num_channels) * (2 * math.pi))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(c.to(torch.float32).reshape(-1), self.freqs.to(torch.float32))
        angles = angles + self.phases.to(torch.float32)
        return (torch.cos(angles) * math.sqrt(2)).to(c.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv (``kernel=[k, k]``) or linear layer (``kernel=[]``).

    The single parameter ``weight`` has shape ``[out, in, *kernel]`` and starts
    as N(0, 1) (no bias).  In ``forward(x, gain=1)`` each output filter is
    normalised to unit RMS and scaled by ``gain / sqrt(fan_in)`` (EDM2 Eq. 47),
    so the layer's output does not depend on the scale of the stored weight.
    In training mode the stored weight is additionally overwritten by its
    normalised version before use ("forced weight normalisation", Eq. 66).
    Convolutions use zero "same" padding.

    Example::

        conv = MPConv(16, 32, kernel=[3, 3])
        y = conv(torch.randn(2, 16, 8, 8))              # -> [2, 32, 8, 8], y.std() ~ 1
        lin = MPConv(16, 4, kernel=[])
        z = lin(torch.randn(2, 16), gain=0.5)           # -> [2, 4]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        kernel = [int(k) for k in kernel]
        if len(kernel) not in (0, 2):
            raise ValueError("MPConv: kernel must be [] (linear) or [k, k] (conv)")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain: Any = 1.0) -> torch.Tensor:
        """The float32 weight actually applied: unit-RMS filters times ``gain / sqrt(fan_in)``."""
        fan_dims = list(range(1, self.weight.ndim))
        w = _unit_rms(self.weight.to(torch.float32), fan_dims)
        fan_in = self.weight[0].numel()
        return w * (gain / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor, gain: Any = 1.0) -> torch.Tensor:
        if self.training:
            with torch.no_grad():  # forced weight normalisation of the stored parameter
                fan_dims = list(range(1, self.weight.ndim))
                self.weight.copy_(_unit_rms(self.weight.to(torch.float32), fan_dims))
        w = self.effective_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# ---------------------------------------------------------------------------
# U-Net block (EDM2 Figure 21, "Encoder block" / "Decoder block").
#
#   encoder:  x = resample(x);  x = skip_1x1(x) if C changes;  x = pixel_norm(x)
#   decoder:  x = resample(x)
#   residual: y = conv_res0(mp_silu(x))
#             y = mp_silu(y * (1 + emb_linear(emb, gain=emb_gain)))
#             y = conv_res1(dropout(y))
#   decoder:  x = skip_1x1(x) if C changes
#   merge:    x = mp_sum(x, y, t=res_balance)                       (0.3)
#   attention (optional, heads of `channels_per_head` channels):
#             q, k, v = pixel_norm(attn_qkv(x)) per head
#             x = mp_sum(x, attn_proj(softmax(q^T k / sqrt(d)) v), t=attn_balance)
#   x = clamp(x, -clip_act, clip_act)                               (256)
# ---------------------------------------------------------------------------


class Block(nn.Module):
    """EDM2 encoder (``flavor='enc'``) or decoder (``flavor='dec'``) block.

    Submodules/parameters (names match the reference state_dict): ``emb_gain``
    (scalar, init 0), ``conv_res0``, ``emb_linear``, ``conv_res1``, optional
    ``conv_skip`` (1x1, when ``in_channels != out_channels``) and, when
    attention is on and ``out_channels >= channels_per_head``, ``attn_qkv``
    and ``attn_proj``.  The number of heads is ``out_channels //
    channels_per_head`` (so a requested attention layer silently disappears
    for fewer than ``channels_per_head`` channels, as in the reference).
    ``dropout`` is a plain float attribute (see :func:`repro.nets.layers.disable_dropout`).

    Example::

        blk = Block(64, 128, emb_channels=256, flavor="enc", resample_mode="down", attention=True)
        y = blk(torch.randn(2, 64, 16, 16), torch.randn(2, 256))   # -> [2, 128, 8, 8]
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: Optional[float] = 256,
    ):
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block: flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"Block: resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = [float(v) for v in resample_filter]
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = float(dropout)
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act

        # Registration order mirrors the reference state_dict order.
        self.emb_gain = nn.Parameter(torch.zeros([]))
        res0_in = out_channels if flavor == "enc" else in_channels
        self.conv_res0 = MPConv(res0_in, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        if self.num_heads:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1])
            self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1])
        else:
            self.attn_qkv = None
            self.attn_proj = None

    def _self_attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        heads = self.num_heads
        # qkv output channels are laid out as [head, channel-in-head, (q|k|v)].
        qkv = self.attn_qkv(x).reshape(n, heads, c // heads, 3, h * w)
        qkv = pixel_norm(qkv, dim=2)
        q, k, v = (qkv[:, :, :, i, :].transpose(-1, -2) for i in range(3))  # [n, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return self.attn_proj(out)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = _resample2x(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=True)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self._self_attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


# ---------------------------------------------------------------------------
# EDM2 U-Net (EDM2 Figure 21 / Appendix B.7, config G).
#
# Embedding:  e = emb_noise(emb_fourier(c_noise));
#             e = mp_sum(e, emb_label(onehot * sqrt(label_dim)), t=label_balance)   (0.5)
#             e = mp_silu(e)
# Encoder:    x = cat([x, 1]) -> {res}x{res}_conv at level 0, {res}x{res}_down
#             at later levels, then num_blocks x {res}x{res}_block{i}; every
#             output is kept as a skip.
# Decoder:    {res}x{res}_in0 (attention) + _in1 at the lowest resolution,
#             {res}x{res}_up elsewhere, then num_blocks+1 x _block{i}, each fed
#             mp_cat(x, skip, t=concat_balance)                                   (0.5)
# Output:     out_conv(x, gain=out_gain)   (out_gain starts at 0)
# Channels:   cblock = model_channels * channel_mult; noise-embedding width
#             cblock[0] (or model_channels * channel_mult_noise); embedding
#             width max(cblock) (or model_channels * channel_mult_emb).
# ---------------------------------------------------------------------------


class UNet(nn.Module):
    """EDM2 magnitude-preserving U-Net ``F(x, c_noise, class_labels)``.

    ``x``: ``[N, img_channels, R, R]``; ``c_noise``: ``[N]``; ``class_labels``:
    ``[N, label_dim]`` (or ``None`` for an unconditional net).  Block keyword
    arguments (``dropout``, ``channels_per_head``, ``res_balance``,
    ``attn_balance``, ``clip_act``, ``resample_filter``) are passed to every
    :class:`Block`.

    Example::

        unet = UNet(img_resolution=8, img_channels=3, label_dim=10, model_channels=16,
                        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
        y = unet(torch.randn(2, 3, 8, 8), torch.zeros(2), torch.eye(10)[:2])   # -> [2, 3, 8, 8]
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: Optional[int] = None,
        channel_mult_emb: Optional[int] = None,
        num_blocks: int = 3,
        attn_resolutions: Iterable[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        **block_kwargs: Any,
    ):
        channel_mult = check_levels("EDM2 UNet", channel_mult, img_resolution)
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        attn_resolutions = {int(r) for r in attn_resolutions}
        widths = [model_channels * m for m in channel_mult]
        noise_width = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_width = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.emb_channels = emb_width

        def block(cin: int, cout: int, **kw: Any) -> Block:
            return Block(cin, cout, emb_width, **kw, **block_kwargs)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_width)
        self.emb_noise = MPConv(noise_width, emb_width, kernel=[])
        self.emb_label = MPConv(label_dim, emb_width, kernel=[]) if label_dim else None

        # Encoder; remember the width of every activation kept as a skip.
        self.enc = nn.ModuleDict()
        skip_widths = []
        ch = img_channels + 1  # + constant-one channel
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(ch, width, kernel=[3, 3])
                ch = width
            else:
                self.enc[f"{res}x{res}_down"] = block(ch, ch, flavor="enc", resample_mode="down")
            skip_widths.append(ch)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = block(ch, width, flavor="enc", attention=res in attn_resolutions)
                ch = width
                skip_widths.append(ch)

        # Decoder; every *_block{i} consumes one skip.
        self.dec = nn.ModuleDict()
        for level in reversed(range(len(widths))):
            res = img_resolution >> level
            width = widths[level]
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = block(ch, ch, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(ch, ch, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(ch, ch, flavor="dec", resample_mode="up")
            for i in range(num_blocks + 1):
                cin = ch + skip_widths.pop()
                self.dec[f"{res}x{res}_block{i}"] = block(cin, width, flavor="dec", attention=res in attn_resolutions)
                ch = width
        assert not skip_widths
        self.out_conv = MPConv(ch, img_channels, kernel=[3, 3])

    def embed(self, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Conditioning vector ``[N, emb_channels]`` (unit magnitude by construction)."""
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(emb.shape[0], self.label_dim, device=emb.device, dtype=emb.dtype)
            label_emb = self.emb_label(class_labels.to(emb.dtype) * math.sqrt(self.label_dim))
            emb = mp_sum(emb, label_emb, t=self.label_balance)
        return mp_silu(emb)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        emb = self.embed(c_noise.reshape(-1), class_labels)
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            h = layer(h) if isinstance(layer, MPConv) else layer(h, emb)
            skips.append(h)
        for name, layer in self.dec.items():
            if "_block" in name:
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
            h = layer(h, emb)
        return self.out_conv(h, gain=self.out_gain)


# ---------------------------------------------------------------------------
# Preconditioning: Karras et al. 2022 (EDM), Table 1 "Ours", as used by EDM2
# (Karras et al. 2024, Section 2 / Appendix B.2, Eq. 21 for the uncertainty):
#   c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
#   c_out   = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
#   c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
#   c_noise = ln(sigma) / 4
#   D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels)
#   u(sigma)    = logvar_linear(logvar_fourier(c_noise))   (log-variance, [N,1,1,1])
# ---------------------------------------------------------------------------


class Precond(nn.Module):
    """EDM-preconditioned EDM2 denoiser ``D(x; sigma)`` around :class:`UNet` (``.unet``).

    ``sigma`` (> 0) may be a float, a 0-d tensor or per-sample ``[N]`` /
    ``[N, 1, 1, 1]``.  ``labels``: one-hot ``[N, label_dim]`` (integer class
    indices ``[N]`` are converted; a single row is broadcast), ``None`` =
    all-zero labels; ignored by unconditional nets (``label_dim == 0``).
    ``return_logvar=True`` also returns the EDM2 uncertainty ``u(sigma)``
    (shape ``[N, 1, 1, 1]``).  ``use_fp16`` runs the U-Net in float16 on CUDA
    devices only; the preconditioning and the result are float32.

    Example::

        net = Precond(img_resolution=8, img_channels=3, label_dim=10, model_channels=16,
                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
        x = torch.randn(4, 3, 8, 8)
        d = net.denoise(x, torch.tensor([0.1, 0.5, 2.0, 10.0]), torch.eye(10)[:4])   # -> [4, 3, 8, 8]
        d, logvar = net(x, 1.0, None, return_logvar=True)                          # logvar: [4, 1, 1, 1]
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        **unet_kwargs: Any,
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = bool(use_fp16)
        self.sigma_data = sigma_data
        self.sigma_min = 0.0
        self.sigma_max = float("inf")
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    # -- input plumbing ---------------------------------------------------------------------------

    def _sigma_column(self, sigma: Any, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(n)
        elif s.numel() != n:
            raise ValueError(f"sigma has {s.numel()} entries but the batch has {n} images")
        return s.reshape(n, 1, 1, 1)

    def _labels(self, labels: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.label_dim == 0:
            return None
        n = x.shape[0]
        if labels is None:
            return torch.zeros(n, self.label_dim, device=x.device)
        labels = torch.as_tensor(labels, device=x.device)
        if labels.ndim == 1 and not labels.is_floating_point():
            labels = F.one_hot(labels.long(), self.label_dim)
        labels = labels.to(torch.float32).reshape(-1, self.label_dim)
        if labels.shape[0] == 1 and n > 1:
            labels = labels.expand(n, -1)
        elif labels.shape[0] != n:
            raise ValueError(f"labels have {labels.shape[0]} rows but the batch has {n} images")
        return labels

    def coefficients(self, sigma: torch.Tensor):
        """Return (c_skip, c_out, c_in, c_noise) for a float32 sigma tensor (EDM Table 1)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    # -- model API --------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        sigma: Any,
        labels: Optional[torch.Tensor] = None,
        return_logvar: bool = False,
    ):
        x = x.to(torch.float32)
        sigma = self._sigma_column(sigma, x)
        labels = self._labels(labels, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        c_noise = c_noise.reshape(-1)
        dtype = torch.float16 if (self.use_fp16 and x.device.type == "cuda") else torch.float32
        F_x = self.unet((c_in * x).to(dtype), c_noise, labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

    def denoise(self, x: torch.Tensor, sigma: Any, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The package's model contract: D(x; sigma) for one-hot ``labels`` (or None)."""
        return self(x, sigma, labels)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        """Continuous-time net: identity (kept for sampler compatibility)."""
        return torch.as_tensor(sigma)


# ---------------------------------------------------------------------------
# Architecture presets (EDM2 train_edm2.py configuration presets; the network
# interface comes from the dataset: ImageNet-64 is 3x64x64 RGB, ImageNet-512 is
# 4x64x64 SD-VAE latents; ImageNet has 1000 classes).  All sizes share
# channel_mult [1,2,3,4], num_blocks 3, attention at 16x16 and 8x8, 64-channel
# heads, and differ in model_channels and dropout:
#   XXS 64 / XS 128 / S 192: dropout 0;  M 256 / L 320 / XL 384 / XXL 448: dropout 0.10.
# The "-uncond" nets (label_dim 0) are the unconditional guides of EDM2's
# classifier-free-guidance presets.
# ---------------------------------------------------------------------------

_EDM2_SIZES = {"xxs": (64, 0.0), "xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.10),
               "l": (320, 0.10), "xl": (384, 0.10), "xxl": (448, 0.10)}
_DATASETS = {"img64": dict(img_resolution=64, img_channels=3), "img512": dict(img_resolution=64, img_channels=4)}
_RELEASED = {"img64": ("xs", "s", "m", "l", "xl"), "img512": ("xxs", "xs", "s", "m", "l", "xl", "xxl")}


def _edm2_arch(dataset: str, size: str, label_dim: int = 1000) -> dict:
    channels, dropout = _EDM2_SIZES[size]
    return dict(
        precond="edm2",
        **_DATASETS[dataset],
        label_dim=label_dim,
        model_channels=channels,
        channel_mult=[1, 2, 3, 4],
        num_blocks=3,
        attn_resolutions=[16, 8],
        channels_per_head=64,
        label_balance=0.5,
        concat_balance=0.5,
        res_balance=0.3,
        attn_balance=0.3,
        clip_act=256,
        dropout=dropout,
        sigma_data=0.5,
        logvar_channels=128,
    )


PRESETS = {f"{ds}-{size}": _edm2_arch(ds, size) for ds, sizes in _RELEASED.items() for size in sizes}
PRESETS["img512-xs-uncond"] = _edm2_arch("img512", "xs", label_dim=0)
PRESETS["img512-s-uncond"] = _edm2_arch("img512", "s", label_dim=0)
