"""Bad inputs, as a careless user or an attacker would give them: each ends as one `error:` line naming what is wrong
and the fix, exit code 2, no traceback, and nothing written to the project. Table-driven; the CLI runs in-process
(click's CliRunner) except where a case needs a process of its own (a file-size limit)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from repro.cli import main
from repro.config import load_config, preset_dict

# ----------------------------------------------------------------------------------------------------------
# A micro project: params, the data stage's output, and models (random weights, written as the stages write them).


@pytest.fixture(scope="module")
def seed_project(tmp_path_factory):
    from repro.datasets.images import load_embedded
    from repro.methods.pretrain import arch_from_config
    from repro.nets.checkpoint import save_model
    from repro.nets.factory import build_network
    from repro.pipeline.stages.sample import eval_models
    from repro.sampling.shards import plan_shards
    from repro.storage.files import record_sha256, save_npz, write_json
    from repro.storage.layout import Paths

    d = tmp_path_factory.mktemp("seed")
    (d / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    env = {"REPRO_TRACKING": "off"}
    r = CliRunner().invoke(main, ["data", "--params", str(d / "params.yaml"), "--no-progress"], env=env)
    assert r.exit_code == 0, r.output
    cfg = load_config(d / "params.yaml")
    paths = Paths.of(cfg, d)
    arch = arch_from_config(cfg.pretrain, load_embedded("digits"))
    net = build_network(arch)
    for path in eval_models(cfg, paths).values():
        save_model(path, net, arch, {})
        record_sha256(path)  # as the pretrain and ddo stages do
    write_json(paths.rounds_json, {"selection_metric": None, "history": {}})
    for s in plan_shards(eval_models(cfg, paths), cfg.sample, cfg.sampler, paths.samples):
        n = s.hi - s.lo
        save_npz(s.out, images=np.zeros((n, 1, 8, 8), np.uint8), labels=np.zeros(n, np.int64),
                 seeds=np.arange(s.lo, s.hi), model_sha256=np.array(""), sampler=np.array(""))
    (d / "results" / "micro").mkdir(parents=True)
    return d


@pytest.fixture
def proj(seed_project, tmp_path, monkeypatch):
    d = tmp_path / "p"
    shutil.copytree(seed_project, d)
    monkeypatch.chdir(d)
    monkeypatch.setenv("REPRO_TRACKING", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return d


def snapshot(d: Path) -> dict:
    """Every file's bytes digest and mode under ``d`` (empty lock files, which hold no output, left out)."""
    import hashlib

    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not (p.name.endswith(".lock") and p.stat().st_size == 0) and p.name != ".repro.lock":
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(args, expect, env=None, cwd_files=None):
    """Run the CLI; assert exit 2, one `error:` line containing every ``expect`` string, and no traceback."""
    r = CliRunner().invoke(main, args, env=env)
    out = r.output
    assert r.exit_code == 2, f"{args}: exit {r.exit_code}\n{out}\n{r.exception!r}"
    assert "Traceback" not in out and not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for e in [expect] if isinstance(expect, str) else expect:
        assert e.lower() in out.lower(), f"{args}: {e!r} not in\n{out}"
    assert "Fix" in out or "fix" in out or "use one of" in out or "must be" in out, out
    return out


# ----------------------------------------------------------------------------------------------------------
# 1. --set values (the config is checked before anything runs).

