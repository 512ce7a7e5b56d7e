"""Stage `ddo`: DDO's self-play rounds and the MLE control (repro.methods.ddo), then models/ddo.

Rounds resume and are reused through their run directories, so `repro ddo --round 1`, `--round 2`, ... (one SLURM
job each, chained with --dependency=afterok) followed by `repro ddo` trains nothing twice. On a cluster a swept round
(ddo.sweep_alpha / sweep_beta) is three waves (:func:`waves`): the round's fake bank and reference score as one job,
its (alpha, beta) candidates as one job array, the choice here; then the whole stage as one job, which finds every
swept round finished, trains the MLE control and writes models/ddo.

Training-seed replicates (ddo.seeds > 1, repro.methods.ddo.selfplay.Replicate) go everywhere a round goes: `repro ddo
--round N` trains round N of every kind and every replicate, and a swept round's waves run for each replicate. The
run directory does not depend on ddo.seeds (replicate k >= 1 works in its ``seed<s>/`` sub-directory), so raising
ddo.seeds reuses the replicates already trained.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from repro.cluster import distributed
from repro.cluster.launcher import Wave
from repro.config import Config, ConfigError
from repro.evaluation.metric import load_metric
from repro.methods.ddo.control import run_round
from repro.methods.ddo.rounds import KINDS
from repro.methods.ddo.selfplay import Replicate, replicates, run_rounds
from repro.methods.ddo.sweep import prepare_round, prepared, select_round, sweep_grid, swept_round, train_candidate
from repro.methods.ddo.family import ARSampling, tokenizer_of
from repro.nets import released
from repro.nets.checkpoint import load_model, read_model_meta
from repro.pipeline.common import in_memory, load_data, log_data_input, require, run_dir, stage_context, tracked
from repro.pipeline.cost import ddo_cost
from repro.storage.files import atomic_dir, check_recorded, read_json, write_json
from repro.storage.layout import Paths, RoundDir, round_name

log = logging.getLogger("repro.pipeline")


def ddo_run_dir(cfg: Config, paths: Paths) -> Path:
    """The ddo stage's run directory (keyed by its params and the sha256 of its inputs; a latent model's: with its
    decoder's, which the selection metric decodes through)."""
    inputs = {"data": paths.data, "base": paths.base, "extractor": paths.extractor, "reference": paths.reference}
    name = released.decoder_name(cfg.pretrain)
    if name and paths.decoder(name).is_file():
        inputs["decoder"] = paths.decoder(name)
    return run_dir("ddo", cfg, paths, inputs, ignore=("ddo.seeds",))


def _selection_decoder(cfg: Config, paths: Paths, info: dict):
    """The decoder the selection metric runs a latent model's samples through before the feature extractor: the one
    the sample stage uses (repro.nets.released.load_decoder: ``checkpoints/<name>.safetensors``, its sha256 checked
    against the lock; a converted checkpoint's EDM2 whitening checked), which must also be the VAE the data stage
    encoded the real latents with (the data manifest's record)."""
    name = released.decoder_name(cfg.pretrain)
    if not name:
        raise ConfigError([("pretrain.decoder", f"is empty, and data.dataset {cfg.data.dataset} is SD-VAE latents: the "
                            "DDO selection metric needs their decoder", "set pretrain.decoder (e.g. sd-vae-ft-mse), "
                            "or a latent pretrain.source")])
    released.check_encoded_with(read_json(paths.manifest), paths.root, name)
    return released.load_decoder(paths.root, name, info.get("encoder"), device=distributed.device())


def _inputs(cfg: Config, paths: Paths):
    """The round's data, the selection metric and the sampler of fakes and selection (no autoguidance, as in the
    paper: DDO's fakes and selection samples come from the models themselves); a VAR base: its sampling context
    (repro.methods.ddo.family.ARSampling: the tokenizer; guidance-free, no top-k/top-p). Latent data (imagenet512):
    the fakes stay latents, and the selection metric decodes the samples (:func:`_selection_decoder`)."""
    require(paths.data, paths.base, paths.extractor, paths.reference)
    check_recorded(paths.base)  # the bytes the pretrain stage wrote
    arch, info = read_model_meta(paths.base)  # a clear error if the base checkpoint is not ours
    data = load_data(paths)
    latent = getattr(data, "latent", False)
    if latent and arch.get("precond") == "var":
        raise ConfigError([("data.dataset", f"{cfg.data.dataset} is SD-VAE latents, and a VAR base samples token "
                            "maps of pixels", "use a pixel data set with a VAR pretrain.source")])
    decoder = _selection_decoder(cfg, paths, info) if latent else None
    if arch.get("precond") == "var":  # AR DDO: the tokenizer the base carries (trained here), or its registry one
        in_memory(data, "AR DDO (the sharded reader serves the diffusion rounds only, so far)")
        tokenizer = tokenizer_of(load_model(paths.base)[0]) or released.load_tokenizer(paths.root, info["tokenizer"])
        sampler = ARSampling(tokenizer.float().eval().requires_grad_(False))
    else:
        sampler = dataclasses.replace(cfg.sampler, guidance=1.0)
    return data, load_metric(cfg.extractor.kind, paths.extractor, paths.reference, decoder=decoder), sampler


