"""Sharded, resumable sampling: the final evaluation's images as shard files of seeds.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from repro.config import SampleConfig, SamplerConfig
from repro.sampling.generate import generate_images, image_grid
from repro.storage.files import load_npz, save_npz, sha256_file

log = logging.getLogger(__name__)


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


_SHA_CACHE: dict[tuple, str] = {}


_NET_CACHE: dict[tuple, tuple] = {}


def eval_ranges(cfg: SampleConfig) -> list[tuple[int, int]]:
    """The final evaluation's seed ranges [first_seed + k n, first_seed + (k+1) n), k < repeats."""
    return [(cfg.first_seed + k * cfg.n_samples, cfg.first_seed + (k + 1) * cfg.n_samples) for k in range(cfg.repeats)]


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
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a truncated shard: not done
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


def _load_net(path: Path, device: str):
    """The network of a model file, kept for the next shard of the same model (one model at a time)."""
    from repro.nets.checkpoint import load_model

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
    ``extras``: ``guide`` / ``decoder`` for generate_images (repro.nets.released.sampling_extras), on ``device``;
    a VAR model's ``tokenizer`` (then ``sampler`` is the config's ``ar`` section).
    """
    if shard_done(shard, sampler):
        return shard.out
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sha = model_sha256(shard.model_path)
    net, arch = _load_net(shard.model_path, device)
    desc = f"sample {shard.model} [{shard.lo},{shard.hi})"
    if arch.get("precond") == "var":  # next-scale sampling: ``sampler`` is the config's ar section
        from repro.sampling.var import generate_var_images

        tokenizer = extras.get("tokenizer") or net.tokenizer  # a released VAR's, or the one a VAR trained here carries
        batches = generate_var_images(net, tokenizer, shard.seeds, ar=sampler, batch=batch, device=device,
                                      progress=progress, desc=desc)
    else:
        shape = (arch["img_channels"], arch["img_resolution"], arch["img_resolution"])
        batches = generate_images(net, shard.seeds, img_shape=shape, label_dim=arch["label_dim"], sampler=sampler,
                                  batch=batch, device=device, progress=progress, desc=desc, **extras)
    imgs, labels = [], []
    for _, x, y in batches:
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
    from repro.nets.checkpoint import read_model_meta
    from repro.sampling.generate import sample_grid

    shards = plan_shards(models, cfg, sampler, out_dir)
    rank, world = distributed.rank(), distributed.world_size()
    for i, shard in enumerate(shards):
        if i % world == rank:
            run_shard(shard, sampler, cfg.batch, progress, device, **extras)
    distributed.barrier()
    written = {name: [str(s.out) for s in shards if s.model == name] for name in models}
    if distributed.is_main():
        for name, path in models.items():
            if extras or read_model_meta(Path(path))[0].get("precond") == "var":  # guided, latent or AR:
                grid = image_grid(load_npz(written[name][0])["images"][:80], ncol=20)  # the evaluation's first images
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
