"""Training on sharded data (ImageNet): the seeded order of items, per-rank reads of memory-mapped shards, and the
DDO fake bank as shards beside them. Nothing here holds the data set, the bank or a per-item table in memory.

Order: the items form an endless stream, epoch after epoch. Epoch e visits the shards in a permutation of the shard
order drawn from ``(seed, e)``, and each shard's items in a permutation drawn from ``(seed, e, shard)``. Step k of
a loop with global batch B takes the stream positions [k * B, (k + 1) * B); a rank takes its contiguous slice of
them (repro.cluster.distributed.batch_slice) and reads only those items. So the batch of a step is a function of
(seed, step) alone, the same on any number of ranks and after any resume, and a rank touches at most a few shards
per step (memory O(shard), never O(data set)).

Reads: :class:`ShardedDataset` keeps the last ``cache`` shards memory-mapped (each verified against the manifest's
sha256 the first time this process opens it); an evicted shard's mapping is closed, so the pages a process has
touched stay bounded by ``cache`` shards. Latent shards (imagenet512: raw SD-VAE mean and std, 2C channels)
become training inputs as EDM2 trains on them: mean + std * noise, whitened with the caller's (scale, bias)
(``repro.nets.sd_vae.edm2_scale_bias``, given by repro.pipeline.common.load_data).

Fake banks (:func:`write_fake_shards`): one fake per real item, fake (shard j, offset i) paired with real (j, i)
and given its label; data shard j's fakes are made by rank j mod world and written as ``<bank>/shard-j.npy``
(uint8 images, or float32 latents for a latent model), each atomically, so a requeued job makes only the missing
ones; then rank 0 writes the bank's index (sizes and sha256). No collective moves images.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import torch

from repro.datasets.imagenet import ShardedData
from repro.storage.files import BadFile, atomic_path, load_npz, save_npz, sha256_file

log = logging.getLogger(__name__)


class ShardOrder:
    """The seeded stream of (shard, offset) over shards of ``sizes`` items (see the module docstring)."""

    def __init__(self, sizes, seed: int | tuple[int, ...]):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.n = int(self.sizes.sum())
        if self.n == 0:
            raise ValueError("no items to draw from (every shard is empty)")
        self.seed = [int(s) for s in (seed if isinstance(seed, tuple) else (seed,))]
        self._within: collections.OrderedDict = collections.OrderedDict()  # (epoch, shard) -> permutation
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch]).permutation(len(self.sizes))

    def within(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._within:
            self._within[key] = np.random.default_rng([*self.seed, epoch, shard + 1]).permutation(self.sizes[shard])
            while len(self._within) > 2:
                self._within.popitem(last=False)
        return self._within[key]

    def _ends(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = self.shard_order(epoch)
            self._epoch = (epoch, order, np.cumsum(self.sizes[order]))
        return self._epoch[1], self._epoch[2]

    def positions(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Stream positions [start, start + count) as (shard, offsets) runs, in stream order."""
        out: list[tuple[int, np.ndarray]] = []
        pos, stop = int(start), int(start) + int(count)
        while pos < stop:
            epoch, q = divmod(pos, self.n)
            order, ends = self._ends(epoch)
            k = int(np.searchsorted(ends, q, side="right"))
            begin = int(ends[k] - self.sizes[order[k]])
            take = min(stop - pos, int(ends[k]) - q)
            shard = int(order[k])
            out.append((shard, self.within(epoch, shard)[q - begin:q - begin + take]))
            pos += take
        return out

    def step(self, step: int, batch: int, part: slice) -> list[tuple[int, np.ndarray]]:
        """This rank's items of step ``step`` of a loop with global batch ``batch`` (``part``: its slice)."""
        return self.positions(step * batch + part.start, part.stop - part.start)