def _check_round(cfg: Config, round_: int) -> None:
    if not 1 <= round_ <= cfg.ddo.rounds:
        raise ValueError(f"--round {round_}: the preset has rounds 1..{cfg.ddo.rounds} (ddo.rounds)")


def _replicate(cfg: Config, index: int) -> Replicate:
    return replicates(cfg.ddo)[index]


def _reference(paths: Paths, rd: Path, kind: str, round_: int, rep: Replicate | None = None) -> tuple[Path, float | None]:
    """Round ``round_``'s reference (of replicate ``rep``, default replicate 0): the base model, or the previous
    round's best (which must be finished)."""
    if round_ == 1:
        return paths.base, None
    prev = RoundDir.of(rd if rep is None else rep.run_dir(rd), kind, round_ - 1)
    if not prev.done.is_file():
        what = kind if rep is None or rep.index == 0 else f"{kind} (training seed {rep.seed})"
        raise FileNotFoundError(f"{what} round {round_ - 1} is not finished ({prev.dir}): run `repro ddo --round "
                                f"{round_ - 1}` first")
    return prev.best, read_json(prev.done)["best_score"]


def run(cfg: Config, paths: Paths, progress: bool, round: int | None = None) -> None:  # noqa: A002
    """All DDO rounds (and the MLE control), then models/ddo; or with ``round``, only that round of each kind."""
    if round is not None:
        _check_round(cfg, round)
    if cfg.ddo.rounds == 0:  # an evaluation-only preset: nothing to train, no data read
        with atomic_dir(paths.ddo) as tmp:
            write_json(tmp / paths.rounds_json.name, {"selection_metric": None, "history": {}})
        log.info("ddo: no rounds (ddo.rounds: 0, an evaluation-only preset): nothing to train; wrote %s",
                 paths.rounds_json)
        return
    data, metric, sampler = _inputs(cfg, paths)
    rd = ddo_run_dir(cfg, paths)
    if round is None:
        with tracked("ddo", cfg, paths) as t:
            t.set_tags({"run_dir": rd})
            log_data_input(t, paths)
            log.info("ddo: %d rounds%s%s%s; run directory %s", cfg.ddo.rounds,
                     " + MLE control" if cfg.ddo.control else "",
                     f", {len(sweep_grid(cfg.ddo))} (alpha, beta) candidates each" if sweep_grid(cfg.ddo) else "",
                     f", {cfg.ddo.seeds} training seeds ({cfg.ddo.seed}..{cfg.ddo.seed + cfg.ddo.seeds - 1})"
                     if cfg.ddo.seeds > 1 else "", rd)
            run_rounds(paths.base, data, cfg.ddo, sampler, cfg.pretrain.sigma_data, metric, rd, paths.ddo, t, progress)
        return
    kinds = KINDS if cfg.ddo.control else ("ddo",)
    # every replicate and kind checked before any work
    refs = [(rep, kind, _reference(paths, rd, kind, round, rep)) for rep in replicates(cfg.ddo) for kind in kinds]
    with tracked("ddo", cfg, paths, extra_hash={"round": round}) as t:
        t.set_tags({"run_dir": rd, "round": round})
        log_data_input(t, paths)
        for rep, kind, (ref_path, ref_score) in refs:
            with t.child(rep.name(kind, round), params={"round": round, "kind": kind, "seed": rep.seed},
                         tags={"round": round, "kind": kind, "seed": rep.seed}) as child:
                where = rep.round_dir(rd, kind, round).dir
                if kind == "ddo" and sweep_grid(cfg.ddo):
                    res = swept_round(round, ref_path, data, rep.cfg, sampler, cfg.pretrain.sigma_data, metric,
                                      where, child, progress, ref_score)
                else:
                    res = run_round(kind, round, ref_path, data, rep.cfg, sampler, cfg.pretrain.sigma_data, metric,
                                      where, child, progress, ref_score=ref_score)
                child.log_metrics({"best_selection_score": res.best_score, "reference_score": res.ref_score})
            log.info("ddo --round %d: %s best %.4f at %d images -> %s", round, rep.name(kind, round), res.best_score,
                     res.best_nimg, res.best_path)


# ----------------------------------------------------------------------------------------------------------
# A swept round on a cluster: prepare (fake bank + reference score), candidates (a job array), select (here).


@dataclass(frozen=True)
class Prepare:
    """Job: swept round ``round``'s fake bank and the reference's selection score (of training-seed replicate
    ``replicate``)."""

    cfg: Config
    root: str
    round: int
    replicate: int = 0

    def __call__(self) -> None:
        with stage_context("ddo", self.cfg, self.root) as paths:
            data, metric, sampler = _inputs(self.cfg, paths)
            rd = ddo_run_dir(self.cfg, paths)
            rep = _replicate(self.cfg, self.replicate)
            ref_path, ref_score = _reference(paths, rd, "ddo", self.round, rep)
            prepare_round(self.round, ref_path, data, rep.cfg, sampler, metric, rep.round_dir(rd, "ddo", self.round).dir,
                          False, ref_score)


