"""The pretrained stage as a new user would try it: dry run, fetch from a local mirror, verify, convert, sample;
a tampered file and a pickle with foreign code are refused. The mirror is an HTTP server on 127.0.0.1 that the
test starts, serving EDM-format pickles the test writes (repro never contacts any other address here)."""

import hashlib
import json
import os

import torch
from click.testing import CliRunner
from test_edm_pickle import Evil, edm_container, make_net, outputs, write_pickle

from repro.catalog.registry import CHECKPOINTS
from repro.cli import main
from repro.nets.checkpoint import load_model

NAME = "edm-cifar10-32x32-cond-vp"
FILE = CHECKPOINTS[NAME].filename





def run(*args):
    return CliRunner().invoke(main, list(args))


def test_dry_run_says_what_it_would_fetch_and_writes_nothing(project):
    r = run("pretrained", "--preset", "cifar10-cond", "--dry-run")
    assert r.exit_code == 0, r.output
    assert CHECKPOINTS[NAME].url in r.output and "not pinned yet" in r.output and "CC BY-NC-SA" in r.output
    assert list(project.iterdir()) == []


def test_fetch_verify_convert_and_sample_from_a_local_mirror(project, mirror, monkeypatch):
    served, url = mirror
    net = make_net(monkeypatch)
    write_pickle(served / FILE, edm_container(net))
    r = run("pretrained", "--preset", "cifar10-cond", "--no-progress", "--set", f"pretrain.mirror={url}")
    assert r.exit_code == 0, r.output
    converted, arch, info = load_model(project / "models/base.safetensors")
    assert torch.equal(outputs(converted), outputs(net))  # same weights, same network function
    digest = hashlib.sha256((served / FILE).read_bytes()).hexdigest()
    assert info["source_sha256"] == digest
    lock = json.loads((project / "checkpoints.lock.json").read_text())
    assert lock[NAME]["sha256"] == digest and lock[NAME]["url"] == CHECKPOINTS[NAME].url
    assert (project / "models/base_grid.png").stat().st_size > 0

    # The file on the mirror is swapped for another one: refused against the pinned hash, nothing converted.
    write_pickle(served / FILE, edm_container(make_net(monkeypatch, seed=1)))
    (project / "checkpoints" / FILE).unlink()
    (project / "models/base.safetensors").unlink()
    r = run("pretrained", "--preset", "cifar10-cond", "--no-progress", "--set", f"pretrain.mirror={url}")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "pinned" in r.output and NAME in r.output
    assert not (project / "models/base.safetensors").exists()


def test_a_pickle_with_foreign_code_is_refused_and_nothing_runs(project, mirror, monkeypatch, tmp_path):
    served, url = mirror
    marker = tmp_path / "marker"
    write_pickle(served / FILE, dict(edm_container(make_net(monkeypatch)), evil=Evil(os.system, f"touch {marker}")))
    r = run("pretrained", "--preset", "cifar10-cond", "--no-progress", "--set", f"pretrain.mirror={url}")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "system" in r.output and "nothing" in r.output
    assert not marker.exists()
    assert not (project / "models/base.safetensors").exists()


def test_a_local_directory_works_as_mirror(project, tmp_path, monkeypatch):
    local = tmp_path / "airgapped"
    local.mkdir()
    net = make_net(monkeypatch, seed=2)
    write_pickle(local / FILE, edm_container(net))
    r = run("pretrained", "--preset", "released-ddo-cifar10-cond", "--no-progress",
            "--set", f"pretrain.source={NAME}", "--set", f"pretrain.mirror={local}")
    assert r.exit_code == 0, r.output
    converted, _, _ = load_model(project / "models/base.safetensors")
    assert torch.equal(outputs(converted), outputs(net))
