"""DDO's self-play: rounds one after another, each round's best becoming the next reference; then models/ddo.
Diffusion and AR models alike (what differs is in repro.methods.ddo.family).

Training-seed replicates (ddo.seeds > 1): replicate k trains every DDO round and the control's rounds again from the
same base, with its own :class:`Replicate` config: training seed ddo.seed + k (every step's draws: batch indices,
noise levels and noise, the data order of sharded data) and its own fake-bank seeds (replicate k's round r bank:
fake_first_seed + k * (rounds + 1) * 1e6 + r * 1e6 + i, so the banks differ even in round 1, whose reference is the
same base for all). The selection seeds and the evaluation seeds are the same for every replicate: they are the
measurement, not the training. Replicate 0 is the run without replicates, bit for bit (its config is ddo itself;
its names, directories and history keys are unchanged); replicate k of seed s trains in ``seed<s>/`` of the run
directory, writes ``<kind>-round<r>-seed<s>`` models and keeps its history under ``<kind>-seed<s>`` in rounds.json.
A DDO replicate and the control replicate of the same seed share only the base (and the selection seeds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from repro.cluster import distributed
from repro.config import DDOConfig, SamplerConfig, replicate_seed_offset
from repro.datasets.images import Dataset
from repro.methods.ddo.family import is_ar
from repro.methods.ddo.control import run_round
from repro.methods.ddo.rounds import KINDS, RoundResult
from repro.methods.ddo.sweep import sweep_grid, swept_round
from repro.nets.checkpoint import load_model
from repro.sampling.generate import sample_grid
from repro.sampling.var import var_grid
from repro.storage.files import write_json
from repro.storage.layout import RoundDir, replicate_dir, round_name


@dataclass(frozen=True)
class Replicate:
    """Training-seed replicate ``index`` of the ddo stage: its config (``cfg``: ddo with this replicate's training seed
    and fake-bank seeds) and its names."""

    index: int
    cfg: DDOConfig

    @property
    def seed(self) -> int:
        """The training seed (ddo.seed + index)."""
        return int(self.cfg.seed)

    @property
    def suffix(self) -> int | None:
        """The seed its names carry: None for replicate 0 (named as without replicates)."""
        return None if self.index == 0 else self.seed

    def name(self, kind: str, round_: int) -> str:
        """Its round's name: MLflow run, model file stem (``ddo-round2``, ``ddo-round2-seed1``)."""
        return round_name(kind, round_, self.suffix)

    def key(self, kind: str) -> str:
        """Its history's key in rounds.json (``ddo``, ``ddo-seed1``)."""
        return kind if self.suffix is None else f"{kind}-seed{self.suffix}"

    def run_dir(self, run_dir: Path) -> Path:
        """Its part of the stage's run directory (the directory itself for replicate 0)."""
        return replicate_dir(run_dir, self.suffix)

    def round_dir(self, run_dir: Path, kind: str, round_: int) -> RoundDir:
        return RoundDir.of(self.run_dir(run_dir), kind, round_)


def replicates(cfg: DDOConfig) -> list[Replicate]:
    """The training-seed replicates of ddo.seeds, replicate 0 first (its config is ``cfg`` itself)."""
    out = [Replicate(0, cfg)]
    for k in range(1, cfg.seeds):
        out.append(Replicate(k, dataclasses.replace(cfg, seed=cfg.seed + k, fake_first_seed=cfg.fake_first_seed
                                                    + k * replicate_seed_offset(cfg))))
    return out


def run_rounds(base_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig, sigma_data: float, metric,
               run_dir: Path, out_dir: Path, tracker, progress: bool = True, run_candidates=None) -> dict:
    """The `ddo` stage: all DDO rounds (and the MLE control) of every training-seed replicate (ddo.seeds), with
    nested MLflow runs (tagged with round, kind and seed); writes ``out_dir``.

    With a sweep (ddo.sweep_alpha / sweep_beta) each DDO round is swept_round (``run_candidates``: see there; it
    is called for replicate 0's rounds only, the other replicates' candidates run here).
    """
    from repro.storage.files import atomic_dir, record_sha256

    history: dict[str, list[dict]] = {}
    results: dict[str, list[tuple[str, RoundResult]]] = {}
    for rep in replicates(cfg):
        for kind in KINDS if cfg.control else ("ddo",):
            ref_path, ref_score = base_path, None
            key = rep.key(kind)
            results[key] = []
            for r in range(1, cfg.rounds + 1):
                name = rep.name(kind, r)
                where = rep.round_dir(run_dir, kind, r).dir
                with tracker.child(name, params={"round": r, "kind": kind, "seed": rep.seed},
                                   tags={"round": r, "kind": kind, "seed": rep.seed}) as child:
                    if kind == "ddo" and sweep_grid(cfg):
                        res = swept_round(r, ref_path, data, rep.cfg, sampler, sigma_data, metric, where, child,
                                          progress, ref_score, run_candidates if rep.index == 0 else None)
                    else:
                        res = run_round(kind, r, ref_path, data, rep.cfg, sampler, sigma_data, metric, where, child,
                                          progress, ref_score=ref_score)
                    child.log_metrics({"best_selection_score": res.best_score, "reference_score": res.ref_score,
                                       "round_seconds": res.seconds})
                    if distributed.is_main():  # a picture for MLflow: rank 0's job
                        best, arch, _ = load_model(res.best_path)
                        if is_ar(sampler):
                            grid = var_grid(best, sampler.tokenizer, n=40, ncol=10)
                        else:
                            grid = sample_grid(best, arch["label_dim"], data.shape, sampler)
                        child.log_image(grid, f"{name.replace('-', '_')}_samples.png")
                results[key].append((name, res))
                ref_path, ref_score = res.best_path, res.best_score
            # No wall-clock times in this output (they are in MLflow and each round's done.json): the same rounds
            # must give the same bytes, or DVC would rerun sampling after every rerun of this stage.
            history[key] = [{"round": x.round, "best_score": x.best_score, "best_nimg": x.best_nimg,
                             "reference_score": x.ref_score, "evals": x.evals, **x.info}
                            for _, x in results[key]]
    # Outputs (atomically as one directory, by rank 0): each round's best, and the selection history.
    if distributed.is_main():
        with atomic_dir(out_dir) as tmp:
            for rs in results.values():
                for name, x in rs:
                    (tmp / f"{name}.safetensors").write_bytes(x.best_path.read_bytes())
                    record_sha256(tmp / f"{name}.safetensors")  # checked by sample and fid
            write_json(tmp / "rounds.json", {"selection_metric": metric.name, "selection_seeds":
                                             [int(cfg.selection_first_seed), int(cfg.selection_first_seed
                                                                                 + cfg.selection_samples)],
                                             **({"training_seeds": [r.seed for r in replicates(cfg)]}
                                                if cfg.seeds > 1 else {}),
                                             "history": history})
    tracker.log_metrics({f"{k}_final_selection_score": v[-1]["best_score"] for k, v in history.items()})
    distributed.barrier()
    return history
