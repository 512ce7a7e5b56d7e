"""ImageNet data stage: an ILSVRC2012-style train folder or an EDM2-style dataset zip, preprocessed as EDM2's dataset
tool does for the released models, written as resumable shards (uint8 pixels; SD-VAE latents for imagenet512) plus
an index and a manifest.

Sources (``data.source``):

- a folder of class sub-folders of images (the ILSVRC2012 ``train/`` layout, e.g. ``train/n01440764/*.JPEG``): the
  class index is the position of the sub-folder's name in sorted order, and images are taken in sorted order of
  their path relative to the folder (EDM2's dataset tool: labels from the top-level folder names, sorted);
- an EDM2-style dataset zip: ``dataset.json`` with ``{"labels": [[file name, class index], ...]}`` and the images.

Preprocessing, per image (RGB): the ADM center crop (EDM2's ``center-crop-dhariwal`` transform, from ADM's
``center_crop_arr``): while the shorter side is at least twice the target, halve both sides with a BOX filter
(integer division); then a BICUBIC resize so that the shorter side equals the target (the other side rounded);
then the central target x target window, offsets ``(side - target) // 2``. An image already at the target size
(an EDM2 zip at that resolution) comes out unchanged. Targets: 64 (imagenet64), 256 (imagenet256), 512
(imagenet512, whose crops then go through the SD-VAE encoder: EDM2's dataset tool ``encode`` stores the raw
posterior mean and std, 8 x 64 x 64 float32, of pixels / 255; ``repro.nets.sd_vae.LatentEncoder``).

Output: per shard, once all its images are decoded, ``data/<dataset>/shard-NNNNN.labels.npy`` (int64 [n]) then
``shard-NNNNN.images.npy`` (uint8 [n, 3, R, R]; ``.latents.npy`` for latents), each written atomically; plain .npy, so readers memory-map them
(``ShardedData``). A shard is finished when both files exist. ``data/<dataset>/plan.json`` fingerprints the source
list and settings; a rerun with the same plan skips finished shards, a different plan starts over.
Then ``data/<dataset>.npz``, an index (every label, the shard sizes), and last ``data/manifest.json`` (counts,
classes, per-shard sha256), only when every shard is done. At most one shard of images is in memory at a time.
A SLURM job array splits the shards among its tasks (task k of K: shards i with i mod K = k); the task that finds
every shard done writes the index and manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from repro.config import ConfigError, DataConfig
from repro.storage.files import BadFile, atomic_path, read_json, save_npz, sha256_file, write_json

log = logging.getLogger(__name__)

RESOLUTIONS = {"imagenet64": 64, "imagenet256": 256, "imagenet512": 512}  # the crop of each data set
LATENT = ("imagenet512",)  # crops encoded to SD-VAE latents (EDM2's latent ImageNet-512)
_FIX_FILE = "replace or delete the file and rerun `repro data` (finished shards are kept)"


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """ADM / EDM2 ``center-crop-dhariwal``: BOX halvings, BICUBIC resize of the short side, center crop (HWC uint8)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                         resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


@dataclass(frozen=True)
class Listing:
    """The images of a source in order, their class indices, and the class names."""
    kind: str             # "folder" or "zip"
    names: list[str]      # paths relative to the folder, or zip member names
    labels: list[int]
    classes: list[str]


def _is_image(name: str) -> bool:
    Image.init()
    return Path(name).suffix.lower() in Image.EXTENSION


def _source_error(problem: str, fix: str) -> ConfigError:
    return ConfigError([("data.source", problem, fix)])


def list_source(source: Path) -> Listing:
    """The images of a train folder or an EDM2 zip; a missing source, empty class folder or zip without
    dataset.json is a ConfigError naming data.source."""
    if not source.exists():
        raise _source_error(f"{source} does not exist", "set data.source to the ILSVRC2012 train folder (class "
                            "sub-folders of JPEGs) or an EDM2 dataset zip")
    if source.is_file():
        return _list_zip(source)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise _source_error(f"{source} has no class sub-folders", "point data.source at the train folder whose "
                            "sub-folders (one per class, e.g. n01440764/) hold the JPEGs")
    names, labels = [], []
    for index, cls in enumerate(classes):
        files = sorted(str(p.relative_to(source).as_posix()) for p in (source / cls).rglob("*")
                       if p.is_file() and _is_image(p.name))
        if not files:
            raise _source_error(f"class folder {source / cls} holds no images", "delete the empty folder or put its "
                                "images back (class indices are the sorted folder order, so every folder counts)")
        names += files
        labels += [index] * len(files)
    return Listing("folder", names, labels, classes)


