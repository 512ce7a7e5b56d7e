"""The MLE control as a tuned, equal-compute baseline (issue 15): a learning-rate search per round
(ddo.control_lrs) and a budget in compute rather than steps (ddo.control_budget).

A plain control round (both options at their defaults) is :func:`repro.methods.ddo.rounds.train_round` with kind
'control', as before. With either option, :func:`train_round` hands the control round to :func:`control_round`:

  1. the reference's selection score, once per round (``prepare.json``; rounds after the first get it from the
     previous round);
  2. one candidate per learning rate (ddo.control_lrs, or ddo.lr alone), each a plain control round in its own
     sub-directory ``lr<lr>/`` of the round directory, from the round's reference, with the draws of a plain
     control round (they depend on (ddo.seed, kind, round, step) only, not on the lr), for the round's budget
     (:func:`control_plan`); a finished candidate is reused, an unfinished one resumes;
  3. the choice: the candidate with the lowest selection score (the selection seeds and metric of DDO's checkpoint
     selection; ties: the first lr listed) becomes the round's ``best.safetensors`` and the next reference; the
     reference stays when no candidate beats it (each candidate keeps it too, as every round does). ``done.json``
     records every candidate's score, the chosen lr, the budget and the compute count; rounds.json's history gets
     the same (new keys; :func:`history_keys`).

The candidates run one after another inside the ddo stage (unlike the DDO sweep's (alpha, beta) candidates, they do
not go out as a SLURM job array): the control is a baseline, small next to DDO.

Equal compute (ddo.control_budget: compute): :func:`forward_equivalents` counts what a DDO round and a control round
spend, in network forward-equivalents, and gives the control the number of steps that makes the two equal, with as
many selection evaluations as DDO. Each learning-rate candidate gets that budget (as each (alpha, beta) candidate of a
swept DDO round gets a DDO round's steps): the search itself is on top, on either side.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from repro.cluster import distributed
from repro.config import ConfigError, DDOConfig
from repro.datasets.sharded import ShardedDataset
from repro.storage.files import atomic_path, read_json, write_json
from repro.storage.layout import RoundDir, lr_candidate_name, round_name

log = logging.getLogger(__name__)

FWD_BWD = 3  # a forward + backward pass, in forward passes (the backward pass costs about two forwards)
DDO_PAIR = 2 * FWD_BWD + 2  # per pair: theta forward+backward on the real and the fake image, two reference forwards
CONTROL_PAIR = 2 * FWD_BWD  # per pair: forward+backward on two real images (control_step_loss: 2 x batch)


def tuned(cfg: DDOConfig) -> bool:
    """Whether the control round is this module's (a learning-rate search or a compute budget), not a plain one."""
    return bool(cfg.control_lrs) or cfg.control_budget != "steps"


def control_lrs(cfg: DDOConfig) -> tuple[float, ...]:
    """The learning rates a control round tries, in order: ddo.control_lrs, or ddo.lr alone."""
    return tuple(float(v) for v in cfg.control_lrs) or (float(cfg.lr),)


