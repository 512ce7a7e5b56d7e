"""The pipeline's stages: data -> extractor -> pretrain -> ddo -> sample -> fid -> table.

Each stage reads only its params (config.STAGE_PARAMS, declared the same way in dvc.yaml), reads its inputs,
writes its outputs atomically, and is one MLflow run. Paths are relative to the project directory (the one
holding params.yaml), never to the current working directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from repro.config import Config, config_hash, stage_dict, to_dict
from repro.storage.files import sha256_file, write_json, write_text

log = logging.getLogger(__name__)

STAGES = ("data", "extractor", "pretrain", "ddo", "sample", "fid", "table")


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, under the project directory ``root``."""

    root: Path
    preset: str
    dataset: str = "digits"

    @classmethod
    def of(cls, cfg: Config, root: Path) -> "Paths":
        return cls(Path(root).resolve(), cfg.preset, cfg.data.dataset)

    @property
    def data(self) -> Path: return self.root / "data" / f"{self.dataset}.npz"
    @property
    def manifest(self) -> Path: return self.root / "data" / "manifest.json"
    @property
    def extractor(self) -> Path: return self.root / "models" / "extractor.safetensors"
    @property
    def reference(self) -> Path: return self.root / "models" / "reference_stats.npz"
    @property
    def base(self) -> Path: return self.root / "models" / "base.safetensors"
    @property
    def base_grid(self) -> Path: return self.root / "models" / "base_grid.png"
    @property
    def ddo(self) -> Path: return self.root / "models" / "ddo"
    @property
    def samples(self) -> Path: return self.root / "samples"
    @property
    def results(self) -> Path: return self.root / "results" / self.preset
    @property
    def runs(self) -> Path: return self.root / "runs"
    @property
    def samples_work(self) -> Path: return self.runs / "samples-work"  # finished shards; samples/ is their copy


def _data(paths: Paths):
    from repro.datasets.images import load_prepared

    return load_prepared(paths.data, json.loads(paths.manifest.read_text()) if paths.manifest.is_file() else None)


def _tracked(stage: str, cfg: Config, paths: Paths, extra_hash: dict | None = None):
    from repro.pipeline.tracking import stage_run

    params = stage_dict(cfg, stage)
    return stage_run(stage, root=paths.root, preset=cfg.preset, params=params,
                     config_hash=config_hash({**params, **(extra_hash or {})}))


def _run_dir(stage: str, cfg: Config, inputs: dict[str, Path]) -> Path:
    """Run directory keyed by the stage's params and the sha256 of its inputs: resume only the same work."""
    key = config_hash({"params": stage_dict(cfg, stage), "inputs": {k: sha256_file(p) for k, p in inputs.items()}})
    return Path(f"{stage}-{key}")


def _require(*files: Path) -> None:
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: run the stage that makes it first (`dvc repro` runs them in order)")


def run_stage(stage: str, cfg: Config, root: Path, progress: bool = True, **kwargs) -> None:
    """Run one stage of the pipeline for ``cfg`` in the project directory ``root``.

    ``kwargs`` go to the stage function (``round=R`` for the ddo stage: run only round R).
    Under torchrun or srun (several processes; see repro.cluster.distributed) it joins their process group first.
    A preempted stage raises repro.cluster.preempt.Preempted after saving its state; the launcher catches it.
    """
    from repro.cluster import distributed

    paths = Paths.of(cfg, root)
    t0 = time.time()
    if distributed.init_from_env() and not distributed.is_main():
        logging.getLogger("repro").setLevel(logging.WARNING)  # rank 0 tells the progress, for all ranks
    try:
        {"data": stage_data, "extractor": stage_extractor, "pretrain": stage_pretrain, "ddo": stage_ddo,
         "sample": stage_sample, "fid": stage_fid, "table": stage_table}[stage](cfg, paths, progress, **kwargs)
    finally:
        distributed.shutdown()
    log.info("stage %s done in %.1fs", stage, time.time() - t0)


def stage_data(cfg: Config, paths: Paths, progress: bool) -> None:
    from repro.datasets.images import prepare

    with _tracked("data", cfg, paths) as t:
        manifest = prepare(cfg.data, paths.data, paths.manifest, root=paths.root, progress=progress)
        t.log_params({"sha256": manifest["sha256"], "n": manifest["n"]})
        t.log_artifact(paths.manifest)


