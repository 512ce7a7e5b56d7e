"""What every stage does the same way: its project paths, its MLflow run, its run directory, its inputs.

Each stage reads only its params (config.STAGE_PARAMS, declared the same way in dvc.yaml), reads its inputs,
writes its outputs atomically, and is one MLflow run. Paths are relative to the project directory (the one
holding params.yaml), never to the current working directory; every name comes from repro.storage.layout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator

from repro.cluster import distributed
from repro.config import Config, config_hash, stage_dict
from repro.datasets.images import Dataset, load_prepared
from repro.datasets.sharded import ShardedDataset
from repro.pipeline.tracking import stage_run
from repro.storage.files import read_json, sha256_file
from repro.storage.layout import Paths

log = logging.getLogger("repro.pipeline")


@contextlib.contextmanager
def stage_context(stage: str, cfg: Config, root: Path | str) -> Iterator[Paths]:
    """Run (part of) ``stage`` here: join torch.distributed if launched so (torchrun, srun), yield the paths.

    A preempted stage raises repro.cluster.preempt.Preempted after saving its state; the launcher catches it.
    """
    t0 = time.time()
    if distributed.init_from_env() and not distributed.is_main():
        logging.getLogger("repro").setLevel(logging.WARNING)  # rank 0 tells the progress, for all ranks
    try:
        yield Paths.of(cfg, root)
    finally:
        distributed.shutdown()
    log.info("stage %s done in %.1fs", stage, time.time() - t0)


def tracked(stage: str, cfg: Config, paths: Paths, extra_hash: dict | None = None):
    """The stage's MLflow run (a context manager yielding its Tracker)."""
    params = stage_dict(cfg, stage)
    return stage_run(stage, root=paths.root, preset=cfg.preset, params=params,
                     config_hash=config_hash({**params, **(extra_hash or {})}))


def run_dir(stage: str, cfg: Config, paths: Paths, inputs: dict[str, Path], ignore: tuple[str, ...] = ()) -> Path:
    """The stage's run directory, keyed by its params and the sha256 of its inputs: resume only the same work.

    ``ignore``: dotted params left out of the key, because the work they add lives in sub-directories of its own
    (ddo.seeds: the training-seed replicates), so changing them reuses what is already done."""
    params = stage_dict(cfg, stage)
    for name in ignore:
        section, _, key = name.partition(".")
        params.get(section, {}).pop(key, None)
    key = config_hash({"params": params, "inputs": {k: sha256_file(p) for k, p in inputs.items()}})
    return paths.run_dir(stage, key)


def require(*files: Path) -> None:
    """Every input exists, or a clear error saying which stage makes it."""
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: run the stage that makes it first (`dvc repro` runs them in order)")


def load_data(paths: Paths, part: str = "train") -> Dataset | ShardedDataset:
    """The data stage's output, checked against its manifest: the array file, or the shards (ImageNet; read per
    rank as repro.datasets.sharded says, latents whitened with EDM2's statistics).

    ``part``: the training part (default: what every training stage reads; with data.holdout 0 every image), the
    held-out part ("heldout") or every image ("all"), as repro.datasets.images.load_prepared says."""
    manifest = read_json(paths.manifest) if paths.manifest.is_file() else None
    if isinstance(manifest, dict) and "shards" in manifest:
        if not paths.data.is_file():
            raise FileNotFoundError(f"{paths.data} not found: run the data stage first (`repro data`)")
        scale_bias = None
        if manifest.get("dtype") == "float32":
            from repro.nets.sd_vae import edm2_scale_bias

            scale_bias = edm2_scale_bias()
        if part == "heldout":
            raise ValueError(f"{paths.data}: sharded data has no held-out part (data.holdout is 0 for it)")
        return ShardedDataset(paths.manifest, scale_bias=scale_bias)
    return load_prepared(paths.data, read_json(paths.manifest) if paths.manifest.is_file() else None, part=part)


def in_memory(data: Dataset | ShardedDataset, what: str) -> Dataset:
    """``data`` for a stage that holds the real images in memory (discriminators, DCD's critic, kernel banks); sharded
    data (ImageNet) is refused, naming the field: those stages have no sharded reader."""
    if isinstance(data, ShardedDataset):
        from repro.config import ConfigError

        raise ConfigError([("data.dataset", f"{what} holds the real images in memory and cannot read sharded data "
                            f"({data.source.folder})", "use it on digits or cifar10; on ImageNet run the DDO stages")])
    return data


def log_data_input(tracker, paths: Paths, context: str = "training") -> None:
    """Record the data set (name and sha256 from its manifest) as an input of the stage's MLflow run."""
    if paths.manifest.is_file():
        tracker.log_dataset(paths.data, paths.dataset, read_json(paths.manifest)["sha256"], context)
