"""Alpha/beta sweeps inside a DDO round: the round's shared fake bank, one candidate per (alpha, beta), the choice.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from repro.cluster import distributed, preempt
from repro.config import DDOConfig, SamplerConfig
from repro.datasets.images import Dataset
from repro.datasets.sharded import ShardedDataset
from repro.methods.ddo.family import make_fake_bank, selection_score
from repro.methods.ddo.rounds import RoundResult, fake_seeds, make_fake_shards, selection_seeds, train_round
from repro.nets.checkpoint import load_model
from repro.nets.layers import disable_dropout
from repro.storage.files import atomic_path, link_or_copy, read_json, save_npz, write_json
from repro.storage.layout import RoundDir, candidate_name, round_name

log = logging.getLogger(__name__)


def sweep_grid(cfg: DDOConfig) -> list[tuple[float, float]]:
    """The (alpha, beta) candidates of a swept round, in grid order (alpha outer); [] when nothing is swept."""
    if not cfg.sweep_alpha and not cfg.sweep_beta:
        return []
    return [(a, b) for a in cfg.sweep_alpha or (cfg.alpha,) for b in cfg.sweep_beta or (cfg.beta,)]


def prepared(round_dir: Path) -> dict | None:
    """What prepare_round saved for this round ({"ref_score", "reference"}), or None if it has not finished."""
    rd = RoundDir(round_dir)
    return read_json(rd.prepared) if rd.prepared.is_file() and rd.fakes.is_file() else None


def prepare_round(round_: int, ref_path: Path, data: Dataset | ShardedDataset, cfg: DDOConfig, sampler: SamplerConfig, metric,
                  round_dir: Path, progress: bool = True, ref_score: float | None = None) -> float:
    """A swept round's shared work: its fake bank (``fakes.npz``) and the reference's selection score
    (``prepare.json``), made once and reused. Returns the reference's score."""
    round_dir = Path(round_dir)
    done = prepared(round_dir)
    if done is not None:
        return done["ref_score"]
    round_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.device()
    ref, arch, _ = load_model(ref_path, device)
    ref = ref.float()  # DDO trains in fp32 (the paper disables mixed precision); released EDM2 weights are fp16
    disable_dropout(ref)
    ref.requires_grad_(False)
    bank = RoundDir(round_dir).fakes
    if isinstance(data, ShardedDataset):  # shards beside the index, each rank its own
        make_fake_shards(ref, data, arch["label_dim"], int(fake_seeds(cfg, round_, 1)[0]), bank, sampler, progress,
                         device)
    elif not bank.is_file():
        n = len(data.images)
        log.info("ddo round %d (sweep): generating %d fakes from the reference into %s", round_, n, bank)
        fakes = make_fake_bank(ref, data, arch.get("label_dim", 0), fake_seeds(cfg, round_, n), sampler, progress,
                               device)
        if distributed.is_main():
            save_npz(bank, **fakes, seeds=fake_seeds(cfg, round_, n))
        distributed.barrier()
    preempt.check(lambda: None, f"in ddo round {round_} after the fake bank")  # the bank is saved
    if ref_score is None:
        ref_score = selection_score(metric, ref, selection_seeds(cfg), arch.get("label_dim", 0), data.shape, sampler)
    if distributed.is_main():
        write_json(RoundDir(round_dir).prepared, {"ref_score": ref_score, "reference": str(ref_path)})
    distributed.barrier()
    return ref_score


def train_candidate(round_: int, ref_path: Path, data: Dataset | ShardedDataset, cfg: DDOConfig, sampler: SamplerConfig,
                    sigma_data: float, metric, round_dir: Path, alpha: float, beta: float, tracker,
                    progress: bool = True) -> RoundResult:
    """One candidate of a swept round: a DDO round with this (alpha, beta), on the round's fake bank, with the
    reference score prepare_round saved (run that first)."""
    prep = prepared(round_dir)
    if prep is None:
        raise FileNotFoundError(f"ddo round {round_}: {round_dir} has no fake bank / prepare.json; run "
                                "prepare_round first")
    out = RoundDir(round_dir).candidate(alpha, beta)
    out.dir.mkdir(parents=True, exist_ok=True)
    if not out.fakes.is_file() and not out.done.is_file() and distributed.is_main():
        shards = RoundDir(round_dir).fakes.with_suffix("")
        if shards.is_dir() and not out.fakes.with_suffix("").exists():  # a sharded bank: its folder too
            out.fakes.with_suffix("").symlink_to(shards.resolve(), target_is_directory=True)
        link_or_copy(RoundDir(round_dir).fakes, out.fakes)  # train_round finds it: not made again
    distributed.barrier()
    return train_round("ddo", round_, ref_path, data, dataclasses.replace(cfg, alpha=alpha, beta=beta), sampler,
                       sigma_data, metric, out.dir, tracker, progress, ref_score=prep["ref_score"])


