"""ImageNet data stage: ADM center crop against an independent reimplementation, labels, shards and manifest,
resume, EDM2 zips, and bad sources as clear errors (repro.datasets.imagenet)."""

import io
import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from repro.cli import main
from repro.config import ConfigError, DataConfig
from repro.datasets import imagenet
from repro.datasets.imagenet import ShardedData, center_crop_adm, prepare_imagenet
from repro.datasets.images import load_prepared
from repro.storage.files import load_npz, read_json, sha256_file

# class folder -> (width, height, PIL mode) of its images; sorted names give the class indices 0, 1, 2
FOLDER = {"n02": [(300, 200, "RGB"), (131, 257, "RGB")],
          "n01": [(97, 65, "RGB"), (50, 40, "L"), (613, 517, "RGB")],
          "n03": [(64, 64, "RGB")]}


def _image(w, h, mode, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]  # smooth gradients plus noise, so crops and resampling show
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    rgb = (rgb + rng.integers(0, 40, rgb.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc") / "train"
    for seed, (cls, sizes) in enumerate(FOLDER.items()):
        (root / cls).mkdir(parents=True)
        for j, (w, h, mode) in enumerate(sizes):
            _image(w, h, mode, 10 * seed + j).save(root / cls / f"{cls}_{j}.JPEG", quality=90)
    (root / "n01" / "notes.txt").write_text("not an image")  # skipped: not an image extension
    return root


def reference_crop(path, size):
    """Independent ADM center crop: the sequence of sizes worked out first, then PIL resizes and a crop box."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    while w >= 2 * size and h >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    if w < h:
        w, h = size, int(round(h * size / w))
    else:
        w, h = int(round(w * size / h)), size
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _expected(train):
    files, labels = [], []
    for index, cls in enumerate(sorted(FOLDER)):
        files += sorted((train / cls).glob("*.JPEG"))
        labels += [index] * len(FOLDER[cls])
    return files, labels


def _npz(out):
    return out.with_suffix(".npz")  # data/imagenet64 -> the index data/imagenet64.npz, the stage's argument


def _read_all(out):
    data = ShardedData(out.parent / "manifest.json")
    arrays = [data.shard(i) for i in range(data.num_shards)]
    assert all(isinstance(images, np.memmap) for images, _ in arrays)  # read by pages, not whole
    return data.manifest, np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays])


@pytest.mark.parametrize("dataset,size", [("imagenet64", 64), ("imagenet256", 256)])
def test_crops_labels_and_manifest(train, tmp_path, dataset, size):
    out = tmp_path / "data" / dataset
    cfg = DataConfig(dataset=dataset, source=str(train), shard_size=4)
    prepare_imagenet(cfg, _npz(out), tmp_path / "data" / "manifest.json")
    m, images, labels = _read_all(out)
    files, want_labels = _expected(train)
    assert images.shape == (len(files), 3, size, size) and images.dtype == np.uint8
    for f, got in zip(files, images, strict=True):
        np.testing.assert_array_equal(got.transpose(1, 2, 0), reference_crop(f, size), err_msg=str(f))
    assert labels.tolist() == want_labels
    assert m["classes"] == ["n01", "n02", "n03"] and m["num_classes"] == 3 and m["class_counts"] == [3, 2, 1]
    assert m["n"] == 6 and m["shape"] == [3, size, size] and [s["n"] for s in m["shards"]] == [4, 2]
    index = load_npz(_npz(out))
    assert index["labels"].tolist() == want_labels and index["shard_n"].tolist() == [4, 2]
    assert m["index_sha256"] == sha256_file(_npz(out))
    with pytest.raises(ValueError, match="prepared as shards"):  # the one-array reader refuses, saying why
        load_prepared(_npz(out), m)
    for s in m["shards"]:
        assert s["sha256"] == sha256_file(out / s["images"]) and s["labels_sha256"] == sha256_file(out / s["labels"])


def test_crop_geometry_by_hand():
    # 300x200 -> BOX to 150x100 (100 < 128 stops) -> BICUBIC to 96x64 -> columns 16..79
    img = Image.new("RGB", (300, 200))
    img.paste((255, 0, 0), (0, 0, 150, 200))    # left half red, right half blue
    img.paste((0, 0, 255), (150, 0, 300, 200))
    out = center_crop_adm(img, 64)
    assert out.shape == (64, 64, 3)
    assert (out[:, :28, 0] == 255).all() and (out[:, 36:, 2] == 255).all()  # the seam sits at column 48 - 16 = 32
    flat = center_crop_adm(Image.new("RGB", (64, 64), (7, 8, 9)), 64)
    assert (flat == [7, 8, 9]).all()


def test_resume_skips_finished_shards(train, tmp_path, monkeypatch):
    out, manifest = tmp_path / "data" / "imagenet64", tmp_path / "data" / "manifest.json"
    cfg = DataConfig(dataset="imagenet64", source=str(train), shard_size=2)
    first = prepare_imagenet(cfg, _npz(out), manifest)
    (out / "shard-00001.images.npy").unlink()  # as if killed after its labels were written
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy") if not p.name.startswith("shard-00001")}
    calls = []
    real = imagenet.center_crop_adm
    monkeypatch.setattr(imagenet, "center_crop_adm", lambda im, s: calls.append(1) or real(im, s))
    again = prepare_imagenet(cfg, _npz(out), manifest)
    assert len(calls) == 2  # only the missing shard's two images
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy") if p.name in kept} == kept
    assert again["shards"] == first["shards"]  # same bytes
    # a different shard size is a different plan: everything is redone
    calls.clear()
    prepare_imagenet(DataConfig(dataset="imagenet64", source=str(train), shard_size=3), _npz(out), manifest)
    assert len(calls) == 6 and sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.images.npy", "shard-00000.labels.npy", "shard-00001.images.npy", "shard-00001.labels.npy"]
    # a shard changed after the stage is refused by the reader, naming the file
    data = ShardedData(manifest)
    images = np.load(out / "shard-00001.images.npy")
    images[0, 0, 0, 0] ^= 1
    np.save(out / "shard-00001.images.npy", images)
    data.shard(0)
    with pytest.raises(ValueError, match="shard-00001.images.npy: sha256 does not match"):
        data.shard(1)


def _zip(path, files, with_json=True, size=64):
    with zipfile.ZipFile(path, "w") as z:
        labels = []
        for i, label in enumerate(files):
            buf = io.BytesIO()
            _image(size, size, "RGB", 100 + i).save(buf, format="PNG")
            name = f"{i // 2:05d}/img{i:08d}.png"
            z.writestr(name, buf.getvalue())
            labels.append([name, label])
        if with_json:
            z.writestr("dataset.json", json.dumps({"labels": labels}))


def test_edm2_zip_at_target_size_is_unchanged(tmp_path):
    _zip(tmp_path / "img64.zip", [2, 0, 1])
    out = tmp_path / "data" / "imagenet64"
    prepare_imagenet(DataConfig(dataset="imagenet64", source=str(tmp_path / "img64.zip")), _npz(out),
                     tmp_path / "data" / "manifest.json")
    m, images, labels = _read_all(out)
    assert labels.tolist() == [2, 0, 1] and m["num_classes"] == 3 and m["source_kind"] == "zip"
    with zipfile.ZipFile(tmp_path / "img64.zip") as z:
        first = np.asarray(Image.open(io.BytesIO(z.read("00000/img00000000.png"))))
    np.testing.assert_array_equal(images[0].transpose(1, 2, 0), first)


def _bad(tmp_path, train):
    cases = {}
    empty = tmp_path / "empty_class"
    (empty / "n01").mkdir(parents=True)
    (empty / "n02").mkdir()
    _image(80, 70, "RGB", 0).save(empty / "n01" / "a.JPEG")
    cases["empty class"] = (str(empty), ["data.source", str(empty / "n02"), "no images"])
    corrupt = tmp_path / "corrupt"
    (corrupt / "n01").mkdir(parents=True)
    (corrupt / "n01" / "bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    cases["corrupt"] = (str(corrupt), [str(corrupt / "n01" / "bad.JPEG"), "corrupt or truncated"])
    trunc = tmp_path / "trunc"
    (trunc / "n01").mkdir(parents=True)
    (trunc / "n01" / "ok.JPEG").write_bytes((train / "n01" / "n01_0.JPEG").read_bytes())
    data = (train / "n02" / "n02_0.JPEG").read_bytes()
    (trunc / "n01" / "zz_cut.JPEG").write_bytes(data[:len(data) // 2])
    cases["truncated"] = (str(trunc), [str(trunc / "n01" / "zz_cut.JPEG"), "corrupt or truncated"])
    _zip(tmp_path / "nojson.zip", [0, 1], with_json=False)
    cases["zip without dataset.json"] = (str(tmp_path / "nojson.zip"), ["data.source", "no dataset.json"])
    cases["missing"] = (str(tmp_path / "nowhere"), ["data.source", "does not exist"])
    cases["unset"] = (None, ["data.source", "empty"])
    return cases


def test_bad_sources_are_clear_errors_and_write_nothing_half_way(train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"REPRO_TRACKING": "off"}
    for what, (source, words) in _bad(tmp_path, train).items():
        over = [] if source is None else ["--set", f"data.source={source}"]
        preset = "imagenet512-l" if what == "missing" else "imagenet64-s"  # refused before any encoder is fetched
        r = CliRunner().invoke(main, ["data", "--preset", preset, *over, "--no-progress"], env=env)
        assert r.exit_code == 2, (what, r.output)
        assert "error:" in r.output and "Traceback" not in r.output and "Fix" in r.output, (what, r.output)
        for w in words:
            assert w in r.output, (what, w, r.output)
        assert not (tmp_path / "data" / "manifest.json").exists(), what
        assert not (tmp_path / "data" / "imagenet64.npz").exists(), what
        assert not list((tmp_path / "data").glob("imagenet64/shard-*")), what
        assert not list((tmp_path / "data").rglob(".*.np*")), what  # no temporary left behind


def test_imagenet512_latents_equal_the_vae_of_the_reference_crop(train, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from repro.nets.sd_vae import SD_VAE_FT_MSE, LatentEncoder

    torch.manual_seed(0)  # a random kl-f8 VAE, 8x down like the real one, narrow to stay fast
    vae = AutoencoderKL(**dict(SD_VAE_FT_MSE, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
                               norm_num_groups=4)).eval()
    out = tmp_path / "data" / "imagenet512"
    with pytest.raises(ConfigError, match="data.dataset: imagenet512 needs a latent encoder"):
        prepare_imagenet(DataConfig(dataset="imagenet512", source=str(train)), _npz(out), tmp_path / "m.json")
    assert not out.exists() and not _npz(out).exists()
    m = prepare_imagenet(DataConfig(dataset="imagenet512", source=str(train), shard_size=4), _npz(out),
                         out.parent / "manifest.json", LatentEncoder(vae), "test-vae")
    _, latents, labels = _read_all(out)
    assert m["dtype"] == "float32" and m["shape"] == [8, 64, 64] and m["latents"]["encoder"] == "test-vae"
    files, want_labels = _expected(train)
    assert labels.tolist() == want_labels and latents.shape == (6, 8, 64, 64)
    with torch.no_grad():
        for f, got in zip(files, latents, strict=True):
            x = torch.from_numpy(reference_crop(f, 512).copy()).permute(2, 0, 1)[None].contiguous().float() / 255
            d = vae.encode(x).latent_dist
            # float32 convolutions batched differently differ by ~3e-4 here; a wrong crop, scale or channel is >> 1e-3
            np.testing.assert_allclose(got, torch.cat([d.mean, d.std], 1)[0].numpy(), rtol=1e-3, atol=1e-3)


def test_source_crops_behind_latents_are_the_crops_and_a_changed_source_is_refused(train, tmp_path):
    """The extractor's reference of a latent data set reads data.source again: the same crops, in shard order; a
    source whose listing changed since the data stage is a ConfigError naming data.source, before any image."""
    import shutil

    from repro.datasets.imagenet import source_crops

    src = tmp_path / "train"
    shutil.copytree(train, src)
    out = tmp_path / "data" / "imagenet512"
    m = prepare_imagenet(DataConfig(dataset="imagenet512", source=str(src), shard_size=4), _npz(out),
                         out.parent / "manifest.json", lambda x: np.zeros((len(x), 8, 64, 64), np.float32), "zeros")
    got = np.concatenate(list(source_crops(m, out / "plan.json", batch=4)))
    files, _ = _expected(src)
    assert got.shape == (6, 3, 512, 512) and got.dtype == np.uint8
    for f, crop in zip(files, got, strict=True):
        np.testing.assert_array_equal(crop.transpose(1, 2, 0), reference_crop(f, 512), err_msg=str(f))
    _image(80, 90, "RGB", 99).save(src / "n03" / "n03_extra.JPEG")
    with pytest.raises(ConfigError, match="data.source: .* no longer lists the 6 images"):
        next(source_crops(m, out / "plan.json"))


def test_cli_prepares_imagenet64_s(train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["data", "--preset", "imagenet64-s", "--set", f"data.source={train}",
                                  "--no-progress"], env={"REPRO_TRACKING": "off"})
    assert r.exit_code == 0, r.output
    m, images, labels = _read_all(tmp_path / "data" / "imagenet64")
    assert m["dataset"] == "imagenet64" and images.shape == (6, 3, 64, 64) and labels.tolist() == _expected(train)[1]
    assert (tmp_path / "data" / "imagenet64.npz").is_file()  # the data stage's dvc out


def test_worker_processes_give_the_same_shards_and_name_a_bad_file(train, tmp_path):
    serial, parallel = tmp_path / "s" / "imagenet64", tmp_path / "p" / "imagenet64"
    prepare_imagenet(DataConfig(dataset="imagenet64", source=str(train), shard_size=4), _npz(serial),
                     serial.parent / "manifest.json")
    m = prepare_imagenet(DataConfig(dataset="imagenet64", source=str(train), shard_size=4, workers=2), _npz(parallel),
                         parallel.parent / "manifest.json")
    assert m["shards"] == read_json(serial.parent / "manifest.json")["shards"]  # same bytes, same order
    bad = tmp_path / "bad"
    (bad / "n01").mkdir(parents=True)
    _image(90, 70, "RGB", 1).save(bad / "n01" / "a.JPEG")
    (bad / "n01" / "b.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"n01/b\.JPEG: not a readable image"):
        prepare_imagenet(DataConfig(dataset="imagenet64", source=str(bad), workers=2), tmp_path / "b" / "imagenet64.npz",
                         tmp_path / "b" / "manifest.json")
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_a_job_array_splits_the_shards_and_the_last_task_writes_the_manifest(train, tmp_path, monkeypatch):
    serial, arr = tmp_path / "s" / "imagenet64", tmp_path / "a" / "data" / "imagenet64"
    cfg = DataConfig(dataset="imagenet64", source=str(train), shard_size=2)
    want = prepare_imagenet(cfg, _npz(serial), serial.parent / "manifest.json")
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    env = {"REPRO_TRACKING": "off", "SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2"}
    args = ["data", "--preset", "imagenet64-s", "--set", f"data.source={train}", "--set", "data.shard_size=2",
            "--no-progress"]
    r = CliRunner().invoke(main, args, env={**env, "SLURM_ARRAY_TASK_ID": "4"})  # task 1 of 2: shard 1
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in arr.glob("*.images.npy")) == ["shard-00001.images.npy"]
    assert not (arr.parent / "manifest.json").exists() and not _npz(arr).exists()
    r = CliRunner().invoke(main, args, env={**env, "SLURM_ARRAY_TASK_ID": "3"})  # task 0: shards 0 and 2, then all
    assert r.exit_code == 0, r.output
    assert read_json(arr.parent / "manifest.json")["shards"] == want["shards"]
