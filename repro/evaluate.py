"""Evaluation: the metric (Fréchet distance in an extractor's feature space) and the sample/fid stages.

The tiny preset's metric is FD-digits: the Fréchet distance between Gaussians fitted to the features of a
small digits classifier (trained by the `extractor` stage) on generated and on real images. It is not FID.
It goes through the same path as the paper presets' Inception FID (torch-fidelity's feature-extractor
registry, see repro.fidelity); only the extractor differs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from repro import fidelity
from repro.config import ExtractorConfig, SampleConfig, SamplerConfig
from repro.data import Dataset
from repro.files import load_npz, save_npz, sha256_file
from repro.sampler import generate_images, image_grid

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


def shard_name(lo: int, hi: int) -> str:
    return f"seeds-{lo:09d}-{hi:09d}.npz"


def sample_models(models: dict[str, Path], cfg: SampleConfig, sampler: SamplerConfig, out_dir: Path, tracker,
                  progress: bool = True, **extras) -> dict:
    """The `sample` stage: for each model, its images for every evaluation seed range, as uint8 npz shards.

    A shard that already exists (same seed range, same model file) is kept, so a rerun continues.
    ``extras``: ``guide`` / ``decoder`` for generate_images (repro.pretrained.sampling_extras).
    """
    from repro.config import config_hash, to_dict
    from repro.ddo import sample_grid
    from repro.files import load_model

    written = {}
    sampler_hash = config_hash(to_dict(sampler))
    for name, path in models.items():
        net, arch, _ = load_model(path)
        model_dir = out_dir / name
        for lo, hi in eval_ranges(cfg):
            shard = model_dir / shard_name(lo, hi)
            if shard.is_file():  # reuse a finished shard only if it came from the same model and sampler
                old = load_npz(shard)
                if str(old.get("model_sha256")) == sha256_file(path) and str(old.get("sampler")) == sampler_hash:
                    continue
            imgs, labels = [], []
            for _, x, y in generate_images(net, np.arange(lo, hi), img_shape=tuple(
                    (arch["img_channels"], arch["img_resolution"], arch["img_resolution"])),
                    label_dim=arch["label_dim"], sampler=sampler, batch=cfg.batch, progress=progress,
                    desc=f"sample {name} [{lo},{hi})", **extras):
                imgs.append(x.numpy())
                labels.append(y.numpy() if y is not None else np.full(len(x), -1))
            save_npz(shard, images=np.concatenate(imgs), labels=np.concatenate(labels), seeds=np.arange(lo, hi),
                     model_sha256=np.array(sha256_file(path)), sampler=np.array(sampler_hash))
        if extras:  # guided or latent: show the evaluation's own first images
            grid = image_grid(load_npz(model_dir / shard_name(*eval_ranges(cfg)[0]))["images"][:80], ncol=20)
        else:
            grid = sample_grid(net, arch["label_dim"], (arch["img_channels"], arch["img_resolution"],
                                                        arch["img_resolution"]), sampler)
        tracker.log_image(grid, f"{name}.png")
        written[name] = [str(model_dir / shard_name(lo, hi)) for lo, hi in eval_ranges(cfg)]
        log.info("sample: %s -> %s", name, model_dir)
    return written


def shard_batches(path: Path, batch: int = 500) -> Iterable[torch.Tensor]:
    images = load_npz(path)["images"]
    for i in range(0, len(images), batch):
        yield torch.as_tensor(images[i:i + batch])
