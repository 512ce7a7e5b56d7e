"""End to end through `dvc repro`: micro stand-ins of imagenet64-s and imagenet512-l on a synthetic ImageNet-like
folder of JPEGs. The data stage writes the shards, the extractor computes Inception reference statistics shard by
shard, pretraining and the DDO rounds read the shards (each rank its slice) and write the fake bank as shards, here
once on 2 gloo ranks (torchrun) between two `dvc repro` runs; then sample, fid and the table. The imagenet512-l
stand-in: a tiny random kl-f8 VAE (registry decoder sd-vae-tiny, served from a local mirror) encodes the crops into
latents, a tiny EDM2 net trains on them, the fakes stay float32 latents and the selection metric and the sample
stage decode through the same pinned decoder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from repro.config import preset_dict
from repro.evaluation.tables.data import read_result

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def _jpeg_folder(root: Path, classes: int = 3, per_class: int = 8, sizes: tuple[int, int] = (70, 150)) -> Path:
    """An ILSVRC-like train folder: class sub-folders of JPEGs of odd sizes (smooth colour fields)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(*sizes)), int(rng.integers(*sizes))
            base = rng.integers(0, 256, (2, 2, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
            img.save(root / f"n{c:08d}" / f"img_{i}.JPEG", quality=90)
    return root


def _project(d: Path) -> dict:
    """A project folder with the pipeline (dvc.yaml and the code) and the environment its commands run in."""
    d.mkdir()
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "REPRO_TRACKING": "off", "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _init_repo(d: Path, env: dict, ignore: str) -> None:
    _run(["git", "init", "-q"], d, env)
    (d / ".gitignore").write_text(ignore)
    _run(["dvc", "init", "-q"], d, env)
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "init"], d, env)


def test_micro_imagenet64_runs_through_dvc_with_ddo_rounds_on_shards(tmp_path, inception_weights):
    weights, _ = inception_weights
    source = _jpeg_folder(tmp_path / "train")
    d = tmp_path / "proj"
    env = _project(d)
    params = preset_dict("micro")
    params["data"].update(dataset="imagenet64", source=str(source), shard_size=10, holdout=0)  # no split of shards
    params["extractor"].update(kind="inception", weights=str(weights), reference="")
    params["pretrain"].update(total_nimg=32, checkpoint_every_nimg=32, batch=8)
    params["pretrain"]["network"].update(model_channels=4, channel_mult=[1, 1, 1, 1], attn_resolutions=[])
    params["sampler"].update(num_steps=2, batch=16)
    params["ddo"].update(rounds=2, batch=8, nimg_per_round=16, eval_every_nimg=16, selection_samples=8,
                         control=False, sweep_alpha=[], sweep_beta=[])
    params["sample"].update(n_samples=8, repeats=1, batch=8, models="base-and-last")  # few 2048-d FDs: slow on CPU
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _init_repo(d, env, "/runs/\n/data/imagenet64/\n")

    out = _run(["dvc", "repro", "pretrain", "extractor"], d, env)
    assert "Running stage 'data'" in out and "Running stage 'pretrain'" in out
    assert sorted(p.name for p in (d / "data/imagenet64").glob("shard-*.images.npy")) == [
        f"shard-{i:05d}.images.npy" for i in range(3)]  # 24 images, 10 per shard
    # The DDO rounds on 2 gloo ranks, each rank making its data shards' fakes and reading its slice of each batch.
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
          "-m", "repro.cli", "ddo", "--no-progress"], d, env)
    banks = sorted(d.glob("runs/ddo-*/ddo-round*/fakes"))
    assert len(banks) == 2 and all(sorted(p.name for p in b.iterdir()) == [f"shard-{j:05d}.npy" for j in range(3)]
                                   for b in banks)
    assert np.load(banks[0] / "shard-00002.npy").shape == (4, 3, 64, 64)

    out = _run(["dvc", "repro"], d, env)  # the ddo stage finds its rounds finished; then sample, fid, table
    assert "already finished" in out and "Running stage 'table'" in out
    models = {m["name"]: m for m in read_result(d / "results/micro")["models"]}
    assert list(models) == ["base", "ddo-round2"]
    assert all(len(m["values"]) == 1 and np.isfinite(m["value"]) and m["value"] > 0 for m in models.values())