class _MappedShards:
    """The last ``cache`` shards of a set of .npy files, memory-mapped, each verified once by sha256."""

    def __init__(self, path_of, digest_of, what: str, cache: int = 2):
        self.path_of, self.digest_of, self.what, self.cache = path_of, digest_of, what, int(cache)
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._verified: set[int] = set()

    def __call__(self, shard: int) -> np.ndarray:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.path_of(shard)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: rerun the stage that makes the {self.what} (finished shards "
                                    "are kept)")
        if shard not in self._verified:
            digest = self.digest_of(shard)
            if digest is not None and sha256_file(path) != digest:
                raise ValueError(f"{path}: sha256 does not match its index; the {self.what} shard changed after it "
                                 "was written. Fix: delete it and rerun (only that shard is made again)")
            self._verified.add(shard)
        self._open[shard] = np.load(path, mmap_mode="r", allow_pickle=False)
        while len(self._open) > self.cache:
            self._open.popitem(last=False)  # its mapping closes with the last reference
        return self._open[shard]

    def take(self, runs: list[tuple[int, np.ndarray]]) -> np.ndarray:
        return np.concatenate([np.asarray(self(s)[o]) for s, o in runs])


class ShardedDataset:
    """The training stages' view of a sharded data set (``data/manifest.json`` with a shards list)."""

    def __init__(self, manifest_path: Path, cache: int = 2, scale_bias: tuple | None = None):
        self.source = ShardedData(manifest_path)
        m = self.source.manifest
        self.sizes = [int(e["n"]) for e in m["shards"]]
        self.stored_shape = tuple(int(s) for s in m["shape"])
        self.latent = m.get("dtype") == "float32"
        # A latent model trains on mean + std * noise: half the stored channels.
        self.shape = ((self.stored_shape[0] // 2, *self.stored_shape[1:]) if self.latent else self.stored_shape)
        self.num_classes = self.source.num_classes
        self._images = _MappedShards(lambda i: self.source.folder / m["shards"][i]["images"],
                                     lambda i: m["shards"][i]["sha256"], "data", cache)
        self._labels = _MappedShards(lambda i: self.source.folder / m["shards"][i]["labels"],
                                     lambda i: m["shards"][i]["labels_sha256"], "data", cache)
        if self.latent:
            if scale_bias is None:
                raise ValueError("latent shards need the whitening (scale, bias): repro.nets.sd_vae.edm2_scale_bias()")
            scale, bias = scale_bias
            if len(scale) != self.shape[0]:
                raise BadFile(manifest_path, "data manifest", f"latents of {self.stored_shape[0]} channels, not "
                              f"mean and std of the SD-VAE's {len(scale)}", "rerun the data stage (`repro data`)")
            self.scale = torch.as_tensor(scale).view(1, -1, 1, 1)
            self.bias = torch.as_tensor(bias).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return sum(self.sizes)

    def order(self, seed: int | tuple[int, ...]) -> ShardOrder:
        return ShardOrder(self.sizes, seed)

    def read(self, runs: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """(stored items, labels) of the given runs, in order."""
        return self._images.take(runs), self._labels.take(runs)

    def batches(self, batch: int):
        """Every stored item in shard order, ``batch`` at a time (a batch never spans two shards); pixels only."""
        if self.latent:
            raise ValueError(f"{self.source.folder}: latent shards have no pixels to compute statistics of; use the "
                             "data set's published reference statistics (extractor.reference)")
        for j in range(len(self.sizes)):
            shard = self._images(j)
            for i in range(0, len(shard), batch):
                yield np.asarray(shard[i:i + batch])

    def labels_of(self, shard: int) -> np.ndarray:
        return np.asarray(self._labels(shard))

    def to_model(self, items: np.ndarray, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Stored items -> the network's float32 input: pixels in [-1, 1], or whitened latent draws
        mean + std * ``noise`` (standard normal, shaped as the network's input)."""
        x = torch.as_tensor(np.ascontiguousarray(items))
        if not self.latent:
            return x.to(torch.float32) / 127.5 - 1
        c = self.shape[0]
        mean, std = x[:, :c].float(), x[:, c:].float()
        return (mean + std * noise) * self.scale + self.bias


def fake_shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def write_fake_shards(bank: Path, data: ShardedDataset, generate, first_seed: int, rank: int, world: int) -> None:
    """Make the fake bank ``bank`` (an index .npz; the shards in the folder beside it, same name without suffix).

    ``generate(seeds, labels) -> np.ndarray`` makes the fakes of one shard. This rank makes the data shards j with
    j mod world = rank that are missing; the caller then waits for every rank (a barrier) and calls
    :func:`index_fake_shards` on rank 0. Fake (j, i) has seed first_seed + (items before shard j) + i.
    """
    folder = bank.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    starts = np.concatenate([[0], np.cumsum(data.sizes)[:-1]])
    for j in range(rank, len(data.sizes), world):
        path = folder / fake_shard_name(j)
        if path.is_file():
            continue
        fakes = generate(first_seed + starts[j] + np.arange(data.sizes[j]), data.labels_of(j))
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, fakes, allow_pickle=False)
        log.info("wrote fake shard %s (%d items)", path, len(fakes))


def index_fake_shards(bank: Path, data: ShardedDataset, first_seed: int) -> None:
    """Rank 0, after every rank's write_fake_shards: the index (shard sizes, sha256, first seed); its presence
    marks the bank finished."""
    folder = bank.with_suffix("")
    digests = [sha256_file(folder / fake_shard_name(j)) for j in range(len(data.sizes))]
    save_npz(bank, shard_n=np.asarray(data.sizes, np.int64), sha256=np.asarray(digests),
             first_seed=np.asarray(first_seed, np.int64), folder=np.asarray(folder.name))


class FakeShards:
    """Read side of a sharded fake bank: ``take(runs)`` reads the fakes paired with those data items."""

    def __init__(self, bank: Path, data: ShardedDataset, cache: int = 2):
        index = load_npz(bank)
        if "shard_n" not in index or index["shard_n"].tolist() != data.sizes:
            raise BadFile(bank, "fake bank index", "shard sizes that do not match the data set's",
                          f"delete {bank} and its folder and rerun (the bank is made again)")
        folder = bank.parent / str(index["folder"])
        digests = index["sha256"].tolist()
        self.first_seed = int(index["first_seed"])
        self._shards = _MappedShards(lambda j: folder / fake_shard_name(j), lambda j: digests[j], "fake bank", cache)

    def take(self, runs: list[tuple[int, np.ndarray]]) -> np.ndarray:
        return self._shards.take(runs)

    def first(self, n: int) -> np.ndarray:
        return np.asarray(self._shards(0)[:n])


def write_array_shards(out_npz: Path, out_manifest: Path, n: int, shard_size: int, shape: tuple[int, ...],
                       num_classes: int, fill, dtype=np.uint8, dataset: str = "synthetic") -> dict:
    """Shards in the data stage's format (repro.datasets.imagenet: shard files, index, manifest) from ``fill(start,
    stop) -> (items, labels)``, written through np.memmap one shard at a time: synthetic or in-memory data for tests
    and the memory benchmark, made fast (nothing decoded). Returns the manifest."""
    import hashlib

    from repro.datasets.imagenet import shard_names
    from repro.storage.files import write_json

    folder = out_npz.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    shards, labels_all = [], []
    for i, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        data_file, label_file = shard_names(i, "latents" if dtype == np.float32 else "images")
        items, labels = fill(start, stop)
        out = np.lib.format.open_memmap(folder / data_file, mode="w+", dtype=dtype, shape=(stop - start, *shape))
        out[:] = items
        out.flush()
        del out
        np.save(folder / label_file, np.asarray(labels, np.int64), allow_pickle=False)
        labels_all.append(np.asarray(labels, np.int64))
        shards.append({"images": data_file, "labels": label_file, "n": stop - start,
                       "sha256": sha256_file(folder / data_file), "labels_sha256": sha256_file(folder / label_file)})
    all_labels = np.concatenate(labels_all)
    save_npz(out_npz, labels=all_labels, shard_n=np.asarray([s["n"] for s in shards]))
    manifest = {"dataset": dataset, "index": out_npz.name, "index_sha256": sha256_file(out_npz),
                "source": "synthetic (repro.datasets.sharded.write_array_shards)", "folder": folder.name,
                "shards": shards, "n": n, "shape": list(shape), "dtype": np.dtype(dtype).name,
                "sha256": hashlib.sha256("".join(s["sha256"] + s["labels_sha256"] for s in shards).encode()).hexdigest(),
                "num_classes": num_classes,
                "class_counts": np.bincount(all_labels, minlength=num_classes).tolist()}
    write_json(out_manifest, manifest)
    return manifest
