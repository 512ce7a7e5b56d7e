"""The toy2d pipeline's stages (``toys/toy2d/dvc.yaml``): pretrain -> ddo, control -> table, over training seeds.

Each stage reads the ``toy2d`` section of a params file (``toys/toy2d/params.yaml``: the fields of
:class:`repro.toys.ddo_toy.Toy2DConfig` and ``seeds``, the training seeds) and writes under ``out/`` beside it:

    out/base/seed<s>.safetensors, curve-seed<s>.json     pretrain: the base at its plateau, its exact NLL curve
    out/ddo/seed<s>-round<r>.safetensors, seed<s>.json    ddo: the chosen (alpha, beta, lr)'s rounds, the grid's scores
    out/control/seed<s>-{steps,compute}.safetensors, seed<s>.json    control: equal steps and equal compute

``table`` scores every model on the evaluation latents and writes table.md, curve.md and metrics.json to its
``--out`` folder; it also runs the Theorem 3.3 fixed-point check (:func:`repro.toys.ddo_toy.theorem33_check`).

Example::

    repro toy2d pretrain --params toys/toy2d/params.yaml
    repro toy2d table --params toys/toy2d/params.yaml --out results/toy2d
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import platform
import time
from pathlib import Path

import torch
import yaml

from repro.config.errors import ConfigError
from repro.storage.files import load_safetensors, read_json, save_safetensors, write_json, write_text
from repro.toys.ddo_toy import (Toy2DConfig, control_search, data_row, ddo_search, equal_compute_steps, new_net,
                                pretrain, render_table, score, theorem33_check, toy_data)

__all__ = ["load_params", "STAGES", "run_stage", "summary"]

_TUPLES = {f.name for f in dataclasses.fields(Toy2DConfig) if f.type == "tuple"}


def load_params(path: Path) -> tuple[Toy2DConfig, list[int]]:
    """The ``toy2d`` section of ``path``: (the config of training seed 0's fields, the training seeds)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError([(str(path), f"cannot be read ({e.strerror})", "pass --params with the toy's params file, "
                            "e.g. toys/toy2d/params.yaml")], "toy2d") from None
    except yaml.YAMLError as e:
        raise ConfigError([(str(path), f"is not YAML ({str(e).splitlines()[0]})", "fix the file's syntax")],
                          "toy2d") from None
    sec = raw.get("toy2d") if isinstance(raw, dict) else None
    if not isinstance(sec, dict):
        raise ConfigError([(f"{path}: toy2d", "missing (no `toy2d:` section)", "add the section, as in "
                            "toys/toy2d/params.yaml")], "toy2d")
    sec = dict(sec)
    seeds = sec.pop("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError([("toy2d.seeds", f"must be a list of distinct integers >= 0, got {seeds!r}",
                            "set e.g. toy2d.seeds: [0, 1, 2]")], "toy2d")
    known = {f.name for f in dataclasses.fields(Toy2DConfig)} - {"seed"}
    unknown = sorted(set(sec) - known)
    if unknown:
        raise ConfigError([(f"toy2d.{k}", "unknown key", f"remove it (known: seeds, {', '.join(sorted(known))})")
                           for k in unknown], "toy2d")
    for k in _TUPLES & set(sec):
        if not isinstance(sec[k], list):
            raise ConfigError([(f"toy2d.{k}", f"must be a list, got {sec[k]!r}", f"write toy2d.{k}: [...]")], "toy2d")
        sec[k] = tuple(sec[k])
    try:
        cfg = Toy2DConfig(**sec)
    except (TypeError, ValueError) as e:  # Toy2DConfig's "toy2d: <field> <problem>", or a value of a wrong type
        msg = str(e).removeprefix("toy2d: ")
        field = msg.split()[0] if str(e).startswith("toy2d: ") else ""
        raise ConfigError([(f"toy2d.{field}" if field else "toy2d", msg[len(field):].strip(),
                            "correct the value in the params file (toys/toy2d/params.yaml has the defaults)")],
                          "toy2d") from None
    return cfg, seeds


def _save(net: torch.nn.Module, path: Path, **meta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, net.state_dict(), {k: json.dumps(v) for k, v in meta.items()})


def _load(cfg: Toy2DConfig, path: Path) -> torch.nn.Module:
    net = new_net(cfg)
    net.load_state_dict(load_safetensors(path))
    return net


def _pretrain(cfg: Toy2DConfig, out: Path) -> None:
    net, info = pretrain(toy_data(cfg), cfg)
    _save(net, out / "base" / f"seed{cfg.seed}.safetensors", steps=info["steps"])
    write_json(out / "base" / f"curve-seed{cfg.seed}.json", info)


