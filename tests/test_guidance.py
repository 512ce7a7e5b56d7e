"""The guidance framework (repro/methods/guidance.py) and its stages (fakes, discriminator, guided), without DVC:
settings and their refusals, guidance off doing nothing, the guided stage's images equal to the sample stage's at
w = 0 (the same seeds, labels and sampler), DG's released files through a local mirror, and the dry runs' plan,
protocol and cost. The whole pipeline through `dvc repro` is tests/test_guidance_pipeline.py."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import guided_dry_run_plans
from repro.catalog import registry
from repro.config import GUIDANCE_VARIANTS, ConfigError, load_config
from repro.methods import guidance as G
from repro.nets.adm import TINY_EXTRACTOR, EncoderUNet, tiny_head
from repro.nets.discriminators import (ADMDiscriminator, EncoderDiscriminator, encoder_config, load_discriminator,
                                       save_discriminator)
from repro.pipeline.stages import discriminator as disc_stage
from repro.pipeline.stages import fakes as fakes_stage
from repro.pipeline.stages import guided as guided_stage
from repro.pipeline.tracking import NullTracker
from repro.sampling.shards import plan_shards, sample_models
from repro.storage.files import load_npz, write_json
from repro.storage.layout import Paths


def _cfg(preset="micro", *sets):
    return load_config(preset=preset, overrides=list(sets))


def test_the_variants_are_the_configs():
    assert tuple(G.VARIANTS) == GUIDANCE_VARIANTS
    assert {v.objective for v in G.VARIANTS.values()} == {"bce", "mse", "wgan-gp", None}


def test_guided_models_resolve_last_and_say_what_they_need(tmp_path):
    cfg = _cfg("micro", "guidance.evaluate=[base+dg, last+dg-improved, control-round1+dg]")
    gms = G.guided_models(cfg, Paths.of(cfg, tmp_path))
    assert [g.name for g in gms] == ["base+dg", "ddo-round2+dg-improved", "control-round1+dg"]
    assert [g.path.name for g in gms] == ["base.safetensors", "ddo-round2.safetensors", "control-round1.safetensors"]
    assert [G.needs_fakes(cfg, g) for g in gms] == [True, False, True]      # the improved objective reads no fakes
    assert all(G.needs_training(cfg, g) for g in gms)
    assert list(G.fake_models(cfg, Paths.of(cfg, tmp_path))) == ["base", "control-round1"]
    no_rounds = _cfg("micro", "ddo.rounds=0", "ddo.control=false", "guidance.evaluate=[last+dg]")
    assert [g.name for g in G.guided_models(no_rounds, Paths.of(no_rounds, tmp_path))] == ["base+dg"]


@pytest.mark.parametrize("sets, words", [
    (["guidance.evaluate=[ddo-round3+dg]"], "guidance.evaluate[0]: 'ddo-round3+dg': there is no round 3"),
    (["ddo.control=false", "guidance.evaluate=[control-round2+dg]"], "ddo.control is false"),
    (["guidance.evaluate=[base+dgx]"], "unknown variant 'dgx'. Fix: use one of: dg, dg-improved"),
    (["guidance.evaluate=[base]"], "'base' is not 'model+variant'"),
    (["guidance.evaluate=[base+dg, base+dg]"], "lists a guided model twice"),
    (["guidance.evaluate=[base+dg]", "guidance.fake_first_seed=0"],
     "guidance.fake_first_seed: the guidance fake-bank seeds [0, 10000000) overlap the sample seeds"),
    (["data.dataset=none", "ddo.rounds=0", "guidance.evaluate=[base+dg-improved]"],
     "guidance.evaluate: trains a discriminator on the data set, but data.dataset is 'none'"),
    (["guidance.evaluate=[last+dg]", "discriminator.arch=adm", "discriminator.extractor=dg-cifar10-adm-classifier",
      "discriminator.conditional=false", "discriminator.head=dg-cifar10-uncond-discriminator-60"],
     "the released head dg-cifar10-uncond-discriminator-60 was trained on the base model's samples"),
    (["discriminator.arch=adm"], "discriminator.extractor: is empty but discriminator.arch is adm"),
    (["discriminator.arch=adm", "discriminator.extractor=dg-cifar10-adm-classifier",
      "discriminator.head=dg-cifar10-uncond-discriminator-60"],
     "discriminator.conditional: is True but the released head dg-cifar10-uncond-discriminator-60 is unconditional"),
    (["dg.tau_min=0.5", "dg.tau_max=0.2"], "dg.tau_min: is above dg.tau_max"),
    (["dg_improved.tau_min=0.5", "dg_improved.tau_max=0.2"], "dg_improved.tau_min: is above dg_improved.tau_max"),
])
def test_bad_guidance_settings_name_the_field_and_the_fix(sets, words):
    with pytest.raises(ConfigError) as e:
        _cfg("micro", *sets)
    assert words in str(e.value) and "Fix:" in str(e.value)


def test_latent_models_are_refused():
    with pytest.raises(ConfigError, match="guides a latent model"):
        _cfg("edm2-img512-l", "guidance.evaluate=[base+dg]", "data.dataset=none", "discriminator.head=''")


def test_with_guidance_off_the_stages_do_nothing_at_once(tmp_path):
    cfg = _cfg("tiny")
    paths = Paths.of(cfg, tmp_path)  # an empty project: no data, no models; nothing is read
    t0 = time.time()
    for stage in (fakes_stage, disc_stage, guided_stage):
        stage.run(cfg, paths, progress=False)
    assert time.time() - t0 < 2
    assert json.loads(paths.fakes_index.read_text()) == {"banks": {}}
    assert json.loads(paths.discriminators_index.read_text()) == {"discriminators": {}}
    assert json.loads(paths.guided_index.read_text()) == {"guided": {}}
    assert guided_stage.guided_shards(cfg, paths) == ({}, [])  # the fid stage adds no model
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["banks.json", "discriminators.json",
                                                                          "guided.json"]


# ----------------------------------------------------------------------------------------------------------
# The guided stage against the sample stage, on a briefly trained base (conftest's `base`).


@pytest.fixture
def guided_project(tmp_path, base, monkeypatch):
    monkeypatch.setenv("REPRO_TRACKING", "off")
    cfg = _cfg("micro", "guidance.evaluate=[base+dg]", "sample.n_samples=12", "sample.batch=8",
               "sample.shard_size=8", "ddo.control=false")
    paths = Paths.of(cfg, tmp_path)
    paths.base.parent.mkdir(parents=True)
    shutil.copy(base, paths.base)
    torch.manual_seed(0)
    disc = EncoderDiscriminator(EncoderUNet(encoder_config(8, 1, 32, num_classes=10)))
    with torch.no_grad():
        for p in disc.parameters():  # no zero-initialised output: the discriminator depends on its input
            p.normal_(0, 0.1)
    paths.discriminators.mkdir(parents=True)
    save_discriminator(paths.discriminator("base+dg"), disc, {"source": "test"})
    write_json(paths.discriminators_index, {"discriminators": {"base+dg": {"source": "test"}}})
    return cfg, paths


def _images(shards):
    return np.concatenate([load_npz(s.out)["images"] for s in sorted(shards, key=lambda s: (s.lo))])


def test_guided_at_w0_is_the_sample_stage_bit_for_bit_and_not_at_w1(guided_project):
    cfg, paths = guided_project
    monkey = {"base": paths.base}
    sample_models(monkey, cfg.sample, cfg.sampler, paths.samples_work, NullTracker(), progress=False)
    plain = plan_shards(monkey, cfg.sample, cfg.sampler, paths.samples_work)
    import dataclasses

    at = {}
    for w in (0.0, 1.0):
        c = dataclasses.replace(cfg, dg=dataclasses.replace(cfg.dg, w=w))
        guided_stage.run(c, paths, progress=False)
        records, shards = guided_stage.guided_shards(c, paths)
        assert records["base+dg"]["guidance"]["w"] == w and len(shards) == 4  # 2 ranges x 12 seeds, shards of 8
        assert [(s.lo, s.hi) for s in shards] == [(s.lo, s.hi) for s in plain]  # the same seeds
        at[w] = _images(shards)
        labels = np.concatenate([load_npz(s.out)["labels"] for s in sorted(shards, key=lambda s: s.lo)])
        assert np.array_equal(labels, np.concatenate([load_npz(s.out)["labels"] for s in plain]))
    assert np.array_equal(at[0.0], _images(plain))  # w = 0: the unguided images, bit for bit
    assert not np.array_equal(at[1.0], _images(plain))
    # each setting has its own run directory: w = 0's shards were not taken for w = 1's
    assert len(list(paths.runs.glob("guided-*"))) == 2


def test_on_a_cluster_the_guided_shards_go_out_as_one_job_array(guided_project):
    import pickle

    from repro.cluster.launcher import Wave

    cfg, paths = guided_project
    waves = list(guided_stage.waves(cfg, paths.root, lambda here: Wave("guided", "guided", ("whole stage",), here)))
    assert [(w.name, len(w.calls), w.here) for w in waves] == [("guided-shards", 4, False), ("guided", 1, True)]
    for call in waves[0].calls:  # what each array task runs (picklable: submitit sends it)
        pickle.loads(pickle.dumps(call))()
    work = sorted(paths.runs.glob("guided-*/base+dg/*.npz"))
    stamps = [f.stat().st_mtime_ns for f in work]
    assert len(work) == 4
    guided_stage.run(cfg, paths, progress=False)  # then the stage here: every shard is there, it only publishes
    assert [f.stat().st_mtime_ns for f in work] == stamps
    assert len(guided_stage.guided_shards(cfg, paths)[1]) == 4
    assert [w.name for w in guided_stage.waves(cfg, paths.root, lambda here: Wave("g", "guided", (), here))] == ["g"]


def test_the_correction_is_dg_or_improved_dg_with_the_settings(guided_project):
    cfg, paths = guided_project
    disc, _ = load_discriminator(paths.discriminator("base+dg"))
    c = G.build_correction(G.VARIANTS["dg"], cfg.dg, cfg.sampler, disc)
    assert (c.w, c.w2, c.tau_min, c.tau_max, c.d_clip, c.boosting) == (2.0, 0.0, 0.01, 1.0, 1e-5, False)
    import dataclasses

    dg = dataclasses.replace(cfg.dg, boosting=True, w=1.0)
    c = G.build_correction(G.VARIANTS["dg"], dg, cfg.sampler, disc)
    assert c.boosting and c.num_steps == cfg.sampler.num_steps and c.w == 1.0
    assert G.sampler_settings(cfg, G.VARIANTS["dg-improved"]) is cfg.dg_improved
    c = G.build_correction(G.VARIANTS["dg-improved"], dataclasses.replace(cfg.dg_improved, w=4.0), cfg.sampler, disc)
    assert not c.boosting and c.d_clip == 0.0 and c.w == 4.0  # its logit's offset is free: no clipping, no sign
    assert not any(p.requires_grad for p in disc.parameters())  # differentiated with respect to its input only


# ----------------------------------------------------------------------------------------------------------
# DG's released files: a mirror or a local copy, sha256 pinned on first use, strictly loaded.


def _tiny_released(monkeypatch, served: Path):
    """DG's released files at test size: an extractor and a head in DG's layout (torch.save'd state dicts),
    registered under the real names (the real ones are 48M + 3M parameters)."""
    monkeypatch.setitem(G.EXTRACTORS, "dg-cifar10-adm-classifier", TINY_EXTRACTOR)
    torch.manual_seed(1)
    ext, head = EncoderUNet(TINY_EXTRACTOR), EncoderUNet(tiny_head())
    with torch.no_grad():
        for p in [*ext.parameters(), *head.parameters()]:
            p.normal_(0, 0.1)
    torch.save(ext.state_dict(), served / "32x32_classifier.pt")
    torch.save(head.state_dict(), served / "discriminator_60.pt")
    monkeypatch.setattr(G, "dg_head", lambda in_channels, image_size, condition: tiny_head(in_channels, condition,
                                                                                           image_size))
    return ext, head


def test_released_dg_files_come_from_a_mirror_pinned_and_load_strictly(tmp_path, base, mirror, monkeypatch):
    served, url = mirror
    ext, head = _tiny_released(monkeypatch, served)
    cfg = _cfg("micro", "guidance.evaluate=[base+dg]", "discriminator.arch=adm",
               "discriminator.extractor=dg-cifar10-adm-classifier", "discriminator.conditional=false",
               "discriminator.head=dg-cifar10-uncond-discriminator-60", f"pretrain.mirror={url}")
    paths = Paths.of(cfg, tmp_path)
    paths.base.parent.mkdir(parents=True)
    shutil.copy(base, paths.base)
    monkeypatch.setenv("REPRO_TRACKING", "off")
    disc_stage.run(cfg, paths, progress=False)
    index = json.loads(paths.discriminators_index.read_text())["discriminators"]["base+dg"]
    assert index["source"] == "released" and index["head"] == "dg-cifar10-uncond-discriminator-60"
    lock = json.loads(paths.lock.read_text())
    assert set(lock) == {"dg-cifar10-adm-classifier", "dg-cifar10-uncond-discriminator-60"}
    assert lock["dg-cifar10-uncond-discriminator-60"]["sha256"] == index["head_sha256"]
    got, _ = load_discriminator(paths.discriminator("base+dg"), paths.checkpoint("32x32_classifier.pt"),
                                index["extractor_sha256"])
    x, tau = torch.randn(3, 1, 8, 8), torch.full([3], 0.3)
    assert torch.equal(got(x, tau), ADMDiscriminator(ext.eval(), head.eval())(x, tau))
    # the guided stage samples with it (the extractor read from checkpoints/, checked against its pin)
    cfg2 = _cfg("micro", "guidance.evaluate=[base+dg]", "discriminator.arch=adm",
                "discriminator.extractor=dg-cifar10-adm-classifier", "discriminator.conditional=false",
                "discriminator.head=dg-cifar10-uncond-discriminator-60", "sample.n_samples=4", "sample.repeats=1",
                "sample.batch=4")
    guided_stage.run(cfg2, paths, progress=False)
    assert len(guided_stage.guided_shards(cfg2, paths)[1]) == 1
    # a file changed after it was pinned is refused, before anything reads it
    (paths.checkpoint("discriminator_60.pt")).write_bytes(b"not the pinned file")
    (served / "discriminator_60.pt").write_bytes(b"not the pinned file")
    with pytest.raises(Exception, match="no longer matches the pinned entry .* The file is refused"):
        disc_stage.run(cfg, paths, progress=False)
    assert json.loads(paths.discriminators_index.read_text())["discriminators"]["base+dg"] == index  # untouched


def test_without_a_mirror_a_released_file_must_be_put_in_checkpoints(tmp_path, monkeypatch):
    _tiny_released(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        G.fetch_dg_file("dg-cifar10-adm-classifier", tmp_path / "project")
    msg = str(e.value)
    assert "Google Drive folder" in msg and registry.DG_FILES["dg-cifar10-adm-classifier"].location in msg
    assert "pretrain.mirror" in msg
    (tmp_path / "project" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "32x32_classifier.pt", tmp_path / "project" / "checkpoints")
    got = G.fetch_dg_file("dg-cifar10-adm-classifier", tmp_path / "project", progress=False)  # put there by hand
    assert json.loads((tmp_path / "project" / "checkpoints.lock.json").read_text())["dg-cifar10-adm-classifier"][
        "sha256"] and got.name == "32x32_classifier.pt"


# ----------------------------------------------------------------------------------------------------------
# Dry runs: plan, protocol and cost of the CIFAR-10 presets.


@pytest.mark.parametrize("preset", ["dg-cifar10-uncond", "dg-cifar10-cond", "dg-improved-cifar10-uncond",
                                    "dg-improved-cifar10-cond", "released-dg-cifar10-uncond",
                                    "released-dg-cifar10-cond", "dg-on-ddo-cifar10-uncond"])
def test_cifar10_dg_presets_dry_run_with_plan_protocol_and_cost(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(tmp_path)
    plans = guided_dry_run_plans(tmp_path, preset)
    (gm,) = plans["guided"]["guided_models"]
    cost = plans["guided"]["cost"]
    assert cost["images"] == 50000 and cost["network_evaluations_per_image"] == 35
    assert cost["discriminator_evaluations_per_image"] == 15  # 18 steps, the last 3 below tau = 0.01
    assert "h (" in cost["device_hours"]["discriminator"]["cpu (2 shared cores, the development VM)"]
    d = plans["discriminator"]["cost"]
    if preset.startswith("released"):
        assert gm["discriminator"].startswith("released dg-cifar10-") and d["trained"] == 0
        assert plans["fakes"]["banks"] == [] and plans["fakes"]["cost"]["images"] == 0
    else:
        epochs = 250 if "-cond" in preset else 60
        steps = d["image_steps"]
        if "improved" in preset:  # real images only, through the generator too
            assert steps == {"mse_step": epochs * 50000} and d["generator_forwards"] == epochs * 50000
        else:
            assert steps == {"bce_step": epochs * 100000} and plans["fakes"]["cost"]["images"] == 50000
        assert "h (" in d["device_hours"]["discriminator"]["cpu (2 shared cores, the development VM)"]
    assert gm["sampler"]["boosting"] == (preset in ("dg-cifar10-cond", "released-dg-cifar10-cond"))
    assert gm["sampler"]["w"] == (1.0 if "-cond" in preset else 2.0)


def test_the_encoder_discriminator_is_all_trainable_and_round_trips(tmp_path):
    disc = EncoderDiscriminator(EncoderUNet(encoder_config(8, 1, 32, num_classes=10)))
    assert disc.trainable is disc
    with torch.no_grad():
        for p in disc.parameters():
            p.normal_(0, 0.1)
    save_discriminator(tmp_path / "d.safetensors", disc, {"k": 1})
    got, info = load_discriminator(tmp_path / "d.safetensors")
    x, tau, y = torch.randn(4, 1, 8, 8), torch.full([4], 0.2), torch.arange(4)
    assert info == {"k": 1} and torch.equal(got(x, tau, y), disc.eval()(x, tau, y))
    assert asdict(got.net.config) == asdict(disc.net.config)
