"""The params.yaml sections as frozen pydantic dataclasses: types, ranges, choices and docs on the fields, the rules
between fields on the section they concern (rules across sections on Config). Loading is in repro.config.load.

Example::

    validate(SamplerConfig, {"num_steps": 18, ...}, loc=("sampler",))   # a SamplerConfig, or ConfigError
    dataclasses.replace(cfg.ddo, beta=0.3)                                # validated again
"""

import dataclasses
import math
import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from repro.catalog.papers import paper_rows
from repro.catalog.protocols import PROTOCOLS
from repro.catalog.registry import CHECKPOINTS, DECODERS, DG_FILES
from repro.config.errors import ConfigError, validate

# ----------------------------------------------------------------------------------------------------------
# Field types: YAML values taken as they are, except an integral float for an int, an int for a float, and a
# string that float() reads for a float (YAML 1.1 reads 5e-5 as a string). No bool for a number, no '5' for an int.


def _number(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _not_nan(v):
    v = _number(v)
    if isinstance(v, float) and math.isnan(v):
        raise PydanticCustomError("nan", "is NaN")
    return v


def _mapping(v):
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise PydanticCustomError("mapping", "must be a mapping of names to values")
    return v


def _any_mapping(v):
    if not isinstance(v, dict):
        raise PydanticCustomError("mapping", "must be a mapping")
    return v


RoundMap = Annotated[dict, BeforeValidator(_any_mapping)]  # {round: value}; the section's rules check the items
Int = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v), Strict()]
Number = Annotated[float, BeforeValidator(_number), Strict()]  # NaN let through (the sweep rule names it)
Float = Annotated[float, BeforeValidator(_not_nan), Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Mapping = Annotated[dict, BeforeValidator(_mapping)]


def Tuple(item):  # noqa: N802 (a type)
    return Annotated[tuple[item, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v), Strict()]


FORBID = ConfigDict(extra="forbid")
MAX_LR = 0.1  # Adam learning rates above this diverge at once (the presets use 5e-5 ... 3e-3); also refuses inf
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # results/<preset>/: a plain name, never a path
# the images of each data set a trained net sees
RESOLUTION = {"digits": 8, "cifar10": 32, "imagenet64": 64, "imagenet256": 256}
LATENT_DATASETS = ("imagenet512",)  # stored as SD-VAE latents (repro.datasets.imagenet.LATENT)
# the images of the data sets a held-out split is built for (data.holdout)
DATA_SIZE = {"digits": 1797, "cifar10": 50_000}


def rules(check):
    """A section's rules between its fields: ``check(self)`` yields (field, problem, fix), fields relative to the
    section; all are reported together, as one ConfigError."""
    def run(self):
        found = list(check(self))
        if found:
            raise ConfigError(found)
        return self
    return model_validator(mode="after")(run)


# ----------------------------------------------------------------------------------------------------------
# Sections (one per stage, plus the shared sampler section).


@dataclass(frozen=True, kw_only=True, config=FORBID)
class DataConfig:
    dataset: Literal["digits", "cifar10", "imagenet64", "imagenet256", "imagenet512", "none"] = Field(description=(
        "'digits' = scikit-learn's 8x8 digits (embedded); 'cifar10' = the 50,000 training images of cifar-10-binary"
        ".tar.gz (downloaded, sha256-pinned); imagenet64/256/512 = data.source center-cropped as EDM2's dataset "
        "tool does (ADM crop), written as shards data/<dataset>/shard-*.npy (imagenet512: SD-VAE latents, mean and "
        "std, of the 512 crops); 'none' = an evaluation that reads no data (FID against a paper's published "
        "statistics). Written to data/<dataset>.npz (ImageNet: an index of the shards)"))
    source: Str = Field("", description=(
        "imagenet*: the ILSVRC2012 train folder (class sub-folders of JPEGs; class index = sorted folder order) or "
        "an EDM2 dataset zip (dataset.json labels + images); unused by the other data sets"))
    shard_size: Int = Field(10000, ge=1, description="imagenet*: images per shard file (a rerun skips finished shards)")
    workers: Int = Field(1, ge=1, description="imagenet*: processes that decode and crop images (1 = this one)")
    mirror: Str = Field("", description=(
        "base URL or local directory that replaces the data archive URL's location (cifar10), like pretrain.mirror"))
    holdout: Float = Field(0.0, ge=0, lt=1, description=(
        "fraction of the images held out (digits, cifar10): a fixed split (data.holdout_seed) written into the data "
        "file and its manifest; every training stage (extractor, pretrain, DDO, the MLE control, discriminators) "
        "reads only the training part, the fid stage also measures against the held-out part and runs the copy "
        "check. 0 = no split (all images train and evaluate)"))
    holdout_seed: Int = Field(0, ge=0, description="seed of the held-out split's permutation (numpy default_rng)")

    @rules
    def _rules(self):
        if self.holdout > 0 and self.dataset != "none":  # 'none' reads no data: nothing to split
            n = DATA_SIZE.get(self.dataset)
            if n is None:
                yield ("holdout", f"{self.holdout:g}: a held-out split of data.dataset {self.dataset} is not built "
                       "(digits and cifar10 only)", "set data.holdout: 0")
            elif not 1 <= round(self.holdout * n) <= n - 1:
                yield ("holdout", f"{self.holdout:g} of the {n} images of {self.dataset} holds out "
                       f"{round(self.holdout * n)}, leaving {n - round(self.holdout * n)} to train on",
                       f"use a fraction that holds out at least 1 and at most {n - 1} images, e.g. 0.2")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class ExtractorConfig:
    kind: Literal["digits-classifier", "inception"] = Field(description=(
        "feature extractor of the metric: the digits classifier trained here (FD-digits, not FID), or Inception-v3 "
        "2015-12-05, 2048-d pool features (FID)"))
    weights: Str = Field("", description=(
        "Inception weights, torch-fidelity's layout (kind inception, or metrics.extra inception); built offline by "
        "`repro inception-weights --out PATH`; ~ expands, relative paths are under the project directory"))
    weights_sha256: Str = Field("", description=(
        "expected sha256 of extractor.weights; empty: pinned in checkpoints.lock.json on first use, later uses must "
        "match"))
    reference: Str = Field("", description=(
        "kind inception: the paper's reference statistics, a URL or path (EDM npz, EDM2 pkl, OpenAI npz); empty: "
        "computed from the data set"))
    reference_sha256: Str = Field("", description=(
        "expected sha256 of extractor.reference; empty: pinned on first download"))
    mirror: Str = Field("", description=(
        "base URL or local directory that replaces extractor.reference's location (like pretrain.mirror)"))
    width: Int = Field(gt=0)
    feature_dim: Int = Field(gt=0)
    steps: Int = Field(gt=0)
    batch: Int = Field(gt=0)
    lr: Float = Field(gt=0, le=MAX_LR)
    seed: Int = Field(ge=0)

    @rules
    def _rules(self):
        if self.reference and self.kind != "inception":
            yield ("reference", f"is set, but extractor.kind is {self.kind}",
                   "set extractor.kind: inception, or extractor.reference: ''")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class NetworkConfig:
    precond: Literal["edm", "vp", "edm2", "var"] = Field(description=(
        "edm / vp: a DDPM++ U-Net denoiser trained with the EDM loss; edm2: EDM2's magnitude-preserving U-Net "
        "(repro.nets.edm2, the ImageNet presets' released family; the micro stand-ins of those presets), trained "
        "with the EDM loss (no learned loss weighting); var: a VAR next-scale transformer on the "
        "tokens of a multi-scale VQ tokenizer, both trained here (sizes in the ar section; the U-Net fields below "
        "are then unused)"))
    model_channels: Int = Field(gt=0)
    channel_mult: Tuple(Int)
    num_blocks: Int = Field(gt=0)
    attn_resolutions: Tuple(Int)
    dropout: Float = Field(ge=0, lt=1)
    conditional: Bool

    @rules
    def _rules(self):
        if not self.channel_mult:
            yield "channel_mult", "is empty", "give at least one level, e.g. [1, 2]"
        if self.model_channels % 2 or self.model_channels < 4:
            yield ("model_channels", f"must be even and >= 4 (the noise embedding's sin/cos pairs), got "
                   f"{self.model_channels}", "set it to an even number such as 8")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class PretrainConfig:
    source: Literal[("train", *CHECKPOINTS)] = Field(description=(
        "'train': train the base model here with the EDM loss; else a released checkpoint (repro/catalog/registry.py), "
        "fetched, verified and converted"))
    mirror: Str = Field("", description="base URL or local directory that replaces the checkpoint URL's location")
    decoder: Literal[("", *DECODERS)] = Field("", description=(
        "the latent decoder (registry DECODERS) of a model trained here on latent data (data.dataset imagenet512): "
        "the data stage encodes with its VAE, the DDO selection and the sample stage decode with it; '' for pixel "
        "data and for a released source, whose registry entry names its decoder"))
    network: NetworkConfig
    sigma_data: Float = Field(gt=0)
    P_mean: Float
    P_std: Float = Field(gt=0)
    lr: Float = Field(gt=0, le=MAX_LR)
    batch: Int = Field(gt=0)
    total_nimg: Int = Field(gt=0)
    lr_rampup_nimg: Int = Field(ge=0)
    ema_halflife_nimg: Int = Field(ge=0)
    checkpoint_every_nimg: Int = Field(gt=0)
    seed: Int = Field(ge=0)
    curve_every_nimg: Int = Field(0, ge=0, description=(
        "every this many images, the EMA network's metric on the DDO selection seeds (and on each half of them: "
        "the seed noise) is recorded (models/base_curve.json, MLflow); 0 = no curve"))
    plateau_window: Int = Field(0, ge=0, description=(
        "stop training at the first curve point where the plateau rule holds (repro.methods.training."
        "plateau_reached: the mean of the last N points is lower than the mean of the N before by less than "
        "plateau_tol); total_nimg is then the most it trains. 0 = train total_nimg"))
    plateau_tol: Float = Field(0.0, ge=0, description=(
        "the plateau rule's tolerance in metric units: the gain between two windows below which the curve counts "
        "as flat; 0 = the curve's seed noise (the range between the two halves of the seeds)"))

    @rules
    def _curve(self):
        if self.plateau_window and not self.curve_every_nimg:
            yield ("plateau_window", f"is {self.plateau_window}, but the plateau rule needs a curve and "
                   "curve_every_nimg is 0", "set pretrain.curve_every_nimg > 0, or pretrain.plateau_window: 0")
        if self.curve_every_nimg and self.curve_every_nimg % self.batch:
            yield ("curve_every_nimg", f"is {self.curve_every_nimg}, not a multiple of pretrain.batch "
                   f"{self.batch}", f"set pretrain.curve_every_nimg to a multiple of {self.batch}")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class SamplerConfig:
    num_steps: Int = Field(ge=2)
    sigma_min: Float = Field(gt=0)
    sigma_max: Float = Field(gt=0)
    rho: Float = Field(gt=0)
    S_churn: Float = Field(ge=0)
    S_min: Float = Field(ge=0)
    S_max: Float = Field(ge=0)
    S_noise: Float = Field(gt=0)
    batch: Int = Field(gt=0)
    label_mode: Literal["random", "balanced"] = Field(
        description="class labels of seed i: drawn from seed i's generator (EDM), or i mod classes")
    guidance: Float = Field(1.0, ge=0, description=(
        "autoguidance weight w: D = guide + w (net - guide); 1 = off (no guide evaluated)"))
    guide: Literal[("", *CHECKPOINTS)] = Field("", description=(
        "registry checkpoint of the guide network ('' = none); the pretrain stage fetches, verifies and converts it "
        "into models/guide.safetensors"))
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "autocast dtype of the network evaluations (bf16/fp16 on CUDA; bf16 also on CPU; fp16 on CPU is refused); "
        "the sampler's state stays float64"))
    compile: Bool = Field(False, description="torch.compile the networks (CUDA only; ignored with a log line on CPU)")

    @rules
    def _rules(self):
        if self.sigma_max <= self.sigma_min:
            yield ("sigma_max", f"must be > sampler.sigma_min ({self.sigma_min})",
                   "raise sampler.sigma_max (EDM uses 80)")
        if self.guidance != 1.0 and not self.guide:
            yield ("guide", f"is empty but sampler.guidance is {self.guidance} (autoguidance needs a guide network)",
                   "name the guide checkpoint, e.g. sampler.guide: edm2-img512-xs-0134217-0.165, or set "
                   "sampler.guidance: 1.0")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class DDOConfig:
    rounds: Int = Field(ge=0, description="self-play rounds; 0 = an evaluation of the base model (nothing trained)")
    alpha: Float = Field(gt=0)
    beta: Float = Field(gt=0)
    lr: Float = Field(gt=0, le=MAX_LR)
    batch: Int = Field(gt=0, description="pairs (real, fake) per optimizer step")
    nimg_per_round: Int = Field(gt=0, description="real images seen per round")
    lr_rampup_nimg: Int = Field(ge=0)
    ema_halflife_nimg: Int = Field(ge=0, description="0 = no EMA")
    P_mean: Float
    P_std: Float = Field(gt=0)
    eval_every_nimg: Int = Field(gt=0, description="checkpoint evaluated for selection every this many images")
    selection_samples: Int = Field(gt=1)
    selection_first_seed: Int = Field(ge=0)
    fake_first_seed: Int = Field(ge=0, description="round r's fake bank uses seeds fake_first_seed + r*1e6 + i")
    control: Bool = Field(description="also run an MLE control: the base trained further with the EDM loss, same steps (see control_budget)")
    seed: Int = Field(ge=0)
    seeds: Int = Field(1, ge=1, description=(
        "training seeds: replicate k < seeds trains every DDO round and the control's rounds from the same base with "
        "training seed ddo.seed + k (step draws, data order) and its own fake-bank seeds (block k of "
        "(rounds + 1) * 1e6 seeds above fake_first_seed); selection and evaluation seeds are the same for all. "
        "Replicate 0 is the run without replicates (same names, directories and numbers); replicate k's models are "
        "<kind>-round<r>-seed<ddo.seed + k>, and the final evaluation adds each replicate's last rounds"))
    sweep_alpha: Tuple(Number) = Field((), description=(
        "if set (with sweep_beta: a grid), each round trains one candidate per (alpha, beta) in the grid; the "
        "candidate checkpoint with the best selection score becomes the round's best and the next reference; "
        "empty = ddo.alpha only. The MLE control is not swept"))
    sweep_beta: Tuple(Number) = Field((), description=(
        "the betas of the sweep grid (see sweep_alpha); empty = ddo.beta only"))
    precision: Literal["fp32", "tf32", "bf16"] = Field("fp32", description=(
        "how theta and the reference compute while training: fp32 with TF32 off (the paper disables mixed precision "
        "for the diffusion DDO loss), tf32 (TF32 matmuls on CUDA), bf16 (autocast). Sampling has its own "
        "sampler.dtype"))
    lr_schedule: Literal["constant", "inverse-sqrt"] = Field("constant", description=(
        "after the warm-up: constant, or EDM2's inverse square root, lr / sqrt(max(nimg / lr_decay_nimg, 1))"))
    lr_decay_nimg: Int = Field(0, ge=0, description="images after which inverse-sqrt decay starts (0 = never)")
    ema_std: Float = Field(0.0, ge=0, lt=0.29, description=(
        "EDM2's power-function EMA of relative standard deviation ema_std (e.g. 0.05); 0 = off. Exclusive with "
        "ema_halflife_nimg"))
    P_std_rounds: RoundMap = Field(default_factory=dict, description=(
        "P_std from a round on, e.g. {17: 3.0} (EDM2-S: 1.6 -> 3.0 from round 17); earlier rounds use ddo.P_std"))
    control_lrs: Tuple(Number) = Field((), description=(
        "the MLE control's learning-rate search: each control round trains one candidate per lr from the round's "
        "reference (same draws), and the candidate with the best selection score (the selection seeds and metric of "
        "DDO's checkpoint selection) is the round's result and the next reference; empty = ddo.lr only, no search"))
    control_budget: Literal["steps", "compute"] = Field("steps", description=(
        "the MLE control's images per round: steps = ddo.nimg_per_round, as DDO's; compute = as many steps as give "
        "it the compute of a DDO round (the fake bank's sampling + DDO's steps, in network forward-equivalents; "
        "repro.methods.ddo.control.equal_compute), with as many selection evaluations as DDO"))

    @rules
    def _rules(self):
        if self.ema_std and self.ema_halflife_nimg:
            yield ("ema_std", f"is {self.ema_std} and ddo.ema_halflife_nimg is {self.ema_halflife_nimg}: two EMAs",
                   "set one of them to 0")
        if self.lr_schedule == "inverse-sqrt" and not self.lr_decay_nimg:
            yield ("lr_decay_nimg", "is 0 with lr_schedule inverse-sqrt", "set ddo.lr_decay_nimg > 0 (EDM2-S "
                   "pretrained with 35000 kimg), or ddo.lr_schedule: constant")
        for r, v in self.P_std_rounds.items():  # keys: ints from YAML, or their strings (after --set)
            if not (str(r).isdigit() and int(r) >= 1) or isinstance(v, bool) or not isinstance(v, (int, float)) or \
                    not v > 0:
                yield (f"P_std_rounds.{r}", f"must map a round >= 1 to a P_std > 0, got {r!r}: {v!r}",
                       "write e.g. ddo.P_std_rounds: {17: 3.0}")
        if self.eval_every_nimg > self.nimg_per_round:
            yield ("eval_every_nimg", f"is larger than ddo.nimg_per_round ({self.nimg_per_round}), so no checkpoint "
                   "of a round would be evaluated", "set ddo.eval_every_nimg <= ddo.nimg_per_round")
        for name in ("sweep_alpha", "sweep_beta"):
            values = getattr(self, name)
            for i, v in enumerate(values):
                if not v > 0:  # also NaN
                    yield (f"{name}[{i}]", f"must be > 0, got {v!r}",
                           f"give positive values, e.g. ddo.{name}: [0.1, 0.3], or [] for no sweep")
            if len({f"{v:g}" for v in values}) != len(values):
                yield (name, f"has repeated values {list(values)} (as written in run directory names, %g)",
                       "list each value once")
        for i, v in enumerate(self.control_lrs):
            if not (v > 0 and v <= MAX_LR):  # also NaN
                yield (f"control_lrs[{i}]", f"must be a learning rate in (0, {MAX_LR:g}], got {v!r}",
                       "give positive values, e.g. ddo.control_lrs: [5.0e-5, 2.0e-4, 1.0e-3], or [] for ddo.lr only")
        if len({f"{v:g}" for v in self.control_lrs}) != len(self.control_lrs):
            yield ("control_lrs", f"has repeated values {list(self.control_lrs)} (as written in run directory names, "
                   "%g)", "list each value once")
        if not self.control and (self.control_lrs or self.control_budget != "steps"):
            yield ("control_lrs" if self.control_lrs else "control_budget", "is set, but ddo.control is false (there "
                   "is no MLE control to tune or budget)", "set ddo.control: true, or ddo.control_lrs: [] and "
                   "ddo.control_budget: steps")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class SampleConfig:
    n_samples: Int = Field(gt=1)
    first_seed: Int = Field(ge=0)
    repeats: Int = Field(ge=1, description="seed ranges [first_seed + k*n_samples, +n_samples), k < repeats")
    batch: Int = Field(gt=0)
    protocol: Literal[("custom", *PROTOCOLS)] = Field(
        "custom", description="the paper protocol these settings must match (repro/catalog/protocols.py); 'custom' = none")
    shard_size: Int = Field(1000, gt=0, description=(
        "seeds per shard file (the unit of resumable, parallel sampling); the images do not depend on it"))
    models: Literal["all", "base-and-last"] = Field("all", description=(
        "which models the final evaluation samples: every DDO round, or the base and the last round only (a paper "
        "table reports the last; each round costs one more full evaluation)"))


