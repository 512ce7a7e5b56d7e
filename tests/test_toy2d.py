"""toy2d (repro/toys/ddo_toy.py): config, the exact metric against a direct computation, a micro run end to end."""

import math

import pytest
import torch

from repro.toys.ddo_toy import MLPDenoiser, Toy2DConfig, equal_compute_steps, exact_metrics, render_table, run, \
    theorem33_check, toy_data


def test_config_defaults_and_refusals():
    cfg = Toy2DConfig()
    assert cfg.rounds == 3 and cfg.control_lrs and cfg.alpha > 0 and cfg.beta > 0
    with pytest.raises(ValueError, match="toy2d: beta must be > 0"):
        Toy2DConfig(beta=0.0)
    with pytest.raises(ValueError, match="toy2d: control_lrs"):
        Toy2DConfig(control_lrs=())
    with pytest.raises(ValueError, match="toy2d: round_steps must be > 0"):
        Toy2DConfig(round_steps=0)


def test_exact_metric_against_direct_computation():
    data = toy_data(Toy2DConfig(modes=4, mode_std=0.2))
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


def test_denoiser_preconditioning():
    net = MLPDenoiser(width=8, depth=1, sigma_data=1.0)
    x = torch.randn(5, 2)
    # at sigma -> 0, c_skip -> 1 and c_out -> 0: D(x) ~ x
    assert torch.allclose(net(x, torch.full((5,), 1e-6)), x, atol=1e-4)
    assert net(x, torch.full((5,), 3.0)).shape == (5, 2)


def test_micro_run_table_has_base_ddo_and_control():
    cfg = Toy2DConfig(pretrain_steps=60, round_steps=8, evals_per_round=2, rounds=2, batch=64, n_fakes=128,
                      n_eval=128, num_steps=4, control_lrs=(1e-3,))
    rows = run(cfg)
    assert [r["model"] for r in rows] == ["data", "base", "ddo-round1", "ddo-round2", "control-round2",
                                          "control-equal-compute"]
    assert all(math.isfinite(r["nll"]) and 0 <= r["off_mode"] <= 1 for r in rows)
    assert rows[-2]["lr"] == 1e-3 and rows[-2]["steps"] == 16
    assert rows[-1]["steps"] == equal_compute_steps(cfg) > 16
    # the exact samples' NLL is far below an almost untrained model's
    assert rows[0]["nll"] < rows[1]["nll"]
    table = render_table(rows, cfg)
    for name in ("| base | 0 |", "| ddo-round2 | 2 |", "| control-round2 (lr 0.001, 16 steps) | 2 |"):
        assert name in table
    assert len(rows[1]["per_seed"]) == len(cfg.eval_seeds)


def test_theorem33_fixed_point():
    # beta 2: the optimum is p_ref^(1/2) p_data^(1/2) / Z, weights far from both the data's and the reference's
    r = theorem33_check(2.0, n=8000, steps=300)
    assert r["max_abs_diff"] < 0.02
    assert max(abs(a - b) for a, b in zip(r["fitted"], r["data"])) > 0.04
    assert r["alpha"] < 1  # "for certain alpha": Z^beta, not 1


def test_equal_compute_steps_counts_passes():
    cfg = Toy2DConfig(rounds=1, round_steps=3, batch=2, n_fakes=5, evals_per_round=1, n_eval=4, num_steps=2)
    # 3 steps x 2 pairs x 8 + 5 fakes x 3 NFE + 1 x 4 x 3 = 48 + 15 + 12 = 75 passes; a control step: 6
    assert equal_compute_steps(cfg) == 13