def _list_zip(source: Path) -> Listing:
    try:
        with zipfile.ZipFile(source) as z:
            members = set(z.namelist())
            if "dataset.json" not in members:
                raise _source_error(f"zip {source} has no dataset.json", "give an EDM2-style dataset zip (dataset.json "
                                    "with the labels beside the images), or the train folder itself")
            meta = json.loads(z.read("dataset.json"))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _source_error(f"{source} is not a readable dataset zip ({type(e).__name__}: {e})",
                            "give an EDM2-style dataset zip or the train folder") from None
    pairs = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int) and p[1] >= 0
            for p in pairs):
        raise _source_error(f"{source}: dataset.json has no labels list of [file, class index] pairs",
                            "give a class-labelled EDM2 dataset zip (dataset_tool.py of an ImageNet folder)")
    missing = [name for name, _ in pairs if name not in members]
    if missing:
        raise _source_error(f"{source}: dataset.json names {len(missing)} files the zip lacks (first: {missing[0]})",
                            "rebuild the zip with EDM2's dataset tool")
    pairs = sorted(pairs)
    num_classes = max(label for _, label in pairs) + 1
    return Listing("zip", [n for n, _ in pairs], [lab for _, lab in pairs], [str(i) for i in range(num_classes)])


def _open_image(source: Path, z: zipfile.ZipFile | None, name: str) -> Image.Image:
    where = f"{source}:{name}" if z else str(source / name)
    try:
        image = Image.open(io.BytesIO(z.read(name) if z else (source / name).read_bytes()))
        image.load()
    except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e}): corrupt or truncated. "
                         f"Fix: {_FIX_FILE}") from None
    return image


_WORKER: dict = {}  # a worker process's source, open zip and target size


def _init_worker(source: str, kind: str, size: int) -> None:
    _WORKER.update(source=Path(source), zip=zipfile.ZipFile(source) if kind == "zip" else None, size=size)


def _crop_one(name: str) -> np.ndarray:
    return center_crop_adm(_open_image(_WORKER["source"], _WORKER["zip"], name), _WORKER["size"]).transpose(2, 0, 1)


@contextlib.contextmanager
def _cropper(source: Path, kind: str, size: int, workers: int) -> Iterator:
    """A function names -> iterator of CHW crops in order: in this process, or in ``workers`` spawned processes."""
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(source), kind, size)) as pool:
            yield lambda names: pool.imap(_crop_one, names, chunksize=16)
        return
    z = zipfile.ZipFile(source) if kind == "zip" else None
    try:
        yield lambda names: (center_crop_adm(_open_image(source, z, n), size).transpose(2, 0, 1) for n in names)
    finally:
        if z is not None:
            z.close()


def _plan(cfg: DataConfig, source: Path, listing: Listing, size: int) -> dict:
    digest = hashlib.sha256()
    for name, label in zip(listing.names, listing.labels, strict=True):
        digest.update(f"{name}\t{label}\n".encode())
    return {"dataset": cfg.dataset, "source": str(source.resolve()), "kind": listing.kind, "resolution": size,
            "shard_size": cfg.shard_size, "n": len(listing.names), "list_sha256": digest.hexdigest(),
            "preprocessing": "EDM2 center-crop-dhariwal (ADM center_crop_arr): BOX halvings, BICUBIC, center crop"}


def shard_names(i: int, what: str = "images") -> tuple[str, str]:
    """The (data, labels) file names of shard i; ``what``: images (uint8 pixels) or latents (float32)."""
    return f"shard-{i:05d}.{what}.npy", f"shard-{i:05d}.labels.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def _write_shards(out_dir: Path, listing: Listing, crops, size: int, step: int, encode=None, task: int = 0,
                  tasks: int = 1) -> list[dict] | None:
    """Each shard of this task not finished yet: its crops (or their latents) into memory, then its labels file,
    then its data file. With ``encode`` the crops go through it _ENCODE_BATCH at a time and only the latents are
    kept. The entries of all shards, or None while another task's shards are missing."""
    shards, missing = [], False
    for i, start in enumerate(range(0, len(listing.names), step)):
        names = listing.names[start:start + step]
        data_file, label_file = shard_names(i, "latents" if encode else "images")
        if (out_dir / data_file).is_file() and (out_dir / label_file).is_file():
            log.info("%s exists: skipped", data_file)
        elif i % tasks != task:
            missing = True  # another task's
            continue
        else:
            data = _encoded(crops(names), len(names), size, encode) if encode else np.empty(
                (len(names), 3, size, size), np.uint8)
            if not encode:
                for j, crop in enumerate(crops(names)):
                    data[j] = crop
            _save_npy(out_dir / label_file, np.asarray(listing.labels[start:start + step], np.int64))
            _save_npy(out_dir / data_file, data)  # last: its presence marks the shard finished
            del data
            log.info("wrote %s (%d images)", data_file, len(names))
        shards.append({"images": data_file, "labels": label_file, "n": len(names)})
    if missing:
        return None
    for e in shards:  # hashed once every shard is there (not by each task of an array)
        e["sha256"], e["labels_sha256"] = sha256_file(out_dir / e["images"]), sha256_file(out_dir / e["labels"])
    return shards


