"""Config: presets, params.yaml, overrides, and a table of bad inputs (clear error, exit code 2, nothing written)."""

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from repro.cli import main
from repro.config import STAGE_PARAMS, ConfigError, apply_overrides, config_from_dict, load_config, preset_dict, preset_names, stage_dict

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_tiny_preset():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load(
        yaml.safe_dump(preset_dict("tiny")))
    assert load_config(ROOT / "params.yaml") == load_config(preset="tiny")


def test_every_preset_validates():
    assert {"tiny", "micro"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(preset=name)
        assert cfg.preset == name


def test_config_is_frozen_and_typed():
    cfg = load_config(preset="tiny")
    with pytest.raises(Exception):
        cfg.ddo.beta = 1.0
    assert isinstance(cfg.ddo.lr, float) and isinstance(cfg.pretrain.network.channel_mult, tuple)


def test_overrides_and_yaml_1_1_floats():
    cfg = load_config(preset="tiny", overrides=["ddo.beta=0.05", "ddo.lr=5e-5", "pretrain.network.dropout=0.1"])
    assert cfg.ddo.beta == 0.05 and cfg.ddo.lr == 5e-5 and cfg.pretrain.network.dropout == 0.1


def test_dvc_yaml_declares_exactly_the_params_each_stage_reads():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = {name: tuple(stage.get("params", [])) for name, stage in dvc["stages"].items()}
    assert declared == STAGE_PARAMS


def test_stage_dict_selects_dotted_keys():
    d = stage_dict(load_config(preset="tiny"), "ddo")
    assert set(d) == {"ddo", "sampler", "pretrain", "extractor"}
    assert d["pretrain"] == {"sigma_data": 0.5} and d["extractor"] == {"kind": "digits-classifier"}


def _set(raw, dotted, value):
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()

BAD = [
    # (dotted key, value, field named in the message, words in the message)
    ("ddo.beta", -1.0, "ddo.beta", "must be > 0"),
    ("ddo.beta", "abc", "ddo.beta", "must be a number"),
    ("ddo.batch", 12.5, "ddo.batch", "must be an integer"),
    ("ddo.control", 3, "ddo.control", "true or false"),
    ("ddo.colour", 1, "ddo.colour", "unknown key"),
    ("pretrain.lr", DELETE, "pretrain.lr", "is missing"),
    ("pretrain.network.precond", "ve", "pretrain.network.precond", "must be one of"),
    ("pretrain.network.channel_mult", 2, "pretrain.network.channel_mult", "must be a list"),
    ("pretrain.network.dropout", 1.5, "pretrain.network.dropout", "must be < 1"),
    ("data.dataset", "mnist", "data.dataset", "must be one of"),
    ("data.holdout", -0.1, "data.holdout", "must be >= 0"),
    ("data.holdout", 1.0, "data.holdout", "must be < 1"),
    ("data.holdout", 0.0001, "data.holdout", "holds out 0"),  # a fraction of the 1,797 digits that holds none out
    ("sampler.sigma_max", 0.001, "sampler.sigma_max", "sigma_min"),
    ("sample.first_seed", 50000, "sample.first_seed", "overlap"),
    ("ddo.eval_every_nimg", 10**9, "ddo.eval_every_nimg", "nimg_per_round"),
    ("sample", "all", "sample", "must be a mapping"),
]


@pytest.mark.parametrize("key,value,field,words", BAD, ids=[f"{b[0]}={b[1] if b[1] is not DELETE else 'deleted'}"
                                                             for b in BAD])
def test_bad_params_give_a_clear_error_exit_2_and_write_nothing(tmp_path, key, value, field, words):
    raw = preset_dict("tiny")
    _set(raw, key, value)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert field in str(e.value) and words in str(e.value) and "Fix:" in str(e.value)
    result = CliRunner().invoke(main, ["data", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert field in result.output and "Fix:" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_missing_params_file_and_bad_yaml(tmp_path):
    r = CliRunner().invoke(main, ["pretrain", "--params", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "file not found" in r.output and "repro params --preset tiny" in r.output
    bad = tmp_path / "params.yaml"
    bad.write_text("ddo: [unclosed\n")
    r = CliRunner().invoke(main, ["pretrain", "--params", str(bad)])
    assert r.exit_code == 2 and "not valid YAML" in r.output
    r = CliRunner().invoke(main, ["ddo", "--preset", "nonexistent"])
    assert r.exit_code == 2 and "unknown preset" in r.output and "tiny" in r.output
    r = CliRunner().invoke(main, ["ddo", "--preset", "tiny", "--set", "ddo.beta"])
    assert r.exit_code == 2 and "section.key=value" in r.output


def test_missing_input_is_a_clear_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(preset_dict("micro")))
    r = CliRunner().invoke(main, ["ddo", "--params", str(params)], env={"REPRO_TRACKING": "off"})
    assert r.exit_code == 2 and "digits.npz not found" in r.output and "dvc repro" in r.output


def test_dry_run_prints_the_resolved_stage_params_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(preset_dict("tiny")))
    r = CliRunner().invoke(main, ["ddo", "--params", str(params), "--dry-run", "--set", "ddo.beta=0.07"])
    assert r.exit_code == 0
    printed = yaml.safe_load(r.output)
    assert printed["ddo"]["beta"] == 0.07 and printed["sampler"] == stage_dict(load_config(preset="tiny"), "ddo")["sampler"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    raw = preset_dict("tiny")
    raw["ddo"]["beta"] = "high"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = subprocess.run([sys.executable, "-m", "repro.cli", "ddo"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "REPRO_TRACKING": "off"})
    assert p.returncode == 2
    assert "ddo.beta" in p.stderr and "Traceback" not in p.stderr + p.stdout


def test_a_paper_protocol_fixes_the_evaluation_settings():
    with pytest.raises(ConfigError) as e:
        load_config(preset="cifar10-cond", overrides=["sample.n_samples=10000"])
    assert "sample.n_samples" in str(e.value) and "ddo-cifar10-fid50k" in str(e.value)
    assert "sample.protocol: custom" in str(e.value)
    with pytest.raises(ConfigError, match="sampler.num_steps"):
        load_config(preset="imagenet64-s", overrides=["sampler.num_steps=18"])
    cfg = load_config(preset="cifar10-cond", overrides=["sample.n_samples=10000", "sample.protocol=custom"])
    assert cfg.sample.n_samples == 10000


def test_fid_dry_run_prints_the_papers_protocol(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["fid", "--preset", "cifar10-cond", "--dry-run"])
    assert r.exit_code == 0, r.output
    plan = yaml.safe_load(r.output)["plan"]["protocol"]
    # DDO's own evaluation: one range of seeds 0-49999 (its README), not EDM's minimum of three
    assert plan["name"] == "ddo-cifar10-fid50k" and plan["n_samples"] == 50000 and plan["nfe"] == 35
    assert plan["seed_ranges"] == [[0, 50000]]
    assert plan["label_mode"] == "random" and plan["reference"].endswith("cifar10-32x32.npz")
    assert list(tmp_path.iterdir()) == []


def test_seed_range_reduction_follows_the_protocol():
    from repro.catalog.protocols import PROTOCOLS
    from repro.pipeline.stages.fid import reduce_values

    assert reduce_values([2.0, 1.0, 3.0], "min") == 1.0 and reduce_values([2.0, 1.0, 3.0], "mean") == 2.0
    assert PROTOCOLS["edm-cifar10-fid50k"].reduce == "min" and PROTOCOLS["tiny-fd-digits"].reduce == "mean"
    with pytest.raises(ValueError):
        reduce_values([1.0], "median")


# The config's problems are pydantic's errors said in params terms: one line per kind of error (field, problem, fix).
def _drop(*path):
    return lambda raw: _set(raw, ".".join(path), DELETE)


PROBLEMS = [
    (["ddo.batch=true"], "ddo.batch: must be an integer, got True. Fix: write a whole number such as 128."),
    (["ddo.batch=12.5"], "ddo.batch: must be an integer, got 12.5. Fix: write a whole number such as 128."),
    (["ddo.batch='128'"], "ddo.batch: must be an integer, got '128'. Fix: write a whole number such as 128."),
    (["ddo.lr=true"], "ddo.lr: must be a number, got True. Fix: write a number such as 0.05."),
    (["ddo.lr=fast"], "ddo.lr: must be a number, got 'fast'. Fix: write a number such as 0.05."),
    (["pretrain.P_mean=.nan"], "pretrain.P_mean: is NaN. Fix: write a number."),
    (["ddo.control=1"], "ddo.control: must be true or false, got 1. Fix: write true or false."),
    (["data.mirror=5"], "data.mirror: must be a string, got 5. Fix: quote it."),
    (["pretrain.network.precond=ve"], "pretrain.network.precond: must be one of edm, vp, edm2, var; got 've'. "
                                      "Fix: set pretrain.network.precond to one of edm, vp, edm2, var."),
    (["pretrain.network.precond=1"], "pretrain.network.precond: must be a string, got 1. Fix: quote it."),
    (["pretrain.network.channel_mult=2"], "pretrain.network.channel_mult: must be a list of int, got 2. "
                                          "Fix: write it as [a, b, ...]."),
    (["pretrain.network.channel_mult=!!set {1: null}"], "pretrain.network.channel_mult: must be a list of int, got {1}. "
                                                        "Fix: write it as [a, b, ...]."),
    (["pretrain.network.channel_mult=[1, x]"], "pretrain.network.channel_mult[1]: must be an integer, got 'x'. "
                                               "Fix: write a whole number such as 128."),
    (["sample=all"], "sample: must be a mapping of SampleConfig fields, got 'all'. "
                     "Fix: write 'sample:' followed by its indented keys."),
    (["launcher.resources.extra=[1]"], "launcher.resources.extra: must be a mapping of names to values, got [1]. "
                                       "Fix: write 'launcher.resources.extra:' followed by indented 'name: value' lines, or {}."),
    (["launcher.resources.extra={1: 2}"], "launcher.resources.extra: must be a mapping of names to values, got {1: 2}. "
                                          "Fix: write 'launcher.resources.extra:' followed by indented 'name: value' lines, or {}."),
    (["ddo.beta=-1"], "ddo.beta: must be > 0, got -1.0. Fix: set ddo.beta > 0."),
    (["sampler.num_steps=1"], "sampler.num_steps: must be >= 2, got 1. Fix: set sampler.num_steps >= 2."),
    (["pretrain.network.dropout=1"], "pretrain.network.dropout: must be < 1, got 1.0. Fix: set pretrain.network.dropout < 1."),
    (["data.colour=1"], "data.colour: unknown key. Fix: remove it, or use one of: dataset, source, shard_size, "
                        "workers, mirror, holdout, holdout_seed."),
    (lambda raw: raw["data"].__setitem__(5, 1), "data.5: unknown key. Fix: remove it, or use one of: dataset, source, "
                                                "shard_size, workers, mirror, holdout, holdout_seed."),
    (_drop("pretrain", "lr"), "pretrain.lr: is missing. Fix: add 'lr:' under 'pretrain' "
                              "(see `repro params --preset tiny` for a complete file)."),
    (_drop("ddo"), "ddo: is missing. Fix: add 'ddo:' under 'the top level' (see `repro params --preset tiny` for a complete file)."),
    # a section's rule names its field from the section's place on; a stage's resources are named from launcher on
    (["sampler.sigma_max=0.001"], "sampler.sigma_max: must be > sampler.sigma_min (0.002). "
                                  "Fix: raise sampler.sigma_max (EDM uses 80)."),
    (["pretrain.curve_every_nimg=0", "pretrain.plateau_window=3"],
     "pretrain.plateau_window: is 3, but the plateau rule needs a curve and curve_every_nimg is 0. "
     "Fix: set pretrain.curve_every_nimg > 0, or pretrain.plateau_window: 0."),
    (["pretrain.curve_every_nimg=1000"], "pretrain.curve_every_nimg: is 1000, not a multiple of pretrain.batch 128. "
                                         "Fix: set pretrain.curve_every_nimg to a multiple of 128."),
    (["launcher.resources.tasks_per_node=2", "launcher.resources.gpus_per_node=4"],
     "launcher.resources.tasks_per_node: is 2 with 4 GPUs per node; each rank drives one GPU. "
     "Fix: set tasks_per_node: 0 (one per GPU) or equal to gpus_per_node."),
    (["launcher.stages={ddo: {tasks_per_node: 2, gpus_per_node: 4}}"],
     "launcher.stages.ddo.tasks_per_node: is 2 with 4 GPUs per node; each rank drives one GPU. "
     "Fix: set tasks_per_node: 0 (one per GPU) or equal to gpus_per_node."),
    (["launcher.stages={ddo: {nodes: 0}}"], "launcher.stages.ddo.nodes: must be >= 1, got 0. Fix: set launcher.stages.ddo.nodes >= 1."),
    (["ddo.sweep_beta=[.nan]"], "ddo.sweep_beta[0]: must be > 0, got nan. "
                                "Fix: give positive values, e.g. ddo.sweep_beta: [0.1, 0.3], or [] for no sweep."),
    # a rule across sections (Config's)
    (["sample.first_seed=50500"], "sample.first_seed: the sample seeds [50500, 54094) overlap the ddo selection seeds "
                                  "[50000, 51000); selection must use other seeds than the final evaluation. "
                                  "Fix: move sample.first_seed or ddo.selection_first_seed so the ranges are disjoint."),
]


@pytest.mark.parametrize("change,line", PROBLEMS, ids=[str(p[0]) if isinstance(p[0], list) else p[1].split(":")[0] + " (raw)"
                                                       for p in PROBLEMS])
def test_each_kind_of_problem_names_the_field_the_problem_and_the_fix(change, line):
    raw = preset_dict("tiny")
    raw = apply_overrides(raw, change) if isinstance(change, list) else (change(raw) or raw)
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "src")
    assert f"src: {line}" in str(e.value).splitlines(), str(e.value)


def test_all_problems_of_the_fields_and_the_sections_rules_come_together():
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=["ddo.beta=-1", "ddo.lr=-2", "ddo.colour=1", "pretrain.batch=0",
                                               "sampler.sigma_max=0.001", "launcher.stages={training: {}}"])
    fields = [p[0] for p in e.value.problems]
    assert sorted(fields) == ["ddo.beta", "ddo.colour", "ddo.lr", "launcher.stages.training", "pretrain.batch",
                              "sampler.sigma_max"]
    with pytest.raises(ConfigError) as e:  # the rules across sections: every one of them
        load_config(preset="tiny", overrides=["ddo.fake_first_seed=0", "metrics.extra=[fid]"])
    assert [p[0] for p in e.value.problems] == ["metrics.extra[0]", "ddo.fake_first_seed", "ddo.fake_first_seed"]


def test_values_are_taken_as_today_yaml_1_1_floats_whole_floats_lists():
    cfg = load_config(preset="tiny", overrides=["ddo.lr=5e-5", "ddo.beta=1", "ddo.batch=64.0", "ddo.sweep_beta=[1, 2e-1]",
                                                "launcher.bind=[/a, /b]"])
    assert cfg.ddo.lr == 5e-5 and type(cfg.ddo.lr) is float  # YAML 1.1 reads 5e-5 as a string
    assert type(cfg.ddo.beta) is float and cfg.ddo.batch == 64 and type(cfg.ddo.batch) is int
    assert cfg.ddo.sweep_beta == (1.0, 0.2) and all(type(v) is float for v in cfg.ddo.sweep_beta)
    assert cfg.launcher.bind == ("/a", "/b")
    assert cfg.sampler.S_max == float("inf")  # .inf is a number (only NaN is refused)


def test_sections_are_frozen_dataclasses_checked_on_replace_and_picklable():
    cfg = load_config(preset="tiny")
    assert dataclasses.is_dataclass(cfg) and [f.name for f in dataclasses.fields(cfg.data)] == [
        "dataset", "source", "shard_size", "workers", "mirror", "holdout", "holdout_seed"]
    assert dataclasses.replace(cfg.ddo, beta=0.3).beta == 0.3 and cfg.ddo.beta == 0.2
    with pytest.raises(ValueError, match="greater than 0"):  # pydantic's ValidationError (a ValueError)
        dataclasses.replace(cfg.ddo, beta=-1.0)
    with pytest.raises(ValueError, match="sampler.guidance is 2.0"):  # a section's rule, also on replace
        dataclasses.replace(cfg.sampler, guidance=2.0)
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(cfg.sampler) == hash(dataclasses.replace(cfg.sampler))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sampler.num_steps = 3


def test_the_error_translation_covers_le_bounds_and_unknown_errors():
    """Kinds no params field has today: an upper bound <=, and an error the translation does not know (said as
    pydantic says it, never a crash)."""
    from typing import Annotated

    from pydantic import Field, model_validator
    from pydantic.dataclasses import dataclass

    from repro.config.errors import validate
    from repro.config.schema import FORBID, Int

    @dataclass(frozen=True, kw_only=True, config=FORBID)
    class Toy:
        k: Int = Field(le=3)
        v: Annotated[int, Field(multiple_of=2)] = 0

        @model_validator(mode="after")
        def _odd(self):
            if self.k == 2:
                raise ValueError("two is taken")
            return self

    with pytest.raises(ConfigError) as e:
        validate(Toy, {"k": 4}, ("toy",))
    assert str(e.value) == "params: toy.k: must be <= 3, got 4. Fix: set toy.k <= 3."
    with pytest.raises(ConfigError) as e:
        validate(Toy, {"k": 1, "v": 3}, ("toy",))
    assert str(e.value) == ("params: toy.v: Input should be a multiple of 2. Fix: see `repro params --preset tiny`.")
    with pytest.raises(ConfigError) as e:
        validate(Toy, {"k": 2})
    assert str(e.value) == "params: (top level): Value error, two is taken. Fix: see `repro params --preset tiny`."


def test_every_name_imported_from_repro_config_is_exported():
    import ast

    import repro.config

    names = set()
    for folder in ("repro", "tests", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "repro.config":
                    names |= {a.name for a in node.names}
    assert names and names <= set(repro.config.__all__), names - set(repro.config.__all__)
    assert all(hasattr(repro.config, n) for n in repro.config.__all__)
