"""Sampling-time refinement of a pretrained generator: the framework that discriminator guidance and its kin share.

Four of the seed methods correct a pretrained model at sampling time with a signal r(x, sigma) ~ log p_data^sigma(x) -
log p_model^sigma(x) (research/dg.md section 6). Here each is a *variant*, and the pipeline evaluates guided models
"model+variant" (``guidance.evaluate``: e.g. base+dg, ddo-round2+dg-improved) beside the unguided ones, on the same
evaluation seeds, through three stages:

1. ``fakes``: the fake bank of every model whose variant trains on one, made once with the sharded sampler
   (repro.sampling.shards; seeds ``guidance.fake_first_seed + i``, the same for every model) and reused;
2. ``discriminator``: one noise-conditioned discriminator per guided model (repro.methods.dg_train: resumable,
   preemptible, DDP), or a released one, written with its spec (repro.nets.discriminators);
3. ``guided``: the evaluation's seeds through EDM's sampler with the variant's :class:`~repro.sampling.edm.Correction`
   (the sampler is not edited; w = 0 gives the unguided images bit for bit), as shards beside the unguided ones.

The fid stage measures them beside the unguided models and records each one's guidance settings.

A variant says what it trains (``objective``: a discriminator loss, or None for nothing to train), whether that
needs the model's fake bank, and how it becomes a correction (:func:`build_correction`). Four variants:

* ``dg``, ``dg-improved``: a trained noise-conditioned discriminator, its log-ratio's gradient in each Heun step;
* ``kernel``: closed-form kernel guidance (repro.methods.kernel): ``objective=None`` (nothing trained; the
  discriminator stage records it and writes no file) and ``uses_fakes=True``; its correction is built in the
  guided stage from the real bank (the data set) and the model's fake bank (:func:`kernel_correction`);
* ``dcd``: Discriminator Contrastive Divergence (repro.methods.dcd): a WGAN-GP critic trained in the discriminator
  stage on the data vs the fake bank (``objective='wgan-gp'``, :func:`train_dcd_critic`, in memory: not
  resumable), applied after the sampler as Langevin steps on its output (:func:`dcd_decoder`, the sampler's
  ``decoder`` hook; pixel-space models only).

Example::

    cfg = load_config(preset="dg-tiny")
    for gm in guided_models(cfg, Paths.of(cfg, root)):
        gm.name, gm.model, gm.variant.name, needs_fakes(cfg, gm), needs_training(cfg, gm)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from repro.catalog import registry
from repro.config import (Config, DCDConfig, DGConfig, ImprovedDGConfig, KernelConfig, SampleConfig, SamplerConfig,
                          split_guided, to_dict)
from repro.methods.dg import T_MIN, DiscriminatorGuidance, vp_logit
from repro.nets.adm import DG_CIFAR10_EXTRACTOR, ADMConfig, EncoderUNet, dg_head, load_adm
from repro.nets.discriminators import (ADMDiscriminator, EncoderDiscriminator, NoiseConditionedDiscriminator,
                                       encoder_config)
from repro.sampling.edm import Correction
from repro.sampling.shards import Shard, plan_shards
from repro.storage.files import load_npz, sha256_file
from repro.storage.layout import Paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One guidance method as the pipeline evaluates it."""

    name: str                # as written in guidance.evaluate
    method: str              # the correction it becomes (build_correction)
    section: str             # the config section of its sampling settings
    objective: str | None    # the discriminator loss it trains with (repro.methods.dg_train), None: nothing trained
    uses_fakes: bool         # its training reads the model's fake bank
    title: str               # for tables and logs
    source: str


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("dg", "dg", "dg", "bce", True, "DG",
            "Kim et al. 2023 (ICML): a noise-conditioned discriminator trained with time-weighted BCE on real vs "
            "the model's samples; score + w grad log(d / (1 - d))"),
    Variant("dg-improved", "dg", "dg_improved", "mse", False, "improved DG",
            "Verine et al. 2025 (ECML-PKDD): the same discriminator trained with the objective that bounds the KL "
            "(denoising score matching of the refined score on real data; reconstructed, repro.methods.dg); "
            "the same sampler, its logit never clipped and no boosting (the logit's offset is free)"),
    Variant("kernel", "kernel", "kernel", None, True, "kernel IPM guidance",
            "Srikanth, Asokan et al. (arXiv 2306.01654): the closed-form IPM critic of the real and fake banks, "
            "mean_i k(x, x_i) - mean_j k(x, y_j) (polyharmonic or Gaussian kernel); score + w grad D; no training"),
    Variant("dcd", "dcd", "dcd", "wgan-gp", True, "DCD",
            "Song et al. 2020 (arXiv 2004.01704): a WGAN-GP critic on real vs the model's samples, then Langevin "
            "steps along its gradient from the sampler's output (pixel space)"),
]}