@dataclass(frozen=True, kw_only=True, config=FORBID)
class PaperConfig:
    """The paper cells this preset's models fill (`repro table --paper <name>` puts our number beside the paper's)."""

    name: Literal[tuple(paper_rows())] = Field("ddo", description="the paper whose tables the results belong to")
    cells: Mapping = Field(default_factory=dict, description=(
        "model -> row id of repro/catalog/paper_tables.yaml (optionally 'row:column'); models: base, final (the last "
        "DDO round; the base when there are no rounds) or a model name, e.g. {base: cifar10/edm-retested, final: "
        "cifar10/edm-ddo}"))

    @rules
    def _rules(self):
        rows = paper_rows()[self.name]
        for model, cell in self.cells.items():
            row, _, column = str(cell).partition(":")
            if row not in rows:
                near = sorted(r for r in rows if r.split("/")[0] == row.split("/")[0]) or sorted(rows)
                yield (f"cells.{model}", f"{cell!r} is not a row of paper {self.name}",
                       f"use one of: {', '.join(near[:12])}")
            elif column and column not in rows[row]:
                yield (f"cells.{model}", f"{cell!r}: the row's table has no column {column!r}",
                       f"use one of: {', '.join(rows[row])}")


EXTRA_METRICS = ("inception",)


@dataclass(frozen=True, kw_only=True, config=FORBID)
class MetricsConfig:
    extra: Tuple(Str) = Field((), description=(
        "more feature spaces for the final evaluation: [inception] adds Inception FID (weights: extractor.weights; "
        "reference: the data set's images)"))
    kid: Bool = Field(False, description=(
        "also KID in the metric's feature space (needs the reference images: the data set)"))
    prc: Bool = Field(False, description="also precision/recall, k = 3, in the metric's feature space (same)")
    kid_subsets: Int = Field(100, gt=0)
    kid_subset_size: Int = Field(1000, gt=1, description="lowered to the smaller set's size when that is smaller")