SET_CASES = [
    ("ddo.beta=-1", "ddo.beta"), ("ddo.beta=0", "ddo.beta"), ("ddo.beta=.nan", "ddo.beta"),
    ("ddo.beta=!!python/name:os.system", ["ddo.beta", "python"]),
    ("ddo.beta=!!python/object/apply:os.system [ls]", ["ddo.beta", "python"]),
    ("ddo.sweep_beta=[0.1,", ["ddo.sweep_beta", "not valid yaml"]), ("ddo.beta=: x", ["ddo.beta", "not valid yaml"]),
    ("ddo.beta={a: 1, a: 2}", ["ddo.beta", "twice"]), ("ddo.beta='unterminated", "ddo.beta"),
    ("=1", "empty key"), (".=1", "empty key"), ("ddo.=1", "empty key"), ("ddo", "section.key=value"),
    ("nosuch.key=1", "nosuch"), ("ddo.nosuch=1", "ddo.nosuch"), ("ddo.beta.x=1", "not a section"),
    ("ddo.lr=.inf", ["ddo.lr", "0.1"]), ("ddo.lr=1e6", ["ddo.lr", "0.1"]), ("ddo.lr=-1", "ddo.lr"), ("ddo.lr=0", "ddo.lr"),
    ("pretrain.lr=.inf", "pretrain.lr"), ("extractor.lr=10", "extractor.lr"), ("ddo.lr=abc", "ddo.lr"),
    ("ddo.rounds=abc", "ddo.rounds"), ("ddo.rounds=1.5", "ddo.rounds"), ("ddo.rounds=-1", "ddo.rounds"),
    ("ddo.batch=0", "ddo.batch"), ("ddo.control=maybe", "ddo.control"), ("sample.n_samples=1", "sample.n_samples"),
    ("sampler.num_steps=1", "sampler.num_steps"), ("preset=../../escape", ["preset", "plain name"]),
    ("preset=/tmp/abs", "preset"), ("preset=a/b", "preset"), ("preset=..", "preset"), ("preset=''", "preset"),
    ("preset=.hidden", "preset"), ("pretrain.network.model_channels=7", ["model_channels", "even"]),
    ("pretrain.network.model_channels=2", "model_channels"),
    ("pretrain.network.attn_resolutions=[3]", ["attn_resolutions", "[8, 4]"]),
    ("pretrain.network.attn_resolutions=[16]", "attn_resolutions"), ("pretrain.network.dropout=1", "dropout"),
    ("pretrain.network.channel_mult=[]", "channel_mult"), ("data.dataset=mnist", "data.dataset"),
    ("pretrain.source=nosuch", "pretrain.source"), ("sampler.label_mode=x", "sampler.label_mode"),
    ("ddo.sweep_beta=[0.1,0.1]", "ddo.sweep_beta"), ("ddo.sweep_alpha=[-1]", "ddo.sweep_alpha"),
    ("ddo.sweep_beta=[.nan]", "ddo.sweep_beta"), ("ddo.eval_every_nimg=100000", "ddo.eval_every_nimg"),
    ("ddo.precision=fp64", "ddo.precision"), ("ddo.lr_schedule=inverse-sqrt", "ddo.lr_decay_nimg"),
    ("sample.first_seed=50000", "sample.first_seed"), ("ddo.P_std_rounds={0: 1}", "ddo.P_std_rounds"),
    ("launcher.executor=cloud", "launcher.executor"), ("metrics.extra=[nosuch]", "metrics.extra"),
    ("ddo.beta={a: 1}", "ddo.beta"), ("ddo.beta=[1]", "ddo.beta"), ("ddo.beta=0.2x", "ddo.beta"), ("data=1", "data"),
    ("sampler.dtype=fp8", "sampler.dtype"), ("sample.repeats=0", "sample.repeats"), ("ddo.alpha=true", "ddo.alpha"),
]