# The frozen feature extractors a released file can be (repro.catalog.registry.DG_FILES, kind adm-extractor).
EXTRACTORS: dict[str, ADMConfig] = {"dg-cifar10-adm-classifier": DG_CIFAR10_EXTRACTOR}


@dataclass(frozen=True)
class GuidedModel:
    """One entry of guidance.evaluate: the generator ``model`` (its file ``path``) sampled with ``variant``."""

    name: str                # e.g. ddo-round2+dg ('last' resolved)
    model: str               # e.g. ddo-round2
    variant: Variant
    path: Path


def resolve_model(cfg: Config, model: str) -> str:
    """'last' -> the last DDO round's name (the base without rounds); other names as they are."""
    if model == "last":
        return f"ddo-round{cfg.ddo.rounds}" if cfg.ddo.rounds else "base"
    return model


def model_path(paths: Paths, model: str) -> Path:
    """The generator file of an evaluation model's name (base, ddo-round<r>, control-round<r>)."""
    if model == "base":
        return paths.base
    kind, _, r = model.partition("-round")
    return paths.round_model(kind, int(r))


def guided_models(cfg: Config, paths: Paths) -> list[GuidedModel]:
    """guidance.evaluate, resolved, in its order."""
    out = []
    for item in cfg.guidance.evaluate:
        model, variant = split_guided(item)
        model = resolve_model(cfg, model)
        out.append(GuidedModel(f"{model}+{variant}", model, VARIANTS[variant], model_path(paths, model)))
    return out


def released_head(cfg: Config, gm: GuidedModel) -> str | None:
    """The released head (registry name) this guided model uses instead of a trained one, if any."""
    return (cfg.discriminator.head or None) if gm.variant.name == "dg" else None


def needs_training(cfg: Config, gm: GuidedModel) -> bool:
    return gm.variant.objective is not None and released_head(cfg, gm) is None


def needs_fakes(cfg: Config, gm: GuidedModel) -> bool:
    """Whether the guided model reads its generator's fake bank: to train on, or (kernel) as the critic's bank."""
    return gm.variant.uses_fakes and (needs_training(cfg, gm) or gm.variant.objective is None)


# ----------------------------------------------------------------------------------------------------------
# Fake banks.


def fake_models(cfg: Config, paths: Paths) -> dict[str, Path]:
    """The generators whose fake bank some guided model trains on (each once), in guidance.evaluate's order."""
    return {gm.model: gm.path for gm in guided_models(cfg, paths) if needs_fakes(cfg, gm)}


def fake_config(cfg: Config, n_data: int) -> SampleConfig:
    """The bank as one seed range: ``guidance.fakes`` seeds (0 = one per real image) from guidance.fake_first_seed,
    in shards of sample.shard_size."""
    n = cfg.guidance.fakes or n_data
    if n < 2:
        raise ValueError(f"guidance.fakes: a fake bank needs at least 2 images, got {n} (the data set has {n_data}). "
                         "Fix: set guidance.fakes, or prepare the data set first (`repro data`)")
    return dataclasses.replace(cfg.sample, n_samples=n, first_seed=cfg.guidance.fake_first_seed, repeats=1,
                               protocol="custom")


def plan_fakes(cfg: Config, paths: Paths, n_data: int, out_dir: Path) -> list[Shard]:
    """Every shard of every fake bank (``out_dir/<model>/seeds-*.npz``)."""
    models = fake_models(cfg, paths)
    return plan_shards(models, fake_config(cfg, n_data), cfg.sampler, out_dir) if models else []