def _ddo(cfg: Toy2DConfig, out: Path) -> None:
    base = _load(cfg, out / "base" / f"seed{cfg.seed}.safetensors")
    nets, info = ddo_search(base, toy_data(cfg), cfg)
    for r, net in enumerate(nets, 1):
        _save(net, out / "ddo" / f"seed{cfg.seed}-round{r}.safetensors", **info["chosen"])
    write_json(out / "ddo" / f"seed{cfg.seed}.json", info)


def _control(cfg: Toy2DConfig, out: Path) -> None:
    base, data = _load(cfg, out / "base" / f"seed{cfg.seed}.safetensors"), toy_data(cfg)
    info = {}
    for name, steps in (("steps", cfg.rounds * cfg.round_steps), ("compute", equal_compute_steps(cfg))):
        net, info[name] = control_search(base, data, cfg, steps)
        _save(net, out / "control" / f"seed{cfg.seed}-{name}.safetensors", lr=info[name]["lr"], steps=steps)
    write_json(out / "control" / f"seed{cfg.seed}.json", info)


def _rows(cfg: Toy2DConfig, out: Path) -> list[dict]:
    data = toy_data(cfg)
    rows = [{"model": "data", **data_row(data, cfg)},
            {"model": "base", **score(_load(cfg, out / "base" / f"seed{cfg.seed}.safetensors"), data, cfg)}]
    chosen = read_json(out / "ddo" / f"seed{cfg.seed}.json")["chosen"]
    for r in range(1, cfg.rounds + 1):
        net = _load(cfg, out / "ddo" / f"seed{cfg.seed}-round{r}.safetensors")
        rows.append({"model": f"ddo-round{r}", "note": f" (alpha {chosen['alpha']:g}, beta {chosen['beta']:g}, "
                     f"lr {chosen['lr']:g})", **score(net, data, cfg)})
    ctl = read_json(out / "control" / f"seed{cfg.seed}.json")
    for name, label in (("steps", "control-equal-steps"), ("compute", "control-equal-compute")):
        net = _load(cfg, out / "control" / f"seed{cfg.seed}-{name}.safetensors")
        rows.append({"model": label, "note": f" (lr {ctl[name]['lr']:g}, {ctl[name]['steps']} steps)",
                     **score(net, data, cfg)})
    return rows