@pytest.mark.parametrize("override,expect", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_bad_set_values_are_refused(proj, override, expect):
    before = snapshot(proj)
    refused(["data", "--set", override, "--no-progress"], expect)
    assert snapshot(proj) == before


# ----------------------------------------------------------------------------------------------------------
# 2. params.yaml itself.

GOOD = yaml.safe_dump(preset_dict("micro"), sort_keys=False)
PARAMS_CASES = [
    ("binary", bytes(range(256)) * 4, "not utf-8"),
    ("utf16", GOOD.encode("utf-16"), "not utf-8"),
    ("latin1", "preset: caf\xe9\n".encode("latin-1"), "not utf-8"),
    ("empty", b"", "mapping"),
    ("a list", b"[1, 2]\n", "mapping"),
    ("a scalar", b"42\n", "mapping"),
    ("duplicate section", (GOOD + "ddo: {beta: 1}\n").encode(), ["twice", "ddo"]),
    ("duplicate key", GOOD.replace("  beta: 0.2\n", "  beta: 0.2\n  beta: 0.3\n").encode(), ["twice", "beta"]),
    ("python tag", (GOOD + "x: !!python/object/apply:os.system [ls]\n").encode(), "python"),
    ("python name tag", GOOD.replace("beta: 0.2", "beta: !!python/name:os.system").encode(), "python"),
    ("unclosed bracket", (GOOD + "y: [1, 2\n").encode(), "not valid yaml"),
    ("bad indentation", (GOOD + "ddo:\n beta: 1\n  alpha: 2\n").encode(), "not valid yaml"),
    ("tab indentation", (GOOD + "z:\n\tq: 1\n").encode(), "not valid yaml"),
    ("unknown section", (GOOD + "nosuch: {a: 1}\n").encode(), "nosuch"),
    ("escape preset", GOOD.replace("preset: micro", "preset: ../../escape").encode(), "plain name"),
    ("inf lr", GOOD.replace("  lr: 0.0003\n", "  lr: .inf\n", 1).encode(), "lr"),
    ("missing section", yaml.safe_dump({k: v for k, v in preset_dict("micro").items() if k != "ddo"}).encode(),
     "ddo"),
]


@pytest.mark.parametrize("name,content,expect", PARAMS_CASES, ids=[c[0] for c in PARAMS_CASES])
def test_bad_params_files_are_refused(proj, name, content, expect):
    (proj / "params.yaml").write_bytes(content)
    before = snapshot(proj)
    out = refused(["data", "--no-progress"], expect)
    assert out.count("params.yaml") <= 2, out  # the file named once per problem, not twice
    assert snapshot(proj) == before


def test_bad_command_lines_are_refused(proj, tmp_path):
    before = snapshot(proj)
    refused(["data", "--params", str(tmp_path / "nosuch.yaml")], "file not found")
    refused(["data", "--preset", "nosuch"], "unknown preset")
    refused(["table", "--paper", "ddo", "--results", "nosuchdir"], ["nosuchdir", "no such folder"])
    refused(["sample", "--round", "1", "--no-progress"], "--round")
    assert snapshot(proj) == before


def test_an_unexpected_exception_keeps_its_traceback(proj, monkeypatch):
    import repro.pipeline.stages.data as data_stage

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(data_stage, "prepare", broken)
    r = CliRunner().invoke(main, ["data", "--no-progress"])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError) and "error:" not in r.output


def test_table_without_results_folder_warns(proj, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["table", "--paper", "ddo"])
    assert r.exit_code == 0 and "warning: no results/" in r.output