def select_round(round_: int, round_dir: Path, cfg: DDOConfig, tracker=None) -> RoundResult:
    """The swept round's result: the candidate with the lowest selection score (ties: the first in grid order);
    its checkpoint becomes the round's ``best.safetensors`` and ``done.json`` lists every candidate."""
    round_dir = Path(round_dir)
    rd = RoundDir(round_dir)
    done_path, best_path = rd.done, rd.best
    if not done_path.is_file():
        cands, missing = [], []
        for a, b in sweep_grid(cfg):
            p = rd.candidate(a, b).done
            if not p.is_file():
                missing.append(str(p.parent))
                continue
            d = read_json(p)
            cands.append({"alpha": a, "beta": b, "best_score": d["best_score"], "best_nimg": d["best_nimg"],
                          "evals": d["evals"], "seconds": d["seconds"]})
        if missing:
            raise FileNotFoundError(f"ddo round {round_}: candidates not finished: {', '.join(missing)}")
        chosen = min(cands, key=lambda c: c["best_score"])  # min keeps the first of equal scores
        prep = prepared(round_dir) or {}
        # The reference is a candidate too (each candidate already keeps it unless beaten; this says so here).
        keep_ref = prep.get("ref_score") is not None and not chosen["best_score"] < prep["ref_score"]
        if distributed.is_main():
            source = Path(prep["reference"]) if keep_ref else rd.candidate(chosen["alpha"], chosen["beta"]).best
            with atomic_path(best_path) as tmp:
                tmp.write_bytes(source.read_bytes())
            write_json(done_path, {"best_score": prep["ref_score"] if keep_ref else chosen["best_score"],
                                   "best_nimg": 0 if keep_ref else chosen["best_nimg"],
                                   "ref_score": prep.get("ref_score"), "evals": chosen["evals"],
                                   "seconds": round(sum(c["seconds"] for c in cands), 1),
                                   "candidates": [{k: c[k] for k in ("alpha", "beta", "best_score", "best_nimg")}
                                                  for c in cands],
                                   "chosen": "reference" if keep_ref else {"alpha": chosen["alpha"],
                                                                           "beta": chosen["beta"]}})
        distributed.barrier()
        log.info("ddo round %d: chose %s among %s", round_,
                 "the reference (no candidate beat it)" if keep_ref else
                 f"alpha {chosen['alpha']:g}, beta {chosen['beta']:g} (selection score {chosen['best_score']:.4f})",
                 ", ".join(f"(alpha {c['alpha']:g}, beta {c['beta']:g}): {c['best_score']:.4f}" for c in cands))
    d = read_json(done_path)
    if tracker is not None:
        chosen = d["chosen"] if isinstance(d["chosen"], dict) else {"alpha": "reference", "beta": "reference"}
        tracker.log_params({"chosen_alpha": chosen["alpha"], "chosen_beta": chosen["beta"]})
    return RoundResult("ddo", round_, best_path, d["best_score"], d["best_nimg"], d.get("ref_score"), d["evals"],
                       d["seconds"])


def run_candidates_here(round_: int, ref_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig,
                        sigma_data: float, metric, round_dir: Path, tracker, progress: bool = True) -> None:
    """The candidates of a swept round, one after another in this process, each a nested MLflow run."""
    for a, b in sweep_grid(cfg):
        name = candidate_name(a, b)
        with tracker.child(f"{round_name('ddo', round_)}-{name}", params={"round": round_, "alpha": a, "beta": b},
                           tags={"round": round_, "kind": "ddo", "candidate": name}) as child:
            res = train_candidate(round_, ref_path, data, cfg, sampler, sigma_data, metric, round_dir, a, b, child,
                                  progress)
            child.log_metrics({"best_selection_score": res.best_score, "best_nimg": res.best_nimg})


def swept_round(round_: int, ref_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig,
                sigma_data: float, metric, round_dir: Path, tracker, progress: bool = True,
                ref_score: float | None = None, run_candidates=None) -> RoundResult:
    """A swept DDO round: prepare, the candidates, select (a finished round is reused).

    ``run_candidates(round_, ref_path, grid)`` runs the candidates elsewhere (e.g. as a job array) and returns once
    they are finished; None: one after another here (run_candidates_here).
    """
    if not RoundDir(round_dir).done.is_file():
        prepare_round(round_, ref_path, data, cfg, sampler, metric, round_dir, progress, ref_score)
        if run_candidates is None:
            run_candidates_here(round_, ref_path, data, cfg, sampler, sigma_data, metric, round_dir, tracker,
                                progress)
        else:
            run_candidates(round_, ref_path, sweep_grid(cfg))
    return select_round(round_, round_dir, cfg, tracker)