def summary(per_seed: dict[int, list[dict]]) -> str:
    """One row per model: mean and min - max over training seeds of the (seed-range mean) NLL and off-mode mass."""
    seeds = list(per_seed)
    lines = [f"| model | NLL mean over training seeds {', '.join(map(str, seeds))} | NLL min – max | "
             "Δ NLL vs its seed's base: mean | Δ min – max | off-mode mass mean | off-mode min – max |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = [next(r["nll"] for r in per_seed[s] if r["model"] == "base") for s in seeds]
    for i, row in enumerate(per_seed[seeds[0]]):
        nll = [per_seed[s][i]["nll"] for s in seeds]
        off = [per_seed[s][i]["off_mode"] for s in seeds]
        d = [a - b for a, b in zip(nll, base)]
        delta = "– | –" if row["model"] in ("data", "base") else \
            f"{sum(d) / len(d):.3f} | {min(d):.3f} – {max(d):.3f}"
        lines.append(f"| {row['model']} | {sum(nll) / len(nll):.3f} | {min(nll):.3f} – {max(nll):.3f} | {delta} | "
                     f"{sum(off) / len(off):.4f} | {min(off):.4f} – {max(off):.4f} |")
    return "\n".join(lines) + "\n"


def _curve_md(cfg: Toy2DConfig, curves: dict[int, dict]) -> str:
    lines = [f"# toy2d: the base's exact NLL curve (curve latents {list(cfg.curve_seeds)}, {cfg.curve_n} samples "
             f"each; every {cfg.curve_every} steps at lr {cfg.pretrain_lr:g})\n",
             f"Plateau rule (M = {cfg.curve_window}): stop at the first evaluation where the mean NLL of the last M "
             "evaluations is lower than the mean of the M before by less than the seed noise (the mean, over the last "
             f"M evaluations, of the range across the curve latents); at most {cfg.pretrain_max_steps} steps. Then "
             f"{cfg.pretrain_cooldown} steps with the lr decayed linearly to 0: the base.\n"]
    for s, c in curves.items():
        lines.append(f"## training seed {s}: {c['constant_lr_steps']} steps at constant lr, "
                     + ("the rule held" if c["plateau"] else "**the rule never held (stopped at the step cap)**")
                     + f"; then {c['steps'] - c['constant_lr_steps']} cooldown steps (lr to 0)\n")
        lines.append("| step | NLL per curve latents | mean |\n|---:|---:|---:|")
        lines += [f"| {e['step']}{' (after the cooldown)' if e.get('cooldown') else ''} | "
                  f"{' / '.join(f'{v:.3f}' for v in e['nll'])} | {sum(e['nll']) / len(e['nll']):.3f} |"
                  for e in c["curve"]]
        lines.append("")
    return "\n".join(lines)


def _table(cfg: Toy2DConfig, seeds: list[int], out: Path, results: Path) -> None:
    t0 = time.time()
    per_seed, curves, choices = {}, {}, {}
    for s in seeds:
        c = dataclasses.replace(cfg, seed=s)
        per_seed[s] = _rows(c, out)
        curves[s] = read_json(out / "base" / f"curve-seed{s}.json")
        choices[s] = {"ddo": read_json(out / "ddo" / f"seed{s}.json"),
                      "control": read_json(out / "control" / f"seed{s}.json")}
    thm = [theorem33_check(b, n=cfg.theorem33_n, steps=cfg.theorem33_steps) for b in (0.5, 1.0, 2.0)]
    search = ("## Hyperparameters picked by the selection latents (seed "
              f"{cfg.selection_seed}, {cfg.n_select} samples)\n\n| training seed | base steps (plateau rule held) | "
              "DDO (alpha, beta, lr) | control lr, equal steps | control lr, equal compute |\n|---:|---|---|---|---|\n"
              + "".join(f"| {s} | {curves[s]['constant_lr_steps']} "
                        f"({'yes' if curves[s]['plateau'] else 'no: step cap'}) + {cfg.pretrain_cooldown} cooldown | "
                        f"{ch['ddo']['chosen']['alpha']:g}, {ch['ddo']['chosen']['beta']:g}, "
                        f"{ch['ddo']['chosen']['lr']:g} | {ch['control']['steps']['lr']:g} | "
                        f"{ch['control']['compute']['lr']:g} |\n" for s, ch in choices.items()))
    thm_text = ("## Theorem 3.3 fixed point (exact log-likelihoods, mode weights free; "
                f"{cfg.theorem33_n} real + {cfg.theorem33_n} fake, {cfg.theorem33_steps} Adam steps)\n\n"
                "| beta | alpha = Z^beta | fitted weights | predicted w_ref^(1-1/beta) w_data^(1/beta) / Z | "
                "max abs diff |\n|---:|---:|---|---|---:|\n" + "".join(
                    f"| {r['beta']:g} | {r['alpha']:.4f} | {' '.join(f'{w:.3f}' for w in r['fitted'])} | "
                    f"{' '.join(f'{w:.3f}' for w in r['predicted'])} | {r['max_abs_diff']:.4f} |\n" for r in thm))
    head = (f"# toy2d (`dvc repro toys/toy2d/dvc.yaml`; {platform.machine()} CPU, torch {torch.__version__})\n\n"
            f"Config: {dataclasses.replace(cfg, seed=seeds[0])} (training seeds {seeds}). DDO: {cfg.rounds} rounds "
            f"of {cfg.round_steps} steps; the control: {cfg.rounds * cfg.round_steps} steps (equal steps) and "
            f"{equal_compute_steps(cfg)} steps (equal compute, network passes counted). Scores: {cfg.n_eval} samples "
            f"on each of the evaluation latents {list(cfg.eval_seeds)}.\n\n## Over training seeds\n\n")
    per_text = "\n".join(f"### training seed {s}\n\n{render_table(rows, dataclasses.replace(cfg, seed=s))}"
                         for s, rows in per_seed.items())
    table = (head + summary(per_seed) + "\n" + search + "\n" + thm_text
             + "\n## Per training seed (each evaluation seed range)\n\n" + per_text)
    results.mkdir(parents=True, exist_ok=True)
    write_text(results / "curve.md", _curve_md(cfg, curves))
    write_json(results / "metrics.json", {"config": {**dataclasses.asdict(cfg), "seed": None}, "seeds": seeds,
                                          "runs": {str(s): rows for s, rows in per_seed.items()},
                                          "choices": {str(s): ch for s, ch in choices.items()},
                                          "curves": {str(s): c for s, c in curves.items()}, "theorem33": thm,
                                          "table_stage_s": round(time.time() - t0, 1)})
    write_text(results / "table.md", table)
    print(summary(per_seed), end="")


STAGES = ("pretrain", "ddo", "control", "table")


def _one(stage: str, cfg: Toy2DConfig, out: Path) -> None:
    torch.set_num_threads(1)
    {"pretrain": _pretrain, "ddo": _ddo, "control": _control}[stage](cfg, out)


def run_stage(stage: str, params: Path, results: Path | None = None, workers: int = 1) -> None:
    """Run ``stage`` for every training seed of ``params``, ``workers`` seeds at a time (processes; the numbers do
    not depend on it); outputs go to ``out/`` beside it (``table``: also ``results``, default ``out/results``)."""
    cfg, seeds = load_params(params)
    out = Path(params).resolve().parent / "out"
    torch.set_num_threads(1)
    if stage == "table":
        _table(cfg, seeds, out, results or out / "results")
        return
    jobs = [(stage, dataclasses.replace(cfg, seed=s), out) for s in seeds]
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            _one(*job)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch's thread pools
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
        for f in [pool.submit(_one, *job) for job in jobs]:
            f.result()
