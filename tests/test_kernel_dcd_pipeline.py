"""Kernel guidance and DCD as guidance variants through the stages (data, fakes, discriminator, guided) on the micro
preset, without DVC: what each stage writes for them, their settings' refusals, and the CIFAR-10 presets' dry runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

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


def test_stages_make_kernel_and_dcd_samples_on_the_micro_preset(tmp_path, base, monkeypatch):
    """data -> fakes -> discriminator -> guided with base+kernel and base+dcd: the kernel writes no discriminator,
    DCD's critic is trained and written; both guided models are published with their settings, and differ from
    the unguided images (the same seeds through the sample stage's sampler)."""
    monkeypatch.setenv("REPRO_TRACKING", "off")
    cfg = _cfg("micro", "guidance.evaluate=[base+kernel, base+dcd]", "guidance.fakes=32", "sample.n_samples=8",
               "sample.repeats=1", "sample.batch=8", "sample.shard_size=8", "ddo.control=false",
               "dcd.critic_steps=4", "dcd.batch=8", "dcd.steps=5", "dcd.step_size=0.05", "kernel.max_bank=32",
               "kernel.w=3.0")
    paths = Paths.of(cfg, tmp_path)
    paths.base.parent.mkdir(parents=True)
    shutil.copy(base, paths.base)
    for stage in (data_stage, fakes_stage, disc_stage, guided_stage):
        stage.run(cfg, paths, progress=False)
    index = json.loads(paths.discriminators_index.read_text())["discriminators"]
    assert index["base+kernel"]["source"] == "closed-form" and not paths.discriminator("base+kernel").exists()
    assert index["base+dcd"]["objective"] == "wgan-gp" and paths.discriminator("base+dcd").is_file()
    records, shards = guided_stage.guided_shards(cfg, paths)
    assert set(records) == {"base+kernel", "base+dcd"}
    assert records["base+kernel"]["banks"]["fake"] == "fakes/base" and records["base+kernel"]["guidance"]["w"] == 3.0
    assert records["base+dcd"]["guidance"]["steps"] == 5
    for r in records.values():  # what the fid stage reads of each guided model
        assert {"model", "variant", "method", "generator", "guidance", "discriminator_sha256",
                "discriminator_info"} <= set(r)
    # the unguided images of the same seeds
    from repro.sampling.shards import plan_shards, run_shard

    plain = plan_shards({"base": paths.base}, cfg.sample, cfg.sampler, tmp_path / "plain")
    for s in plain:
        run_shard(s, cfg.sampler, cfg.sample.batch, False, "cpu")
    ref = load_npz(plain[0].out)["images"]
    for name in ("base+kernel", "base+dcd"):
        (s,) = [s for s in shards if s.model == name]
        imgs = load_npz(s.out)["images"]
        assert imgs.shape == ref.shape and imgs.dtype == np.uint8
        assert not np.array_equal(imgs, ref), name
    # the kernel correction the stage builds is the settings' one
    corr, _ = guided_stage._correction_and_extras(cfg, paths, G.guided_models(cfg, paths)[0], "cpu")
    assert isinstance(corr, KernelGuidance) and corr.w == 3.0 and corr.critic.real.shape == (32, 64)


@pytest.mark.parametrize("preset", ["kernel-cifar10-uncond", "dcd-cifar10-uncond"])
def test_cifar10_presets_dry_run_with_plan_protocol_and_cost(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    plans = {}
    for stage in ("fakes", "discriminator", "guided", "fid"):
        r = runner.invoke(main, [stage, "--preset", preset, "--dry-run"])
        assert r.exit_code == 0, r.output
        plans[stage] = yaml.safe_load(r.output.split("# would do:\n")[1])["plan"]
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert plans["fid"]["protocol"]["n_samples"] == 50000 and plans["fid"]["protocol"]["nfe"] == 35
    assert plans["guided"]["evaluation_protocol"] == plans["fid"]["protocol"]["name"]
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


def test_the_tiny_preset_has_kernel_and_dcd_beside_dg():
    cfg = load_config(preset="guidance-tiny")
    assert {"base+dg", "base+kernel", "base+dcd"} <= set(cfg.guidance.evaluate)
    assert torch.is_tensor(torch.zeros(1))
