"""The CIFAR-10 data stage on a small synthetic cifar-10-binary.tar.gz that the test builds (20 training records,
known pixels and labels), served by an HTTP server on 127.0.0.1 that the test starts, or read from a local mirror
directory. The real 170 MB archive is never read here (no internet): these tests check the parsing (label byte,
then R, G, B planes), the manifest, the sha256 pin, and the refusals."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from repro.cli import main
from repro.datasets.images import CIFAR10_URL, load_prepared, read_cifar10_binary

ARCHIVE = "cifar-10-binary.tar.gz"
PER_BATCH = 4



def expected_arrays():
    """Known images and labels: every pixel a function of (image, channel, row, col)."""
    n = 5 * PER_BATCH
    i, c, y, x = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    images = ((i * 7 + c * 80 + y * 3 + x) % 256).astype(np.uint8)
    labels = (np.arange(n) * 3 % 10).astype(np.int64)
    return images, labels


def batch_bytes(images, labels):
    """The binary format written independently of the parser: per record, the label byte then R, G, B planes."""
    out = bytearray()
    for img, lab in zip(images, labels):
        out.append(int(lab))
        for ch in range(3):
            for row in range(32):
                out.extend(bytes(int(v) for v in img[ch, row]))
    return bytes(out)


def write_archive(path, members=None, truncate=None):
    images, labels = expected_arrays()
    if members is None:
        members = {f"cifar-10-batches-bin/data_batch_{b + 1}.bin":
                   batch_bytes(images[b * PER_BATCH:(b + 1) * PER_BATCH], labels[b * PER_BATCH:(b + 1) * PER_BATCH])
                   for b in range(5)}
        members["cifar-10-batches-bin/test_batch.bin"] = batch_bytes(images[:2], (labels[:2] + 1) % 10)
        members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if truncate and name == truncate:
                data = data[:-100]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path




def run_data(mirror):
    return CliRunner().invoke(main, ["data", "--preset", "cifar10-cond", "--no-progress", "--set",
                                     f"data.mirror={mirror}"])


def test_data_stage_from_http_mirror_parses_rgb_planes_and_pins_the_archive(project, mirror):
    d, url = mirror
    archive = write_archive(d / ARCHIVE)
    r = run_data(url)
    assert r.exit_code == 0, r.output
    npz = project / "data" / "cifar10.npz"
    assert npz.is_file() and not (project / "data" / "digits.npz").exists()
    manifest = json.loads((project / "data" / "manifest.json").read_text())
    ds = load_prepared(npz, manifest)
    images, labels = expected_arrays()
    assert ds.images.dtype == np.uint8 and ds.images.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    # the planes are R, G, B in that order: channel c of image 0 at (0, 0) is c * 80
    assert ds.images[0, :, 0, 0].tolist() == [0, 80, 160]
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert manifest["dataset"] == "cifar10" and manifest["n"] == 20 and manifest["shape"] == [3, 32, 32]
    assert manifest["archive_sha256"] == sha and CIFAR10_URL in manifest["source"] and url in manifest["source"]
    assert manifest["class_counts"] == np.bincount(labels, minlength=10).tolist() and manifest["num_classes"] == 10
    lock = json.loads((project / "checkpoints.lock.json").read_text())
    assert lock[ARCHIVE]["sha256"] == sha and lock[ARCHIVE]["url"] == CIFAR10_URL
    assert (project / "checkpoints" / ARCHIVE).is_file()


def test_tampered_archive_after_pinning_is_refused_and_nothing_written(project, mirror):
    d, url = mirror
    write_archive(d / ARCHIVE)
    assert run_data(url).exit_code == 0
    for f in ("cifar10.npz", "manifest.json"):
        (project / "data" / f).unlink()
    (project / "checkpoints" / ARCHIVE).unlink()
    images, labels = expected_arrays()
    images[3, 1, 5, 5] ^= 1  # one pixel changed: a different archive
    members = {f"cifar-10-batches-bin/data_batch_{b + 1}.bin":
               batch_bytes(images[b * 4:(b + 1) * 4], labels[b * 4:(b + 1) * 4]) for b in range(5)}
    write_archive(d / ARCHIVE, members)
    r = run_data(url)
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output
    assert ARCHIVE in r.output and "no longer matches the pinned" in r.output
    assert not (project / "data" / "cifar10.npz").exists() and not (project / "data" / "manifest.json").exists()
    assert not (project / "checkpoints" / ARCHIVE).exists()


def test_local_directory_mirror_and_the_pin_accepts_the_same_archive(project, tmp_path):
    local = tmp_path / "airgapped"
    local.mkdir()
    write_archive(local / ARCHIVE)
    assert run_data(str(local)).exit_code == 0
    first = (project / "data" / "cifar10.npz").read_bytes()
    (project / "checkpoints" / ARCHIVE).unlink()
    r = run_data(str(local))  # copied again, matches the pin
    assert r.exit_code == 0, r.output
    assert (project / "data" / "cifar10.npz").read_bytes() == first


def test_truncated_member_is_a_clear_error_naming_it(project, tmp_path):
    local = tmp_path / "airgapped"
    local.mkdir()
    write_archive(local / ARCHIVE, truncate="cifar-10-batches-bin/data_batch_3.bin")
    r = run_data(str(local))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "data_batch_3.bin is truncated or malformed" in r.output
    assert not (project / "data").exists() or not any((project / "data").iterdir())


def test_missing_member_bad_label_and_corrupt_gzip(tmp_path):
    images, labels = expected_arrays()
    ok = {f"cifar-10-batches-bin/data_batch_{b + 1}.bin": batch_bytes(images[:2], labels[:2]) for b in range(5)}
    missing = dict(ok)
    del missing["cifar-10-batches-bin/data_batch_5.bin"]
    with pytest.raises(ValueError, match="data_batch_5.bin is missing"):
        read_cifar10_binary(write_archive(tmp_path / "a.tar.gz", missing))
    bad = dict(ok)
    bad["cifar-10-batches-bin/data_batch_2.bin"] = batch_bytes(images[:2], np.array([1, 10]))
    with pytest.raises(ValueError, match="data_batch_2.bin has label 10"):
        read_cifar10_binary(write_archive(tmp_path / "b.tar.gz", bad))
    whole = write_archive(tmp_path / "c.tar.gz", ok).read_bytes()
    (tmp_path / "c.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="c.tar.gz: not a readable .tar.gz"):
        read_cifar10_binary(tmp_path / "c.tar.gz")
    ds = read_cifar10_binary(write_archive(tmp_path / "d.tar.gz", ok))
    assert ds.images.shape == (10, 3, 32, 32)


def test_imagenet_data_stage_says_what_is_missing(project):
    r = CliRunner().invoke(main, ["data", "--preset", "imagenet64-s", "--no-progress"])
    assert r.exit_code == 2 and "data.source: empty" in r.output and "ILSVRC2012 train folder" in r.output