# ----------------------------------------------------------------------------------------------------------
# Sampling-time refinement (discriminator guidance and its kin), evaluated beside the unguided models: which guided
# models (guidance), their discriminators (discriminator), DG's guided sampler (dg).

# The guidance variants (repro.methods.guidance.VARIANTS describes each; a test checks the two agree).
GUIDANCE_VARIANTS = ("dg", "dg-improved", "kernel", "dcd")
GUIDED_MODEL = re.compile(r"base|last|(ddo|control)-round[1-9][0-9]*")


def split_guided(item: str) -> tuple[str, str]:
    """'ddo-round2+dg' -> ('ddo-round2', 'dg'): the model and the variant of a guided model's name."""
    model, _, variant = item.rpartition("+")
    return model, variant


@dataclass(frozen=True, kw_only=True, config=FORBID)
class GuidanceConfig:
    """Which guided models the final evaluation adds, and the fake banks their discriminators train on."""

    evaluate: Tuple(Str) = Field((), description=(
        "guided models, each 'model+variant' (e.g. base+dg, last+dg-improved): model = base, last (the last DDO "
        "round; the base without rounds), ddo-round<r> or control-round<r>; variant = dg (Kim et al. 2023: BCE "
        "discriminator), dg-improved (Verine et al. 2025: the objective that bounds the KL), kernel (closed-form "
        "IPM critic from the real and fake banks, no training) or dcd (a WGAN-GP critic, then Langevin steps on "
        "the sampler's output). Each is sampled on "
        "the evaluation seeds and measured beside the unguided models. Empty = off (the fakes, discriminator and "
        "guided stages do nothing)"))
    fakes: Int = Field(0, ge=0, description=(
        "fake bank per model whose discriminator trains on one (DG's BCE): 0 = one per real image (DG: 50,000)"))
    fake_first_seed: Int = Field(200_000_000, ge=0, description=(
        "fake i of a model's bank has seed fake_first_seed + i (the same seeds for every model; disjoint from the "
        "other seed ranges)"))

    @rules
    def _rules(self):
        for i, item in enumerate(self.evaluate):
            model, variant = split_guided(item)
            if not model:
                yield (f"evaluate[{i}]", f"{item!r} is not 'model+variant'", "write e.g. base+dg or last+dg-improved")
            elif variant not in GUIDANCE_VARIANTS:
                yield (f"evaluate[{i}]", f"{item!r}: unknown variant {variant!r}",
                       f"use one of: {', '.join(GUIDANCE_VARIANTS)}")
            elif not GUIDED_MODEL.fullmatch(model):
                yield (f"evaluate[{i}]", f"{item!r}: unknown model {model!r}",
                       "use base, last, ddo-round<r> or control-round<r>")
        if len(set(self.evaluate)) != len(self.evaluate):
            yield "evaluate", f"lists a guided model twice: {list(self.evaluate)}", "list each once"


