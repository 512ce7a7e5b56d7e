"""End to end through `dvc repro`: a micro stand-in of imagenet64-s on a synthetic ImageNet-like folder of JPEGs.
The data stage writes the shards, the extractor computes Inception reference statistics shard by shard, pretraining
and the DDO rounds read the shards (each rank its slice) and write the fake bank as shards, here once on 2 gloo
ranks (torchrun) between two `dvc repro` runs; then sample, fid and the table."""

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


def _jpeg_folder(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    """An ILSVRC-like train folder: class sub-folders of JPEGs of odd sizes (smooth colour fields)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(70, 150)), int(rng.integers(70, 150))
            base = rng.integers(0, 256, (2, 2, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
            img.save(root / f"n{c:08d}" / f"img_{i}.JPEG", quality=90)
    return root


def test_micro_imagenet64_runs_through_dvc_with_ddo_rounds_on_shards(tmp_path, inception_weights):
    weights, _ = inception_weights
    source = _jpeg_folder(tmp_path / "train")
    d = tmp_path / "proj"
    d.mkdir()
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
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
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "REPRO_TRACKING": "off", "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], d, env)
    (d / ".gitignore").write_text("/runs/\n/data/imagenet64/\n")
    _run(["dvc", "init", "-q"], d, env)
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "init"], d, env)

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