def test_micro_imagenet512_runs_through_dvc_with_latent_ddo_rounds_and_decoding(tmp_path, inception_weights):
    import torch

    from repro.config import load_config
    from repro.datasets.imagenet import center_crop_adm
    from repro.evaluation import fidelity
    from repro.evaluation.extractor import data_statistics
    from repro.nets.checkpoint import load_model
    from repro.nets.sd_vae import save_autoencoder, tiny_autoencoder
    from repro.pipeline.stages import ddo as ddo_stage
    from repro.pipeline.stages import sample as sample_stage
    from repro.sampling.generate import generate_images
    from repro.storage.files import load_npz, read_json, sha256_file
    from repro.storage.layout import Paths

    weights, _ = inception_weights
    source = _jpeg_folder(tmp_path / "train", per_class=3, sizes=(300, 700))  # short sides below and above 512
    served = tmp_path / "mirror"  # the decoder's "download location": a local directory (pretrain.mirror)
    served.mkdir()
    vae_file = save_autoencoder(tiny_autoencoder(seed=0), served / "sd-vae-tiny.safetensors")
    # The expected reference statistics: Inception features of the real 512 crops, computed here from the JPEGs.
    crops = np.stack([center_crop_adm(Image.open(f), 512).transpose(2, 0, 1) for f in sorted(source.rglob("*.JPEG"))])
    want = data_statistics(fidelity.INCEPTION_EXTRACTOR, weights, crops)
    d = tmp_path / "proj"
    env = _project(d)
    params = preset_dict("micro")
    params["data"].update(dataset="imagenet512", source=str(source), shard_size=4, holdout=0)  # micro holds out digits
    params["extractor"].update(kind="inception", weights=str(weights), reference="")  # from data.source's crops
    params["pretrain"].update(decoder="sd-vae-tiny", mirror=str(served), total_nimg=32, checkpoint_every_nimg=32,
                              batch=8)
    params["pretrain"]["network"].update(precond="edm2", model_channels=4, channel_mult=[1, 1, 1, 1],
                                         attn_resolutions=[])
    params["sampler"].update(num_steps=2, batch=16)
    params["ddo"].update(rounds=2, batch=8, nimg_per_round=16, eval_every_nimg=16, selection_samples=4,
                         control=False, sweep_alpha=[], sweep_beta=[])
    params["sample"].update(n_samples=4, repeats=1, batch=4, models="base-and-last")
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _init_repo(d, env, "/runs/\n/data/imagenet512/\n/checkpoints/\n/checkpoints.lock.json\n")

    out = _run(["dvc", "repro", "pretrain", "extractor"], d, env)
    assert "Running stage 'data'" in out and "Running stage 'pretrain'" in out
    # The data stage fetched the decoder from the mirror, pinned its sha256, and encoded the crops with its VAE.
    vae_sha = sha256_file(vae_file)
    assert json.loads((d / "checkpoints.lock.json").read_text())["sd-vae-tiny"]["sha256"] == vae_sha
    m = read_json(d / "data/manifest.json")
    assert m["dtype"] == "float32" and m["shape"] == [8, 64, 64] and m["n"] == 9
    assert m["latents"]["encoder"] == f"sd-vae-tiny sha256 {vae_sha}"
    # The extractor read the pixel crops behind the latents again (not decoded latents): the statistics of the crops.
    got = fidelity.FeatureStats.load(d / "models/reference_stats.npz")
    assert got.n == 9 and np.allclose(got.mu, want.mu, atol=1e-5) and np.allclose(got.sigma, want.sigma, atol=1e-5)
    assert "pixel crops" in read_json(d / "models/extractor.json")["reference"]
    _, arch, _ = load_model(d / "models/base.safetensors")
    assert arch["precond"] == "edm2" and arch["img_channels"] == 4 and arch["img_resolution"] == 64
    # The DDO rounds on 2 gloo ranks: fakes are latents (float32), as shards, each rank its data shards'.
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29732",
          "-m", "repro.cli", "ddo", "--no-progress"], d, env)
    banks = sorted(d.glob("runs/ddo-*/ddo-round*/fakes"))
    assert len(banks) == 2 and all(sorted(p.name for p in b.iterdir()) == [f"shard-{j:05d}.npy" for j in range(3)]
                                   for b in banks)
    fakes = np.load(banks[0] / "shard-00002.npy")
    assert fakes.dtype == np.float32 and fakes.shape == (1, 4, 64, 64) and np.isfinite(fakes).all()

    out = _run(["dvc", "repro"], d, env)  # the ddo stage finds its rounds finished; then sample, fid, table
    assert "already finished" in out and "Running stage 'table'" in out
    models = {m["name"]: m for m in read_result(d / "results/micro")["models"]}
    assert list(models) == ["base", "ddo-round2"]
    assert all(len(m["values"]) == 1 and np.isfinite(m["value"]) and m["value"] > 0 for m in models.values())
    assert all(np.isfinite(m["selection_score"]) for m in models.values() if m["name"] != "base")

    # The sample stage's images are decoded 512x512 RGB; the selection metric's decoder (the ddo stage's) is the
    # sample stage's: the same latents decode to the same images, and the base's latents for the sample seeds,
    # decoded by the selection decoder, are the sample stage's images.
    (shard,) = sorted((d / "samples/base").glob("*.npz"))
    s = load_npz(shard)
    assert s["images"].dtype == np.uint8 and s["images"].shape == (4, 3, 512, 512)
    cfg = load_config(d / "params.yaml")
    paths = Paths.of(cfg, d)
    net, _, info = load_model(paths.base)
    selection = ddo_stage._selection_decoder(cfg, paths, info)
    sampling = sample_stage._sampling_setup(cfg, paths)[1]["decoder"]
    assert torch.equal(selection(torch.from_numpy(fakes)), sampling(torch.from_numpy(fakes)))
    latents = torch.cat([x for _, x, _ in generate_images(
        net, s["seeds"], img_shape=(4, 64, 64), label_dim=3, sampler=cfg.sampler, labels=s["labels"],
        decoder=lambda x: x.float())])
    diff = (selection(latents).int() - torch.from_numpy(s["images"]).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01  # equal up to float summation order between processes
