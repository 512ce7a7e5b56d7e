"""Running a stage: here, or as waves of jobs through the launcher (repro.cluster.launcher).

The pipeline's stages, in order: data -> extractor -> pretrain -> ddo -> sample -> fakes -> discriminator -> guided
-> fid -> table (fakes, discriminator and guided: the guided models of repro.methods.guidance). Each is a module
of repro.pipeline.stages with ``run(cfg, paths, progress, **kwargs)``; a stage whose work splits into jobs on a
cluster also has ``waves(cfg, root, whole, **kwargs)`` (the DDO sweep, the sample shards), and one with more to say
in a dry run has ``describe(cfg, paths)``. The launcher runs waves and knows nothing of the stages; a new method
adds stage modules here, not launcher code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

from repro.cluster import launcher
from repro.cluster.launcher import Wave
from repro.config import Config
from repro.pipeline.common import stage_context
from repro.storage.layout import Paths

STAGES = ("data", "extractor", "pretrain", "ddo", "sample", "fakes", "discriminator", "guided", "fid", "table")


def stage_module(stage: str) -> ModuleType:
    """The module of ``stage`` (imported on demand: running one stage imports only the code it runs, which is
    exactly the code dvc.yaml lists as its dependencies; tests/test_dvc_deps.py checks that)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    return importlib.import_module(f"repro.pipeline.stages.{stage}")


def run_stage(stage: str, cfg: Config, root: Path | str, progress: bool = True, **kwargs) -> None:
    """Run ``stage`` for ``cfg`` in this process, in the project directory ``root``.

    ``kwargs`` go to the stage (``round=R`` for the ddo stage: run only round R). Under torchrun or srun (several
    processes; see repro.cluster.distributed) it joins their process group first.
    """
    with stage_context(stage, cfg, root) as paths:
        stage_module(stage).run(cfg, paths, progress, **kwargs)


@dataclass(frozen=True)
class StageCall:
    """Job: a whole stage (picklable: what the launcher submits, or runs here)."""

    stage: str
    cfg: Config
    root: str
    kwargs: dict = field(default_factory=dict)
    progress: bool = False

    def __call__(self) -> str:
        run_stage(self.stage, self.cfg, Path(self.root), progress=self.progress, **self.kwargs)
        return f"{self.stage} done"


def waves(stage: str, cfg: Config, root: Path, **kwargs) -> Iterator[Wave]:
    """The stage as waves of jobs: its own decomposition, else one job that runs the whole stage."""
    def whole(here: bool) -> Wave:
        return Wave(stage, stage, (StageCall(stage, cfg, str(root), kwargs),), here=here)

    module = stage_module(stage)
    if hasattr(module, "waves"):
        return module.waves(cfg, root, whole, **kwargs)
    return iter([whole(False)])


def launch(stage: str, cfg: Config, root: Path, progress: bool = True, **kwargs) -> None:
    """Run ``stage`` where ``launcher.executor`` says: here, or as jobs this call waits for."""
    root = Path(root).resolve()
    if cfg.launcher.executor == "local" or launcher.in_job():
        launcher.run_here(StageCall(stage, cfg, str(root), kwargs, progress), cfg.launcher.max_requeue)
        return
    launcher.run_waves(waves(stage, cfg, root, **kwargs), cfg, root)


def describe(stage: str, cfg: Config, root: Path) -> dict | None:
    """Extra facts for --dry-run: what a stage would fetch, write or measure."""
    fn = getattr(stage_module(stage), "describe", None)
    return fn(cfg, Paths.of(cfg, root)) if fn else None
