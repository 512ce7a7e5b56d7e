"""Data: the data set, prepared into a uint8 array file ``data/<dataset>.npz`` plus a manifest with its sha256.

The embedded default is scikit-learn's 8x8 handwritten digits (UCI ML "optdigits" test set, 1,797 images,
10 classes), which ships inside the scikit-learn wheel: no download. Pixel values 0..16 are mapped to
0..255 (round(v * 255 / 16)). Arrays are stored NCHW uint8, the layout every stage reads.

CIFAR-10 (the paper's 50,000 training images) comes from the *binary* release, never the Python pickles (nothing
is unpickled here): ``cifar-10-binary.tar.gz`` is fetched by repro.storage.download (resumable, atomic, its sha256 pinned
in checkpoints.lock.json on first download; ``data.mirror`` replaces the URL's location, a base URL or a local
directory) into ``checkpoints/`` (git-ignored), and read straight from the tar, nothing extracted. Each record
of ``cifar-10-batches-bin/data_batch_{1..5}.bin`` is 1 label byte then 3072 pixel bytes: the 32x32 red plane,
then green, then blue, row-major, which is already NCHW.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro.config import DataConfig
from repro.storage.files import BadFile, load_npz, read_json, save_npz, sha256_file, write_json

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_TRAIN = tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TRAIN_N = 50_000  # in the released archive (10,000 per batch); a smaller one is only warned about
CIFAR10_SHAPE = (3, 32, 32)
CIFAR10_CLASSES = 10
_RECORD = 1 + 3 * 32 * 32


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    num_classes: int
    indices: np.ndarray | None = None  # int64 [N]: each image's index in the data stage's file (None: all, in order)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def load_embedded(name: str) -> Dataset:
    """Load an embedded data set by name, as uint8 NCHW."""
    if name.startswith("imagenet"):
        raise ValueError(f"data.dataset {name} is read from local files, not embedded: use prepare() (`repro data` "
                         "with data.source set to the ILSVRC2012 train folder or an EDM2 dataset zip)")
    if name == "cifar10":
        raise ValueError("data.dataset cifar10 is downloaded, not embedded: use prepare() (`repro data`)")
    if name != "digits":
        raise ValueError(f"unknown embedded data set {name!r}; available: digits")
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return Dataset(images=images, labels=d.target.astype(np.int64), num_classes=10)


def read_cifar10_binary(archive: Path) -> Dataset:
    """The 5 training batches of ``cifar-10-binary.tar.gz``, read from the tar without extracting anything.

    Any record count is accepted (tests use small archives); a missing, truncated or malformed member, or a
    label outside 0..9, is a ValueError naming the archive and the member.
    """
    images, labels = [], []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
            for name in CIFAR10_TRAIN:
                m = members.get(name)
                if m is None or not m.isfile():
                    raise ValueError(f"{archive}: member {name} is missing; is this cifar-10-binary.tar.gz (the "
                                     f"binary release, not the python one)? Delete it to download it again")
                f = tar.extractfile(m)
                raw = f.read() if f is not None else b""
                if len(raw) != m.size or m.size == 0 or m.size % _RECORD:
                    raise ValueError(f"{archive}: member {name} is truncated or malformed ({len(raw)} bytes read of "
                                     f"{m.size}; records are {_RECORD} bytes each). Delete the archive to download "
                                     "it again")
                rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _RECORD)
                if rec[:, 0].max() >= CIFAR10_CLASSES:
                    raise ValueError(f"{archive}: member {name} has label {int(rec[:, 0].max())}, outside "
                                     f"0..{CIFAR10_CLASSES - 1}: not a CIFAR-10 batch. Delete the archive to download "
                                     "it again")
                labels.append(rec[:, 0].astype(np.int64))
                images.append(rec[:, 1:].reshape(-1, *CIFAR10_SHAPE))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{archive}: not a readable .tar.gz ({type(e).__name__}: {e}): truncated or corrupt. Delete "
                         "it to download it again") from e
    ds = Dataset(images=np.concatenate(images), labels=np.concatenate(labels), num_classes=CIFAR10_CLASSES)
    if len(ds.images) != CIFAR10_TRAIN_N:
        log.warning("%s: %d training images, not the %d of the released CIFAR-10 archive", archive,
                    len(ds.images), CIFAR10_TRAIN_N)
    return ds


def _fetch_cifar10(cfg: DataConfig, root: Path, progress: bool) -> tuple[Path, str]:
    from repro.storage.download import Lock, fetch
    from repro.storage.layout import Paths

    dest = Paths(root).checkpoint(CIFAR10_URL.rsplit("/", 1)[-1])
    path = fetch(CIFAR10_URL, dest, lock=Lock(Paths(root).lock), mirror=cfg.mirror or None, progress=progress)
    return path, sha256_file(path)


PARTS = ("train", "heldout", "all")


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed held-out split of ``n`` images: (train, heldout) sorted int64 indices, disjoint, covering 0..n-1.

    ``round(holdout * n)`` images are held out: the first ones of numpy ``default_rng(seed).permutation(n)``; the same
    (n, holdout, seed) always gives the same split. ``holdout`` 0: every image trains, none is held out.
    """
    k = int(round(holdout * n))
    if not 0 <= k < n or (holdout > 0 and k == 0):
        raise ValueError(f"data.holdout {holdout:g} of {n} images holds out {k}: use a fraction in (0, 1) that holds "
                         "out at least one image and leaves at least one to train on")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]).astype(np.int64), np.sort(perm[:k]).astype(np.int64)