@dataclass(frozen=True, kw_only=True, config=FORBID)
class DiscriminatorConfig:
    """The noise-conditioned discriminator of each guided model (stage discriminator; DG's train.py defaults)."""

    arch: Literal["adm", "encoder"] = Field("encoder", description=(
        "adm: DG's discriminator, the frozen ADM classifier `extractor` to its middle block + a small trainable ADM "
        "head (CIFAR-10); encoder: a small ADM encoder of width `width`, trained end to end (the 8x8 digits, which "
        "have no pretrained classifier)"))
    extractor: Literal[("", *(n for n, f in DG_FILES.items() if f.kind == "adm-extractor"))] = Field("", description=(
        "arch adm: the frozen feature extractor (repro/catalog/registry.py DG_FILES; from pretrain.mirror or "
        "checkpoints/, sha256 pinned on first use)"))
    head: Literal[("", *(n for n, f in DG_FILES.items() if f.kind == "dg-head"))] = Field("", description=(
        "a released head instead of training (variant dg only, on the model it was released for: the base); '' = "
        "train one per guided model"))
    conditional: Bool = Field(False, description="class-conditional discriminator (DG's --cond): labels enter its "
                                                 "time embedding")
    width: Int = Field(32, gt=0, multiple_of=32, description="arch encoder: its base channels (GroupNorm: x32)")
    epochs: Int = Field(50, gt=0, description="passes over the pool of real and fake images (DG: 50; released heads "
                                              "60 uncond, 250 cond); the last epoch's discriminator is used")
    batch: Int = Field(128, gt=0, description="real and fake images pooled and shuffled (DG: 128)")
    lr: Float = Field(3e-4, gt=0, le=MAX_LR, description="Adam (DG: 3e-4)")
    weight_decay: Float = Field(1e-7, ge=0, description="Adam weight decay (DG: 1e-7)")
    t_min: Float = Field(1e-5, gt=0, lt=1, description="smallest VP time of training (DG: 1e-5)")
    importance_sampling: Bool = Field(True, description=(
        "draw the VP time with density g^2 / sigma_t^2 (DG), else uniformly"))
    num_data: Int = Field(0, ge=0, description="first num_data images of each bank (0 = all; DG: 50,000)")
    seed: Int = Field(0, ge=0)

    @rules
    def _rules(self):
        if self.arch == "adm" and not self.extractor:
            yield ("extractor", "is empty but discriminator.arch is adm", "name the frozen extractor, e.g. "
                   "dg-cifar10-adm-classifier, or set discriminator.arch: encoder")
        if self.head and self.arch != "adm":
            yield ("head", f"is a released ADM head ({self.head}) but discriminator.arch is {self.arch}",
                   "set discriminator.arch: adm (with its extractor), or discriminator.head: ''")
        if self.head and DG_FILES[self.head].conditional != self.conditional:
            yield ("conditional", f"is {self.conditional} but the released head {self.head} is "
                   f"{'' if DG_FILES[self.head].conditional else 'un'}conditional",
                   f"set discriminator.conditional: {str(DG_FILES[self.head].conditional).lower()}")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class DGConfig:
    """DG's guided sampler (DG's generate.py): score <- score + w grad log(d / (1 - d)) inside a time window."""

    w: Float = Field(2.0, ge=0, description="weight at each step's first evaluation (DG: 2 uncond, 1 cond CIFAR-10)")
    w2: Float = Field(0.0, ge=0, description="weight at the Heun correction's evaluation (DG: 0, one discriminator "
                                             "evaluation per step)")
    tau_min: Float = Field(0.01, ge=0, le=1, description="window: guidance only where the VP time tau(sigma) >= "
                                                        "tau_min (DG: 0.01, sigma ~ 0.045)")
    tau_max: Float = Field(1.0, ge=0, le=1, description="... and tau(sigma) <= tau_max (DG: 1)")
    d_clip: Float = Field(1e-5, ge=0, lt=0.5, description=(
        "d clipped to [d_clip, 1 - d_clip] before log(d / (1 - d)) (DG: 1e-5); dg-improved: never clipped (its "
        "logit has a free offset)"))
    boosting: Bool = Field(False, description=(
        "DG's conditional CIFAR-10 'boosting': samples the discriminator calls fake churn and get a larger weight "
        "(variant dg only: it reads the sign of a calibrated logit)"))
    boost_churn: Float = Field(4.0, ge=0, description="S_churn of boosted samples (DG: 4)")
    boost_period: Int = Field(5, gt=0, description="boosted samples churn at steps i % boost_period == 0 (DG: 5)")
    boost_weight_period: Int = Field(2, gt=0, description="... and get boost_factor x w at steps i % this == 0 (DG: 2)")
    boost_factor: Float = Field(2.0, ge=0, description="(DG: 2)")

    @rules
    def _rules(self):
        if self.tau_min > self.tau_max:
            yield "tau_min", f"is above dg.tau_max ({self.tau_max})", "set dg.tau_min <= dg.tau_max (DG: 0.01, 1)"


