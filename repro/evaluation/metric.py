"""Evaluation: the metric (Fréchet distance in an extractor's feature space) and the sample/fid stages.

The tiny preset's metric is FD-digits: the Fréchet distance between Gaussians fitted to the features of a
small digits classifier (trained by the `extractor` stage) on generated and on real images. It is not FID.
It goes through the same path as the paper presets' Inception FID (torch-fidelity's feature-extractor
registry, see repro.evaluation.fidelity); only the extractor differs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from repro.config import SamplerConfig
from repro.evaluation import fidelity
from repro.sampling.generate import generate_images
from repro.storage.files import readable, sha256_file

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "fd_digits": "FD-digits (Fréchet distance in digits-classifier features; not FID)",
    "fid": "FID (Inception-v3 2015-12-05, 2048-d pool features)",
}

# Config kind -> (torch-fidelity extractor name, metric name).
EXTRACTORS = {"digits-classifier": (fidelity.DIGITS_EXTRACTOR, "fd_digits"),
              "inception": (fidelity.INCEPTION_EXTRACTOR, "fid")}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Metric:
    """Fréchet distance of generated images to reference statistics, in an extractor's feature space."""

    def __init__(self, name: str, extractor_kind: str, weights_path: Path, reference_path: Path,
                 device: str | None = None, decoder=None):
        self.name = name
        self.decoder = decoder  # a latent model's: samples -> uint8 images before the extractor (score only)
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

        A latent model's samples go through ``self.decoder`` (the SD-VAE decoder, repro.nets.sd_vae.LatentDecoder)
        before the extractor, as in the sample stage: the features are those of the decoded images.

        With several processes every rank must call it: each generates and embeds its share of the batches,
        the features come back to every rank in one process's batch order, so the statistics (and the score,
        which rank 0 then sends to all) are bitwise those of one process.
        """
        return self.score_parts(net, seeds, label_dim, img_shape, sampler, parts=1)[0]

    def score_parts(self, net, seeds: np.ndarray, label_dim: int, img_shape, sampler: SamplerConfig,
                    parts: int) -> tuple[float, list[float]]:
        """:meth:`score` of all the seeds, and the distance of each of ``parts`` contiguous, near-equal parts of
        them (in seed order; their spread is the seed noise of a score on that many samples). One generation."""
        from repro.cluster import distributed

        part = (distributed.rank(), distributed.world_size())
        device = next(net.parameters()).device if isinstance(net, torch.nn.Module) else "cpu"
        features = self._gathered_features(imgs for _, imgs, _ in generate_images(
            net, seeds, img_shape=img_shape, label_dim=label_dim, sampler=sampler, device=device, part=part,
            decoder=self.decoder))
        whole = self._distance_of(features)
        split = [self._distance_of([f]) for f in np.array_split(np.concatenate(features), parts)] if parts > 1 else [whole]
        return distributed.broadcast_object((whole, split))

    def score_images(self, batches: Iterable[torch.Tensor]) -> float:
        """The distance to the reference of this rank's uint8 image batches, gathered over the ranks in one
        process's batch order (batches dealt round-robin: ``chunks[rank::world]``); every rank must call it."""
        from repro.cluster import distributed

        return distributed.broadcast_object(self._distance_of(self._gathered_features(batches)))

    def _gathered_features(self, batches: Iterable[torch.Tensor]) -> list[np.ndarray]:
        """The features of this rank's image batches and the other ranks', batch by batch in one process's order."""
        from repro.cluster import distributed

        with torch.no_grad():
            local = [fidelity.extract_features(self.extractor, imgs, self.feature).cpu().numpy() for imgs in batches]
        return distributed.gather_chunks(local)

    def _distance_of(self, chunks: list[np.ndarray]) -> float:
        stats = fidelity.FeatureStats(meta={"extractor": self.extractor.get_name(), "feature": self.feature})
        for features in chunks:  # batch by batch, as the statistics were always summed
            stats.update(features)
        return self.distance(stats)

    def protocol(self) -> dict:
        out = {"extractor": self.extractor_kind, "extractor_sha256": sha256_file(self.weights_path),
               "reference_sha256": sha256_file(self.reference_path)}
        if self.weights_path.suffix == ".safetensors":  # the extractor stage's copy of Inception weights
            from safetensors import safe_open

            with readable(str(self.weights_path), "safetensors file"), safe_open(str(self.weights_path), framework="pt") as f:
                meta = f.metadata() or {}
            if "source_sha256" in meta:
                out["extractor_weights_source_sha256"] = meta["source_sha256"]
        for key in ("source", "source_sha256", "source_kind"):
            if key in self.reference.meta:
                out[f"reference_{key}"] = self.reference.meta[key]
        return out


def metric_name(kind: str) -> str:
    return EXTRACTORS[kind][1]


def load_metric(kind: str, weights: Path, reference: Path, decoder=None) -> Metric:
    """The metric of ``kind``; ``decoder``: a latent model's decoder, applied to its samples before the extractor."""
    for p, what in ((weights, "extractor weights"), (reference, "reference statistics")):
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} not found ({what}): run the extractor stage first (`repro extractor`)")
    return Metric(metric_name(kind), EXTRACTORS[kind][0], weights, reference, decoder=decoder)


# ----------------------------------------------------------------------------------------------------------
# The extractor stage.


# ----------------------------------------------------------------------------------------------------------
# The fid stage's optional metrics: more feature spaces (metrics.extra), KID and precision/recall.


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