def indices_sha256(idx: np.ndarray) -> str:
    """sha256 of an index array as little-endian int64 bytes (what the manifest records for each part)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(idx, dtype="<i8").tobytes()).hexdigest()


def prepare(cfg: DataConfig, out_npz: Path, out_manifest: Path, root: Path | None = None,
            progress: bool = True) -> dict:
    """The `data` stage: write the array file and its manifest (sha256, shape, classes, source).

    ``root``: the project directory (the lock file and checkpoints/ for downloads); default: out_npz's grandparent.
    """
    if cfg.dataset == "none":  # an evaluation against a paper's published statistics reads no data
        ds = Dataset(images=np.zeros((0, 0, 0, 0), np.uint8), labels=np.zeros(0, np.int64), num_classes=0)
        source = {"source": "none: this preset reads no data (an evaluation against published statistics)"}
    elif cfg.dataset == "cifar10":
        archive, archive_sha = _fetch_cifar10(cfg, Path(root) if root else out_npz.parent.parent, progress)
        ds = read_cifar10_binary(archive)
        source = {"source": CIFAR10_URL + (f" (via mirror {cfg.mirror})" if cfg.mirror else ""),
                  "archive_sha256": archive_sha, "members": list(CIFAR10_TRAIN)}
    elif cfg.dataset.startswith("imagenet"):
        raise ValueError(f"data.dataset {cfg.dataset} is prepared as shards by repro.datasets.imagenet."
                         "prepare_imagenet (the `data` stage calls it), not as one array file")
    else:
        import sklearn

        ds = load_embedded(cfg.dataset)
        source = {"source": f"scikit-learn {sklearn.__version__} sklearn.datasets.load_digits (embedded, no download)"}
    split = {}
    if cfg.holdout > 0 and len(ds.images):  # the split travels in the data file (its sha256 covers it) and in the manifest
        train, heldout = split_indices(len(ds.images), cfg.holdout, cfg.holdout_seed)
        split = {"split": {"holdout": cfg.holdout, "seed": cfg.holdout_seed, "rule": "numpy default_rng(seed)."
                           "permutation(n): the first round(holdout * n) are held out; indices sorted",
                           "n_train": int(len(train)), "n_heldout": int(len(heldout)),
                           "train_sha256": indices_sha256(train), "heldout_sha256": indices_sha256(heldout),
                           "heldout_indices": heldout.tolist()}}
        save_npz(out_npz, images=ds.images, labels=ds.labels, heldout=heldout)
    else:
        save_npz(out_npz, images=ds.images, labels=ds.labels)
    manifest = {
        "dataset": cfg.dataset,
        **source,
        "file": out_npz.name,
        "sha256": sha256_file(out_npz),
        "n": int(len(ds.images)),
        "shape": list(ds.shape),
        "dtype": "uint8",
        "num_classes": ds.num_classes,
        "class_counts": np.bincount(ds.labels, minlength=ds.num_classes).tolist() if len(ds.labels) else [],
        **split,
    }
    write_json(out_manifest, manifest)
    log.info("wrote %s (%d images %s, sha256 %s) and %s", out_npz, manifest["n"], ds.shape,
             manifest["sha256"][:12], out_manifest)
    return manifest


def load_prepared(npz: Path, manifest: dict | None = None, part: str = "train") -> Dataset:
    """Read the prepared array file, verifying its sha256 against the manifest first.

    ``part``: with a held-out split (data.holdout > 0) the training part ("train", what every training stage reads),
    the held-out part ("heldout") or every image ("all"); without a split each part is every image, except
    "heldout", which is an error.
    """
    if part not in PARTS:
        raise ValueError(f"unknown data part {part!r}; use one of {', '.join(PARTS)}")

    if manifest is None:
        mpath = npz.with_name("manifest.json")
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath} not found: run the data stage first (`repro data`)")
        manifest = read_json(mpath)
    if isinstance(manifest, dict) and "shards" in manifest:
        raise ValueError(f"{npz.with_suffix('')}: data set {manifest.get('dataset')} is prepared as shards: read it "
                         "with repro.datasets.sharded.ShardedDataset (repro.pipeline.common.load_data does)")
    if not npz.is_file():
        raise FileNotFoundError(f"{npz} not found: run the data stage first (`repro data`)")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str) or "num_classes" not in manifest:
        raise BadFile(npz.with_name("manifest.json"), "data manifest", "no sha256 and num_classes entries",
                      "rerun the data stage (`repro data`)")
    digest = sha256_file(npz)
    if digest != manifest["sha256"]:
        raise ValueError(f"{npz}: sha256 {digest[:12]}... does not match the manifest ({manifest['sha256'][:12]}...); "
                         "the file changed after the data stage. Fix: rerun `repro data`")
    arrays = load_npz(npz)
    images, labels, n = arrays["images"], arrays["labels"], len(arrays["images"])
    if "heldout" not in arrays:
        if part == "heldout":
            raise ValueError(f"{npz}: the data has no held-out part (data.holdout is 0); set data.holdout and rerun "
                             "`repro data`")
        return Dataset(images=images, labels=labels, num_classes=int(manifest["num_classes"]))
    heldout = np.asarray(arrays["heldout"], np.int64)
    split = manifest.get("split") or {}
    if split.get("heldout_sha256") != indices_sha256(heldout):
        raise ValueError(f"{npz}: its held-out indices do not match the manifest's split record; rerun `repro data`")
    if part == "all":
        idx = np.arange(n, dtype=np.int64)
    elif part == "heldout":
        idx = heldout
    else:
        mask = np.ones(n, bool)
        mask[heldout] = False
        idx = np.flatnonzero(mask).astype(np.int64)
    return Dataset(images=images[idx], labels=labels[idx], num_classes=int(manifest["num_classes"]), indices=idx)