@dataclass(frozen=True, kw_only=True, config=FORBID)
class ImprovedDGConfig:
    """Improved DG's guided sampler: DG's (score + w grad d inside the window), with the logit never clipped and no
    boosting (the improved objective leaves d's offset free, so neither its clipping nor its sign means anything).
    The paper's sampling settings could not be read (research/dg.md b.2): DG's are the defaults."""

    w: Float = Field(2.0, ge=0, description="weight at each step's first evaluation")
    w2: Float = Field(0.0, ge=0, description="weight at the Heun correction's evaluation")
    tau_min: Float = Field(0.01, ge=0, le=1, description="window: guidance only where tau(sigma) >= tau_min")
    tau_max: Float = Field(1.0, ge=0, le=1, description="... and tau(sigma) <= tau_max")

    @rules
    def _rules(self):
        if self.tau_min > self.tau_max:
            yield ("tau_min", f"is above dg_improved.tau_max ({self.tau_max})",
                   "set dg_improved.tau_min <= dg_improved.tau_max")


VAR_MODELS = tuple(n for n, c in CHECKPOINTS.items() if c.tokenizer)
VAR_TOKENIZERS = tuple(n for n, c in CHECKPOINTS.items() if c.arch == "var-vqvae")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class ARTokenizerConfig:
    """The multi-scale VQ tokenizer a VAR trained here uses (pretrain.network.precond var): repro.nets.vqvae's
    VQVAE at a small size, trained first by the pretrain stage (reconstruction + VQ commitment, straight-through)."""

    vocab_size: Int = Field(64, ge=2, description="codebook entries, shared by all scales")
    z_channels: Int = Field(8, gt=0, description="code vector size (the VAR's Cvae)")
    ch: Int = Field(32, gt=0, description="base width of the encoder and decoder")
    ch_mult: Tuple(Int) = Field((1, 2), description="one level per entry; the latent map is the image / 2^(levels-1)")
    patch_nums: Tuple(Int) = Field((1, 2, 3, 4), description=(
        "token-map sizes, coarse to fine; the last equals the latent map's size"))
    steps: Int = Field(2000, gt=0, description="tokenizer training steps (Adam)")
    batch: Int = Field(64, gt=0)
    lr: Float = Field(1e-3, gt=0, le=MAX_LR)
    commitment: Float = Field(0.25, ge=0, description="weight of ||f - sg(f_hat)||^2 (VQ-VAE's beta)")

    @rules
    def _rules(self):
        if not self.ch_mult:
            yield "ch_mult", "is empty", "give at least one level, e.g. [1, 2]"
        if not self.patch_nums or list(self.patch_nums) != sorted(set(self.patch_nums)) or self.patch_nums[0] < 1:
            yield ("patch_nums", f"must be increasing sizes >= 1, got {list(self.patch_nums)}",
                   "write e.g. ar.tokenizer.patch_nums: [1, 2, 3, 4]")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class ARModelConfig:
    """The VAR transformer trained here (pretrain.network.precond var), repro.nets.var.VAR at a small size."""

    depth: Int = Field(4, gt=0, description="transformer blocks")
    embed_dim: Int = Field(128, gt=0, description="width (a multiple of heads)")
    heads: Int = Field(4, gt=0)
    cond_drop_rate: Float = Field(0.1, ge=0, lt=1, description=(
        "label dropout to the unconditional class (keeps classifier-free guidance possible; AR DDO trains that "
        "branch by maximum likelihood)"))

    @rules
    def _rules(self):
        if self.embed_dim % self.heads:
            yield "embed_dim", f"{self.embed_dim} is not a multiple of ar.model.heads ({self.heads})", \
                "set ar.model.embed_dim to a multiple of ar.model.heads"


@dataclass(frozen=True, kw_only=True, config=FORBID)
class ARConfig:
    """Autoregressive (VAR) models: the next-scale sampler (repro.sampling.var), and the sizes of a tokenizer and
    VAR trained here (pretrain.network.precond var); a released VAR's tokenizer is its registry entry's. Unused (and
    left at its defaults) when the base is a diffusion model."""

    cfg: Float = Field(1.0, ge=0, description="classifier-free guidance scale, read in the convention cfg_mode")
    cfg_mode: Literal["upstream", "guidance-free-at-1"] = Field("upstream", description=(
        "upstream: t = cfg * k / (K - 1) at scale k (VAR's sampler; cfg 1.0 still guides); guidance-free-at-1: "
        "t = (cfg - 1) * k / (K - 1) (cfg 1.0 = the conditional model); logits = (1 + t) cond - t uncond"))
    top_k: Int = Field(0, ge=0, description="keep the k most likely tokens (0 = off; DDO's protocol: off)")
    top_p: Float = Field(0.0, ge=0, lt=1, description="nucleus sampling mass (0 = off; DDO's protocol: off)")
    tokenizer: ARTokenizerConfig = Field(ARTokenizerConfig(), description=(
        "the tokenizer trained here (pretrain.network.precond var)"))
    model: ARModelConfig = Field(ARModelConfig(), description="the VAR trained here (pretrain.network.precond var)")

    @property
    def guided(self) -> bool:
        """Whether any scale mixes in the unconditional logits (t != 0 somewhere)."""
        return self.cfg != (1.0 if self.cfg_mode == "guidance-free-at-1" else 0.0)


@dataclass(frozen=True, kw_only=True, config=FORBID)
class KernelConfig:
    """Closed-form IPM kernel guidance (repro.methods.kernel; Srikanth, Asokan et al. 2023/2025): score <- score +
    w grad D(x), D the closed-form critic of the real bank (the data set) and the model's fake bank. Nothing is
    trained. The paper's settings could not be read (research/dg.md c.2): the defaults are ours."""

    kernel: Literal["polyharmonic", "gaussian"] = Field("polyharmonic", description=(
        "polyharmonic: r^(2m - n) (times log r for even n, 2m - n >= 0), the authors' closed-form discriminator's "
        "basis; gaussian: exp(-r^2 / 2)"))
    bandwidth: Float = Field(0.0, ge=0, description="h, distances in units of h; 0 = the median real-fake distance")
    poly_m: Int = Field(1, ge=1, description="polyharmonic order m")
    poly_n: Int = Field(0, ge=0, description="polyharmonic dimension n (0 = the images' C x H x W)")
    where: Literal["noised", "denoised"] = Field("noised", description=(
        "noised: x_t against the banks noised to the step's sigma (the critic between the noised marginals; "
        "default, argued in repro.methods.kernel); denoised: the denoised estimate against the clean banks"))
    w: Float = Field(0.1, ge=0, description=(
        "weight at each step's first evaluation; with normalize, the guidance's size relative to the model's score "
        "(0.1: a tenth of it; ours, not tuned)"))
    w2: Float = Field(0.0, ge=0, description="weight at the Heun correction's evaluation")
    tau_min: Float = Field(0.0, ge=0, le=1, description="window: guidance only where tau(sigma) >= tau_min")
    tau_max: Float = Field(1.0, ge=0, le=1, description="... and tau(sigma) <= tau_max")
    normalize: Bool = Field(True, description=(
        "use grad D's direction at the size of a score, g / rms(g) / sigma (w then sets the size relative to the "
        "model's score): needed for the polyharmonic kernel in image dimensions, whose values leave float64's range"))
    max_bank: Int = Field(10_000, ge=0, description="each bank subsampled to at most this many images (0 = all)")
    chunk: Int = Field(1024, ge=1, description="bank images and query images per block (memory ~ chunk^2)")
    seed: Int = Field(0, ge=0, description="the banks' subsampling")

    @rules
    def _rules(self):
        if self.tau_min > self.tau_max:
            yield "tau_min", f"is above kernel.tau_max ({self.tau_max})", "set kernel.tau_min <= kernel.tau_max"


