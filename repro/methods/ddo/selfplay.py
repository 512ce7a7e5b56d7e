"""DDO's self-play: rounds one after another, each round's best becoming the next reference; then models/ddo.
Diffusion and AR models alike (what differs is in repro.methods.ddo.family).
"""

from __future__ import annotations

from pathlib import Path

from repro.cluster import distributed
from repro.config import DDOConfig, SamplerConfig
from repro.datasets.images import Dataset
from repro.methods.ddo.family import is_ar
from repro.methods.ddo.rounds import KINDS, RoundResult, train_round
from repro.methods.ddo.sweep import sweep_grid, swept_round
from repro.nets.checkpoint import load_model
from repro.sampling.generate import sample_grid
from repro.sampling.var import var_grid
from repro.storage.files import write_json
from repro.storage.layout import RoundDir, round_name


def run_rounds(base_path: Path, data: Dataset, cfg: DDOConfig, sampler: SamplerConfig, sigma_data: float, metric,
               run_dir: Path, out_dir: Path, tracker, progress: bool = True, run_candidates=None) -> dict:
    """The `ddo` stage: all DDO rounds (and the MLE control) with nested MLflow runs; writes ``out_dir``.

    With a sweep (ddo.sweep_alpha / sweep_beta) each DDO round is swept_round (``run_candidates``: see there).
    """
    from repro.storage.files import atomic_dir, record_sha256

    history: dict[str, list[dict]] = {}
    results: dict[str, list[RoundResult]] = {}
    for kind in KINDS if cfg.control else ("ddo",):
        ref_path, ref_score = base_path, None
        results[kind] = []
        for r in range(1, cfg.rounds + 1):
            with tracker.child(round_name(kind, r), params={"round": r, "kind": kind},
                               tags={"round": r, "kind": kind}) as child:
                if kind == "ddo" and sweep_grid(cfg):
                    res = swept_round(r, ref_path, data, cfg, sampler, sigma_data, metric, RoundDir.of(run_dir, "ddo", r).dir,
                                      child, progress, ref_score, run_candidates)
                else:
                    res = train_round(kind, r, ref_path, data, cfg, sampler, sigma_data, metric,
                                      RoundDir.of(run_dir, kind, r).dir, child, progress, ref_score=ref_score)
                child.log_metrics({"best_selection_score": res.best_score, "reference_score": res.ref_score,
                                   "round_seconds": res.seconds})
                if distributed.is_main():  # a picture for MLflow: rank 0's job
                    best, arch, _ = load_model(res.best_path)
                    if is_ar(sampler):
                        grid = var_grid(best, sampler.tokenizer, n=40, ncol=10)
                    else:
                        grid = sample_grid(best, arch["label_dim"], data.shape, sampler)
                    child.log_image(grid, f"{kind}_round{r}_samples.png")
            results[kind].append(res)
            ref_path, ref_score = res.best_path, res.best_score
        # No wall-clock times in this output (they are in MLflow and each round's done.json): the same rounds
        # must give the same bytes, or DVC would rerun sampling after every rerun of this stage.
        history[kind] = [{"round": x.round, "best_score": x.best_score, "best_nimg": x.best_nimg,
                          "reference_score": x.ref_score, "evals": x.evals, **x.info}
                         for x in results[kind]]
    # Outputs (atomically as one directory, by rank 0): each round's best, and the selection history.
    if distributed.is_main():
        with atomic_dir(out_dir) as tmp:
            for kind, rs in results.items():
                for x in rs:
                    (tmp / f"{round_name(kind, x.round)}.safetensors").write_bytes(x.best_path.read_bytes())
                    record_sha256(tmp / f"{round_name(kind, x.round)}.safetensors")  # checked by sample and fid
            write_json(tmp / "rounds.json", {"selection_metric": metric.name, "selection_seeds":
                                             [int(cfg.selection_first_seed), int(cfg.selection_first_seed
                                                                                 + cfg.selection_samples)],
                                             "history": history})
    tracker.log_metrics({f"{k}_final_selection_score": v[-1]["best_score"] for k, v in history.items()})
    distributed.barrier()
    return history