def steps_of(nimg: int, batch: int) -> int:
    """Optimizer steps of a round of ``nimg`` images: the loop steps while fewer than ``nimg`` have been seen."""
    return -(-int(nimg) // int(batch))


def evaluations(nimg_per_round: int, eval_every_nimg: int, batch: int) -> int:
    """Selection evaluations of a round, as train_round makes them: after each step whose image count ``nimg`` has
    ``nimg % eval_every_nimg < batch`` (the first step at or past each multiple of eval_every_nimg), and after the
    last step. With K steps: every step if eval_every_nimg <= batch, else the multiples of eval_every_nimg in
    (0, (K-1) batch] (one step each) plus the last step."""
    k = steps_of(nimg_per_round, batch)
    return k if eval_every_nimg <= batch else (k - 1) * batch // eval_every_nimg + 1


def eval_every_for(steps: int, batch: int, n_evals: int) -> int:
    """An eval_every_nimg that gives a round of ``steps`` steps exactly ``n_evals`` evaluations, spaced about evenly
    (ceil(steps * batch / n_evals), lowered to the largest value that still gives ``n_evals``)."""
    if not 1 <= n_evals <= steps:
        raise ValueError(f"{n_evals} evaluations do not fit in {steps} steps")
    if n_evals == 1:
        return steps * batch
    every = min(-(-steps * batch // n_evals), (steps - 1) * batch // (n_evals - 1))
    assert evaluations(steps * batch, every, batch) == n_evals, (steps, batch, n_evals, every)
    return every


def forward_equivalents(*, batch: int, nimg_per_round: int, eval_every_nimg: int, bank_images: int, nfe: int,
                        selection_samples: int, budget: str) -> dict:
    """The compute of one DDO round and of one control round (one learning-rate candidate), in network
    forward-equivalents, and the control's images per round under ``budget`` ('steps' or 'compute').

    Unit: one forward pass of the network on one image at the model's resolution (a latent model: its latent) = 1;
    a backward pass = 2, so forward + backward = 3 (FWD_BWD). As train_round spends it (diffusion models):

    DDO round, with B = batch pairs per step, K = ceil(nimg_per_round / B) steps, E evaluations (:func:`evaluations`):
      fake bank     one fake per real image of the training data, each from the sampler: bank_images x NFE
                    (the DDO sampler has autoguidance off: Heun's NFE = 2 num_steps - 1 network calls)
      training      per step ddo_diffusion_loss: theta forward on B real and B fake images with gradient and the
                    backward pass through both (2 x 3B), the frozen reference's forward on both without
                    gradient (2 x B): 8B per step, 8BK per round
      selection     E x selection_samples x NFE (sampling the selection seeds; the metric's feature extractor is
                    the same per evaluation on either side and not counted)
    Control round, K' steps:
      training      per step control_step_loss: forward and backward on 2B real images: 6B per step
      selection     E' x selection_samples x NFE
    (The reference's selection score is made once per round on either side; Adam, EMA and data loading are not
    network passes and are not counted: benchmarks/bench_control_compute.py measures whole steps and rounds.)

    budget 'steps': K' = K and the control's eval_every_nimg = DDO's, as before (E' = E).
    budget 'compute': E' = E (eval_every_nimg scaled, :func:`eval_every_for`) so the selection terms cancel, and
    K' = round((bank_images NFE + 8BK) / 6B), the nearest whole step: the two totals differ by at most 3B.

    Returns {'ddo', 'control'} (forward-equivalents per round, selection included), the steps, evaluations and the
    control's nimg_per_round and eval_every_nimg (K' x B: the control counts B per step, as DDO counts pairs).
    """
    if budget not in ("steps", "compute"):
        raise ValueError(f"budget {budget!r}: steps or compute")
    k = steps_of(nimg_per_round, batch)
    n_evals = evaluations(nimg_per_round, eval_every_nimg, batch)
    selection = n_evals * selection_samples * nfe
    bank = bank_images * nfe
    ddo = bank + k * batch * DDO_PAIR + selection
    if budget == "steps":
        k_c, nimg_c, every_c = k, nimg_per_round, eval_every_nimg
    else:
        per_step = batch * CONTROL_PAIR
        k_c = max((2 * (ddo - selection) + per_step) // (2 * per_step), n_evals, 1)  # the nearest whole step
        nimg_c, every_c = k_c * batch, eval_every_for(k_c, batch, n_evals)
    control = k_c * batch * CONTROL_PAIR + selection
    return {"ddo": ddo, "control": control, "ddo_fake_bank": bank, "ddo_training": k * batch * DDO_PAIR,
            "control_training": k_c * batch * CONTROL_PAIR, "selection": selection, "evaluations": n_evals,
            "nfe": nfe, "ddo_steps": k, "control_steps": k_c, "control_nimg_per_round": nimg_c,
            "control_eval_every_nimg": every_c}


def sampler_nfe(sampler) -> int:
    """Network evaluations per image of the sampler DDO draws fakes and selection samples with (EDM Heun: 2 steps - 1;
    the ddo stage passes it with guidance 1.0, autoguidance off; a guide would double it)."""
    return (2 * sampler.num_steps - 1) * (2 if getattr(sampler, "guidance", 1.0) != 1.0 else 1)


def control_plan(cfg: DDOConfig, data, sampler) -> dict:
    """The control round's budget: {'budget', 'nimg_per_round', 'eval_every_nimg'} and, for a diffusion model, the
    compute count of :func:`forward_equivalents` ('forward_equivalents')."""
    from repro.methods.ddo.family import is_ar

    plan = {"budget": cfg.control_budget, "nimg_per_round": cfg.nimg_per_round,
            "eval_every_nimg": cfg.eval_every_nimg}
    if is_ar(sampler):
        if cfg.control_budget == "compute":
            raise ConfigError([("ddo.control_budget", "is compute, but the base is a VAR model, whose fake bank the "
                                "compute count does not cover", "set ddo.control_budget: steps")])
        return plan
    n = len(data) if isinstance(data, ShardedDataset) else len(data.images)
    fe = forward_equivalents(batch=cfg.batch, nimg_per_round=cfg.nimg_per_round, eval_every_nimg=cfg.eval_every_nimg,
                             bank_images=n, nfe=sampler_nfe(sampler), selection_samples=cfg.selection_samples,
                             budget=cfg.control_budget)
    plan.update(nimg_per_round=fe["control_nimg_per_round"], eval_every_nimg=fe["control_eval_every_nimg"],
                forward_equivalents=fe)
    return plan


def candidate_cfg(cfg: DDOConfig, lr: float, plan: dict) -> DDOConfig:
    """A learning-rate candidate's settings: a plain control round (no search, steps budget) at ``lr``, for the
    plan's images and evaluations."""
    return dataclasses.replace(cfg, lr=lr, control_lrs=(), control_budget="steps",
                               nimg_per_round=plan["nimg_per_round"], eval_every_nimg=plan["eval_every_nimg"])


def history_keys(done: dict) -> dict:
    """What a tuned control round adds to rounds.json's history (no wall-clock times: the same rounds must give the
    same bytes)."""
    keys = ("budget", "lr", "candidates", "nimg_per_round", "eval_every_nimg", "forward_equivalents")
    out = {k: done[k] for k in keys if k in done}
    out["candidates"] = [{k: c[k] for k in ("lr", "best_score", "best_nimg")} for c in done["candidates"]]
    return out


def _reference_score(round_: int, ref_path: Path, data, cfg: DDOConfig, sampler, metric, rd: RoundDir,
                     ref_score: float | None) -> float:
    """The reference's selection score (as train_round makes it), made once per round and kept in prepare.json."""
    from repro.methods.ddo.family import selection_score
    from repro.methods.ddo.rounds import selection_seeds
    from repro.methods.training import for_training
    from repro.nets.checkpoint import load_model
    from repro.nets.layers import disable_dropout

    if rd.prepared.is_file():
        return read_json(rd.prepared)["ref_score"]
    if ref_score is None:
        ref, arch, _ = load_model(ref_path, distributed.device())
        ref = for_training(ref)
        disable_dropout(ref)
        ref.requires_grad_(False)
        ref_score = selection_score(metric, ref, selection_seeds(cfg), arch.get("label_dim", 0), data.shape, sampler)
    if distributed.is_main():
        write_json(rd.prepared, {"ref_score": ref_score, "reference": str(ref_path)})
    distributed.barrier()
    return ref_score


def control_round(round_: int, ref_path: Path, data, cfg: DDOConfig, sampler, sigma_data: float, metric,
                  round_dir: Path, tracker, progress: bool = True, ref_score: float | None = None):
    """A tuned control round in ``round_dir``: the candidates (one per learning rate, each resumable and reused if
    finished), then the choice (module docstring). Returns the round's RoundResult, whose ``info`` holds the keys
    rounds.json's history adds."""
    from repro.methods.ddo.rounds import RoundResult, train_round

    rd = RoundDir(Path(round_dir))
    if not rd.done.is_file():
        rd.dir.mkdir(parents=True, exist_ok=True)
        plan = control_plan(cfg, data, sampler)
        ref_score = _reference_score(round_, ref_path, data, cfg, sampler, metric, rd, ref_score)
        cands = []
        for lr in control_lrs(cfg):
            name = lr_candidate_name(lr)
            with tracker.child(f"{round_name('control', round_)}-{name}",
                               params={"round": round_, "lr": lr, "nimg_per_round": plan["nimg_per_round"],
                                       "eval_every_nimg": plan["eval_every_nimg"], "budget": plan["budget"]},
                               tags={"round": round_, "kind": "control", "candidate": name}) as child:
                res = train_round("control", round_, ref_path, data, candidate_cfg(cfg, lr, plan), sampler,
                                  sigma_data, metric, rd.lr_candidate(lr).dir, child, progress, ref_score=ref_score)
                child.log_metrics({"best_selection_score": res.best_score, "best_nimg": res.best_nimg})
            cands.append({"lr": lr, "best_score": res.best_score, "best_nimg": res.best_nimg, "evals": res.evals,
                          "seconds": res.seconds, "best_path": res.best_path})
        chosen = min(cands, key=lambda c: c["best_score"])  # min keeps the first of equal scores
        keep_ref = not chosen["best_score"] < ref_score  # no candidate beat the reference: it stays
        if distributed.is_main():
            with atomic_path(rd.best) as tmp:
                tmp.write_bytes(Path(ref_path if keep_ref else chosen["best_path"]).read_bytes())
            write_json(rd.done, {
                "best_score": ref_score if keep_ref else chosen["best_score"],
                "best_nimg": 0 if keep_ref else chosen["best_nimg"], "ref_score": ref_score,
                "evals": chosen["evals"], "seconds": round(sum(c["seconds"] for c in cands), 1),
                "budget": plan["budget"], "lr": None if keep_ref else chosen["lr"],
                "chosen": "reference" if keep_ref else {"lr": chosen["lr"]},
                "candidates": [{k: c[k] for k in ("lr", "best_score", "best_nimg", "seconds")} for c in cands],
                "nimg_per_round": plan["nimg_per_round"], "eval_every_nimg": plan["eval_every_nimg"],
                **({"forward_equivalents": {k: plan["forward_equivalents"][k] for k in ("ddo", "control")}}
                   if "forward_equivalents" in plan else {})})
        distributed.barrier()
        log.info("control round %d (%s budget, %d images): chose %s among %s", round_, plan["budget"],
                 plan["nimg_per_round"], "the reference (no candidate beat it)" if keep_ref else
                 f"lr {chosen['lr']:g} (selection score {chosen['best_score']:.4f})",
                 ", ".join(f"lr {c['lr']:g}: {c['best_score']:.4f}" for c in cands))
    d = read_json(rd.done)
    tracker.log_params({"control_budget": d["budget"], "chosen_lr": "reference" if d["lr"] is None else d["lr"],
                        "control_nimg_per_round": d["nimg_per_round"]})
    tracker.log_metrics({f"candidate_score_{lr_candidate_name(c['lr'])}": c["best_score"] for c in d["candidates"]}
                        | {f"{k}_forward_equivalents": v for k, v in d.get("forward_equivalents", {}).items()})
    return RoundResult("control", round_, rd.best, d["best_score"], d["best_nimg"], d.get("ref_score"), d["evals"],
                       d["seconds"], info=history_keys(d))


def run_round(kind: str, round_: int, ref_path: Path, data, cfg: DDOConfig, sampler, sigma_data: float, metric,
              run_dir: Path, tracker, progress: bool = True, ref_score: float | None = None):
    """One round of ``kind`` ('ddo' or 'control'): a tuned control round (:func:`control_round`) when ddo.control_lrs
    or ddo.control_budget: compute asks for one, else the plain round (repro.methods.ddo.rounds.train_round)."""
    from repro.methods.ddo.rounds import train_round

    if kind == "control" and tuned(cfg):
        return control_round(round_, ref_path, data, cfg, sampler, sigma_data, metric, run_dir, tracker, progress,
                             ref_score)
    return train_round(kind, round_, ref_path, data, cfg, sampler, sigma_data, metric, run_dir, tracker, progress,
                       ref_score=ref_score)
