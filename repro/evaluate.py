"""Evaluation: the metric (Fréchet distance in an extractor's feature space) and the sample/fid stages.

The tiny preset's metric is FD-digits: the Fréchet distance between Gaussians fitted to the features of a
small digits classifier (trained by the `extractor` stage) on generated and on real images. It is not FID.
It goes through the same path as the paper presets' Inception FID (torch-fidelity's feature-extractor
registry, see repro.fidelity); only the extractor differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from repro import fidelity
from repro.config import ExtractorConfig, SampleConfig, SamplerConfig
from repro.data import Dataset
from repro.files import load_npz, save_npz, sha256_file
from repro.sampler import generate_images

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "fd_digits": "FD-digits (Fréchet distance in digits-classifier features; not FID)",
}


class Metric:
    """Fréchet distance of generated images to reference statistics, in an extractor's feature space."""

    def __init__(self, name: str, extractor_kind: str, weights_path: Path, reference_path: Path):
        self.name = name
        self.extractor_kind = extractor_kind
        self.weights_path = Path(weights_path)
        self.reference_path = Path(reference_path)
        self.extractor = fidelity.make_extractor(extractor_kind, str(weights_path))
        self.feature = fidelity.default_feature(extractor_kind)
        self.reference = fidelity.FeatureStats.load(reference_path)

    def statistics(self, batches: Iterable[torch.Tensor]) -> "fidelity.FeatureStats":
        return fidelity.compute_statistics(batches, self.extractor, self.feature)

    def distance(self, stats: "fidelity.FeatureStats") -> float:
        return fidelity.frechet_distance(stats.mu, stats.sigma, self.reference.mu, self.reference.sigma)

    def score(self, net, seeds: np.ndarray, label_dim: int, img_shape, sampler: SamplerConfig) -> float:
        """Generate the seeds' images with ``net`` and return their distance to the reference."""
        batches = (imgs for _, imgs, _ in generate_images(net, seeds, img_shape=img_shape, label_dim=label_dim,
                                                          sampler=sampler))
        return self.distance(self.statistics(batches))

    def protocol(self) -> dict:
        return {"extractor": self.extractor_kind, "extractor_sha256": sha256_file(self.weights_path),
                "reference_sha256": sha256_file(self.reference_path)}


def metric_name(kind: str) -> str:
    return {"digits-classifier": "fd_digits"}[kind]


def load_metric(kind: str, weights: Path, reference: Path) -> Metric:
    for p, what in ((weights, "extractor weights"), (reference, "reference statistics")):
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} not found ({what}): run the extractor stage first (`repro extractor`)")
    return Metric(metric_name(kind), kind, weights, reference)


def build_extractor(cfg: ExtractorConfig, data: Dataset, weights_out: Path, reference_out: Path, tracker,
                    progress: bool = True) -> dict:
    """The `extractor` stage: train the digits classifier, then the reference statistics of the real data."""
    from repro.classifier import save_classifier, train_classifier

    model, info = train_classifier(data.images, data.labels, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr,
                                   seed=cfg.seed, feature_dim=cfg.feature_dim, width=cfg.width, progress=progress)
    save_classifier(model, weights_out)
    tracker.log_metrics({k: v for k, v in info.items() if isinstance(v, (int, float))})
    extractor = fidelity.make_extractor(cfg.kind, str(weights_out))
    batches = (torch.as_tensor(data.images[i:i + 500]) for i in range(0, len(data.images), 500))
    stats = fidelity.compute_statistics(batches, extractor, fidelity.default_feature(cfg.kind))
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
# depends only on seed i (repro.sampler), so the images do not depend on the shard size, the batch size, the
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
    """The small fields of a shard file (model_sha256, sampler, lo, hi), without reading its images; None if
    the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            seeds = z["seeds"]
            return {"model_sha256": str(z["model_sha256"]), "sampler": str(z["sampler"]),
                    "lo": int(seeds[0]) if len(seeds) else None, "hi": int(seeds[-1]) + 1 if len(seeds) else None}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def shard_done(shard: Shard, sampler: SamplerConfig) -> bool:
    """True if ``shard.out`` holds this shard's seeds, made by the same model file and sampler settings."""
    rec = shard_record(shard.out) if shard.out.is_file() else None
    return (rec is not None and rec["lo"] == shard.lo and rec["hi"] == shard.hi
            and rec["sampler"] == sampler_hash(sampler) and rec["model_sha256"] == model_sha256(shard.model_path))


_NET_CACHE: dict[tuple, tuple] = {}


def _load_net(path: Path, device: str):
    """The network of a model file, kept for the next shard of the same model (one model at a time)."""
    from repro.files import load_model

    key = (model_sha256(path), str(device))
    if key not in _NET_CACHE:
        _NET_CACHE.clear()
        net, arch, _ = load_model(path, device)
        _NET_CACHE[key] = (net, arch)
    return _NET_CACHE[key]


def run_shard(shard: Shard, sampler: SamplerConfig, batch: int, progress: bool = False,
              device: str | None = None) -> Path:
    """Make one shard's images (uint8 [N, C, H, W], labels, seeds) unless it is finished; return its path.

    ``device``: default the GPU when there is one. Note that per-seed noise is drawn on that device, so CPU and
    GPU runs of the same seed give different (equally valid) images; the device is recorded in the shard.
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
                                   desc=f"sample {shard.model} [{shard.lo},{shard.hi})"):
        imgs.append(x.numpy())
        labels.append(y.numpy() if y is not None else np.full(len(x), -1))
    save_npz(shard.out, images=np.concatenate(imgs), labels=np.concatenate(labels), seeds=shard.seeds,
             model_sha256=np.array(sha), sampler=np.array(sampler_hash(sampler)),
             device=np.array(torch.device(device).type))
    return shard.out


def sample_models(models: dict[str, Path], cfg: SampleConfig, sampler: SamplerConfig, out_dir: Path, tracker,
                  progress: bool = True) -> dict:
    """The `sample` stage: every model's images for every evaluation seed range, as uint8 npz shards.

    Finished shards are kept, so a rerun continues where a killed one stopped. Under torch.distributed
    (repro.distributed), rank r makes shards i with i % world_size == r, then all ranks wait for each other.
    """
    from repro import distributed
    from repro.ddo import sample_grid

    shards = plan_shards(models, cfg, sampler, out_dir)
    rank, world = distributed.rank(), distributed.world_size()
    for i, shard in enumerate(shards):
        if i % world == rank:
            run_shard(shard, sampler, cfg.batch, progress)
    distributed.barrier()
    written = {name: [str(s.out) for s in shards if s.model == name] for name in models}
    if distributed.is_main():
        for name, path in models.items():
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