_ENCODE_BATCH = 32


def _encoded(crops: Iterator[np.ndarray], n: int, size: int, encode) -> np.ndarray:
    out, batch, at = None, [], 0
    for k, crop in enumerate(crops, 1):
        batch.append(crop)
        if len(batch) == _ENCODE_BATCH or k == n:
            z = np.asarray(encode(np.stack(batch)), np.float32)
            if out is None:
                out = np.empty((n, *z.shape[1:]), np.float32)
            out[at:at + len(z)], at, batch = z, at + len(z), []
    return out


def checked_source(cfg: DataConfig) -> tuple[Path, Listing]:
    """data.source and its listing; an unset or missing source, an empty class folder or a zip without dataset.json
    is a ConfigError (checked before anything is loaded or written)."""
    if not cfg.source:
        raise _source_error(f"empty, but data.dataset {cfg.dataset} is read from local files (ImageNet is a "
                            "licence-gated download)", "set data.source to the ILSVRC2012 train folder (class "
                            "sub-folders of JPEGs) or an EDM2 dataset zip, e.g. --set data.source=/data/imagenet/train")
    source = Path(cfg.source).expanduser()
    return source, list_source(source)


def source_crops(manifest: dict, plan_path: Path, batch: int = 64, workers: int = 1) -> Iterator[np.ndarray]:
    """The pixel crops behind a latent data set (uint8 [<= batch, 3, R, R], in shard order): ``data.source`` read
    again through the same listing and crop as the data stage, for reference statistics of the real images (EDM2's
    reference of ImageNet-512 is of the 512x512 crops, not of decoded latents).

    The source must still be what the data stage read: its listing (every file name and class) must hash to the
    plan's ``list_sha256`` and give the manifest's count, or this is a ConfigError naming data.source before any
    image is read. The images' bytes are not hashed again (ImageNet is 140 GB); the listing is."""
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path} not found: rerun the data stage (`repro data`)")
    plan = read_json(plan_path)
    source = Path(plan["source"])
    listing = list_source(source)
    digest = hashlib.sha256()
    for name, label in zip(listing.names, listing.labels, strict=True):
        digest.update(f"{name}\t{label}\n".encode())
    if digest.hexdigest() != plan["list_sha256"] or len(listing.names) != int(manifest["n"]):
        raise _source_error(f"{source} no longer lists the {manifest['n']} images the data stage encoded (its file "
                            f"list now has {len(listing.names)} entries and another sha256)",
                            "restore the source the data stage read, or rerun `repro data` on this one")
    size = int(plan["resolution"])
    with _cropper(source, listing.kind, size, workers) as crops:
        out = []
        for crop in crops(listing.names):
            out.append(crop)
            if len(out) == batch:
                yield np.stack(out)
                out = []
        if out:
            yield np.stack(out)


