"""Typed, frozen configuration: params.yaml grouped by stage, presets, validation.

A config is read from a params file (``params.yaml``, what DVC tracks) or from a named preset
(``repro/config/presets/<name>.yaml``), optionally with ``section.key=value`` overrides. Every value is checked
before any work starts; a bad value raises :class:`ConfigError`, which names the field and the fix.

Example::

    cfg = load_config(Path("params.yaml"), overrides=["ddo.beta=0.1"])
    cfg.ddo.beta          # 0.1
    section_dict(cfg, "ddo")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from repro.catalog.protocols import PROTOCOLS
from repro.catalog.registry import CHECKPOINTS


class ConfigError(ValueError):
    """Bad configuration: names the field, what is wrong with it, and how to fix it."""

    def __init__(self, problems: list[tuple[str, str, str]], source: str = "params"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {f}: {p}. Fix: {fix}." for f, p, fix in problems]
        super().__init__("\n".join(lines))


def spec(default: Any = dataclasses.MISSING, *, gt=None, ge=None, lt=None, le=None, choices=None, doc=""):
    """A dataclass field with validation metadata (range, choices) and a one-line doc."""
    meta = dict(gt=gt, ge=ge, lt=lt, le=le, choices=choices, doc=doc)
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------
# Sections (one per stage, plus the shared sampler section).


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = spec(choices=("digits", "cifar10", "imagenet64", "imagenet512"),
                        doc="'digits' = scikit-learn's 8x8 digits (embedded); 'cifar10' = the 50,000 training "
                            "images of cifar-10-binary.tar.gz (downloaded, sha256-pinned); imagenet*: not prepared "
                            "yet. Written to data/<dataset>.npz")
    mirror: str = spec("", doc="base URL or local directory that replaces the data archive URL's location "
                               "(cifar10), like pretrain.mirror")


@dataclass(frozen=True, kw_only=True)
class ExtractorConfig:
    kind: str = spec(choices=("digits-classifier", "inception"),
                     doc="feature extractor of the metric: the digits classifier trained here (FD-digits, not FID), "
                         "or Inception-v3 2015-12-05, 2048-d pool features (FID)")
    weights: str = spec("", doc="Inception weights, torch-fidelity's layout (kind inception, or metrics.extra "
                                "inception); built offline by `repro inception-weights --out PATH`; ~ expands, "
                                "relative paths are under the project directory")
    weights_sha256: str = spec("", doc="expected sha256 of extractor.weights; empty: pinned in checkpoints.lock.json "
                                       "on first use, later uses must match")
    reference: str = spec("", doc="kind inception: the paper's reference statistics, a URL or path (EDM npz, EDM2 "
                                  "pkl, OpenAI npz); empty: computed from the data set")
    reference_sha256: str = spec("", doc="expected sha256 of extractor.reference; empty: pinned on first download")
    width: int = spec(gt=0)
    feature_dim: int = spec(gt=0)
    steps: int = spec(gt=0)
    batch: int = spec(gt=0)
    lr: float = spec(gt=0)
    seed: int = spec(ge=0)


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    precond: str = spec(choices=("edm", "vp"))
    model_channels: int = spec(gt=0)
    channel_mult: tuple[int, ...] = spec()
    num_blocks: int = spec(gt=0)
    attn_resolutions: tuple[int, ...] = spec()
    dropout: float = spec(ge=0, lt=1)
    conditional: bool = spec()


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    source: str = spec(choices=("train", *CHECKPOINTS),
                       doc="'train': train the base model here with the EDM loss; else a released checkpoint "
                           "(repro/registry.py), fetched, verified and converted")
    mirror: str = spec("", doc="base URL or local directory that replaces the checkpoint URL's location")
    network: NetworkConfig = spec()
    sigma_data: float = spec(gt=0)
    P_mean: float = spec()
    P_std: float = spec(gt=0)
    lr: float = spec(gt=0)
    batch: int = spec(gt=0)
    total_nimg: int = spec(gt=0)
    lr_rampup_nimg: int = spec(ge=0)
    ema_halflife_nimg: int = spec(ge=0)
    checkpoint_every_nimg: int = spec(gt=0)
    seed: int = spec(ge=0)


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    num_steps: int = spec(ge=2)
    sigma_min: float = spec(gt=0)
    sigma_max: float = spec(gt=0)
    rho: float = spec(gt=0)
    S_churn: float = spec(ge=0)
    S_min: float = spec(ge=0)
    S_max: float = spec(ge=0)
    S_noise: float = spec(gt=0)
    batch: int = spec(gt=0)
    label_mode: str = spec(choices=("random", "balanced"),
                           doc="class labels of seed i: drawn from seed i's generator (EDM), or i mod classes")
    guidance: float = spec(1.0, ge=0, doc="autoguidance weight w: D = guide + w (net - guide); 1 = off (no guide "
                                         "evaluated)")
    guide: str = spec("", choices=("", *CHECKPOINTS),
                      doc="registry checkpoint of the guide network ('' = none); the pretrain stage fetches, verifies "
                          "and converts it into models/guide.safetensors")
    dtype: str = spec("fp32", choices=("fp32", "bf16", "fp16"),
                      doc="autocast dtype of the network evaluations (bf16/fp16 on CUDA; bf16 also on CPU; fp16 on CPU "
                          "is refused); the sampler's state stays float64")
    compile: bool = spec(False, doc="torch.compile the networks (CUDA only; ignored with a log line on CPU)")


@dataclass(frozen=True, kw_only=True)
class DDOConfig:
    rounds: int = spec(ge=1)
    alpha: float = spec(gt=0)
    beta: float = spec(gt=0)
    lr: float = spec(gt=0)
    batch: int = spec(gt=0, doc="pairs (real, fake) per optimizer step")
    nimg_per_round: int = spec(gt=0, doc="real images seen per round")
    lr_rampup_nimg: int = spec(ge=0)
    ema_halflife_nimg: int = spec(ge=0, doc="0 = no EMA")
    P_mean: float = spec()
    P_std: float = spec(gt=0)
    eval_every_nimg: int = spec(gt=0, doc="checkpoint evaluated for selection every this many images")
    selection_samples: int = spec(gt=1)
    selection_first_seed: int = spec(ge=0)
    fake_first_seed: int = spec(ge=0, doc="round r's fake bank uses seeds fake_first_seed + r*1e6 + i")
    control: bool = spec(doc="also run an MLE control: the base trained further with the EDM loss, same steps")
    seed: int = spec(ge=0)
    sweep_alpha: tuple[float, ...] = spec((), doc="if set (with sweep_beta: a grid), each round trains one candidate "
                                          "per (alpha, beta) in the grid; the candidate checkpoint with the best "
                                          "selection score becomes the round's best and the next reference; "
                                          "empty = ddo.alpha only. The MLE control is not swept")
    sweep_beta: tuple[float, ...] = spec((), doc="the betas of the sweep grid (see sweep_alpha); empty = ddo.beta only")


# Fields left out of a stage's params (run directory keys, MLflow hashes) while empty, so that adding them changed
# no run directory of the settings that do not use them.
OMIT_WHEN_EMPTY = ("ddo.sweep_alpha", "ddo.sweep_beta")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    n_samples: int = spec(gt=1)
    first_seed: int = spec(ge=0)
    repeats: int = spec(ge=1, doc="seed ranges [first_seed + k*n_samples, +n_samples), k < repeats")
    batch: int = spec(gt=0)
    protocol: str = spec("custom", choices=("custom", *PROTOCOLS),
                         doc="the paper protocol these settings must match (repro/protocols.py); 'custom' = none")
    shard_size: int = spec(1000, gt=0, doc="seeds per shard file (the unit of resumable, parallel sampling); "
                                           "the images do not depend on it")


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    extra: tuple[str, ...] = spec((), doc="more feature spaces for the final evaluation: [inception] adds Inception "
                                         "FID (weights: extractor.weights; reference: the data set's images)")
    kid: bool = spec(False, doc="also KID in the metric's feature space (needs the reference images: the data set)")
    prc: bool = spec(False, doc="also precision/recall, k = 3, in the metric's feature space (same)")
    kid_subsets: int = spec(100, gt=0)
    kid_subset_size: int = spec(1000, gt=1, doc="lowered to the smaller set's size when that is smaller")


EXTRA_METRICS = ("inception",)


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What one job asks SLURM for (sbatch options); any other option goes in ``extra``."""

    partition: str = spec("", doc="sbatch --partition ('' = the cluster's default)")
    account: str = spec("", doc="sbatch --account")
    qos: str = spec("", doc="sbatch --qos")
    nodes: int = spec(1, ge=1)
    gpus_per_node: int = spec(0, ge=0)
    tasks_per_node: int = spec(0, ge=0, doc="processes per node (torch.distributed ranks); 0 = one per GPU, or 1")
    cpus_per_task: int = spec(2, ge=1)
    mem_gb: float = spec(8.0, gt=0, doc="memory per node, GB")
    time_min: int = spec(60, gt=0, doc="time limit in minutes; the job saves and requeues itself before it")
    constraint: str = spec("", doc="sbatch --constraint, e.g. 'a100|h100'")
    array_parallelism: int = spec(64, ge=1, doc="at most this many tasks of a job array run at once")
    signal_delay_s: int = spec(120, ge=10, doc="the job is warned (SIGUSR2) this long before its time limit")
    extra: dict = field(default_factory=dict, metadata={"doc": "other sbatch options, e.g. {exclusive: true}"})


RESOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(Resources))


@dataclass(frozen=True, kw_only=True)
class LauncherConfig:
    """Where stages run. Not a stage param: changing it never reruns a stage (the results are the same)."""

    executor: str = spec("local", choices=("local", "debug", "slurm"),
                         doc="local: in this process; debug: through submitit, in this process (pdb on an error); "
                             "slurm: one SLURM job per stage (sample shards as a job array), waited for")
    container: str = spec("none", choices=("none", "apptainer", "pyxis"),
                          doc="run the job inside the image: apptainer exec --nv, or srun --container-image (pyxis)")
    image: str = spec("", doc="the .sif file (apptainer) or image reference (pyxis)")
    image_digest: str = spec("", doc="the image's digest (sha256:...), recorded on every MLflow run")
    bind: tuple[str, ...] = spec((), doc="host paths to mount in the container (src[:dst])")
    setup: tuple[str, ...] = spec((), doc="shell lines run in the job before the stage (e.g. 'module load cuda')")
    log_dir: str = spec("runs/slurm", doc="job scripts and logs, relative to the project directory")
    poll_s: float = spec(5.0, gt=0, doc="seconds between job state checks")
    max_requeue: int = spec(20, ge=0, doc="a job requeues itself after preemption at most this many times")
    resources: Resources = field(default_factory=Resources, metadata={"doc": "every stage's job"})
    stages: dict = field(default_factory=dict, metadata={"doc": "per stage, resources that differ, e.g. "
                                                                 "{ddo: {gpus_per_node: 8, time_min: 1440}}"})


