"""toy2d (repro/toys/ddo_toy.py, toy2d_stages.py, toys/toy2d/dvc.yaml): config, the exact metric against a direct
computation, the plateau rule, Theorem 3.3's fixed point, and a micro run end to end through `dvc repro`."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from repro.toys.ddo_toy import MLPDenoiser, Toy2DConfig, equal_compute_steps, exact_metrics, plateau_reached, \
    pretrain, theorem33_check, toy_data
from repro.toys.toy2d_stages import load_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_dvc_deps import module_closure  # noqa: E402


def test_config_defaults_and_refusals():
    cfg = Toy2DConfig()
    assert cfg.rounds >= 1 and cfg.control_lrs and cfg.ddo_betas and toy_data(cfg).means.shape == (16, 2)
    with pytest.raises(ValueError, match="toy2d: ddo_betas must be"):
        Toy2DConfig(ddo_betas=(0.0,))
    with pytest.raises(ValueError, match="toy2d: control_lrs"):
        Toy2DConfig(control_lrs=())
    with pytest.raises(ValueError, match="toy2d: round_steps must be an integer > 0"):
        Toy2DConfig(round_steps=0)
    with pytest.raises(ValueError, match="modes must be a square number"):
        Toy2DConfig(modes=10)
    with pytest.raises(ValueError, match="distinct latents"):
        Toy2DConfig(curve_seeds=(0, 5))


def test_params_file_refusals(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"toy2d": {"seeds": [0, 1], "width": 4, "ddo_lrs": [1e-3]}}))
    cfg, seeds = load_params(p)
    assert seeds == [0, 1] and cfg.width == 4 and cfg.ddo_lrs == (1e-3,)
    for bad, field in (({"widht": 4}, "toy2d.widht: unknown key"), ({"seeds": [0, 0]}, "toy2d.seeds: must be"),
                       ({"round_steps": -1}, "toy2d.round_steps: must be an integer > 0"),
                       ({"control_lrs": 0.1}, "toy2d.control_lrs: must be a list")):
        p.write_text(yaml.safe_dump({"toy2d": bad}))
        with pytest.raises(ValueError, match=field):
            load_params(p)
    # through the CLI: one error line naming the field, exit 2, nothing written
    p.write_text(yaml.safe_dump({"toy2d": {"width": 0}}))
    r = subprocess.run([sys.executable, "-m", "repro.cli", "toy2d", "pretrain", "--params", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: toy2d: toy2d.width: must be an integer > 0, got 0. Fix:")
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_exact_metric_against_direct_computation():
    data = toy_data(Toy2DConfig(data="ring", modes=4, mode_std=0.2))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.1], [0.0, 0.0], [-2.0, 0.5]], dtype=torch.float64)
    # log p(x) = log (1/4) sum_k N(x; mu_k, 0.2^2 I), written out by hand.
    mus = [(2.0, 0.0), (0.0, 2.0), (-2.0, 0.0), (0.0, -2.0)]
    var = 0.2 ** 2
    logp = [math.log(sum(0.25 * math.exp(-((a - m0) ** 2 + (b - m1) ** 2) / (2 * var)) / (2 * math.pi * var)
                         for m0, m1 in mus)) for a, b in x.tolist()]
    m = exact_metrics(data, x)
    assert m["nll"] == pytest.approx(-sum(logp) / 4, rel=1e-9)
    # distances to the nearest mean in std: 0, 0.5, 10, 2.5 -> one of four beyond 3 std
    assert m["off_mode"] == pytest.approx(0.25)
    # the 4x4 grid: means 1 apart, centred
    g = toy_data(Toy2DConfig())
    assert sorted(set(g.means[:, 0].tolist())) == [-1.5, -0.5, 0.5, 1.5]


def test_denoiser_preconditioning():
    net = MLPDenoiser(width=8, depth=1, sigma_data=1.0)
    x = torch.randn(5, 2)
    # at sigma -> 0, c_skip -> 1 and c_out -> 0: D(x) ~ x
    assert torch.allclose(net(x, torch.full((5,), 1e-6)), x, atol=1e-4)
    assert net(x, torch.full((5,), 3.0)).shape == (5, 2)


def _curve(means, spread=0.1):
    return [{"step": i, "nll": [m - spread / 2, m + spread / 2]} for i, m in enumerate(means)]


def test_plateau_rule():
    # too few evaluations for two windows: never a plateau
    assert not plateau_reached(_curve([5, 5, 5, 5, 5]), 3)
    # flat: the last 3's mean equals the 3 before -> plateau
    assert plateau_reached(_curve([5, 5, 5, 5, 5, 5]), 3)
    # improving by 0.3 between windows, seed noise 0.1 -> not yet; noise 0.5 -> plateau
    falling = [5.3, 5.3, 5.3, 5.0, 5.0, 5.0]
    assert not plateau_reached(_curve(falling, 0.1), 3)
    assert plateau_reached(_curve(falling, 0.5), 3)
    # getting worse is a plateau too (no improvement)
    assert plateau_reached(_curve([4, 4, 4, 6, 6, 6]), 3)
    # only the last 2M evaluations count
    assert plateau_reached(_curve([50, 40, 5, 5, 5, 5, 5, 5]), 3)


def test_pretrain_stops_at_the_rule_or_the_cap():
    cfg = Toy2DConfig(pretrain_max_steps=40, curve_every=10, curve_window=1, curve_n=64, num_steps=3, batch=32,
                      pretrain_cooldown=5)
    net, info = pretrain(toy_data(cfg), cfg)
    constant, cool = info["curve"][:-1], info["curve"][-1]
    steps = [e["step"] for e in constant]
    assert steps == list(range(10, info["constant_lr_steps"] + 1, 10)) and info["constant_lr_steps"] <= 40
    assert cool == {"step": info["constant_lr_steps"] + 5, "nll": cool["nll"], "cooldown": True}
    assert info["steps"] == cool["step"]
    # it stopped at the first evaluation where the rule held, or at the cap without it
    held = [plateau_reached(constant[:i], 1) for i in range(1, len(steps) + 1)]
    assert held[:-1] == [False] * (len(steps) - 1)
    assert info["plateau"] == held[-1] and (info["plateau"] or info["constant_lr_steps"] == 40)


def test_theorem33_fixed_point():
    # beta 2: the optimum is p_ref^(1/2) p_data^(1/2) / Z, weights far from both the data's and the reference's
    r = theorem33_check(2.0, n=4000, steps=300)
    assert r["max_abs_diff"] < 0.02
    assert max(abs(a - b) for a, b in zip(r["fitted"], r["data"])) > 0.04
    assert r["alpha"] < 1  # "for certain alpha": Z^beta, not 1


def test_equal_compute_steps_counts_passes():
    cfg = Toy2DConfig(rounds=1, round_steps=3, batch=2, n_fakes=5, evals_per_round=1, n_select=4, num_steps=2)
    # 3 steps x 2 pairs x 8 + 5 fakes x 3 NFE + 1 x 4 x 3 = 48 + 15 + 12 = 75 passes; a control step: 6
    assert equal_compute_steps(cfg) == 13


def test_dvc_yaml_code_deps_are_the_import_closure():
    stages = yaml.safe_load((ROOT / "toys/toy2d/dvc.yaml").read_text())["stages"]
    want = sorted(f"../../{p}" for p in module_closure("repro.toys.toy2d_stages"))
    for name, st in stages.items():
        code = sorted(d for d in st["deps"] if d.endswith(".py"))
        assert code == want, f"toys/toy2d/dvc.yaml stage {name}: code deps should be\n" + "\n".join(want)
        assert st["cmd"].startswith(f"repro toy2d {name} --params params.yaml")


MICRO = {"seeds": [0, 1, 2], "pretrain_max_steps": 30, "curve_every": 10, "curve_window": 1, "curve_n": 64,
         "batch": 32, "rounds": 1, "round_steps": 6, "evals_per_round": 1, "ddo_lrs": [1e-3], "n_fakes": 64,
         "control_lrs": [1e-3, 3e-3], "num_steps": 3, "pretrain_cooldown": 5, "n_select": 64, "n_eval": 64,
         "theorem33_n": 500, "theorem33_steps": 20}


def test_micro_run_through_dvc(tmp_path):
    """`dvc repro toys/toy2d/dvc.yaml` in a fresh git + DVC project, micro params: a table with data, base, DDO and
    both controls over three training seeds; a second repro does nothing."""
    d = tmp_path / "project"
    (d / "toys/toy2d").mkdir(parents=True)
    shutil.copytree(ROOT / "repro", d / "repro", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "toys/toy2d/dvc.yaml", d / "toys/toy2d/dvc.yaml")
    params = yaml.safe_load((ROOT / "toys/toy2d/params.yaml").read_text())
    params["toy2d"].update(MICRO)
    (d / "toys/toy2d/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*cmd):
        p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{cmd}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout + p.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    out = run("dvc", "repro", "toys/toy2d/dvc.yaml")
    for stage in ("pretrain", "ddo", "control", "table"):
        assert f"toys/toy2d/dvc.yaml:{stage}'" in out
    metrics = json.loads((d / "results/toy2d/metrics.json").read_text())
    assert metrics["seeds"] == [0, 1, 2]
    for s in ("0", "1", "2"):
        rows = metrics["runs"][s]
        assert [r["model"] for r in rows] == ["data", "base", "ddo-round1", "control-equal-steps",
                                              "control-equal-compute"]
        assert all(math.isfinite(r["nll"]) and 0 <= r["off_mode"] <= 1 and len(r["per_seed"]) == 2 for r in rows)
        assert rows[0]["nll"] < rows[1]["nll"]  # exact samples beat a 30-step model
        ch = metrics["choices"][s]
        assert ch["control"]["steps"]["steps"] == 6
        assert ch["control"]["compute"]["steps"] == equal_compute_steps(load_params(d / "toys/toy2d/params.yaml")[0])
        assert ch["control"]["compute"]["lr"] in (1e-3, 3e-3) and len(ch["ddo"]["grid"]) == 2
        assert metrics["curves"][s]["constant_lr_steps"] <= 30
    # the base differs between training seeds (each seed trains its own)
    assert len({metrics["runs"][s][1]["nll"] for s in ("0", "1", "2")}) == 3
    table = (d / "results/toy2d/table.md").read_text()
    assert "| base |" in table and "| ddo-round1 |" in table and "| control-equal-compute |" in table
    assert "### training seed 2" in table and "Theorem 3.3" in table
    assert "plateau" in (d / "results/toy2d/curve.md").read_text().lower()
    assert "Running stage" not in run("dvc", "repro", "toys/toy2d/dvc.yaml")
    # one seed at a time gives the same bases, byte for byte, as the pipeline's two at a time
    other = tmp_path / "one-worker"
    other.mkdir()
    shutil.copy(d / "toys/toy2d/params.yaml", other / "params.yaml")
    run("repro", "toy2d", "pretrain", "--params", str(other / "params.yaml"), "--workers", "1")
    for s in (0, 1, 2):
        name = f"out/base/seed{s}.safetensors"
        assert (other / name).read_bytes() == (d / "toys/toy2d" / name).read_bytes()
