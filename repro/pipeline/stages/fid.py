"""Stage `fid`: the metric of every model on the evaluation seeds, from the sample shards; results/<preset>/.

The protocol (samples, seed ranges and how they reduce, labels, sampler, extractor and reference) is data
(repro.catalog.protocols) and is written beside the numbers.

With a held-out split (data.holdout > 0) the main value is against the reference statistics of the *training part*
(the extractor stage's, which the DDO rounds' selection also uses: nothing in training or selection sees a held-out
image), and more numbers per model come beside it: the distance to the held-out part's statistics
(``<metric>_heldout``, same features, same samples), KID (unbiased whatever the set sizes, unlike the Fréchet
distance, whose bias with 359 reference images is larger than the models' differences) against the training part and
against the held-out part (``kid_train``, ``kid_heldout``, same subset size), and the copy rate
(repro.evaluation.copycheck). The protocol records the split and the floors: the training part's own statistics
against the held-out part's, and random training subsets of the held-out part's size against the rest.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import numpy as np

from repro.catalog import protocols
from repro.config import Config, to_dict
from repro.evaluation.copycheck import CopyCheck
from repro.evaluation.extractor import extra_metrics
from repro.evaluation.fidelity import frechet_distance, kid
from repro.evaluation.metric import METRIC_LABELS, evaluate_range, feature_metrics, load_metric, reference_features
from repro.evaluation.tables.data import write_result
from repro.nets.checkpoint import read_model_meta, weight_dtypes
from repro.nets.var import PATCH_NUMS
from repro.pipeline.common import load_data, require, tracked
from repro.pipeline.stages.guided import guided_shards
from repro.pipeline.stages.sample import eval_models, shard_sampler
from repro.pipeline.tracking import git_commit
from repro.sampling.shards import eval_ranges, model_sha256, plan_shards, range_batches, range_shards, sample_devices
from repro.storage.files import check_recorded, read_json, sha256_file, write_text
from repro.storage.layout import Paths, parse_round_name, round_name

log = logging.getLogger("repro.pipeline")


def run(cfg: Config, paths: Paths, progress: bool) -> None:
    models = eval_models(cfg, paths)
    require(paths.samples, paths.rounds_json)
    for path in models.values():  # the models the shards name: as their stages wrote them
        if path.is_file():
            check_recorded(path)
    guided, guided_in = guided_shards(cfg, paths)  # the guided models beside them (none with guidance off)
    metric = load_metric(cfg.extractor.kind, paths.extractor, paths.reference)
    history = read_json(paths.rounds_json)["history"]  # empty for an evaluation-only preset
    paper, cells = cfg.paper.name, dict(cfg.paper.cells)
    final = f"ddo-round{cfg.ddo.rounds}" if cfg.ddo.rounds else "base"  # the model the "final" cell means
    base_arch, _ = read_model_meta(paths.base)
    reduce = "mean"  # over the seed ranges; a paper protocol says how it reduces (EDM: the minimum of three)
    if cfg.sample.protocol != "custom":
        reduce = protocols.get(cfg.sample.protocol).reduce
    shards = plan_shards(models, cfg.sample, shard_sampler(cfg), paths.samples) + guided_in
    models = {**models, **{name: paths.root / g["generator"] for name, g in guided.items()}}
    m = cfg.metrics
    data = load_data(paths) if paths.data.is_file() else None
    extras = extra_metrics(m.extra, cfg.extractor, paths.root, data.images if data else None,
                           sha256_file(paths.data) if data else "", paths.runs, progress) if m.extra else []
    held = heldout_reference(metric, paths)  # None without a held-out split
    heldout_key = f"{metric.name}_heldout"
    keep = m.kid or m.prc or bool(held)
    if keep and data is None:
        raise FileNotFoundError(f"metrics.kid/prc compare with the real images: {paths.data} not found; run `repro data`")
    ref_feats = reference_features(metric, data.images) if (m.kid or m.prc) else None
    suffix = "" if metric.name == "fid" else "_" + metric.name.removeprefix("fd_")
    with tracked("fid", cfg, paths) as t:
        entries = []
        for name in models:
            kind, r, seed = parse_round_name(guided[name]["model"] if name in guided else name) or (name, 0, None)
            values, more = [], {}
            for lo, hi in eval_ranges(cfg.sample):
                # The range's shards streamed through the extractors: one set of statistics each, no PNGs.
                batches = range_batches(range_shards(shards, name, lo, hi), model_sha=model_sha256(models[name]))
                if held:  # the copy check counts each batch on its way to the extractors
                    held["copy"].reset()
                    batches = held["copy"].watch(batches)
                stats, feats = evaluate_range([metric, *extras], batches, keep)
                values.append(metric.distance(stats[0]))
                if held:
                    ref = held["stats"]
                    more.setdefault(heldout_key, []).append(
                        frechet_distance(stats[0].mu, stats[0].sigma, ref.mu, ref.sigma))
                    more.setdefault("copy_rate", []).append(held["copy"].rate)
                    size = min(1000, len(feats), len(held["heldout_feats"]))  # one subset size for both parts
                    for part in ("train", "heldout"):
                        more.setdefault(f"kid_{part}", []).append(
                            kid(feats / held["scale"], held[f"{part}_feats"], subsets=100, subset_size=size)["kid_mean"])
                for x, st in zip(extras, stats[1:]):
                    more.setdefault(x.name, []).append(x.distance(st))
                if m.kid or m.prc:
                    for k, v in feature_metrics(feats, ref_feats, m.kid, m.prc, m.kid_subsets, m.kid_subset_size,
                                                suffix).items():
                        more.setdefault(k, []).append(v)
            devices = sample_devices(s for s in shards if s.model == name)
            if len(devices) > 1:
                log.warning("fid: %s's sample shards were made on %s; a seed's image differs between devices. To "
                            "use one device, delete %s and rerun `repro sample` there", name, " and ".join(devices),
                            paths.samples_work / name)
            entry = {"name": name, "round": r, "value": reduce_values(values, reduce), "values": values,
                     "sample_devices": devices, "weights": weight_dtypes(models[name])}
            if name not in guided:  # training-seed replicates: which seed
                entry.update(replicate_fields(cfg, name))
            cell = cells.get(name) or (cells.get("final") if name == final else None)
            if cell:
                entry["cell"] = cell
            if more:  # other metrics: the protocol's reduction for distances, the mean for KID and precision/recall
                entry["extra"] = {k: {"value": reduce_values(v, reduce if k in ("fid", heldout_key) else "mean"),
                                      "values": v}
                                  for k, v in more.items()}
                t.log_metrics({f"{k}/{name}": e["value"] for k, e in entry["extra"].items()})
            if name in guided:  # what it is: its generator, variant, discriminator and sampler settings
                g = guided[name]
                entry["guided"] = {"model": g["model"], "variant": g["variant"], "guidance": g["guidance"],
                                   "discriminator_sha256": g["discriminator_sha256"],
                                   "discriminator": {k: v for k, v in g["discriminator_info"].items()
                                                     if k in ("source", "objective", "epochs", "head", "extractor")}}
                how = (f"w = {g['guidance']['w']:g}" if "w" in g["guidance"]
                       else f"{g['guidance']['steps']} Langevin steps")  # DCD: a refinement after sampling
                entry["note"] = f"{g['method']} on {g['model']} ({how})"
            elif kind in history:  # a replicate's history: under <kind>-seed<s> (repro.methods.ddo.selfplay)
                entry["selection_score"] = history[kind if seed is None else f"{kind}-seed{seed}"][r - 1]["best_score"]
            if kind == "control" and name not in guided:
                entry["note"] = control_note(history.get("control" if seed is None else f"control-seed{seed}", []), int(r),
                                             "next-scale cross-entropy" if base_arch.get("precond") == "var"
                                             else "EDM loss")
            entries.append(entry)
            t.log_metrics({f"{metric.name}/{name}": entry["value"]})
            log.info("fid: %s %s = %.4f (%s)", name, metric.name, entry["value"],
                     ", ".join(f"{v:.4f}" for v in values))
        sampler = to_dict(cfg.sampler)
        ar = base_arch.get("precond") == "var"
        if ar:  # VAR: next-scale sampling, one evaluation per scale (two where the unconditional pass runs)
            a = cfg.ar
            scales = len(base_arch.get("patch_nums") or PATCH_NUMS)
            sampler_record = {"name": "var-next-scale", "num_steps": scales, "nfe": scales, "cfg": a.cfg,
                              "cfg_mode": a.cfg_mode, "top_k": a.top_k, "top_p": a.top_p,
                              "network_evaluations": scales * (2 if a.guided else 1)}
        else:
            sampler_record = {"name": "edm-heun", "num_steps": sampler["num_steps"],
                              "nfe": 2 * sampler["num_steps"] - 1, "S_churn": sampler["S_churn"],
                              "dtype": sampler["dtype"], "guidance": sampler["guidance"],
                              **({"guide": sampler["guide"]} if sampler["guidance"] != 1.0 else {})}
        metrics = {
            "preset": cfg.preset,
            "paper": paper,
            "metric": metric.name,
            "metric_label": METRIC_LABELS.get(metric.name, metric.name),
            "protocol": {
                "n_samples": cfg.sample.n_samples, "seed_ranges": [list(r) for r in eval_ranges(cfg.sample)],
                "name": cfg.sample.protocol, "reduce": reduce, "cond": ar or bool(base_arch.get("label_dim")),
                "label_mode": "balanced" if ar else (cfg.sampler.label_mode if base_arch.get("label_dim") else "none"),
                **metric.protocol(),
                "sampler": sampler_record,
                "reference": (cfg.extractor.reference if cfg.extractor.reference
                              else f"{paths.data.relative_to(paths.root)} ("
                              + (f"the training part, {held['record']['n_train']} images" if held
                                 else "all real images") + ")"),
                **({"heldout": held["record"]} if held else {}),
                **({"selection_seeds": [cfg.ddo.selection_first_seed,
                                        cfg.ddo.selection_first_seed + cfg.ddo.selection_samples]} if history else {}),
                # training-seed replicates: each trained from the same base with its own training seed (ddo.seeds)
                **({"training_seeds": [cfg.ddo.seed + k for k in range(cfg.ddo.seeds)]}
                   if history and cfg.ddo.seeds > 1 else {}),
                **({"base_curve": curve} if (curve := base_curve_record(paths)) else {}),
                "full": cfg.sample.protocol != "custom",
            },
            "run": {"command": "repro fid", "git_commit": git_commit(paths.root),
                    "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
            "models": entries,
            **({"extra_metrics": {x.name: {"label": METRIC_LABELS.get(x.name, x.name), **x.protocol(),
                                           "reference": "the data set's images"} for x in extras}} if extras else {}),
            **({"feature_metrics": {"space": metric.name, "kid_subsets": m.kid_subsets, "kid_subset_size":
                                    m.kid_subset_size, "prc_k": 3, "reference": "the data set's images"}}
               if keep else {}),
        }
        write_result(paths.results, metrics)
        rows = ["round\tddo\tcontrol"]
        if history:  # the selection metric along the DDO rounds (and the control's); none without rounds
            ctrl = {x["round"]: x["best_score"] for x in history.get("control", [])}
            sel = {x["round"]: x["best_score"] for x in history["ddo"]}
            base_sel = history["ddo"][0]["reference_score"]
            rows.append(f"0\t{base_sel:.6f}\t{base_sel:.6f}")
            for r in range(1, cfg.ddo.rounds + 1):
                rows.append(f"{r}\t{sel[r]:.6f}\t{ctrl.get(r, float('nan')):.6f}")
            _plot_rounds(t, metric.name, history, base_sel)
        write_text(paths.rounds_tsv, "\n".join(rows) + "\n")


def replicate_fields(cfg: Config, name: str) -> dict:
    """A model entry's training seed with training-seed replicates (ddo.seeds > 1), for a DDO or control round:
    ``seed`` (replicate 0's: ddo.seed), and for replicates k >= 1 ``replicate_of``, replicate 0's entry of the same
    kind and round. Empty without replicates (entries as before) and for other models (base)."""
    parsed = parse_round_name(name)
    if cfg.ddo.seeds <= 1 or parsed is None or parsed[0] not in ("ddo", "control"):
        return {}
    kind, r, seed = parsed
    if seed is None:
        return {"seed": int(cfg.ddo.seed)}
    return {"seed": seed, "replicate_of": round_name(kind, r)}


def control_note(history: list[dict], round_: int, loss: str) -> str:
    """What the MLE control of round ``round_`` was, from rounds.json's control history (never from the config): its
    learning rates tried and chosen up to that round, and its budget (equal steps, or equal compute with the counts
    repro.methods.ddo.control recorded). A plain control (no search, equal steps) keeps the text it always had."""
    rounds = [x for x in history if x["round"] <= round_]
    if not rounds or "budget" not in rounds[-1]:
        return (f"MLE control: the same rounds, steps, optimizer and selection as DDO, with the {loss} on real images "
                "instead of the DDO loss")
    lrs = [c["lr"] for c in rounds[-1]["candidates"]]
    chosen = ", ".join(f"r{x['round']} " + ("reference kept" if x.get("lr") is None else f"{x['lr']:g}")
                       for x in rounds)
    how = (f"lr tuned over {{{', '.join(f'{v:g}' for v in lrs)}}} per round by the selection seeds (chosen: {chosen})"
           if len(lrs) > 1 else f"lr {lrs[0]:g}")
    last = rounds[-1]
    fe = last.get("forward_equivalents")
    if last["budget"] == "compute":
        budget = (f"equal compute ({fe['control']:,} network forward-equivalents per round, DDO's {fe['ddo']:,}: "
                  f"{last['nimg_per_round']:,} images per round, as many selection evaluations)")
    else:
        budget = "equal steps (the same rounds, steps, optimizer and selection as DDO" + (
            f"; {fe['control']:,} network forward-equivalents per round, DDO's {fe['ddo']:,})" if fe else ")")
    return f"MLE control: {loss} on real images from the same base, {how}, {budget}"


def heldout_reference(metric, paths: Paths) -> dict | None:
    """With a held-out split: the held-out part's statistics in ``metric``'s space, the copy check (training part vs
    held-out part) and the record of both for the protocol; None without a split."""
    if not paths.data.is_file() or "split" not in (read_json(paths.manifest) if paths.manifest.is_file() else {}):
        return None
    import torch

    train, heldout = load_data(paths, "train"), load_data(paths, "heldout")
    with torch.no_grad():
        stats = metric.statistics(torch.as_tensor(heldout.images[i:i + 500]) for i in range(0, len(heldout.images), 500))
    copy = CopyCheck(train.images, heldout.images)
    split = read_json(paths.manifest)["split"]
    train_feats, heldout_feats = reference_features(metric, train.images), reference_features(metric, heldout.images)
    # the Fréchet distance's own noise and bias at the held-out part's size: random training subsets of that size
    # against the rest of the training part (nothing but sampling separates them)
    rng, k, same_size = np.random.default_rng(0), len(heldout_feats), []
    for _ in range(5):
        perm = rng.permutation(len(train_feats))
        a, b = train_feats[perm[:k]], train_feats[perm[k:]]
        same_size.append(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
    size = min(1000, len(heldout_feats))
    # KID's cubic kernel (x.y / d + 1)^3 assumes features of order 1 (Inception's); these classifier features are
    # ~3x larger, which makes the kernel's values and KID's noise explode: every set is divided by one constant,
    # the training part's root-mean-square feature value (the same kernel for all, so still an unbiased MMD^2)
    scale = float(np.sqrt((train_feats.astype(np.float64) ** 2).mean()))
    train_feats, heldout_feats = train_feats / scale, heldout_feats / scale
    record = {"n_train": split["n_train"], "n_heldout": split["n_heldout"], "fraction": split["holdout"],
              "seed": split["seed"], "heldout_sha256": split["heldout_sha256"], "train_sha256": split["train_sha256"],
              "metric": f"{metric.name}_heldout: the same samples' features against the held-out part's statistics",
              "floor": frechet_distance(metric.reference.mu, metric.reference.sigma, stats.mu, stats.sigma),
              "floor_note": "the training part's own statistics against the held-out part's: what a model that "
                            "reproduced the training images exactly would score in the held-out column",
              "floor_same_size": same_size,
              "floor_same_size_note": f"{metric.name} of 5 random {k}-image subsets of the training part against the "
                                      "rest of it: the Fréchet distance's bias and noise with a reference this small",
              "kid_floor": kid(train_feats, heldout_feats, subsets=100, subset_size=size)["kid_mean"],
              "kid": f"KID (unbiased MMD^2, cubic polynomial kernel, 100 subsets of min(1000, samples, held-out) "
                     f"= {size} samples) in {metric.name}'s features divided by {scale:.4g} (the training part's "
                     "root-mean-square feature value) against each part",
              "kid_feature_scale": scale,
              "copy_check": copy.protocol()}
    log.info("fid: held-out part %d images (floor %.4f), copy threshold %.3f", len(heldout.images), record["floor"],
             copy.threshold)
    return {"stats": stats, "copy": copy, "record": record, "scale": scale, "train_feats": train_feats,
            "heldout_feats": heldout_feats}


def base_curve_record(paths: Paths) -> dict | None:
    """The pretraining curve (models/base_curve.json, the pretrain stage's) for the protocol, or None where the base
    was not trained here with a curve: every point as [images, score, part scores...], and the plateau rule."""
    if not paths.base_curve.is_file():
        return None
    rec = read_json(paths.base_curve)
    if not rec.get("curve"):
        return None
    return {"metric": rec["metric"], "seeds": rec["seeds"], "every_nimg": rec["every_nimg"],
            "plateau_window": rec["plateau_window"], "plateau_tol": rec.get("plateau_tol", 0.0),
            "plateau": rec["plateau"], "nimg": rec["nimg"],
            "total_nimg": rec["total_nimg"],
            "points": [[c["nimg"], round(c["score"], 6), *(round(v, 6) for v in c["parts"])] for c in rec["curve"]]}


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


def describe(cfg: Config, paths: Paths) -> dict | None:
    """The evaluation protocol (--dry-run)."""
    return None if cfg.sample.protocol == "custom" else {"protocol": protocols.get(cfg.sample.protocol).to_dict()}