def prepare_imagenet(cfg: DataConfig, out_npz: Path, out_manifest: Path, encode=None, encoder_id: str = "",
                     task: tuple[int, int] = (0, 1)) -> dict | None:
    """Write the shards of ``cfg.dataset`` into ``out_npz`` without its suffix (data/imagenet64/; resumable), then
    the index ``out_npz`` (every label and the shard sizes: the file dvc.yaml's data stage names), then
    ``out_manifest``.

    imagenet512 needs ``encode``: uint8 [n, 3, 512, 512] -> float32 latents (``repro.nets.sd_vae.LatentEncoder``:
    EDM2's raw SD-VAE mean and std, [n, 8, 64, 64]), and ``encoder_id`` (e.g. the VAE file's sha256) for the plan.

    ``task`` = (k, K): one of K tasks of a job array; it makes the shards i with i mod K = k, and, if every shard
    is then finished, writes the index and manifest (else returns None).
    """
    out_dir = out_npz.with_suffix("")
    if (cfg.dataset in LATENT) != (encode is not None):
        raise ConfigError([("data.dataset", f"{cfg.dataset} {'needs' if encode is None else 'takes no'} a latent "
                            "encoder (the SD-VAE of pretrain.source's decoder)",
                            "run it through the data stage (`repro data`), which loads the encoder")])
    size = RESOLUTIONS[cfg.dataset]
    source, listing = checked_source(cfg)
    plan = {**_plan(cfg, source, listing, size), "encoder": encoder_id}
    plan_path = out_dir / "plan.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:  # the tasks of an array check the plan in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out_dir.exists() and (not plan_path.is_file() or read_json(plan_path) != plan):
            log.info("%s: a different source or settings: starting over", out_dir)
            for done in (out_manifest, out_npz):
                done.unlink(missing_ok=True)
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not plan_path.is_file():
            write_json(plan_path, plan)
        kind = "latents" if encode else "images"
        if not all((out_dir / f).is_file() for i in range(-(-len(listing.names) // cfg.shard_size))
                   for f in shard_names(i, kind)):
            for done in (out_manifest, out_npz):  # they say "all done"; written again when every shard is
                done.unlink(missing_ok=True)
    n, (task, tasks) = len(listing.names), task
    with _cropper(source, listing.kind, size, cfg.workers) as crops:
        shards = _write_shards(out_dir, listing, crops, size, cfg.shard_size, encode, task, tasks)
    if shards is None:
        log.info("task %d of %d: its shards are done; the task that finishes last writes %s", task, tasks,
                 out_manifest)
        return None
    save_npz(out_npz, labels=np.asarray(listing.labels, np.int64), shard_n=np.asarray([s["n"] for s in shards]))
    manifest = {
        "dataset": cfg.dataset,
        "index": out_npz.name,
        "index_sha256": sha256_file(out_npz),
        "source": str(source.resolve()),
        "source_kind": listing.kind,
        "preprocessing": plan["preprocessing"],
        "folder": out_dir.name,
        "shards": shards,
        "sha256": hashlib.sha256("".join(s["sha256"] + s["labels_sha256"] for s in shards).encode()).hexdigest(),
        "n": n,
        "shape": list(np.load(out_dir / shards[0]["images"], mmap_mode="r").shape[1:]) if shards else [3, size, size],
        "dtype": "float32" if encode else "uint8",
        "latents": ({"encoder": encoder_id, "stored": "raw SD-VAE posterior mean and std (channels 0-3, 4-7) of "
                     "pixels / 255, as EDM2's dataset tool; whiten with repro.nets.sd_vae.edm2_scale_bias"}
                    if encode else None),
        "num_classes": len(listing.classes),
        "classes": listing.classes,
        "class_counts": np.bincount(listing.labels, minlength=len(listing.classes)).tolist(),
    }
    write_json(out_manifest, manifest)
    log.info("wrote %d shards of %d images (%dx%d%s) to %s and %s", len(shards), n, size, size,
             ", as latents" if encode else "", out_dir, out_manifest)
    return manifest


class ShardedData:
    """Read side of the shards: ``shard(i)`` memory-maps shard i's images (read-only) after checking both files'
    sha256 against the manifest, so a process holds only the pages it touches."""

    def __init__(self, manifest_path: Path):
        self.manifest_path = Path(manifest_path)
        m = read_json(self.manifest_path)
        if not isinstance(m, dict) or not isinstance(m.get("shards"), list) or "folder" not in m:
            raise BadFile(self.manifest_path, "data manifest", "no shards list", "rerun the data stage (`repro data`)")
        self.manifest = m
        self.folder = self.manifest_path.parent / m["folder"]
        self.num_classes = int(m["num_classes"])

    def __len__(self) -> int:
        return int(self.manifest["n"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [n, 3, R, R] memory-mapped, labels int64 [n]) of shard i, verified."""
        entry = self.manifest["shards"][i]
        arrays = []
        for key, digest in (("images", "sha256"), ("labels", "labels_sha256")):
            path = self.folder / entry[key]
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: rerun the data stage (`repro data`): finished shards are "
                                        "kept")
            if sha256_file(path) != entry[digest]:
                raise ValueError(f"{path}: sha256 does not match {self.manifest_path}; the shard changed after the "
                                 "data stage. Fix: delete it and rerun `repro data` (it redoes only that shard)")
            arrays.append(np.load(path, mmap_mode="r" if key == "images" else None, allow_pickle=False))
        if len(arrays[0]) != entry["n"] or len(arrays[1]) != entry["n"]:
            raise BadFile(self.folder / entry["images"], "data shard", f"not {entry['n']} items",
                          "delete it and rerun `repro data`")
        return arrays[0], arrays[1]
