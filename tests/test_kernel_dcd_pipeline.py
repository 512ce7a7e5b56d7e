"""Kernel guidance and DCD as guidance variants through the stages (data, fakes, discriminator, guided) on the micro
preset, without DVC: what each stage writes for them, their settings' refusals, and the CIFAR-10 presets' dry runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import guided_dry_run_plans
from repro.cli import main
from repro.config import ConfigError, load_config
from repro.methods import guidance as G
from repro.methods.kernel import KernelGuidance
from repro.pipeline.stages import data as data_stage
from repro.pipeline.stages import discriminator as disc_stage
from repro.pipeline.stages import fakes as fakes_stage
from repro.pipeline.stages import guided as guided_stage
from repro.storage.files import load_npz
from repro.storage.layout import Paths


def _cfg(preset="micro", *sets):
    return load_config(preset=preset, overrides=list(sets))


def test_the_new_variants_are_in_the_framework(tmp_path):
    assert G.VARIANTS["kernel"].objective is None and G.VARIANTS["dcd"].objective == "wgan-gp"
    cfg = _cfg("micro", "guidance.evaluate=[base+kernel, last+dcd]")
    gms = G.guided_models(cfg, Paths.of(cfg, tmp_path))
    assert [g.name for g in gms] == ["base+kernel", "ddo-round2+dcd"]
    assert [G.needs_fakes(cfg, g) for g in gms] == [True, True]         # both read their model's fake bank
    assert [G.needs_training(cfg, g) for g in gms] == [False, True]     # the kernel critic is closed-form
    with pytest.raises(ValueError, match="not a discriminator correction"):
        G.build_correction(gms[0].variant, cfg.kernel, cfg.sampler, None)


@pytest.mark.parametrize("sets, words", [
    (["kernel.tau_min=0.5", "kernel.tau_max=0.2"], "kernel.tau_min: is above kernel.tau_max"),
    (["kernel.kernel=imq"], "kernel.kernel"),
    (["kernel.where=clean"], "kernel.where"),
    (["dcd.step_size=-1"], "dcd.step_size"),
    (["dcd.temperature=0"], "dcd.temperature"),
])
def test_bad_kernel_and_dcd_settings_name_the_field(sets, words):
    with pytest.raises(ConfigError) as e:
        _cfg("micro", *sets)
    assert words in str(e.value)


def test_a_bad_setting_on_the_command_line_is_one_error_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["guided", "--preset", "micro", "--set", "kernel.w=-1", "--dry-run"])
    assert r.exit_code == 2 and "error:" in r.output and "kernel.w" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_one_run_measures_base_kernel_and_dcd_on_the_same_seeds(tmp_path, base, monkeypatch):
    """Every stage in order (data, extractor, ddo, sample, fakes, discriminator, guided, fid, table; the pretrained
    base from conftest) on the micro preset with base+kernel and base+dcd: the kernel writes no discriminator, DCD's
    critic is trained and written, both guided models are sampled on the evaluation's seeds (differing from the
    unguided images there) and measured beside the base in one table."""
    from repro.evaluation.tables.data import read_result
    from repro.pipeline.stages import ddo as ddo_stage
    from repro.pipeline.stages import extractor as extractor_stage
    from repro.pipeline.stages import fid as fid_stage
    from repro.pipeline.stages import sample as sample_stage
    from repro.pipeline.stages import table as table_stage

    monkeypatch.setenv("REPRO_TRACKING", "off")
    cfg = _cfg("micro", "guidance.evaluate=[base+kernel, base+dcd]", "guidance.fakes=32", "sample.n_samples=16",
               "ddo.rounds=0", "ddo.control=false", "ddo.sweep_alpha=[]", "ddo.sweep_beta=[]",
               "dcd.critic_steps=4", "dcd.batch=8", "dcd.steps=5", "dcd.step_size=0.05", "kernel.max_bank=32",
               "kernel.w=0.3")
    paths = Paths.of(cfg, tmp_path)
    paths.base.parent.mkdir(parents=True)
    shutil.copy(base, paths.base)
    for stage in (data_stage, extractor_stage, ddo_stage, sample_stage, fakes_stage, disc_stage, guided_stage,
                  fid_stage, table_stage):
        stage.run(cfg, paths, progress=False)
    index = json.loads(paths.discriminators_index.read_text())["discriminators"]
    assert index["base+kernel"]["source"] == "closed-form" and not paths.discriminator("base+kernel").exists()
    assert index["base+dcd"]["objective"] == "wgan-gp" and paths.discriminator("base+dcd").is_file()
    records, shards = guided_stage.guided_shards(cfg, paths)
    assert set(records) == {"base+kernel", "base+dcd"}
    assert records["base+kernel"]["banks"]["fake"] == "fakes/base" and records["base+kernel"]["guidance"]["w"] == 0.3
    assert records["base+dcd"]["guidance"]["steps"] == 5
    # the same seeds as the unguided model's shards, other images
    for name in ("base+kernel", "base+dcd"):
        mine = sorted((s for s in shards if s.model == name), key=lambda s: s.lo)
        for s in mine:
            ref = load_npz(paths.samples / "base" / s.out.name)
            got = load_npz(s.out)
            assert np.array_equal(got["seeds"], ref["seeds"]) and got["images"].dtype == np.uint8
            assert not np.array_equal(got["images"], ref["images"]), name
    # one result: the base and both guided models, each on both seed ranges
    result = read_result(paths.results)
    models = {m["name"]: m for m in result["models"]}
    assert set(models) == {"base", "base+kernel", "base+dcd"}
    assert all(len(m["values"]) == 2 and np.isfinite(m["value"]) for m in models.values())
    assert models["base+kernel"]["guided"]["discriminator"] == {"source": "closed-form"}
    assert models["base+dcd"]["note"] == "DCD on base (5 Langevin steps)"
    table = paths.table.read_text()
    assert "| base+kernel |" in table and "| base+dcd |" in table
    # the kernel correction the stage builds is the settings' one
    corr, _ = guided_stage._correction_and_extras(cfg, paths, G.guided_models(cfg, paths)[0], "cpu")
    assert isinstance(corr, KernelGuidance) and corr.w == 0.3 and corr.critic.real.shape == (32, 64)


@pytest.mark.parametrize("preset", ["kernel-cifar10-uncond", "dcd-cifar10-uncond"])
def test_cifar10_presets_dry_run_with_plan_protocol_and_cost(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(tmp_path)
    plans = guided_dry_run_plans(tmp_path, preset)
    assert plans["fakes"]["cost"]["images"] == 50000          # both read the base model's fake bank
    (gm,) = plans["guided"]["guided_models"]
    cost = plans["guided"]["cost"]
    assert cost["images"] == 50000 and cost["network_evaluations_per_image"] == 35
    if preset.startswith("kernel"):
        assert gm["variant"] == "kernel" and gm["discriminator"].startswith("none: closed-form")
        assert cost["kernel_image_pairs"] > 0 and plans["discriminator"]["cost"]["trained"] == 0
    else:
        assert gm["variant"] == "dcd" and cost["dcd_langevin_critic_gradients"] == 50000 * gm["sampler"]["steps"]
        assert plans["discriminator"]["cost"]["dcd_critic_images"] > 0


def test_the_tiny_preset_has_kernel_and_dcd_beside_dg_and_ddo():
    cfg = load_config(preset="guidance-tiny")
    assert {"base+dg", "base+dg-improved", "last+dg", "base+kernel", "base+dcd"} == set(cfg.guidance.evaluate)
    assert cfg.ddo.rounds > 0


def test_paper_tables_print_dcd_rows_and_say_the_kernel_paper_has_none():
    r = CliRunner().invoke(main, ["table", "--paper", "dcd"])
    assert r.exit_code == 0 and "21.67" in r.output and "16.24" in r.output and "SN-GAN" in r.output
    r = CliRunner().invoke(main, ["table", "--paper", "ipm_kernel"])
    assert r.exit_code == 0 and "No result numbers" in r.output
