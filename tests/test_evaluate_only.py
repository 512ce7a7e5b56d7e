"""An evaluation-only preset end to end: a released checkpoint (here a tiny EDM network written by this test in the
upstream pickle format) and the paper's reference statistics, both served by a local HTTP mirror, go through
`dvc repro` straight to sampling and FID (the data and ddo stages do nothing), and `repro table --paper ddo` shows
our number in the cell the preset claims, marked because this micro run is not the paper's 50k-sample protocol."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_edm_pickle import edm_container, recording_init_args, write_pickle
from test_tables import check_golden

from repro.config import preset_dict
from repro.evaluation.tables import render as R
from repro.nets import edm as N

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=900):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def _released_checkpoint(monkeypatch, path: Path) -> Path:
    """A tiny class-conditional EDM network for 32x32 RGB, pickled as NVlabs' persistence writes a release."""
    torch.manual_seed(0)
    kw = dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, model_type="SongUNet",
              embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
              resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16],
              dropout=0.13, augment_dim=9)
    with recording_init_args(monkeypatch):
        net = N.EDMPrecond(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return write_pickle(path, edm_container(net.eval()))


def _reference(path: Path) -> Path:
    """EDM's reference-statistics format (npz with mu and sigma, 2048-d)."""
    g = np.random.default_rng(0)
    a = g.standard_normal((2048, 64))
    np.savez(path, mu=g.standard_normal(2048) * 0.1, sigma=a @ a.T / 64 + 1e-3 * np.eye(2048))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, inception_weights):
    import functools
    import threading
    from http.server import ThreadingHTTPServer

    from conftest import QuietHandler

    mp = pytest.MonkeyPatch()
    served = tmp_path_factory.mktemp("served")
    _released_checkpoint(mp, served / "edm-cifar10-cond-vp-ddo.pkl")
    mp.undo()
    _reference(served / "cifar10-32x32.npz")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    d = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
    params = preset_dict("released-ddo-cifar10-cond")
    params["pretrain"]["mirror"] = url
    params["extractor"].update(mirror=url, weights=str(inception_weights[0]))
    params["sampler"].update(batch=16)
    params["sample"].update(n_samples=16, batch=16, shard_size=16, protocol="custom")  # a micro run: marked
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "REPRO_TRACKING": "off", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], d, env)
    _run(["dvc", "init", "-q"], d, env)
    _run(["git", "add", "-A"], d, env)
    _run(["git", "commit", "-qm", "init"], d, env)
    out = _run(["dvc", "repro"], d, env)
    table = _run(["repro", "table", "--paper", "ddo"], d, env)
    server.shutdown()
    return d, out, table


def test_an_evaluation_goes_straight_to_sampling_and_fid(evaluated):
    d, out, _ = evaluated
    assert "nothing to train" in out  # the ddo stage with no rounds
    manifest = json.loads((d / "data/manifest.json").read_text())
    assert manifest["dataset"] == "none" and manifest["n"] == 0  # no data read, nothing downloaded for it
    assert not list((d / "checkpoints").glob("cifar-10*"))
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["edm-cifar10-cond-vp-ddo.pkl", "fid-refs"]
    assert json.loads((d / "models/ddo/rounds.json").read_text())["history"] == {}
    numbers = json.loads((d / "results/released-ddo-cifar10-cond/metrics.json").read_text())
    assert list(numbers["fid"]) == ["base"] and numbers["fid"]["base"] > 0  # numbers only
    described = json.loads((d / "results/released-ddo-cifar10-cond/protocol.json").read_text())
    assert described["paper"] == "ddo" and described["models"][0]["cell"] == "cifar10/edm-ddo"
    assert described["protocol"]["cond"] is True and described["models"][0]["weights"] == ["float32"]


def test_the_table_shows_our_number_in_its_cell_marked_as_another_protocol(evaluated):
    d, _, table = evaluated
    fid = json.loads((d / "results/released-ddo-cifar10-cond/metrics.json").read_text())["fid"]["base"]
    ours = R._fmt_ours(fid)
    row = next(line for line in table.splitlines() if line.startswith("| **EDM + DDO** |"))
    assert f"| ({ours}) (cond) |" in row  # in its cell, in parentheses: 16 samples are not the paper's 50k
    assert "NOT the paper's protocol: 16 samples (paper 50000)" in row
    # the rest of the table is the paper's; our number (and Δ) normalised for the golden file
    section = table.split("### Table 2")[0].replace(f"({ours})", "(OURS)").replace(R._fmt_delta(fid - 1.30), "DELTA")
    check_golden("evaluate_only_table1.md", re.sub(r"\n+$", "\n", section))
