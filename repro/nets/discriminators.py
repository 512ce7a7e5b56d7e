"""Noise-conditioned discriminators for discriminator guidance: a frozen feature extractor and a trainable head.

Every discriminator here answers DG's convention ``disc(x_vp, tau, labels) -> logit [N]``: x_vp = alpha x_0 +
s eps is a VP-noised input, tau in [0, 1] the VP time, and the output is log(d / (1 - d)) (before any
clipping) of the probability d that the input is a noised data sample rather than a noised model sample
(``repro.methods.dg.vp_logit`` adapts it to EDM's x and sigma). The trainer reads two more things:

* ``features(x_vp, tau)``: the frozen part (no parameters are trained there); ``forward(..., grad_features=
  False)`` evaluates it without a graph (DG's training, where only the head gets gradients);
* ``trainable``: the module that is trained and checkpointed (its ``state_dict`` is the checkpoint).

:class:`ADMDiscriminator` is DG's pixel-space discriminator: ADM's classifier encoder run to its middle block
(frozen) and a small ADM encoder head on that 8x8 map (Kim et al. 2023; research/dg.md a.1). Its ``trainable``
is the head, whose state dict has the layout of DG's released ``discriminator_60.pt`` / ``discriminator_250.pt``.
:class:`EncoderDiscriminator` is one ADM encoder with one output, trained end to end (our choice for data without a
pretrained classifier, such as the 8x8 digits). :class:`MLPDiscriminator` is the 2-D toys' discriminator (DG's toy:
an MLP of 4 layers of 256 units).

A discriminator is described by a JSON-able ``spec`` (:func:`spec_of`, :func:`build_discriminator`); the guidance
pipeline saves the trained module with its spec (:func:`save_discriminator`) and rebuilds it from the file
(:func:`load_discriminator`), the frozen extractor of an ADM discriminator coming from its own (released) file.

Example::

    disc = ADMDiscriminator.from_files("32x32_classifier.pt", "discriminator_60.pt")
    logit = disc(x_vp, tau)                      # [N]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from repro.nets.adm import DG_CIFAR10_EXTRACTOR, ADMConfig, EncoderUNet, dg_head, load_adm
from repro.nets.vpsde import sigma_from_tau
from repro.storage.files import load_safetensors, readable

__all__ = ["NoiseConditionedDiscriminator", "ADMDiscriminator", "EncoderDiscriminator", "MLPDiscriminator",
           "encoder_config", "spec_of", "build_discriminator", "save_discriminator", "load_discriminator",
           "read_discriminator_meta"]

FORMAT = "repro.discriminator/1"


class NoiseConditionedDiscriminator(nn.Module):
    """Base: ``forward(x_vp, tau, labels=None, grad_features=True) -> logit [N]`` = head_logit(features(...)).

    Subclasses define :meth:`head_logit` and, where there is a frozen part, :meth:`features`; ``trainable`` is
    the trained module (default: the whole discriminator).
    """

    def features(self, x_vp: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return x_vp

    def head_logit(self, h: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def trainable(self) -> nn.Module:
        return self

    def forward(self, x_vp: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor | None = None,
                grad_features: bool = True) -> torch.Tensor:
        tau = torch.as_tensor(tau, dtype=x_vp.dtype, device=x_vp.device).expand(x_vp.shape[0])
        if grad_features:
            h = self.features(x_vp, tau)
        else:
            with torch.no_grad():
                h = self.features(x_vp, tau)
        return self.head_logit(h, tau, labels)


class ADMDiscriminator(NoiseConditionedDiscriminator):
    """DG's discriminator: frozen ADM classifier encoder to its middle block, then a trainable ADM encoder head.

    ``extractor``: :class:`~repro.nets.adm.EncoderUNet` (e.g. ``32x32_classifier.pt``), frozen here
    (``requires_grad_(False)``, kept in eval mode); gradients still flow through it to the input, as guidance
    needs. ``head``: an EncoderUNet with one output whose ``in_channels`` are the extractor's feature channels;
    a conditional head takes class indices or one-hot labels.

    Example::

        disc = ADMDiscriminator(EncoderUNet(TINY_EXTRACTOR), EncoderUNet(tiny_head()))
        disc(torch.zeros(2, 1, 8, 8), torch.full([2], 0.3)).shape      # torch.Size([2])
    """

    def __init__(self, extractor: EncoderUNet, head: EncoderUNet):
        super().__init__()
        fc = extractor.config.feature_shape
        if head.config.in_channels != fc[0] or head.config.image_size != fc[1] or head.config.out_channels != 1:
            raise ValueError(f"head: expects {head.config.in_channels}x{head.config.image_size}x"
                             f"{head.config.image_size} inputs with {head.config.out_channels} output(s), the "
                             f"extractor gives {fc[0]}x{fc[1]}x{fc[2]} features. Fix: build the head with "
                             f"dg_head(in_channels={fc[0]}, image_size={fc[1]}) (one output)")
        self.extractor = extractor.requires_grad_(False).eval()
        self.head = head

    @property
    def trainable(self) -> nn.Module:
        return self.head

    def train(self, mode: bool = True) -> "ADMDiscriminator":
        super().train(mode)
        self.extractor.eval()  # frozen: no dropout in it, whatever the mode
        return self

    def features(self, x_vp: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.extractor(x_vp, tau, feature=True)

    def head_logit(self, h: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(h, tau, condition=labels if self.head.config.condition else None)[:, 0]

    @classmethod
    def from_files(cls, extractor_path: str | Path, head_path: str | Path | None = None, *,
                   extractor_config: ADMConfig = DG_CIFAR10_EXTRACTOR, head_config: ADMConfig | None = None,
                   extractor_sha256: str | None = None, head_sha256: str | None = None,
                   device="cpu") -> "ADMDiscriminator":
        """The extractor from ``extractor_path`` and the head from ``head_path`` (None: a fresh head to train),
        both loaded strictly (:func:`repro.nets.adm.load_adm`). ``head_config`` defaults to DG's head for the
        extractor's feature channels, unconditional.

        Example::

            disc = ADMDiscriminator.from_files("32x32_classifier.pt", "discriminator_250.pt",
                                               head_config=dg_head(condition=True))
        """
        ext = load_adm(extractor_path, extractor_config, extractor_sha256, device)
        fc = extractor_config.feature_shape
        head_config = head_config or dg_head(in_channels=fc[0], image_size=fc[1])
        head = load_adm(head_path, head_config, head_sha256, device) if head_path is not None \
            else EncoderUNet(head_config).to(device)
        return cls(ext, head)


class EncoderDiscriminator(NoiseConditionedDiscriminator):
    """One ADM encoder (:class:`~repro.nets.adm.EncoderUNet`, one output) on the noised image, trained end to end:
    logit = net(x_vp, tau, labels)[:, 0]. Nothing is frozen (``trainable`` is the whole discriminator).

    Example::

        >>> disc = EncoderDiscriminator(EncoderUNet(encoder_config(8, 1, width=32)))
        >>> disc(torch.zeros(2, 1, 8, 8), torch.full([2], 0.3)).shape
        torch.Size([2])
    """

    def __init__(self, net: EncoderUNet):
        super().__init__()
        if net.config.out_channels != 1:
            raise ValueError(f"net: a discriminator has one output, this encoder has {net.config.out_channels}. "
                             "Fix: build it with out_channels=1 (encoder_config)")
        self.net = net

    def head_logit(self, h: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(h, tau, condition=labels if self.net.config.condition else None)[:, 0]


def encoder_config(resolution: int, channels: int, width: int = 32, num_classes: int = 0) -> ADMConfig:
    """The end-to-end discriminator for small images: DG's head layout (ADM encoder, scale-shift norm, attention
    pooling, one output) on the image itself, two levels (the second at half resolution, with attention), one
    residual block per level, ``width`` base channels; conditional when ``num_classes`` > 0. Our choice, not DG's
    (DG always starts from a pretrained classifier).

    Example::

        >>> encoder_config(8, 1).feature_shape
        (64, 4, 4)
    """
    return ADMConfig(image_size=resolution, in_channels=channels, model_channels=width, out_channels=1,
                     num_res_blocks=1, attention_resolutions=(resolution // 2,), channel_mult=(1, 2),
                     num_head_channels=32, condition=num_classes > 0, num_classes=max(num_classes, 1))


# ----------------------------------------------------------------------------------------------------------
# A discriminator as data: its spec, and its file.


def _config(d: dict) -> ADMConfig:
    return ADMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def spec_of(disc: NoiseConditionedDiscriminator) -> dict:
    """The JSON-able description that :func:`build_discriminator` rebuilds ``disc`` from (weights aside)."""
    if isinstance(disc, ADMDiscriminator):
        return {"kind": "adm", "extractor": dataclasses.asdict(disc.extractor.config),
                "head": dataclasses.asdict(disc.head.config)}
    if isinstance(disc, EncoderDiscriminator):
        return {"kind": "encoder", "net": dataclasses.asdict(disc.net.config)}
    if isinstance(disc, MLPDiscriminator):
        return {"kind": "mlp", "dim": disc.dim, "width": disc.width, "depth": disc.depth,
                "num_classes": disc.num_classes}
    raise ValueError(f"no spec for {type(disc).__name__}")


def build_discriminator(spec: dict, extractor: EncoderUNet | None = None) -> NoiseConditionedDiscriminator:
    """A fresh discriminator of ``spec`` (:func:`spec_of`); an ADM one needs its loaded, frozen ``extractor``.

    Example::

        disc = build_discriminator({"kind": "encoder", "net": dataclasses.asdict(encoder_config(8, 1))})
    """
    kind = spec.get("kind")
    if kind == "adm":
        if extractor is None:
            raise ValueError("extractor: an ADM discriminator needs its frozen feature extractor. Fix: load it with "
                             "repro.nets.adm.load_adm and pass it")
        if dataclasses.asdict(extractor.config) != dataclasses.asdict(_config(spec["extractor"])):
            raise ValueError("extractor: its config differs from the one the discriminator was trained with")
        return ADMDiscriminator(extractor, EncoderUNet(_config(spec["head"])))
    if kind == "encoder":
        return EncoderDiscriminator(EncoderUNet(_config(spec["net"])))
    if kind == "mlp":
        return MLPDiscriminator(spec["dim"], spec["width"], spec["depth"], spec["num_classes"])
    raise ValueError(f"unknown discriminator kind {kind!r}: use adm, encoder or mlp")


def save_discriminator(path: Path, disc: NoiseConditionedDiscriminator, info: dict | None = None,
                       state: dict | None = None) -> None:
    """Write the trained module's weights (``state``, default ``disc.trainable.state_dict()``) with the spec and
    free-form ``info`` (what it was trained on, its extractor's file and sha256) as safetensors metadata."""
    from repro.storage.files import save_safetensors

    tensors = state if state is not None else disc.trainable.state_dict()
    save_safetensors(path, tensors, {"format": FORMAT, "spec": json.dumps(spec_of(disc), sort_keys=True),
                                     "info": json.dumps(info or {}, sort_keys=True)})


def read_discriminator_meta(path: Path) -> tuple[dict, dict]:
    """(spec, info) of a file written by :func:`save_discriminator`."""
    from safetensors import safe_open

    with readable(str(path), "safetensors file"), safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a discriminator file of this package (format {meta.get('format')!r}). Fix: "
                         "rerun the discriminator stage (`repro discriminator`)")
    return json.loads(meta["spec"]), json.loads(meta.get("info", "{}"))