def stage_extractor(cfg: Config, paths: Paths, progress: bool) -> None:
    from repro.evaluation.extractor import build_extractor, inception_weights

    if cfg.extractor.kind == "inception":
        inception_weights(cfg.extractor, paths.root)  # a missing or changed weights file: an error before any run
    if cfg.extractor.kind != "inception" or not cfg.extractor.reference:
        _require(paths.data)  # Inception against a paper's reference file needs no data
    data = _data(paths) if paths.data.is_file() else None
    with _tracked("extractor", cfg, paths) as t:
        info = build_extractor(cfg.extractor, data, paths.extractor, paths.reference, t, progress, root=paths.root)
        write_json(paths.extractor.with_suffix(".json"), {**info, "kind": cfg.extractor.kind,
                                                          "sha256": sha256_file(paths.extractor)})


def stage_pretrain(cfg: Config, paths: Paths, progress: bool) -> None:
    """Train the base model here (source 'train'), or fetch + verify + convert a released checkpoint."""
    from repro.cluster import distributed
    from repro.nets.checkpoint import load_model
    from repro.sampling.generate import sample_grid

    if cfg.pretrain.source != "train":
        from repro.nets.released import check

        check(cfg.pretrain)
    with _tracked("pretrain", cfg, paths) as t:
        if cfg.pretrain.source == "train":
            from repro.methods.pretrain import pretrain

            _require(paths.data)
            data = _data(paths)
            run_dir = paths.runs / _run_dir("pretrain", cfg, {"data": paths.data})
            t.set_tags({"run_dir": run_dir})
            info = pretrain(cfg.pretrain, data, run_dir, paths.base, t, progress)
            t.log_metrics({"seconds": info["seconds_this_run"]})
        else:
            from repro.nets.released import fetch_and_convert

            summary = fetch_and_convert(cfg.pretrain, paths.root, paths.base, progress)
            t.set_tags({"checkpoint": cfg.pretrain.source, "checkpoint_sha256": summary["sha256"]})
        from repro.nets.released import fetch_extras, sampling_extras

        t.set_tags({f"{k}_sha256": v for k, v in fetch_extras(cfg, paths.root, progress).items()})
        # A sample grid of the base model (seeds 0..n-1), to look at before spending compute on it (rank 0).
        if distributed.is_main():
            net, arch, info = load_model(paths.base)
            shape = (arch["img_channels"], arch["img_resolution"], arch["img_resolution"])
            extras = sampling_extras(cfg, paths.root, arch, info)  # guided / latent: as the evaluation samples
            grid = sample_grid(net, arch.get("label_dim", 0), shape, cfg.sampler, n=32, ncol=8, **extras)
            save_png(paths.base_grid, grid, scale=max(1, min(4, 128 // (grid.shape[0] // 4))))  # 4 rows; 512 px: x1
            t.log_image(grid, "base_samples.png")
            log.info("pretrain: wrote %s and a sample grid %s", paths.base, paths.base_grid)


def save_png(path: Path, image, scale: int = 4) -> None:
    from PIL import Image

    from repro.storage.files import atomic_path

    img = Image.fromarray(image)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def describe(stage: str, cfg: Config, root: Path) -> dict | None:
    """Extra facts for --dry-run: what a stage would fetch or write."""
    if stage == "pretrain" and cfg.pretrain.source != "train":
        from repro.nets.released import plan

        return plan(cfg.pretrain, root, Paths.of(cfg, root).base, cfg.sampler)
    if stage in ("sample", "fid") and cfg.sample.protocol != "custom":
        from repro.catalog.protocols import get

        return {"protocol": get(cfg.sample.protocol).to_dict()}
    return None


def stage_ddo(cfg: Config, paths: Paths, progress: bool, round: int | None = None,  # noqa: A002
              step: str | None = None, alpha: float | None = None, beta: float | None = None) -> None:
    """All DDO rounds (and the MLE control), then models/ddo; or with ``round``, only that round.

    Rounds resume and are reused through their run directories, so `repro ddo --round 1`, `--round 2`, ...
    (one SLURM job each, chained with --dependency=afterok) followed by `repro ddo` trains nothing twice.
    With a sweep (ddo.sweep_alpha / sweep_beta), ``step`` runs one step of swept DDO round ``round`` only:
    'prepare', 'candidate' (with ``alpha``, ``beta``) or 'select' (the launcher's jobs; see repro.methods.ddo.rounds).
    """
    from repro.evaluation.metric import load_metric
    from repro.methods.ddo.rounds import KINDS, train_round
    from repro.methods.ddo.selfplay import run_rounds
    from repro.methods.ddo.sweep import prepare_round, select_round, sweep_grid, swept_round, train_candidate
    from repro.nets.checkpoint import read_model_meta

    # DDO's fakes and selection samples come from the models themselves: no autoguidance (as in the paper).
    sampler = dataclasses.replace(cfg.sampler, guidance=1.0)
    if round is not None and not 1 <= round <= cfg.ddo.rounds:
        raise ValueError(f"--round {round}: the preset has rounds 1..{cfg.ddo.rounds} (ddo.rounds)")
    if step is not None and (round is None or not sweep_grid(cfg.ddo) or step not in ("prepare", "candidate", "select")
                             or (step == "candidate") != (alpha is not None and beta is not None)):
        raise ValueError(f"ddo step {step!r} (round {round}, alpha {alpha}, beta {beta}): a step is 'prepare', "
                         "'candidate' (with alpha and beta) or 'select' of one round of a swept ddo stage")
    _require(paths.data, paths.base, paths.extractor, paths.reference)
    run_dir = ddo_run_dir(cfg, paths)
    if step == "select":  # file copies only: no data, no metric
        select_round(round, run_dir / f"ddo-round{round}", cfg.ddo)
        return
    data = _data(paths)
    metric = load_metric(cfg.extractor.kind, paths.extractor, paths.reference)
    read_model_meta(paths.base)  # a clear error if the base checkpoint is not ours
    if round is None:
        with _tracked("ddo", cfg, paths) as t:
            t.set_tags({"run_dir": run_dir})
            log.info("ddo: %d rounds%s%s; run directory %s", cfg.ddo.rounds,
                     " + MLE control" if cfg.ddo.control else "",
                     f", {len(sweep_grid(cfg.ddo))} (alpha, beta) candidates each" if sweep_grid(cfg.ddo) else "",
                     run_dir)
            run_rounds(paths.base, data, cfg.ddo, sampler, cfg.pretrain.sigma_data, metric, run_dir, paths.ddo,
                       t, progress)
        return
    kinds = ("ddo",) if step else KINDS if cfg.ddo.control else ("ddo",)
    refs = {}
    for kind in kinds:  # check every kind's previous round before any work starts
        if round == 1:
            refs[kind] = (paths.base, None)
            continue
        prev = run_dir / f"{kind}-round{round - 1}"
        if not (prev / "done.json").is_file():
            raise FileNotFoundError(f"{kind} round {round - 1} is not finished ({prev}): run `repro ddo --round "
                                    f"{round - 1}` first")
        refs[kind] = (prev / "best.safetensors", json.loads((prev / "done.json").read_text())["best_score"])
    round_dir = run_dir / f"ddo-round{round}"
    if step == "prepare":
        prepare_round(round, refs["ddo"][0], data, cfg.ddo, sampler, metric, round_dir, progress, refs["ddo"][1])
        return
    if step == "candidate":
        with _tracked("ddo", cfg, paths, extra_hash={"round": round, "alpha": alpha, "beta": beta}) as t:
            t.set_tags({"run_dir": run_dir, "round": round, "alpha": alpha, "beta": beta})
            res = train_candidate(round, refs["ddo"][0], data, cfg.ddo, sampler, cfg.pretrain.sigma_data, metric,
                                  round_dir, alpha, beta, t, progress)
            t.log_metrics({"best_selection_score": res.best_score, "best_nimg": res.best_nimg})
        return
    with _tracked("ddo", cfg, paths, extra_hash={"round": round}) as t:
        t.set_tags({"run_dir": run_dir, "round": round})
        for kind in kinds:
            ref_path, ref_score = refs[kind]
            with t.child(f"{kind}-round{round}", params={"round": round, "kind": kind},
                         tags={"round": round, "kind": kind}) as child:
                if kind == "ddo" and sweep_grid(cfg.ddo):
                    res = swept_round(round, ref_path, data, cfg.ddo, sampler, cfg.pretrain.sigma_data, metric,
                                      round_dir, child, progress, ref_score)
                else:
                    res = train_round(kind, round, ref_path, data, cfg.ddo, sampler, cfg.pretrain.sigma_data, metric,
                                      run_dir / f"{kind}-round{round}", child, progress, ref_score=ref_score)
                child.log_metrics({"best_selection_score": res.best_score, "reference_score": res.ref_score})
            log.info("ddo --round %d: %s best %.4f at %d images -> %s", round, kind, res.best_score, res.best_nimg,
                     res.best_path)


def ddo_run_dir(cfg: Config, paths: Paths) -> Path:
    """The ddo stage's run directory (keyed by its params and the sha256 of its inputs)."""
    inputs = {"data": paths.data, "base": paths.base, "extractor": paths.extractor, "reference": paths.reference}
    return paths.runs / _run_dir("ddo", cfg, inputs)


def ddo_sweep_todo(cfg: Config, root: Path, round_: int) -> dict:
    """What swept DDO round ``round_`` still needs: {'done': bool, 'prepared': bool, 'candidates': [(a, b), ...]}
    (the launcher sends out only that)."""
    from repro.methods.ddo.sweep import candidate_dir, prepared, sweep_grid

    paths = Paths.of(cfg, root)
    _require(paths.data, paths.base, paths.extractor, paths.reference)
    round_dir = ddo_run_dir(cfg, paths) / f"ddo-round{round_}"
    prev = round_dir.parent / f"ddo-round{round_ - 1}"
    if round_ > 1 and not (prev / "done.json").is_file():
        raise FileNotFoundError(f"ddo round {round_ - 1} is not finished ({prev}): run `repro ddo --round "
                                f"{round_ - 1}` first")
    return {"done": (round_dir / "done.json").is_file(), "prepared": prepared(round_dir) is not None,
            "candidates": [(a, b) for a, b in sweep_grid(cfg.ddo)
                           if not (candidate_dir(round_dir, a, b) / "done.json").is_file()]}


def eval_models(cfg: Config, paths: Paths) -> dict[str, Path]:
    """The models the final evaluation compares: base, each DDO round's best, the control's last round."""
    models = {"base": paths.base}
    for r in range(1, cfg.ddo.rounds + 1):
        models[f"ddo-round{r}"] = paths.ddo / f"ddo-round{r}.safetensors"
    if cfg.ddo.control:
        models[f"control-round{cfg.ddo.rounds}"] = paths.ddo / f"control-round{cfg.ddo.rounds}.safetensors"
    return models


def _sampling_setup(cfg: Config, paths: Paths) -> tuple[str, dict]:
    """The device the sample stage uses, and its guide / latent decoder on that device (if the preset has them)."""
    import torch

    from repro.nets.checkpoint import read_model_meta
    from repro.nets.released import sampling_extras

    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch, info = read_model_meta(paths.base)
    return device, sampling_extras(cfg, paths.root, arch, info, device=device)


def stage_sample(cfg: Config, paths: Paths, progress: bool) -> None:
    from repro.sampling.shards import sample_models
    from repro.storage.files import atomic_dir, link_or_copy

    models = eval_models(cfg, paths)
    _require(*models.values())
    device, extras = _sampling_setup(cfg, paths)  # guide (sampler.guidance != 1), latent decoder
    with _tracked("sample", cfg, paths) as t:
        # Shards are made in a resumable work directory, then published atomically as samples/ (exactly the
        # shards of this plan: shards of another shard size or seed range left in the work directory are not).
        work = paths.samples_work
        written = sample_models(models, cfg.sample, cfg.sampler, work, t, progress, device, **extras)
        with atomic_dir(paths.samples) as tmp:
            for name, files in written.items():
                (tmp / name).mkdir()
                for f in map(Path, files):
                    link_or_copy(f, tmp / name / f.name)


def sample_shards(cfg: Config, root: Path, missing_only: bool = True) -> list:
    """The sample stage's shards (not yet finished ones by default): what the launcher sends out as a job array."""
    from repro.sampling.shards import plan_shards, shard_done

    paths = Paths.of(cfg, root)
    models = eval_models(cfg, paths)
    _require(*models.values())
    shards = plan_shards(models, cfg.sample, cfg.sampler, paths.samples_work)
    return [s for s in shards if not (missing_only and shard_done(s, cfg.sampler))]


def run_sample_shard(cfg: Config, root: Path, shard) -> Path:
    """One shard of the sample stage (one task of its job array)."""
    from repro.sampling.shards import run_shard

    device, extras = _sampling_setup(cfg, Paths.of(cfg, root))
    return run_shard(shard, cfg.sampler, cfg.sample.batch, progress=False, device=device, **extras)


def stage_fid(cfg: Config, paths: Paths, progress: bool) -> None:
    from repro.evaluation.metric import METRIC_LABELS, evaluate_range, extra_metrics, feature_metrics, load_metric, reference_features
    from repro.pipeline.tracking import git_commit
    from repro.sampling.shards import eval_ranges, model_sha256, plan_shards, range_batches, range_shards, sample_devices

    models = eval_models(cfg, paths)
    _require(paths.samples, paths.ddo / "rounds.json")
    metric = load_metric(cfg.extractor.kind, paths.extractor, paths.reference)
    history = json.loads((paths.ddo / "rounds.json").read_text())["history"]
    reduce = "mean"  # over the seed ranges; a paper protocol says how it reduces (EDM: the minimum of three)
    if cfg.sample.protocol != "custom":
        from repro.catalog.protocols import get

        reduce = get(cfg.sample.protocol).reduce
    shards = plan_shards(models, cfg.sample, cfg.sampler, paths.samples)
    m = cfg.metrics
    data = _data(paths) if paths.data.is_file() else None
    extras = extra_metrics(m.extra, cfg.extractor, paths.root, data.images if data else None,
                           sha256_file(paths.data) if data else "", paths.runs, progress) if m.extra else []
    keep = m.kid or m.prc
    if keep and data is None:
        raise FileNotFoundError(f"metrics.kid/prc compare with the real images: {paths.data} not found; run `repro data`")
    ref_feats = reference_features(metric, data.images) if keep else None
    suffix = "" if metric.name == "fid" else "_" + metric.name.removeprefix("fd_")
    with _tracked("fid", cfg, paths) as t:
        entries = []
        for name in models:
            kind, _, r = name.partition("-round")
            values, more = [], {}
            for lo, hi in eval_ranges(cfg.sample):
                # The range's shards streamed through the extractors: one set of statistics each, no PNGs.
                batches = range_batches(range_shards(shards, name, lo, hi), model_sha=model_sha256(models[name]))
                stats, feats = evaluate_range([metric, *extras], batches, keep)
                values.append(metric.distance(stats[0]))
                for x, st in zip(extras, stats[1:]):
                    more.setdefault(x.name, []).append(x.distance(st))
                if keep:
                    for k, v in feature_metrics(feats, ref_feats, m.kid, m.prc, m.kid_subsets, m.kid_subset_size,
                                                suffix).items():
                        more.setdefault(k, []).append(v)
            devices = sample_devices(s for s in shards if s.model == name)
            if len(devices) > 1:
                log.warning("fid: %s's sample shards were made on %s; a seed's image differs between devices. To "
                            "use one device, delete %s and rerun `repro sample` there", name, " and ".join(devices),
                            paths.samples_work / name)
            entry = {"name": name, "round": int(r or 0), "value": reduce_values(values, reduce), "values": values,
                     "sample_devices": devices}
            if more:  # other metrics: the protocol's reduction for distances, the mean for KID and precision/recall
                entry["extra"] = {k: {"value": reduce_values(v, reduce if k == "fid" else "mean"), "values": v}
                                  for k, v in more.items()}
                t.log_metrics({f"{k}/{name}": e["value"] for k, e in entry["extra"].items()})
            if kind in history:
                entry["selection_score"] = history[kind][int(r) - 1]["best_score"]
            if kind == "control":
                entry["note"] = ("MLE control: the same rounds, steps, optimizer and selection as DDO, "
                                 "with the EDM loss on real images instead of the DDO loss")
            entries.append(entry)
            t.log_metrics({f"{metric.name}/{name}": entry["value"]})
            log.info("fid: %s %s = %.4f (%s)", name, metric.name, entry["value"],
                     ", ".join(f"{v:.4f}" for v in values))
        sampler = to_dict(cfg.sampler)
        metrics = {
            "preset": cfg.preset,
            "paper": "ddo",
            "metric": metric.name,
            "metric_label": METRIC_LABELS.get(metric.name, metric.name),
            "protocol": {
                "n_samples": cfg.sample.n_samples, "seed_ranges": [list(r) for r in eval_ranges(cfg.sample)],
                "name": cfg.sample.protocol, "reduce": reduce, "label_mode": cfg.sampler.label_mode,
                **metric.protocol(),
                "sampler": {"name": "edm-heun", "num_steps": sampler["num_steps"],
                            "nfe": 2 * sampler["num_steps"] - 1, "S_churn": sampler["S_churn"]},
                "reference": (cfg.extractor.reference if cfg.extractor.reference
                              else f"{paths.data.relative_to(paths.root)} (all real images)"),
                "selection_seeds": [cfg.ddo.selection_first_seed,
                                    cfg.ddo.selection_first_seed + cfg.ddo.selection_samples],
                "full": True,
            },
            "run": {"command": "repro fid", "git_commit": git_commit(paths.root),
                    "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
            "models": entries,
            **({"extra_metrics": {x.name: {"label": METRIC_LABELS.get(x.name, x.name), **x.protocol(),
                                           "reference": "the data set's images"} for x in extras}} if extras else {}),
            **({"feature_metrics": {"space": metric.name, "kid_subsets": m.kid_subsets, "kid_subset_size":
                                    m.kid_subset_size, "prc_k": 3, "reference": "the data set's images"}}
               if keep else {}),
            "final": {"base": entries[0]["value"], "ddo": entries[cfg.ddo.rounds]["value"]},
        }
        write_json(paths.results / "metrics.json", metrics)
        rows = ["round\tddo\tcontrol"]
        ctrl = {x["round"]: x["best_score"] for x in history.get("control", [])}
        sel = {x["round"]: x["best_score"] for x in history["ddo"]}
        base_sel = history["ddo"][0]["reference_score"]
        rows.append(f"0\t{base_sel:.6f}\t{base_sel:.6f}")
        for r in range(1, cfg.ddo.rounds + 1):
            rows.append(f"{r}\t{sel[r]:.6f}\t{ctrl.get(r, float('nan')):.6f}")
        write_text(paths.results / "rounds.tsv", "\n".join(rows) + "\n")
        _plot_rounds(t, metric.name, history, base_sel)


def reduce_values(values: list[float], how: str) -> float:
    """One number from the values of several seed ranges: their mean, or their minimum (EDM's protocol)."""
    if how == "min":
        return float(min(values))
    if how == "mean":
        return float(sum(values) / len(values))
    raise ValueError(f"unknown reduction {how!r}: use 'mean' or 'min'")


def _plot_rounds(tracker, metric_name: str, history: dict, base_score: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, rs in history.items():
        ax.plot([0] + [x["round"] for x in rs], [base_score] + [x["best_score"] for x in rs], marker="o", label=kind)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric_name} (selection seeds)")
    ax.legend()
    fig.tight_layout()
    tracker.log_figure(fig, "metric_per_round.png")
    plt.close(fig)


def stage_table(cfg: Config, paths: Paths, progress: bool) -> None:
    from repro.evaluation.tables import render_paper, render_run

    _require(paths.results / "metrics.json")
    metrics = json.loads((paths.results / "metrics.json").read_text())
    with _tracked("table", cfg, paths) as t:
        run_md = render_run(metrics, "md")
        write_text(paths.results / "table.md", run_md)
        write_text(paths.root / "results" / "ddo_tables.md", render_paper("ddo", paths.root / "results", "md"))
        t.log_artifact(paths.results / "table.md")
        print(run_md)