@dataclass(frozen=True, kw_only=True)
class Config:
    preset: str = spec(doc="name of this setting; results go to results/<preset>/")
    data: DataConfig = spec()
    extractor: ExtractorConfig = spec()
    pretrain: PretrainConfig = spec()
    sampler: SamplerConfig = spec()
    ddo: DDOConfig = spec()
    sample: SampleConfig = spec()
    metrics: MetricsConfig = spec(MetricsConfig(), doc="optional metrics of the final evaluation (fid stage)")
    launcher: LauncherConfig = field(default_factory=LauncherConfig, metadata={"doc": "where stages run"})


# Which params each stage reads (what dvc.yaml declares; a test checks the two agree).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "extractor": ("extractor",),
    "pretrain": ("pretrain", "sampler"),
    "ddo": ("ddo", "sampler", "pretrain.sigma_data", "extractor.kind"),
    "sample": ("sample", "sampler", "ddo.rounds", "ddo.control"),
    "fid": ("preset", "sample", "sampler", "extractor.kind", "ddo.rounds", "ddo.control", "ddo.selection_first_seed",
            "ddo.selection_samples", "metrics", "extractor.weights", "extractor.weights_sha256"),
    "table": ("preset",),
}

SEED_BLOCK = 1_000_000  # round r's fake bank: seeds fake_first_seed + r * SEED_BLOCK + i