def load_discriminator(path: Path, extractor_path: Path | None = None, extractor_sha256: str | None = None,
                       device="cpu") -> tuple[NoiseConditionedDiscriminator, dict]:
    """Rebuild a discriminator from its file (strict key and shape check), in eval mode with its parameters frozen
    (guidance differentiates it with respect to its input only); an ADM one also reads its extractor from
    ``extractor_path`` (checked against ``extractor_sha256`` before it is read). Returns (disc, info)."""

    from repro.nets.state import load_state_strict

    spec, info = read_discriminator_meta(path)
    extractor = None
    if spec["kind"] == "adm":
        if extractor_path is None:
            raise ValueError(f"{path}: an ADM discriminator; its extractor file is needed too")
        extractor = load_adm(extractor_path, _config(spec["extractor"]), extractor_sha256)
    disc = build_discriminator(spec, extractor)
    load_state_strict(disc.trainable, load_safetensors(str(path)), str(path))
    return disc.to(device).eval().requires_grad_(False), info


class MLPDiscriminator(NoiseConditionedDiscriminator):
    """A noise-conditioned MLP discriminator for low-dimensional toys: logit = MLP([x_vp, c(tau)]).

    ``depth`` hidden layers of ``width`` units with SiLU (DG's 2-D toy: "a 4-layer, 256-unit MLP"; the exact
    layout of its input and time conditioning is not published, so this is our choice): the time enters as
    c(tau) = log(sigma(tau)) / 4, EDM's c_noise, a smooth coordinate over the whole range. ``num_classes`` > 0
    adds a label embedding to the input.

    Example::

        >>> MLPDiscriminator(dim=2)(torch.zeros(3, 2), torch.full([3], 0.5)).shape
        torch.Size([3])
    """

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, num_classes: int = 0):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"dim, width, depth must be >= 1, got {dim}, {width}, {depth}. Fix: e.g. 2, 256, 4")
        self.dim, self.width, self.depth, self.num_classes = dim, width, depth, num_classes
        layers: list[nn.Module] = []
        d_in = dim + 1 + (num_classes if num_classes else 0)
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.SiLU()]
            d_in = width
        layers.append(nn.Linear(d_in, 1))
        self.net = nn.Sequential(*layers)

    def head_logit(self, h: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = torch.log(sigma_from_tau(tau.to(h.dtype)).clamp_min(1e-12)) / 4
        parts = [h.flatten(1), c[:, None]]
        if self.num_classes:
            if labels is None:
                raise ValueError("labels: this discriminator is class-conditional (num_classes > 0). Fix: pass "
                                 "class indices [N] or one-hot labels [N, C]")
            onehot = labels if labels.ndim == 2 else nn.functional.one_hot(labels.long(), self.num_classes)
            parts.append(onehot.to(h.dtype))
        return self.net(torch.cat(parts, dim=1))[:, 0]