# ----------------------------------------------------------------------------------------------------------
# 3. Corrupt files the stages read: models, data, manifests, shards, results.


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _random(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _huge_header(p: Path) -> None:
    p.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")


def _text(p: Path) -> None:
    p.write_text("not this kind of file\n")


def _bad_json(p: Path) -> None:
    p.write_text('{"sha256": ')


def _json_list(p: Path) -> None:
    p.write_text("[1, 2]\n")


def _flip_64_bytes(p: Path) -> None:
    """64 bytes of the tensor data inverted: the file still loads, but is not what its stage wrote."""
    b = bytearray(p.read_bytes())
    for i in range(len(b) - 200, len(b) - 136):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


BREAK = {"truncated": _truncate, "random": _random, "empty": _empty, "huge header": _huge_header, "text": _text}

FILE_CASES = [
    *[(f"base {k}", "models/base.safetensors", f, ["sample"]) for k, f in BREAK.items()],
    *[(f"ddo round {k}", "models/ddo/ddo-round2.safetensors", f, ["sample"]) for k, f in BREAK.items()],
    ("control truncated", "models/ddo/control-round2.safetensors", _truncate, ["sample"]),
    ("base 64 flipped bytes", "models/base.safetensors", _flip_64_bytes, ["sample"]),
    ("round 64 flipped bytes", "models/ddo/ddo-round1.safetensors", _flip_64_bytes, ["sample"]),
    ("control 64 flipped bytes", "models/ddo/control-round2.safetensors", _flip_64_bytes, ["sample"]),
    *[(f"data {k}", "data/digits.npz", f, ["extractor"]) for k, f in BREAK.items() if k != "huge header"],
    ("manifest bad json", "data/manifest.json", _bad_json, ["extractor"]),
    ("manifest empty", "data/manifest.json", _empty, ["extractor"]),
    ("manifest binary", "data/manifest.json", _random, ["extractor"]),
    ("manifest list", "data/manifest.json", _json_list, ["extractor"]),
    *[(f"shard {k}", "samples/base/seeds-000000000-000000096.npz", f, ["export-samples", "--out", "x.npz"])
      for k, f in BREAK.items() if k != "huge header"],
    ("metrics bad json", "results/micro/metrics.json", _bad_json, ["table", "--paper", "ddo"]),
    ("metrics binary", "results/micro/metrics.json", _random, ["table", "--paper", "ddo"]),
]


@pytest.mark.parametrize("name,rel,brk,args", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_corrupt_files_are_refused_naming_them(proj, name, rel, brk, args):
    path = proj / rel
    if rel.startswith("results/"):
        (path.parent / "protocol.json").write_text("{}\n")
    brk(path)
    before = snapshot(proj)
    out = refused([*args, "--no-progress"] if args[0] not in ("export-samples", "table") else args, Path(rel).name)
    assert "allow_pickle" not in out and "If you trust" not in out  # numpy's advice is the wrong advice here
    if "flipped" in name:
        assert "changed after it was written" in out
    assert snapshot(proj) == before


# ----------------------------------------------------------------------------------------------------------
# 4. The MLflow store (tracking on): unknown scheme, no server, missing folder, corrupt store.


def _corrupt_db(proj):
    _random(proj / "mlflow.db")
    return None


STORE_CASES = [
    ("no server", "http://127.0.0.1:9", "no server answers"),
    ("unknown scheme", "foo://x/y", "unknown scheme"),
    ("missing folder", "sqlite:////nonexistent-folder-for-repro/mlflow.db", "does not exist"),
    ("corrupt store", None, "cannot be opened"),
]


@pytest.mark.parametrize("name,uri,expect", STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_unusable_tracking_stores_fail_fast(proj, monkeypatch, name, uri, expect):
    import time

    monkeypatch.delenv("REPRO_TRACKING")
    if uri is None:
        _corrupt_db(proj)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = snapshot(proj)
    t0 = time.time()
    refused(["data", "--no-progress"], [expect, "REPRO_TRACKING=off"])
    assert time.time() - t0 < 30  # no minutes of retries
    assert snapshot(proj) == before
    assert not Path("/nonexistent-folder-for-repro").exists()


# ----------------------------------------------------------------------------------------------------------
# 5. A released pickle of a network class the converter does not build: refused, quarantined, not pinned.


def test_unsupported_pickle_is_refused_quarantined_and_not_pinned(project, tmp_path, monkeypatch):
    import test_edm_pickle as tp

    from repro.catalog.registry import CHECKPOINTS

    name = "edm-cifar10-32x32-cond-vp"
    local = tmp_path / "mirror"
    local.mkdir()
    net = tp.make_net(monkeypatch)
    names = {**tp.UPSTREAM_NAMES, tp.PlainPersistent: "EDMLoss", type(net): "iDDPMPrecond"}
    tp.write_pickle(local / CHECKPOINTS[name].filename, tp.edm_container(net), names=names)
    out = refused(["pretrained", "--preset", "released-ddo-cifar10-cond", "--no-progress", "--set",
                   f"pretrain.source={name}", "--set", f"pretrain.mirror={local}"], ["iDDPMPrecond", "not supported"])
    assert "NotImplementedError" not in out
    assert not (project / "checkpoints.lock.json").exists() or name not in (project / "checkpoints.lock.json").read_text()
    assert not (project / "checkpoints" / CHECKPOINTS[name].filename).exists()  # never picked up again
    reasons = list((project / "checkpoints" / "quarantine").glob("*.reason.txt"))
    assert len(reasons) == 1 and "iDDPMPrecond" in reasons[0].read_text()
    assert not (project / "models" / "base.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------
# 6. A full disk (a file-size limit stands in for it): one error line, nothing half-written.


def test_a_full_disk_is_one_error_line(proj):
    (proj / "data").rename(proj / "old-data")
    before = snapshot(proj)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    env = {**os.environ, "REPRO_TRACKING": "off"}
    p = subprocess.run([sys.executable, "-m", "repro.cli", "data", "--no-progress"], cwd=proj, env=env,
                       capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("error:") == 1 and "ulimit" in p.stderr
    after = snapshot(proj)
    assert after == before, set(after) ^ set(before)


# ----------------------------------------------------------------------------------------------------------
# 7. Read-only places. The tests run as root, which writes anywhere: the command runs without the capabilities
# that bypass file permissions (setpriv, util-linux), as a user's process would.

READ_ONLY_CASES = [
    ("project folder", ".", [], "read-only"),
    ("data folder", "data", [], "/data is read-only"),
    ("samples folder", "samples", [], "/samples is read-only"),
    ("a samples model folder", "samples/base", [], "/samples/base is read-only"),
    ("mlflow store", "mlflow.db", ["tracking"], "mlflow"),
]


@pytest.mark.parametrize("name,rel,opts,expect", READ_ONLY_CASES, ids=[c[0] for c in READ_ONLY_CASES])
def test_read_only_places_are_one_error_line(proj, name, rel, opts, expect):
    env = {**os.environ, "REPRO_TRACKING": "off"}
    stage = "sample" if rel.startswith("samples") else "data"
    if "tracking" in opts:  # a store made by an earlier run, now read-only (file and folder)
        env.pop("REPRO_TRACKING")
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{proj / 'store' / 'mlflow.db'}"
        (proj / "store").mkdir()
        import sqlite3

        sqlite3.connect(proj / "store" / "mlflow.db").execute("create table t (x int)").connection.close()
        rel = "store/mlflow.db"
        os.chmod(proj / rel, 0o444)
        os.chmod(proj / "store", 0o555)
    if rel == ".":  # a fresh project: nothing but params.yaml
        for q in proj.iterdir():
            if q.is_dir():
                shutil.rmtree(q)
    before = snapshot(proj)
    os.chmod(proj / rel, 0o555 if (proj / rel).is_dir() else 0o444)
    caps = "-dac_override,-dac_read_search,-fowner"
    try:
        p = subprocess.run(["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-m",
                            "repro.cli", stage, "--no-progress"], cwd=proj, env=env, capture_output=True, text=True,
                           timeout=120)
    finally:
        for q in (proj, proj / "data", proj / "samples", proj / "samples/base", proj / "store"):
            if q.exists():
                os.chmod(q, 0o755)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and p.stderr.count("error:") == 1, p.stderr
    assert expect in p.stderr and "Fix:" in p.stderr, p.stderr
    assert snapshot(proj) == before


@pytest.mark.parametrize("content", [b'{"history": ', b"", b"\xff\xfe\x00garbage"])
def test_every_json_input_is_read_naming_its_path(tmp_path, content):
    """rounds.json, done.json, manifests, indexes: all read through read_json, whose error names the file."""
    from repro.storage.files import BadFile, read_json

    path = tmp_path / "models" / "ddo" / "rounds.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(BadFile, match=r"rounds\.json: JSON file cannot be read .*Fix: "):
        read_json(path)
    import re

    # No other JSON read of a file is left, except the two that name their file themselves (and read_json).
    own = {"storage/files.py", "storage/download.py", "evaluation/tables/data.py"}
    for p in ROOT_PKG.rglob("*.py"):
        if str(p.relative_to(ROOT_PKG)) not in own:
            assert not re.search(r"json\.loads?\([^)]*(read_text|open)\(", p.read_text()), p


ROOT_PKG = Path(__file__).resolve().parents[1] / "repro"