# ----------------------------------------------------------------------------------------------------------
# Building typed configs from plain dicts, with every problem collected.


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, problems: list) -> Any:
    """Convert a YAML value to the annotated type, or record a problem and return None."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append((path, f"must be a mapping of {tp.__name__} fields, got {value!r}",
                             f"write '{path}:' followed by its indented keys"))
            return None
        return _build(tp, value, path, problems)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            problems.append((path, f"must be a list of {_type_name(item_tp)}, got {value!r}",
                             "write it as [a, b, ...]"))
            return None
        items = [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items)
    if tp is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            problems.append((path, f"must be a mapping of names to values, got {value!r}",
                             f"write '{path}:' followed by indented 'name: value' lines, or {{}}"))
            return None
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append((path, f"must be true or false, got {value!r}", "write true or false"))
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append((path, f"must be an integer, got {value!r}", "write a whole number such as 128"))
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '5e-5' as a string; accept it as a number
            try:
                return float(value)
            except ValueError:
                pass
        problems.append((path, f"must be a number, got {value!r}", "write a number such as 0.05"))
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        problems.append((path, f"must be a string, got {value!r}", "quote it"))
        return None
    raise TypeError(f"unsupported config type {tp}")


def _check_range(value: Any, meta: dict, path: str, problems: list) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        problems.append((path, f"must be one of {', '.join(map(str, choices))}; got {value!r}",
                         f"set {path} to one of {', '.join(map(str, choices))}"))
        return
    if isinstance(value, float) and math.isnan(value):
        problems.append((path, "is NaN", "write a number"))
        return
    for key, ok, words in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                           ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
        bound = meta.get(key)
        if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
            problems.append((path, f"must be {words} {bound}, got {value!r}", f"set {path} {words} {bound}"))


def _build(cls, raw: dict, prefix: str, problems: list):
    n_before = len(problems)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            problems.append((where, "unknown key",
                             f"remove it, or use one of: {', '.join(fields)}"))
    values = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is not dataclasses.MISSING:
                values[name] = f.default
                continue
            if f.default_factory is not dataclasses.MISSING:
                values[name] = f.default_factory()
                continue
            problems.append((path, "is missing", f"add '{name}:' under '{prefix or 'the top level'}' "
                             f"(see `repro params --preset tiny` for a complete file)"))
            values[name] = None
            continue
        value = _coerce(raw[name], hints[name], path, problems)
        _check_range(value, f.metadata, path, problems)
        values[name] = value
    if len(problems) > n_before:
        return None
    return cls(**values)


def _cross_checks(cfg: Config) -> list[tuple[str, str, str]]:
    """Constraints between fields."""
    problems = []
    s = cfg.sampler
    if s.sigma_max <= s.sigma_min:
        problems.append(("sampler.sigma_max", f"must be > sampler.sigma_min ({s.sigma_min})",
                         "raise sampler.sigma_max (EDM uses 80)"))
    if s.guidance != 1.0 and not s.guide:
        problems.append(("sampler.guide", f"is empty but sampler.guidance is {s.guidance} (autoguidance needs a guide "
                         "network)", "name the guide checkpoint, e.g. sampler.guide: edm2-img512-xs-0134217-0.165, "
                         "or set sampler.guidance: 1.0"))
    d = cfg.ddo
    if d.eval_every_nimg > d.nimg_per_round:
        problems.append(("ddo.eval_every_nimg", f"is larger than ddo.nimg_per_round ({d.nimg_per_round}), "
                         "so no checkpoint of a round would be evaluated",
                         "set ddo.eval_every_nimg <= ddo.nimg_per_round"))
    for name in ("sweep_alpha", "sweep_beta"):
        values = getattr(d, name)
        for i, v in enumerate(values):
            if v is not None and not v > 0:  # also NaN
                problems.append((f"ddo.{name}[{i}]", f"must be > 0, got {v!r}", f"give positive values, e.g. "
                                 f"ddo.{name}: [0.1, 0.3], or [] for no sweep"))
        names = [f"{v:g}" for v in values if v is not None]
        if len(set(names)) != len(names):
            problems.append((f"ddo.{name}", f"has repeated values {list(values)} (as written in run directory "
                             "names, %g)", "list each value once"))
    net = cfg.pretrain.network
    if not net.channel_mult:
        problems.append(("pretrain.network.channel_mult", "is empty", "give at least one level, e.g. [1, 2]"))
    x, m = cfg.extractor, cfg.metrics
    for i, name in enumerate(m.extra):
        if name not in EXTRA_METRICS or name == x.kind:
            problems.append((f"metrics.extra[{i}]", f"{name!r} is not an extra feature space here",
                             f"use one of {', '.join(e for e in EXTRA_METRICS if e != x.kind) or 'none'}"))
    if (x.kind == "inception" or "inception" in m.extra) and not x.weights:
        problems.append(("extractor.weights", "is empty, but Inception features are asked for",
                         "build the weights offline with `repro inception-weights --out PATH` and set "
                         "extractor.weights: PATH"))
    if x.reference and x.kind != "inception":
        problems.append(("extractor.reference", f"is set, but extractor.kind is {x.kind}",
                         "set extractor.kind: inception, or extractor.reference: ''"))
    if (m.kid or m.prc) and x.reference:
        problems.append(("metrics.kid" if m.kid else "metrics.prc", "needs the reference images, but "
                         "extractor.reference is a file of published statistics (mu and sigma only)",
                         "set metrics.kid/prc: false, or extractor.reference: '' (reference from the data set)"))
    # A named protocol fixes the evaluation: the settings must say the same.
    if cfg.sample.protocol != "custom":
        p = PROTOCOLS[cfg.sample.protocol]
        want = {"sample.n_samples": (cfg.sample.n_samples, p.n_samples),
                "sample.repeats": (cfg.sample.repeats, len(p.seed_ranges)),
                "sample.first_seed": (cfg.sample.first_seed, p.seed_ranges[0][0]),
                "sampler.num_steps": (cfg.sampler.num_steps, p.num_steps)}
        if p.label_mode != "none" and cfg.pretrain.network.conditional and cfg.pretrain.source == "train":
            want["sampler.label_mode"] = (cfg.sampler.label_mode, p.label_mode)
        if p.extractor == "inception-v3-compat":
            want["extractor.kind"] = (x.kind, "inception")
            name = p.reference.rsplit("/", 1)[-1]
            if x.reference.rsplit("/", 1)[-1] != name:  # a mirror or local copy keeps the file name
                want["extractor.reference"] = (x.reference, p.reference)
        for key, (have, need) in want.items():
            if have != need:
                problems.append((key, f"is {have!r} but protocol {p.name} ({p.cell}) uses {need!r}",
                                 f"set {key}: {need}, or sample.protocol: custom"))
    # Seed ranges must not overlap: selection, final evaluation, and each round's fake bank.
    ranges = {"ddo selection seeds": (d.selection_first_seed, d.selection_first_seed + d.selection_samples)}
    e = cfg.sample
    ranges["sample seeds"] = (e.first_seed, e.first_seed + e.repeats * e.n_samples)
    fakes = (d.fake_first_seed, d.fake_first_seed + (d.rounds + 1) * SEED_BLOCK)
    names = list(ranges)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (a0, a1), (b0, b1) = ranges[a], ranges[b]
            if a0 < b1 and b0 < a1:
                problems.append(("sample.first_seed", f"the {b} [{b0}, {b1}) overlap the {a} [{a0}, {a1}); "
                                 "selection must use other seeds than the final evaluation",
                                 "move sample.first_seed or ddo.selection_first_seed so the ranges are disjoint"))
    for name, (a0, a1) in ranges.items():
        if a0 < fakes[1] and fakes[0] < a1:
            problems.append(("ddo.fake_first_seed", f"the fake-bank seeds [{fakes[0]}, {fakes[1]}) overlap the "
                             f"{name} [{a0}, {a1})", "move ddo.fake_first_seed above the other seed ranges"))
    problems += _launcher_checks(cfg.launcher)
    return problems


def _launcher_checks(lc: LauncherConfig) -> list[tuple[str, str, str]]:
    problems = []
    if lc.container != "none" and not lc.image:
        problems.append(("launcher.image", f"is empty but launcher.container is {lc.container!r}",
                         "set launcher.image to the .sif file (apptainer) or image reference (pyxis), "
                         "or launcher.container: none"))
    stages = STAGE_PARAMS.keys()
    for stage, over in lc.stages.items():
        where = f"launcher.stages.{stage}"
        if stage not in stages:
            problems.append((where, "is not a stage", f"use one of: {', '.join(stages)}"))
            continue
        if not isinstance(over, dict):
            problems.append((where, f"must be a mapping of resources, got {over!r}",
                             f"write e.g. '{stage}: {{gpus_per_node: 1}}'"))
    checked = {"launcher.resources": lc.resources}
    for stage in lc.stages:
        if stage in stages:
            try:
                checked[f"launcher.stages.{stage}"] = resources_for(lc, stage)
            except ConfigError as e:
                problems += e.problems
    for where, res in checked.items():
        if res.tasks_per_node and res.gpus_per_node and res.tasks_per_node != res.gpus_per_node:
            problems.append((f"{where}.tasks_per_node", f"is {res.tasks_per_node} with {res.gpus_per_node} GPUs "
                             "per node; each rank drives one GPU",
                             "set tasks_per_node: 0 (one per GPU) or equal to gpus_per_node"))
        for key in res.extra:
            if key.replace("-", "_") in RESOURCE_FIELDS + ("time", "mem", "ntasks_per_node", "gres", "array"):
                problems.append((f"{where}.extra.{key}", "duplicates a resource field",
                                 f"set {key.replace('-', '_')} as its own field instead of in extra"))
    return problems


def resources_for(lc: LauncherConfig, stage: str) -> Resources:
    """The resources of ``stage``'s job: launcher.resources, with launcher.stages.<stage> on top."""
    over = lc.stages.get(stage) or {}
    if not isinstance(over, dict) or not over:
        return lc.resources
    problems: list = []
    res = _build(Resources, {**to_dict(lc.resources), **over}, f"launcher.stages.{stage}", problems)
    if problems:
        raise ConfigError(problems)
    return res