@dataclass(frozen=True, kw_only=True, config=FORBID)
class DCDConfig:
    """Discriminator Contrastive Divergence (repro.methods.dcd; Song et al. 2020): a WGAN-GP critic trained on the
    real images vs the model's fake bank (stage discriminator, in memory), then ``steps`` Langevin steps along its
    gradient on the sampler's output, in pixel space (stage guided). Critic training follows DCD's configs (batch
    64, Adam 2e-4, betas (0, 0.9)); the Langevin defaults are ours (DCD's per-dataset values were not found)."""

    critic_steps: Int = Field(1000, gt=0, description="critic updates (DCD trains 50,000 on CIFAR-10)")
    batch: Int = Field(64, gt=0, description="real and fake images per critic update (DCD: 64)")
    lr: Float = Field(2e-4, gt=0, description="Adam (DCD: 2e-4, betas (0, 0.9))")
    gp_weight: Float = Field(10.0, ge=0, description="gradient penalty weight (Gulrajani et al.: 10)")
    steps: Int = Field(20, ge=0, description="Langevin steps per image (DCD: 20; 0 = off)")
    step_size: Float = Field(0.01, ge=0, description="eps in x <- x + eps/2 grad D/T + sqrt(eps) noise xi")
    noise: Float = Field(0.05, ge=0, description="noise scale (1 = exact Langevin; sqrt(eps) x 0.05 = DCD's 0.005)")
    temperature: Float = Field(1.0, gt=0, description="T (DCD: 1)")
    grad_clip: Float = Field(1.0, ge=0, description="the critic's gradient clipped to +-grad_clip per pixel (DCD's "
                                                     "proj_norm 1.0; 0 = off)")
    seed: Int = Field(0, ge=0, description="critic initialisation and minibatches, and the Langevin noise")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class Resources:
    """What one job asks SLURM for (sbatch options); any other option goes in ``extra``."""

    partition: Str = Field("", description="sbatch --partition ('' = the cluster's default)")
    account: Str = Field("", description="sbatch --account")
    qos: Str = Field("", description="sbatch --qos")
    nodes: Int = Field(1, ge=1)
    gpus_per_node: Int = Field(0, ge=0)
    tasks_per_node: Int = Field(0, ge=0, description=(
        "processes per node (torch.distributed ranks); 0 = one per GPU, or 1"))
    cpus_per_task: Int = Field(2, ge=1)
    mem_gb: Float = Field(8.0, gt=0, description="memory per node, GB")
    time_min: Int = Field(60, gt=0, description="time limit in minutes; the job saves and requeues itself before it")
    constraint: Str = Field("", description="sbatch --constraint, e.g. 'a100|h100'")
    array_parallelism: Int = Field(64, ge=1, description="at most this many tasks of a job array run at once")
    signal_delay_s: Int = Field(120, ge=10, description="the job is warned (SIGUSR2) this long before its time limit")
    extra: Mapping = Field(default_factory=dict, description="other sbatch options, e.g. {exclusive: true}")

    @rules
    def _rules(self):
        if self.tasks_per_node and self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            yield ("tasks_per_node", f"is {self.tasks_per_node} with {self.gpus_per_node} GPUs per node; each rank "
                   "drives one GPU", "set tasks_per_node: 0 (one per GPU) or equal to gpus_per_node")
        names = {f.name for f in dataclasses.fields(self)} | {"time", "mem", "ntasks_per_node", "gres", "array"}
        for key in self.extra:
            if key.replace("-", "_") in names:
                yield (f"extra.{key}", "duplicates a resource field",
                       f"set {key.replace('-', '_')} as its own field instead of in extra")


@dataclass(frozen=True, kw_only=True, config=FORBID)
class LauncherConfig:
    """Where stages run. Not a stage param: changing it never reruns a stage (the results are the same)."""

    executor: Literal["local", "debug", "slurm"] = Field("local", description=(
        "local: in this process; debug: through submitit, in this process (pdb on an error); slurm: one SLURM job per "
        "stage (sample shards as a job array), waited for"))
    container: Literal["none", "apptainer", "pyxis"] = Field(
        "none", description="run the job inside the image: apptainer exec --nv, or srun --container-image (pyxis)")
    image: Str = Field("", description="the .sif file (apptainer) or image reference (pyxis)")
    image_digest: Str = Field("", description="the image's digest (sha256:...), recorded on every MLflow run")
    bind: Tuple(Str) = Field((), description="host paths to mount in the container (src[:dst])")
    setup: Tuple(Str) = Field((), description="shell lines run in the job before the stage (e.g. 'module load cuda')")
    log_dir: Str = Field("runs/slurm", description="job scripts and logs, relative to the project directory")
    poll_s: Float = Field(5.0, gt=0, description="seconds between job state checks")
    max_requeue: Int = Field(20, ge=0, description="a job requeues itself after preemption at most this many times")
    resources: Resources = Field(default_factory=Resources, description="every stage's job")
    stages: Mapping = Field(default_factory=dict, description=(
        "per stage, resources that differ, e.g. {ddo: {gpus_per_node: 8, time_min: 1440}}"))

    @rules
    def _rules(self):
        if self.container != "none" and not self.image:
            yield ("image", f"is empty but launcher.container is {self.container!r}", "set launcher.image to the .sif "
                   "file (apptainer) or image reference (pyxis), or launcher.container: none")
        for stage, over in self.stages.items():
            if stage not in STAGE_PARAMS:
                yield f"stages.{stage}", "is not a stage", f"use one of: {', '.join(STAGE_PARAMS)}"
            elif not isinstance(over, dict):
                yield (f"stages.{stage}", f"must be a mapping of resources, got {over!r}",
                       f"write e.g. '{stage}: {{gpus_per_node: 1}}'")
            else:
                try:
                    resources_for(self, stage)
                except ConfigError as e:  # its fields are named from launcher. on, as its fixes say
                    yield from ((f.removeprefix("launcher."), p, fix) for f, p, fix in e.problems)


def resources_for(lc: LauncherConfig, stage: str) -> Resources:
    """The resources of ``stage``'s job: launcher.resources, with launcher.stages.<stage> on top."""
    over = lc.stages.get(stage) or {}
    if not isinstance(over, dict) or not over:
        return lc.resources
    return validate(Resources, {**dataclasses.asdict(lc.resources), **over}, ("launcher", "stages", stage))