@dataclass(frozen=True)
class Candidate:
    """Job: one (alpha, beta) candidate of swept round ``round`` (of training-seed replicate ``replicate``), on the
    round's fake bank."""

    cfg: Config
    root: str
    round: int
    alpha: float
    beta: float
    replicate: int = 0

    def __call__(self) -> None:
        cfg, r = self.cfg, self.round
        with stage_context("ddo", cfg, self.root) as paths:
            data, metric, sampler = _inputs(cfg, paths)
            rd = ddo_run_dir(cfg, paths)
            rep = _replicate(cfg, self.replicate)
            ref_path, _ = _reference(paths, rd, "ddo", r, rep)
            seed = {"seed": rep.seed} if rep.index else {}  # replicate 0: tagged and hashed as without replicates
            with tracked("ddo", cfg, paths, extra_hash={"round": r, "alpha": self.alpha, "beta": self.beta,
                                                         **seed}) as t:
                t.set_tags({"run_dir": rd, "round": r, "alpha": self.alpha, "beta": self.beta, **seed})
                log_data_input(t, paths)
                res = train_candidate(r, ref_path, data, rep.cfg, sampler, cfg.pretrain.sigma_data, metric,
                                      rep.round_dir(rd, "ddo", r).dir, self.alpha, self.beta, t, False)
                t.log_metrics({"best_selection_score": res.best_score, "best_nimg": res.best_nimg})


@dataclass(frozen=True)
class Select:
    """Here, after the candidates: the best candidate becomes swept round ``round``'s best (file copies), of
    training-seed replicate ``replicate``."""

    cfg: Config
    root: str
    round: int
    replicate: int = 0

    def __call__(self) -> None:
        paths = Paths.of(self.cfg, self.root)
        rep = _replicate(self.cfg, self.replicate)
        select_round(self.round, rep.round_dir(ddo_run_dir(self.cfg, paths), "ddo", self.round).dir, rep.cfg)


def describe(cfg: Config, paths: Paths) -> dict:
    """The plan and cost of the stage (--dry-run): rounds, candidates, steps, images and network evaluations."""
    d = cfg.ddo
    plan = {"rounds": d.rounds, "kinds": list(KINDS if d.control and d.rounds else ("ddo",) if d.rounds else ()),
            **({"training_seeds": [rep.seed for rep in replicates(d)]} if d.seeds > 1 and d.rounds else {}),
            "alpha_beta": sweep_grid(d) or ([(d.alpha, d.beta)] if d.rounds else []),
            "selection": {"seeds": [d.selection_first_seed, d.selection_first_seed + d.selection_samples],
                          "metric": cfg.extractor.kind},
            "precision": d.precision, "cost": ddo_cost(cfg)}
    if cfg.sample.protocol != "custom":
        plan["evaluation_protocol"] = cfg.sample.protocol
    return plan


def waves(cfg: Config, root: Path, whole: Callable[[bool], Wave], round: int | None = None) -> Iterator[Wave]:  # noqa: A002
    """The stage as waves of jobs: each swept round as prepare -> candidates -> select (round by round, each wave
    covering every training-seed replicate), then the whole stage."""
    if round is not None:
        _check_round(cfg, round)
    grid = sweep_grid(cfg.ddo)
    for r in ([round] if round is not None else range(1, cfg.ddo.rounds + 1)) if grid else ():
        paths = Paths.of(cfg, root)
        require(paths.data, paths.base, paths.extractor, paths.reference)
        rd = ddo_run_dir(cfg, paths)
        reps = replicates(cfg.ddo)
        for rep in reps:  # the previous round must be finished: refuse before submitting anything
            _reference(paths, rd, "ddo", r, rep)
        todo_reps = [rep for rep in reps if not rep.round_dir(rd, "ddo", r).done.is_file()]
        if not todo_reps:
            log.info("ddo round %d: already finished", r)
            continue
        name = round_name("ddo", r)
        prepare = [Prepare(cfg, str(root), r, rep.index) for rep in todo_reps
                   if prepared(rep.round_dir(rd, "ddo", r).dir) is None]
        if prepare:
            yield Wave(f"{name}-prepare", "ddo", tuple(prepare))
        todo = [Candidate(cfg, str(root), r, a, b, rep.index) for rep in todo_reps for a, b in grid
                if not rep.round_dir(rd, "ddo", r).candidate(a, b).done.is_file()]
        if todo:
            yield Wave(f"{name}-candidates", "ddo", tuple(todo))
        yield Wave(f"{name}-select", "ddo", tuple(Select(cfg, str(root), r, rep.index) for rep in todo_reps),
                   here=True)
    yield whole(False)