# ----------------------------------------------------------------------------------------------------------
# Presets, overrides, loading.


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("repro.config.presets").iterdir() if p.name.endswith(".yaml"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_text(name: str) -> str | None:
    """The preset's YAML file as written (with its comments), or None for an unknown name."""
    if name not in preset_names():
        return None
    return resources.files("repro.config.presets").joinpath(f"{name}.yaml").read_text()


def preset_dict(name: str) -> dict:
    """The raw params tree of a preset, with ``extends:`` resolved."""
    if name not in preset_names():
        raise ConfigError([("--preset", f"unknown preset {name!r}",
                            f"use one of: {', '.join(preset_names())}")], source="command line")
    raw = yaml.safe_load(resources.files("repro.config.presets").joinpath(f"{name}.yaml").read_text()) or {}
    parent = raw.pop("extends", None)
    if parent:
        raw = _deep_merge(preset_dict(parent), raw)
    raw["preset"] = name
    return raw


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError([("--set", f"{item!r} is not of the form section.key=value",
                                "write e.g. --set ddo.beta=0.1")], source="command line")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node and parts[0] == "launcher":
                node[p] = {}  # optional section: --set launcher.executor=slurm works without it in the file
            if not isinstance(node.get(p), dict):
                raise ConfigError([(key, f"{p!r} is not a section", "check the key against params.yaml")],
                                  source="command line")
            node = node[p]
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def config_from_dict(raw: Any, source: str = "params") -> Config:
    """Validate a raw params tree into a :class:`Config`; raises ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", "must be a mapping of sections", "see `repro params --preset tiny`")],
                          source)
    problems: list = []
    cfg = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems, source)
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(params: Path | None = None, preset: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load and validate: a preset if named, else the params file; then the overrides."""
    if preset is not None:
        raw, source = preset_dict(preset), f"preset {preset}"
    else:
        params = Path(params or "params.yaml")
        if not params.is_file():
            raise ConfigError([(str(params), "file not found",
                                "run from the project directory, pass --params PATH, or write one with "
                                "`repro params --preset tiny > params.yaml`")], source="command line")
        try:
            raw = yaml.safe_load(params.read_text())
        except yaml.YAMLError as e:
            raise ConfigError([(str(params), f"is not valid YAML ({e})", "fix the YAML syntax")], str(params))
        source = str(params)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source)


def to_dict(obj: Any) -> Any:
    """A config (or section) as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def stage_dict(cfg: Config, stage: str) -> dict:
    """Exactly the params a stage reads (dotted names select one key of a section), as nested dicts."""
    out: dict = {}
    for name in STAGE_PARAMS[stage]:
        section, _, key = name.partition(".")
        value = to_dict(getattr(cfg, section))
        if key:
            out.setdefault(section, {})[key] = value[key]
        else:
            out[section] = value
    for name in OMIT_WHEN_EMPTY:
        section, _, key = name.partition(".")
        if out.get(section, {}).get(key, None) == []:
            del out[section][key]
    return out


def config_hash(data: Any) -> str:
    """Short, stable hash of JSON-able data (used to key run directories and tag MLflow runs)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(to_dict(data), sort_keys=False, default_flow_style=False)
