"""Every on-disk name of the package, in one place: the project's files and the inside of a run directory.

A project directory (the one holding params.yaml) looks like this::

    params.yaml, dvc.yaml, dvc.lock        what DVC tracks
    checkpoints.lock.json                  sha256 pins of every downloaded file (commit it)
    checkpoints/                           downloads: released checkpoints, decoders, fid-refs/ (git-ignored);
                                           quarantine/: downloads that failed conversion, with the reason
    data/<dataset>.npz, data/manifest.json the data stage's output
    models/                                extractor, reference statistics, base model, guide, ddo/ (one file
                                           per round and kind, rounds.json)
    samples/<model>/seeds-*.npz            the final evaluation's images (published copy of runs/samples-work)
    fakes/<model>/seeds-*.npz, banks.json  guidance: each guided model's fake bank (copy of runs/fakes-work)
    models/guidance/<model+variant>.safetensors, discriminators.json
                                           guidance: each guided model's discriminator
    samples-guided/<model+variant>/seeds-*.npz, guided.json
                                           guidance: the guided models' evaluation images (runs/guided-<key>/)
    results/<preset>/                      metrics.json (numbers), protocol.json, rounds.tsv, table.md
    runs/<stage>-<key>/                    resumable work of a stage, keyed by its params and inputs
    runs/.repro.lock                       held by the `repro` stage command running on this project
    runs/slurm/<job id>/                   submitit's scripts and logs

Inside a ddo run directory, round r of kind k ('ddo' or 'control') lives in ``<k>-round<r>/`` (:class:`RoundDir`);
a swept round keeps one sub-directory per (alpha, beta) candidate. Training-seed replicates (ddo.seeds > 1) of seed s
keep theirs in ``seed<s>/`` (:func:`replicate_dir`), and their models are ``<k>-round<r>-seed<s>`` (:func:`round_name`)
beside replicate 0's, which are named as without replicates. Nothing else in the package spells these names:
ask :class:`Paths` or :class:`RoundDir`.

Example::

    paths = Paths.of(cfg, root)
    paths.data, paths.round_model("ddo", 2)           # data/digits.npz, models/ddo/ddo-round2.safetensors
    RoundDir.of(paths.runs / "ddo-1a2b", "ddo", 2).fakes
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "checkpoints.lock.json"
QUARANTINE = "quarantine"          # <download folder>/quarantine/: files that failed their check, with the reason
SHA256_SUFFIX = ".sha256"          # <model>.sha256 beside a model: its sha256 as its stage wrote it
STORE_LOCK_SUFFIX = ".lock"        # mlflow.db.lock beside a sqlite store: serialises its creation
METRICS_FILE = "metrics.json"      # results/<preset>/: the numbers (what `dvc metrics show` prints)
PROTOCOL_FILE = "protocol.json"    # results/<preset>/: what they measure (protocol, models, cells, run)


def round_name(kind: str, round_: int, seed: int | None = None) -> str:
    """The name of round ``round_`` of ``kind``: its run sub-directory, its model file's stem, its MLflow run.

    ``seed``: a training-seed replicate's (ddo.seeds > 1: replicates 1, 2, ... train with ddo.seed + k), named
    ``<kind>-round<r>-seed<s>`` with s the seed itself; None for replicate 0, whose names are those of a run
    without replicates."""
    return f"{kind}-round{round_}" + ("" if seed is None else f"-seed{seed}")


def parse_round_name(name: str) -> tuple[str, int, int | None] | None:
    """(kind, round, seed) of a name made by :func:`round_name` (seed None for replicate 0), or None (e.g. base)."""
    m = re.fullmatch(r"(.+)-round(\d+)(?:-seed(\d+))?", name)
    return (m[1], int(m[2]), None if m[3] is None else int(m[3])) if m else None


def replicate_dir(run_dir: Path, seed: int | None) -> Path:
    """Where a training-seed replicate's rounds live in the ddo stage's run directory: replicate 0 (seed None) in the
    run directory itself, as without replicates; replicate k in its ``seed<s>`` sub-directory."""
    return Path(run_dir) if seed is None else Path(run_dir) / f"seed{seed}"


def candidate_name(alpha: float, beta: float) -> str:
    """The name of one (alpha, beta) candidate of a swept DDO round (its sub-directory, its MLflow run)."""
    return f"a{alpha:g}-b{beta:g}"


def lr_candidate_name(lr: float) -> str:
    """The name of one learning-rate candidate of a tuned MLE control round (its sub-directory, its MLflow run)."""
    return f"lr{lr:g}"


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, under the project directory ``root``."""

    root: Path
    preset: str = ""
    dataset: str = "digits"

    @classmethod
    def of(cls, cfg, root: Path) -> "Paths":
        return cls(Path(root).resolve(), cfg.preset, cfg.data.dataset)

    # downloads and their pins
    @property
    def lock(self) -> Path: return self.root / LOCK_FILE
    @property
    def checkpoints(self) -> Path: return self.root / "checkpoints"
    def checkpoint(self, filename: str) -> Path: return self.checkpoints / filename
    def decoder(self, name: str) -> Path: return self.checkpoints / f"{name}.safetensors"
    def fid_ref(self, filename: str) -> Path: return self.checkpoints / "fid-refs" / filename

    # the data stage
    @property
    def data(self) -> Path: return self.root / "data" / f"{self.dataset}.npz"
    @property
    def manifest(self) -> Path: return self.root / "data" / "manifest.json"

    # models
    @property
    def extractor(self) -> Path: return self.root / "models" / "extractor.safetensors"
    @property
    def extractor_info(self) -> Path: return self.root / "models" / "extractor.json"
    @property
    def reference(self) -> Path: return self.root / "models" / "reference_stats.npz"
    @property
    def base(self) -> Path: return self.root / "models" / "base.safetensors"
    @property
    def base_grid(self) -> Path: return self.root / "models" / "base_grid.png"
    @property
    def base_curve(self) -> Path: return self.root / "models" / "base_curve.json"  # the pretraining curve
    @property
    def guide(self) -> Path: return self.root / "models" / "guide.safetensors"
    @property
    def ddo(self) -> Path: return self.root / "models" / "ddo"
    @property
    def rounds_json(self) -> Path: return self.ddo / "rounds.json"
    def round_model(self, kind: str, round_: int, seed: int | None = None) -> Path:
        return self.ddo / f"{round_name(kind, round_, seed)}.safetensors"

    # guidance: fake banks, discriminators, guided samples
    @property
    def fakes(self) -> Path: return self.root / "fakes"
    @property
    def fakes_index(self) -> Path: return self.fakes / "banks.json"
    @property
    def fakes_work(self) -> Path: return self.runs / "fakes-work"  # finished fake shards; fakes/ is their copy
    @property
    def discriminators(self) -> Path: return self.root / "models" / "guidance"
    @property
    def discriminators_index(self) -> Path: return self.discriminators / "discriminators.json"
    def discriminator(self, guided: str) -> Path: return self.discriminators / f"{guided}.safetensors"
    @property
    def guided_samples(self) -> Path: return self.root / "samples-guided"
    @property
    def guided_index(self) -> Path: return self.guided_samples / "guided.json"
    def guided_work(self, key: str) -> Path: return self.runs / f"guided-{key}"  # shards of one guidance setting

    # samples and results
    @property
    def samples(self) -> Path: return self.root / "samples"
    @property
    def results_root(self) -> Path: return self.root / "results"
    @property
    def results(self) -> Path: return self.results_root / self.preset
    @property
    def metrics(self) -> Path: return self.results / METRICS_FILE
    @property
    def protocol(self) -> Path: return self.results / PROTOCOL_FILE
    @property
    def rounds_tsv(self) -> Path: return self.results / "rounds.tsv"
    @property
    def table(self) -> Path: return self.results / "table.md"
    def paper_tables(self, paper: str) -> Path: return self.results_root / f"{paper}_tables.md"

    # resumable work
    @property
    def runs(self) -> Path: return self.root / "runs"
    @property
    def project_lock(self) -> Path: return self.runs / ".repro.lock"  # one `repro` stage command at a time
    def run_dir(self, stage: str, key: str) -> Path: return self.runs / f"{stage}-{key}"
    @property
    def samples_work(self) -> Path: return self.runs / "samples-work"  # finished shards; samples/ is their copy


@dataclass(frozen=True)
class RoundDir:
    """The files of one DDO round (or one candidate of a swept round) in its run directory."""

    dir: Path

    @classmethod
    def of(cls, run_dir: Path, kind: str, round_: int) -> "RoundDir":
        return cls(Path(run_dir) / round_name(kind, round_))

    @property
    def fakes(self) -> Path: return self.dir / "fakes.npz"          # the round's fake bank
    @property
    def state(self) -> Path: return self.dir / "state.pt"           # training state to resume from
    @property
    def best(self) -> Path: return self.dir / "best.safetensors"    # the round's best checkpoint
    @property
    def done(self) -> Path: return self.dir / "done.json"           # written last: the round is finished
    @property
    def prepared(self) -> Path: return self.dir / "prepare.json"    # a swept round's reference score

    def candidate(self, alpha: float, beta: float) -> "RoundDir":
        """One (alpha, beta) candidate of a swept round."""
        return RoundDir(self.dir / candidate_name(alpha, beta))

    def lr_candidate(self, lr: float) -> "RoundDir":
        """One learning-rate candidate of a tuned MLE control round."""
        return RoundDir(self.dir / lr_candidate_name(lr))