# Which params each stage reads (what dvc.yaml declares; a test checks the two agree).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "data": ("data", "pretrain.decoder"),
    "extractor": ("extractor",),
    "pretrain": ("pretrain", "sampler", "ar", "extractor.kind", "ddo.selection_first_seed", "ddo.selection_samples"),
    "ddo": ("ddo", "sampler", "pretrain.sigma_data", "pretrain.decoder", "extractor.kind"),
    "sample": ("sample", "sampler", "ddo.rounds", "ddo.control", "ddo.seed", "ddo.seeds", "pretrain.decoder", "ar"),
    "fakes": ("guidance", "sampler", "ddo.rounds", "discriminator.head"),
    "discriminator": ("guidance.evaluate", "discriminator", "dcd", "ddo.rounds", "pretrain.mirror"),
    "guided": ("guidance.evaluate", "dg", "dg_improved", "kernel", "dcd", "sample", "sampler", "ddo.rounds"),
    "fid": ("preset", "sample", "sampler", "extractor.kind", "ddo.rounds", "ddo.control", "ddo.seed", "ddo.seeds",
            "ddo.selection_first_seed", "ddo.selection_samples", "metrics", "extractor.weights", "extractor.weights_sha256", "paper",
            "guidance.evaluate", "ar"),
    "table": ("preset", "paper.name"),
}

SEED_BLOCK = 1_000_000  # round r's fake bank: seeds fake_first_seed + r * SEED_BLOCK + i


def replicate_seed_offset(d: DDOConfig) -> int:
    """How far training-seed replicate k's fake-bank seeds are shifted (times k): one block of rounds + 1 rounds, so
    the replicates' fake seeds follow each other without overlap."""
    return (d.rounds + 1) * SEED_BLOCK


def fake_seed_range(d: DDOConfig) -> tuple[int, int]:
    """[first, end) of every fake-bank seed the ddo stage may draw: every round of every training-seed replicate."""
    return d.fake_first_seed, d.fake_first_seed + d.seeds * replicate_seed_offset(d)


@dataclass(frozen=True, kw_only=True, config=FORBID)
class Config:
    preset: Str = Field(description="name of this setting; results go to results/<preset>/")
    data: DataConfig
    extractor: ExtractorConfig
    pretrain: PretrainConfig
    sampler: SamplerConfig
    ddo: DDOConfig
    sample: SampleConfig
    metrics: MetricsConfig = Field(MetricsConfig(), description="optional metrics of the final evaluation (fid stage)")
    paper: PaperConfig = Field(PaperConfig(), description="the paper cells the results fill (fid and table stages)")
    guidance: GuidanceConfig = Field(GuidanceConfig(), description="guided models beside the unguided ones")
    discriminator: DiscriminatorConfig = Field(DiscriminatorConfig(), description="their discriminators")
    dg: DGConfig = Field(DGConfig(), description="DG's guided sampler")
    dg_improved: ImprovedDGConfig = Field(ImprovedDGConfig(), description="improved DG's guided sampler")
    ar: ARConfig = Field(ARConfig(), description="autoregressive (VAR) models: tokenizer and next-scale sampler")
    kernel: KernelConfig = Field(KernelConfig(), description="closed-form IPM kernel guidance")
    dcd: DCDConfig = Field(DCDConfig(), description="Discriminator Contrastive Divergence: its critic and Langevin steps")
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="where stages run")

    @property
    def is_ar(self) -> bool:
        """Whether the base is an autoregressive (VAR) model: a released one, or one trained here."""
        return self.pretrain.source in VAR_MODELS or (self.pretrain.source == "train"
                                                      and self.pretrain.network.precond == "var")

    @rules
    def _rules(self):
        """The rules across sections: the extractor and the metrics, a paper protocol, disjoint seed ranges."""
        x, m, d, e = self.extractor, self.metrics, self.ddo, self.sample
        if not PRESET_NAME.fullmatch(self.preset) or ".." in self.preset:
            yield ("preset", f"{self.preset!r} is not a plain name (it names the folder results/<preset>/)",
                   "use letters, digits, '_', '-' and '.', e.g. preset: my-run")
        net, res = self.pretrain.network, RESOLUTION.get(self.data.dataset)
        if self.pretrain.source == "train" and res:
            have = [res >> i for i in range(len(net.channel_mult))]
            for i, r in enumerate(net.attn_resolutions):
                if r not in have:
                    yield (f"pretrain.network.attn_resolutions[{i}]", f"{r}: the network's levels on "
                           f"{self.data.dataset} ({res}x{res}) have resolutions {have}, so no attention would run",
                           f"use resolutions among {have}, or [] for none")
        if self.data.dataset == "none":  # an evaluation against published statistics: nothing may read the data
            needs = [(k, why) for k, bad, why in (
                ("pretrain.source", self.pretrain.source == "train", "trains the base model on it"),
                ("ddo.rounds", d.rounds > 0, "DDO trains on it"),
                ("extractor.reference", not x.reference, "the reference statistics would be computed from it"),
                ("metrics.kid", m.kid or m.prc, "KID and precision/recall compare with its images"),
                ("metrics.extra", bool(m.extra), "extra metrics use its images as their reference")) if bad]
            for key, why in needs:
                yield (key, f"needs the data set ({why}), but data.dataset is 'none'",
                       "set data.dataset to the data set (e.g. cifar10), or change this setting")
        for i, name in enumerate(m.extra):
            if name not in EXTRA_METRICS or name == x.kind:
                yield (f"metrics.extra[{i}]", f"{name!r} is not an extra feature space here",
                       f"use one of {', '.join(n for n in EXTRA_METRICS if n != x.kind) or 'none'}")
        if (x.kind == "inception" or "inception" in m.extra) and not x.weights:
            yield ("extractor.weights", "is empty, but Inception features are asked for", "build the weights offline "
                   "with `repro inception-weights --out PATH` and set extractor.weights: PATH")
        if (m.kid or m.prc) and x.reference:
            yield ("metrics.kid" if m.kid else "metrics.prc", "needs the reference images, but extractor.reference "
                   "is a file of published statistics (mu and sigma only)",
                   "set metrics.kid/prc: false, or extractor.reference: '' (reference from the data set)")
        # A named protocol fixes the evaluation: the settings must say the same.
        if e.protocol != "custom":
            p = PROTOCOLS[e.protocol]
            want = {"sample.n_samples": (e.n_samples, p.n_samples), "sample.repeats": (e.repeats, len(p.seed_ranges)),
                    "sample.first_seed": (e.first_seed, p.seed_ranges[0][0])}
            if p.sampler == "var-next-scale":  # VAR: no sampling tricks; an AR model
                want.update({"ar.top_k": (self.ar.top_k, 0), "ar.top_p": (self.ar.top_p, 0.0),
                             "pretrain.source": (self.pretrain.source in VAR_MODELS, True)})
            else:
                want["sampler.num_steps"] = (self.sampler.num_steps, p.num_steps)
            if p.label_mode != "none" and self.pretrain.network.conditional and self.pretrain.source == "train":
                want["sampler.label_mode"] = (self.sampler.label_mode, p.label_mode)
            if p.extractor == "inception-v3-compat":
                want["extractor.kind"] = (x.kind, "inception")
                if x.reference.rsplit("/", 1)[-1] != p.reference.rsplit("/", 1)[-1]:  # a mirror keeps the file name
                    want["extractor.reference"] = (x.reference, p.reference)
            for key, (have, need) in want.items():
                if have != need:
                    yield (key, f"is {have!r} but protocol {p.name} ({p.cell}) uses {need!r}",
                           f"set {key}: {need}, or sample.protocol: custom")
        # Seed ranges must not overlap: selection, final evaluation, and each round's fake bank.
        ranges = {"ddo selection seeds": (d.selection_first_seed, d.selection_first_seed + d.selection_samples),
                  "sample seeds": (e.first_seed, e.first_seed + e.repeats * e.n_samples)}
        (a, (a0, a1)), (b, (b0, b1)) = ranges.items()
        if a0 < b1 and b0 < a1:
            yield ("sample.first_seed", f"the {b} [{b0}, {b1}) overlap the {a} [{a0}, {a1}); selection must use other "
                   "seeds than the final evaluation",
                   "move sample.first_seed or ddo.selection_first_seed so the ranges are disjoint")
        f0, f1 = fake_seed_range(d)
        for name, (a0, a1) in ranges.items():
            if a0 < f1 and f0 < a1:
                yield ("ddo.fake_first_seed", f"the fake-bank seeds [{f0}, {f1}) overlap the {name} [{a0}, {a1})",
                       "move ddo.fake_first_seed above the other seed ranges")
        yield from _guidance_rules(self)
        yield from _ar_rules(self)
        yield from _decoder_rules(self)


