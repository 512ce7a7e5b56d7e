"""Config: presets, params.yaml, overrides, and a table of bad inputs (clear error, exit code 2, nothing written)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from repro.cli import main
from repro.config import STAGE_PARAMS, ConfigError, config_from_dict, load_config, preset_dict, preset_names, stage_dict

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
    assert plan["n_samples"] == 50000 and plan["reduce"] == "min" and plan["nfe"] == 35
    assert plan["seed_ranges"] == [[0, 50000], [50000, 100000], [100000, 150000]]
    assert plan["label_mode"] == "random" and plan["reference"].endswith("cifar10-32x32.npz")
    assert list(tmp_path.iterdir()) == []


def test_seed_range_reduction_follows_the_protocol():
    from repro.catalog.protocols import PROTOCOLS
    from repro.pipeline.stages.fid import reduce_values

    assert reduce_values([2.0, 1.0, 3.0], "min") == 1.0 and reduce_values([2.0, 1.0, 3.0], "mean") == 2.0
    assert PROTOCOLS["edm-cifar10-fid50k"].reduce == "min" and PROTOCOLS["tiny-fd-digits"].reduce == "mean"
    with pytest.raises(ValueError):
        reduce_values([1.0], "median")
