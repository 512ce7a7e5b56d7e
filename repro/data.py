"""Data: the embedded data set, prepared into a uint8 array file plus a manifest with its sha256.

The embedded default is scikit-learn's 8x8 handwritten digits (UCI ML "optdigits" test set, 1,797 images,
10 classes), which ships inside the scikit-learn wheel: no download. Pixel values 0..16 are mapped to
0..255 (round(v * 255 / 16)). Arrays are stored NCHW uint8, the layout every stage reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro.config import DataConfig
from repro.files import load_npz, save_npz, sha256_file, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def load_embedded(name: str) -> Dataset:
    """Load an embedded data set by name, as uint8 NCHW."""
    if name in ("cifar10", "imagenet64", "imagenet512"):
        raise ValueError(f"data.dataset {name}: the data stage for it is not built yet (paper-scale data is a "
                         "later issue); `repro pretrained` works without it")
    if name != "digits":
        raise ValueError(f"unknown embedded data set {name!r}; available: digits")
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return Dataset(images=images, labels=d.target.astype(np.int64), num_classes=10)


def prepare(cfg: DataConfig, out_npz: Path, out_manifest: Path) -> dict:
    """The `data` stage: write the array file and its manifest (sha256, shape, classes, source)."""
    import sklearn

    ds = load_embedded(cfg.dataset)
    save_npz(out_npz, images=ds.images, labels=ds.labels)
    manifest = {
        "dataset": cfg.dataset,
        "source": f"scikit-learn {sklearn.__version__} sklearn.datasets.load_digits (embedded, no download)",
        "file": out_npz.name,
        "sha256": sha256_file(out_npz),
        "n": int(len(ds.images)),
        "shape": list(ds.shape),
        "dtype": "uint8",
        "num_classes": ds.num_classes,
        "class_counts": np.bincount(ds.labels, minlength=ds.num_classes).tolist(),
    }
    write_json(out_manifest, manifest)
    log.info("wrote %s (%d images %s, sha256 %s) and %s", out_npz, manifest["n"], ds.shape,
             manifest["sha256"][:12], out_manifest)
    return manifest


def load_prepared(npz: Path, manifest: dict | None = None) -> Dataset:
    """Read the prepared array file, verifying its sha256 against the manifest first."""
    import json

    if manifest is None:
        mpath = npz.with_name("manifest.json")
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath} not found: run the data stage first (`repro data`)")
        manifest = json.loads(mpath.read_text())
    if not npz.is_file():
        raise FileNotFoundError(f"{npz} not found: run the data stage first (`repro data`)")
    digest = sha256_file(npz)
    if digest != manifest["sha256"]:
        raise ValueError(f"{npz}: sha256 {digest[:12]}... does not match the manifest ({manifest['sha256'][:12]}...); "
                         "the file changed after the data stage: rerun `repro data`")
    arrays = load_npz(npz)
    return Dataset(images=arrays["images"], labels=arrays["labels"], num_classes=int(manifest["num_classes"]))