def _decoder_rules(cfg: "Config"):
    """Latent data needs a decoder, named once: by a released source's registry entry, or by pretrain.decoder."""
    p = cfg.pretrain
    latent = cfg.data.dataset in LATENT_DATASETS
    if latent and p.curve_every_nimg and p.source == "train":
        yield ("pretrain.curve_every_nimg", f"is {p.curve_every_nimg}, but {cfg.data.dataset} is latents and the "
               "curve does not decode its samples", "set pretrain.curve_every_nimg: 0 for latent data")
    released = CHECKPOINTS[p.source].decoder if p.source != "train" else None
    if p.decoder and p.source != "train" and p.decoder != released:
        yield ("pretrain.decoder", f"is {p.decoder}, but pretrain.source {p.source} is released with decoder "
               f"{released or 'none (pixels)'}", "leave pretrain.decoder empty: the registry entry names the decoder")
    elif p.decoder and not latent:
        yield ("pretrain.decoder", f"is {p.decoder}, but data.dataset {cfg.data.dataset} is pixels, not latents",
               "leave pretrain.decoder empty (or use a latent data set: imagenet512)")
    elif latent and p.source == "train" and not p.decoder:
        yield ("pretrain.decoder", f"is empty, but data.dataset {cfg.data.dataset} is SD-VAE latents and the base is "
               "trained here, so nothing names the VAE that encodes and decodes them",
               f"set pretrain.decoder (one of: {', '.join(DECODERS)})")


def _ar_rules(cfg: "Config"):
    """A tokenizer is no model; what the pipeline does not drive for AR models yet is refused by name."""
    ar_model = cfg.is_ar
    if cfg.pretrain.source in VAR_TOKENIZERS:
        yield ("pretrain.source", f"{cfg.pretrain.source} is VAR's tokenizer, not a generator",
               f"name a VAR model ({', '.join(VAR_MODELS)}); its registry entry names the tokenizer")
    if cfg.ar != ARConfig() and not ar_model:
        yield ("ar", f"is set, but pretrain.source {cfg.pretrain.source} is not a VAR model",
               "leave the ar section at its defaults (or name a VAR pretrain.source)")
    if cfg.pretrain.source == "train" and cfg.pretrain.network.precond == "var" and cfg.pretrain.curve_every_nimg:
        yield ("pretrain.curve_every_nimg", "a VAR trained here has no pretraining curve yet (the curve samples with "
               "the EDM sampler)", "set pretrain.curve_every_nimg: 0 (and pretrain.plateau_window: 0)")
    if cfg.pretrain.source == "train" and cfg.pretrain.network.precond == "var":
        t, res = cfg.ar.tokenizer, RESOLUTION.get(cfg.data.dataset)
        if res and res >> (len(t.ch_mult) - 1) != t.patch_nums[-1]:
            yield ("ar.tokenizer.patch_nums", f"ends with {t.patch_nums[-1]}, but the tokenizer's latent map on "
                   f"{cfg.data.dataset} ({res}x{res}, {len(t.ch_mult)} levels) is {res >> (len(t.ch_mult) - 1)}x"
                   f"{res >> (len(t.ch_mult) - 1)}", f"end ar.tokenizer.patch_nums with {res >> (len(t.ch_mult) - 1)}")
    if ar_model and cfg.ddo.control_budget == "compute":
        yield ("ddo.control_budget", "is compute, but the base is a VAR model, whose fake bank (next-scale sampling, "
               "decoded and re-encoded by the tokenizer) the compute count (repro.methods.ddo.control) does not cover",
               "set ddo.control_budget: steps (ddo.control_lrs works for VAR models)")
    if ar_model and cfg.guidance.evaluate:
        yield ("guidance.evaluate", "discriminator guidance of a VAR model is not built", "set guidance.evaluate: []")


def _guidance_rules(cfg: "Config"):
    """The guided models against the rest: models that exist, data to train on, seed ranges apart."""
    g, d = cfg.guidance, cfg.ddo
    trains = False
    for i, item in enumerate(g.evaluate):
        model, variant = split_guided(item)
        kind, _, r = model.partition("-round")
        if r.isdigit() and not 1 <= int(r) <= d.rounds:
            yield (f"guidance.evaluate[{i}]", f"{item!r}: there is no round {r} (ddo.rounds is {d.rounds})",
                   "name a round in 1..ddo.rounds, or last")
        elif kind == "control" and not d.control:
            yield (f"guidance.evaluate[{i}]", f"{item!r}: ddo.control is false, so there is no control model",
                   "set ddo.control: true, or guide base or a DDO round")
        released = variant == "dg" and bool(cfg.discriminator.head)
        if released and model != "base" and not (model == "last" and d.rounds == 0):
            yield (f"guidance.evaluate[{i}]", f"{item!r}: the released head {cfg.discriminator.head} was trained on "
                   "the base model's samples, not this model's", "guide base with it, or set discriminator.head: '' "
                   "to train one for this model")
        trains = trains or not released
    if trains and cfg.data.dataset == "none":
        yield ("guidance.evaluate", "trains a discriminator on the data set, but data.dataset is 'none'",
               "set data.dataset (e.g. cifar10), or use released heads only (discriminator.head, variant dg)")
    if g.evaluate and cfg.pretrain.source != "train" and CHECKPOINTS[cfg.pretrain.source].decoder:
        yield ("guidance.evaluate", f"guides a latent model ({cfg.pretrain.source}); guidance in latent space is not "
               "built", "set guidance.evaluate: []")
    if g.evaluate:
        e = cfg.sample
        n_fakes = g.fakes or 10 ** 7  # one per real image: at most ~1.3M (ImageNet)
        f0, f1 = g.fake_first_seed, g.fake_first_seed + n_fakes
        for name, (a0, a1) in {"sample seeds": (e.first_seed, e.first_seed + e.repeats * e.n_samples),
                               "ddo selection seeds": (d.selection_first_seed,
                                                       d.selection_first_seed + d.selection_samples),
                               "ddo fake-bank seeds": fake_seed_range(d)}.items():
            if a0 < f1 and f0 < a1:
                yield ("guidance.fake_first_seed", f"the guidance fake-bank seeds [{f0}, {f1}) overlap the {name} "
                       f"[{a0}, {a1})", "move guidance.fake_first_seed above the other seed ranges")