def load_bank(shards: list[Shard]) -> tuple[np.ndarray, np.ndarray]:
    """A bank's images (uint8 [N, C, H, W]) and labels (int64 [N]; -1 for an unconditional model), in seed order."""
    parts = [load_npz(s.out) for s in sorted(shards, key=lambda s: s.lo)]
    return np.concatenate([p["images"] for p in parts]), np.concatenate([p["labels"] for p in parts]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Discriminators: DG's released files, fresh ones to train, the correction they become.


def fetch_dg_file(name: str, root: Path, mirror: str = "", progress: bool = True) -> Path:
    """A released DG file (repro.catalog.registry.DG_FILES) in checkpoints/, sha256-pinned in checkpoints.lock.json.

    The authors publish these in Google Drive folders, which cannot be downloaded automatically: the file comes
    from ``mirror`` (pretrain.mirror: a base URL or a directory holding it under its released file name), else it
    must already be in checkpoints/ (put there by hand). Either way its sha256 is pinned on first use and checked
    on every later use.
    """
    from repro.storage.download import Lock, fetch

    f = registry.get_dg_file(name)
    paths = Paths(Path(root))
    dest = paths.checkpoint(f.filename)
    if not mirror and not dest.is_file():
        raise FileNotFoundError(f"{dest} not found: {name} ({f.filename}) is published in a Google Drive folder "
                                f"({f.location}), which cannot be downloaded automatically. Fix: download "
                                f"{f.filename} from there into {paths.checkpoints}/, or set pretrain.mirror to a "
                                "directory or URL holding it; its sha256 is pinned on first use")
    return fetch(f.url if mirror else str(dest), dest, sha256=f.sha256, lock=Lock(paths.lock), name=name,
                 mirror=mirror or None, progress=progress)


def _extractor(cfg: Config, arch: dict, root: Path, progress: bool) -> tuple[EncoderUNet, dict]:
    """The frozen extractor of discriminator.arch adm, fetched and loaded strictly; with what identifies it."""
    name = cfg.discriminator.extractor
    config = EXTRACTORS[name]
    if (config.image_size, config.in_channels) != (arch["img_resolution"], arch["img_channels"]):
        raise ValueError(f"discriminator.extractor {name} reads {config.in_channels}x{config.image_size}x"
                         f"{config.image_size} images, the model samples {arch['img_channels']}x"
                         f"{arch['img_resolution']}x{arch['img_resolution']}. Fix: set discriminator.arch: encoder")
    path = fetch_dg_file(name, root, cfg.pretrain.mirror, progress)
    sha = sha256_file(path)
    return load_adm(path, config, sha), {"extractor": name, "extractor_file": path.name, "extractor_sha256": sha}


def new_discriminator(cfg: Config, arch: dict, root: Path,
                      progress: bool = True) -> tuple[NoiseConditionedDiscriminator, dict]:
    """A fresh discriminator to train for a model of architecture ``arch`` (discriminator.arch), and its info."""
    d = cfg.discriminator
    label_dim = int(arch.get("label_dim") or 0)
    if d.conditional and not label_dim:
        raise ValueError("discriminator.conditional: the model is unconditional, so its samples have no labels. Fix: "
                         "set discriminator.conditional: false")
    if d.arch == "encoder":
        return EncoderDiscriminator(EncoderUNet(encoder_config(arch["img_resolution"], arch["img_channels"], d.width,
                                                               label_dim if d.conditional else 0))), {}
    ext, info = _extractor(cfg, arch, root, progress)
    c, h, _ = ext.config.feature_shape
    return ADMDiscriminator(ext, EncoderUNet(dg_head(in_channels=c, image_size=h, condition=d.conditional))), info


def released_discriminator(cfg: Config, arch: dict, root: Path,
                           progress: bool = True) -> tuple[NoiseConditionedDiscriminator, dict]:
    """DG's released discriminator: the frozen extractor and the released head (discriminator.head), both loaded
    strictly with ``weights_only=True`` after their sha256 is checked against the lock."""
    ext, info = _extractor(cfg, arch, root, progress)
    name = cfg.discriminator.head
    path = fetch_dg_file(name, root, cfg.pretrain.mirror, progress)
    sha = sha256_file(path)
    c, h, _ = ext.config.feature_shape
    head = load_adm(path, dg_head(in_channels=c, image_size=h, condition=cfg.discriminator.conditional), sha)
    return ADMDiscriminator(ext, head), {**info, "source": "released", "head": name, "head_file": path.name,
                                         "head_sha256": sha}


def sampler_settings(cfg: Config, variant: Variant):
    """The config section of ``variant``'s sampling settings (``cfg.dg`` for DG, ``cfg.dg_improved``, ...)."""
    return getattr(cfg, variant.section)


def guidance_settings(variant: Variant, dg: DGConfig | ImprovedDGConfig | KernelConfig | DCDConfig,
                      sampler: SamplerConfig) -> dict:
    """What a guided model's samples depend on besides its generator and discriminator (recorded with them);
    ``dg``: the variant's section (:func:`sampler_settings`)."""
    if variant.method == "dg":
        improved = isinstance(dg, ImprovedDGConfig)  # its logit's offset is free: no clipping, no boosting
        s = {"variant": variant.name, "method": "dg", "w": dg.w, "w2": dg.w2, "tau_min": dg.tau_min,
             "tau_max": dg.tau_max, "d_clip": 0.0 if improved else dg.d_clip,
             "boosting": not improved and dg.boosting}
        if s["boosting"]:
            s.update(boost_churn=dg.boost_churn, boost_period=dg.boost_period,
                     boost_weight_period=dg.boost_weight_period, boost_factor=dg.boost_factor,
                     num_steps=sampler.num_steps)
        return s
    if variant.method in ("kernel", "dcd"):
        return {"variant": variant.name, "method": variant.method, **to_dict(dg)}
    raise ValueError(f"no correction for method {variant.method!r}")


def build_correction(variant: Variant, dg: DGConfig | ImprovedDGConfig, sampler: SamplerConfig,
                     disc: NoiseConditionedDiscriminator) -> Correction:
    """The sampler's correction of ``variant`` with its settings ``dg`` (:func:`sampler_settings`; see
    :func:`guidance_settings`), evaluating ``disc``.

    DG: :class:`repro.methods.dg.DiscriminatorGuidance` of the VP-native discriminator, weight w in the window;
    improved DG: the same, with d never clipped and no boosting. (Kernel guidance: :func:`kernel_correction`;
    DCD is no correction: :func:`dcd_decoder`.)
    """
    if variant.method != "dg":
        raise ValueError(f"build_correction: variant {variant.name} is not a discriminator correction. Fix: use "
                         "kernel_correction (kernel) or dcd_decoder (dcd)")
    s = guidance_settings(variant, dg, sampler)
    boost = {k: s[k] for k in ("boost_churn", "boost_period", "boost_weight_period", "boost_factor") if k in s}
    return DiscriminatorGuidance(vp_logit(disc), w=s["w"], w2=s["w2"], tau_min=s["tau_min"], tau_max=s["tau_max"],
                                 d_clip=s["d_clip"], boosting=s["boosting"], num_steps=sampler.num_steps, **boost)


def _discriminator_words(cfg: Config, gm: GuidedModel) -> str:
    if released_head(cfg, gm):
        return "released " + str(released_head(cfg, gm))
    if gm.variant.method == "kernel":
        return (f"none: closed-form {cfg.kernel.kernel} critic of the data and the fake bank (up to "
                f"{cfg.kernel.max_bank or 'all'} each)")
    if gm.variant.method == "dcd":
        return (f"trained here (wgan-gp critic, {cfg.discriminator.arch}, {cfg.dcd.critic_steps} steps), then "
                f"{cfg.dcd.steps} Langevin steps per image")
    return f"trained here ({gm.variant.objective}, {cfg.discriminator.arch}, {cfg.discriminator.epochs} epochs)"


def describe(cfg: Config, paths: Paths) -> list[dict]:
    """The guided models as the dry runs print them."""
    return [{"name": gm.name, "model": gm.model, "variant": gm.variant.name, "method": gm.variant.title,
             "discriminator": _discriminator_words(cfg, gm),
             "objective": gm.variant.objective, "trained": needs_training(cfg, gm), "fake_bank": needs_fakes(cfg, gm),
             "sampler": guidance_settings(gm.variant, sampler_settings(cfg, gm.variant), cfg.sampler)}
            for gm in guided_models(cfg, paths)]


def dg_train_settings(cfg: Config, objective: str) -> dict:
    """The trainer's settings (repro.methods.dg_train.DGTrainConfig) from the discriminator section."""
    d = to_dict(cfg.discriminator)
    keep = ("epochs", "batch", "lr", "weight_decay", "t_min", "importance_sampling", "num_data", "seed")
    return {"objective": objective, **{k: d[k] for k in keep}}


# ----------------------------------------------------------------------------------------------------------
# Kernel guidance and DCD: what the guided stage builds for them.


def _pixels(images: np.ndarray) -> torch.Tensor:
    """A bank as float32: uint8 images scaled to [-1, 1] (float arrays as they are)."""
    from repro.sampling.generate import from_uint8

    t = torch.as_tensor(images)
    return from_uint8(t) if t.dtype == torch.uint8 else t.to(torch.float32)


def kernel_correction(k: KernelConfig, real: np.ndarray, fake: np.ndarray, device: str = "cpu",
                      denoise=None):
    """The kernel variant's correction: :class:`repro.methods.kernel.KernelGuidance` of the closed-form critic of
    ``real`` (the data set's images) and ``fake`` (the model's bank), uint8 [N, C, H, W] (scaled to [-1, 1]) or
    float; ``denoise``: the model's denoiser (``where: denoised`` only). Labels are not used: the critic compares
    the class-mixed banks (a class-conditional model gets the unconditional critic's gradient)."""
    from repro.methods.kernel import KernelCritic, KernelGuidance, median_bandwidth

    r, f = _pixels(real).to(device), _pixels(fake).to(device)
    h = k.bandwidth or median_bandwidth(r, f, seed=k.seed)
    critic = KernelCritic(r, f, k.kernel, h, poly_m=k.poly_m, poly_n=k.poly_n, max_bank=k.max_bank, chunk=k.chunk,
                          seed=k.seed)
    return KernelGuidance(critic, w=k.w, w2=k.w2, where=k.where, tau_min=k.tau_min, tau_max=k.tau_max,
                          normalize=k.normalize, denoise=denoise)


class FixedTimeCritic(torch.nn.Module):
    """A noise-conditioned discriminator used as a critic on clean images: D(x) = disc(x, tau = T_MIN) (DCD's critic
    reuses the discriminator networks and their files; at tau = 1e-5, x_vp = x to 1e-8)."""

    def __init__(self, disc: NoiseConditionedDiscriminator):
        super().__init__()
        self.disc = disc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc(x, torch.full([len(x)], T_MIN, device=x.device, dtype=x.dtype), None)


def train_dcd_critic(disc: NoiseConditionedDiscriminator, real: np.ndarray, fake: np.ndarray, d: DCDConfig,
                     device: str = "cpu", tracker=None) -> list[dict]:
    """Train ``disc`` (a fresh one, repro.nets.discriminators) as DCD's WGAN-GP critic on the data vs the fake bank,
    in memory (not resumable: DCD's critic is small next to the sampling it refines); the minibatches come from
    d.seed. Returns the per-step statistics (the last ones are logged every 50 steps to ``tracker``)."""
    from repro.methods.dcd import CriticTrainConfig, train_critic

    critic = FixedTimeCritic(disc).to(device)
    log = (lambda k, s: tracker.log_metrics({f"critic_{n}": v for n, v in s.items()}, step=k)) if tracker else None
    hist = train_critic(critic, _pixels(real), _pixels(fake), CriticTrainConfig(
        steps=d.critic_steps, batch=d.batch, lr=d.lr, gp_weight=d.gp_weight, seed=d.seed), log_every=50, log=log)
    disc.eval()
    return hist


def dcd_decoder(d: DCDConfig, disc: NoiseConditionedDiscriminator):
    """The sampler's ``decoder`` for DCD: ``d.steps`` Langevin steps along grad D / T (clipped, pixels kept in
    [-1, 1]) from the sampler's output, then uint8. The noise comes from a generator seeded by d.seed and the
    batch's first values (the same images give the same chain)."""
    from repro.methods.dcd import critic_grad, langevin
    from repro.sampling.generate import to_uint8

    energy = critic_grad(FixedTimeCritic(disc), d.temperature)

    def decode(x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        key = int(x32.flatten()[:64].double().abs().sum().item() * 1e6) % (2 ** 31)
        g = torch.Generator().manual_seed(d.seed * 7919 + key)
        y = langevin(x32, energy, steps=d.steps, step_size=d.step_size, noise=d.noise, grad_clip=d.grad_clip,
                     clamp=(-1.0, 1.0), generator=g)
        return to_uint8(y)
    return decode
