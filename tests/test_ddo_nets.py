"""DDO on the networks it fine-tunes: a DDO step on EDM's U-Net and on EDM2's (whose train-mode forward rewrites its
weights in place), its gradient against finite differences, and a round that keeps its reference when no
checkpoint beats it."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from functools import partial

import pytest
import torch

from repro.methods.ddo import sweep as sweep_mod
from repro.methods.ddo.loss import ddo_diffusion_loss
from repro.methods.ddo.rounds import eval_forward, train_round
from repro.nets.checkpoint import save_model
from repro.nets.factory import build_network
from repro.nets.layers import disable_dropout
from repro.pipeline.tracking import NullTracker
from repro.storage.layout import RoundDir

ARCHS = {
    "edm": dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], dropout=0.1),
    "edm2": dict(precond="edm2", img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.1),
}


def _pair(family, seed=0):
    """A reference and a theta that differs from it a little (so the log-ratios are not zero); float32, as trained."""
    torch.manual_seed(seed)
    ref = disable_dropout(build_network(ARCHS[family])).eval().requires_grad_(False)
    net = copy.deepcopy(ref).train().requires_grad_(True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref, net


def _batch(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    x_real, x_fake = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.nn.functional.one_hot(torch.randint(10, [n], generator=g), 10).float()
    sigma = torch.exp(torch.randn(n, 1, 1, 1, generator=g) * 1.2 - 1.2)
    eps = torch.randn(n, 1, 8, 8, generator=g)
    return x_real, y, x_fake, y, sigma, eps


def _loss(net, ref, batch, net_fake=None):
    return ddo_diffusion_loss(net, ref, *batch, alpha=1.5, beta=0.2, sigma_data=0.5, net_fake=net_fake)[0]


@pytest.mark.parametrize("family", ["edm", "edm2"])
def test_a_ddo_step_runs_and_its_gradient_matches_finite_differences(family):
    ref, net = _pair(family)
    batch = _batch()
    if family == "edm2":  # two train-mode passes before backward: EDM2's in-place weight normalisation breaks it
        with pytest.raises(RuntimeError, match="inplace operation"):
            _loss(net, ref, batch).backward()
        net.zero_grad(set_to_none=True)
    # theta's fake pass in eval mode (as the paper's code does, per the transcription of its Appendix D)
    loss = _loss(net, ref, batch, net_fake=partial(eval_forward, net))
    loss.backward()
    assert net.training  # eval_forward put it back
    # The directional derivative along a random direction (every parameter), by central differences. The nets
    # compute in float32: a step of 3e-3 balances truncation and rounding (agreement ~0.2% measured).
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in net.named_parameters()}
    g = torch.Generator().manual_seed(7)
    direction = {n: torch.randn(p.shape, generator=g) * p.detach().abs().mean().clamp_min(1e-3)
                 for n, p in net.named_parameters()}
    auto = sum((grads[n] * d).sum() for n, d in direction.items()).item()
    h, vals = 3e-3, []
    for sign in (1, -1):
        probe = copy.deepcopy(net).eval()  # eval: no in-place weight normalisation while probing
        with torch.no_grad():
            for n, p in probe.named_parameters():
                p.add_(sign * h * direction[n])
            vals.append(_loss(probe, ref, batch).item())
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(auto) > 1e-2 and fd == pytest.approx(auto, rel=1e-2), (fd, auto)
    for n, p in list(net.named_parameters())[::7]:  # and per tensor, where the gradient is not negligible
        if grads[n].abs().max() < 1e-3 * max(g.abs().max() for g in grads.values()):
            continue
        # a 10x larger step than above: one tensor's share of the loss is small, and float32 rounding of the loss
        # (~1e-6 of 1.6) over 2 x 3e-3 is ~5e-4, the size of a bias's derivative; truncation stays ~h^2 ~ 1e-3
        probe_p, probe_m, h_n = copy.deepcopy(net).eval(), copy.deepcopy(net).eval(), 10 * h
        with torch.no_grad():
            dict(probe_p.named_parameters())[n].add_(h_n * direction[n])
            dict(probe_m.named_parameters())[n].sub_(h_n * direction[n])
            fd_n = (_loss(probe_p, ref, batch) - _loss(probe_m, ref, batch)).item() / (2 * h_n)
        auto_n = (grads[n] * direction[n]).sum().item()
        assert fd_n == pytest.approx(auto_n, rel=2e-2, abs=2e-4), n
    # one Adam step changes theta and lowers nothing in the reference
    before = [p.detach().clone() for p in ref.parameters()]
    torch.optim.Adam(net.parameters(), lr=1e-3).step()
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))


class FirstIsBest:
    """Selection metric stand-in: the first model scored (the round's reference) is the best of all."""

    name = "first_is_best"

    def __init__(self):
        self.calls = 0

    def score(self, net, seeds, label_dim, img_shape, sampler):
        self.calls += 1
        return 1.0 if self.calls == 1 else 2.0 + self.calls


def test_a_round_whose_checkpoints_are_all_worse_keeps_its_reference(tmp_path, cfg, data):
    torch.manual_seed(0)
    arch = dict(precond="edm", img_resolution=8, img_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[], dropout=0.0)
    save_model(tmp_path / "ref.safetensors", build_network(arch), arch)
    small = replace(data, images=data.images[:64], labels=data.labels[:64])
    dcfg = replace(cfg.ddo, batch=16, nimg_per_round=32, eval_every_nimg=16, selection_samples=8)
    res = train_round("ddo", 1, tmp_path / "ref.safetensors", small, dcfg, cfg.sampler, 0.5, FirstIsBest(),
                      tmp_path / "round", NullTracker(), progress=False)
    assert res.best_score == 1.0 and res.best_nimg == 0 and [e["nimg"] for e in res.evals] == [16, 32]
    assert res.best_path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    # a swept round whose candidates are all worse keeps the reference too
    rd = tmp_path / "swept"
    swept = replace(dcfg, sweep_beta=(0.1, 0.3))
    sweep_mod.swept_round(1, tmp_path / "ref.safetensors", small, swept, cfg.sampler, 0.5, FirstIsBest(), rd,
                          NullTracker(), False)
    done = json.loads(RoundDir(rd).done.read_text())
    assert done["chosen"] == "reference" and done["best_nimg"] == 0 and done["best_score"] == 1.0
    assert RoundDir(rd).best.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


class NormMetric:
    name = "weight_norm"

    def score(self, net, seeds, label_dim, img_shape, sampler):
        return float(sum((p.detach().double() ** 2).sum() for p in net.parameters()).sqrt()) % 1.0


def test_a_ddo_round_trains_an_edm2_net(tmp_path, cfg, data):
    torch.manual_seed(0)
    arch = dict(ARCHS["edm2"], dropout=0.0)
    save_model(tmp_path / "ref.safetensors", build_network(arch), arch)
    small = replace(data, images=data.images[:32], labels=data.labels[:32])
    dcfg = replace(cfg.ddo, batch=8, nimg_per_round=16, eval_every_nimg=8, selection_samples=4)
    res = train_round("ddo", 1, tmp_path / "ref.safetensors", small, dcfg, replace(cfg.sampler, num_steps=2), 0.5,
                      NormMetric(), tmp_path / "round", NullTracker(), progress=False)
    assert [e["nimg"] for e in res.evals] == [8, 16] and res.best_path.is_file()


def test_training_precision_sets_and_restores_tf32_and_autocast():
    from repro.methods.training import training_precision

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # torch's default for cuDNN
    with training_precision("fp32") as autocast:  # the paper's setting: fp32, TF32 off
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with autocast():
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    assert torch.backends.cudnn.allow_tf32  # restored
    with training_precision("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with training_precision("bf16") as autocast, autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    with pytest.raises(ValueError, match="ddo.precision"):
        with training_precision("fp16"):
            pass


def test_edm2_schedules_power_ema_and_late_round_P_std():
    import math

    from repro.methods.ddo.rounds import P_std_of_round
    from repro.methods.training import for_training, lr_decay, power_ema_beta, power_ema_gamma

    assert lr_decay(500, 0) == 1.0 and lr_decay(500, 1000) == 1.0 and lr_decay(4000, 1000) == pytest.approx(0.5)
    for sigma_rel in (0.01, 0.05, 0.1):  # the exponent reproduces the relative std it was solved for
        g = power_ema_gamma(sigma_rel)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    # EDM2's averaging profile: weights of a power-function EMA over t images are proportional to t'^gamma
    g, batch, n = power_ema_gamma(0.05), 4, 400
    w = torch.zeros(n // batch, dtype=torch.float64)
    for k in range(n // batch):  # EMA of one-hot "parameters": how much step k's weights count at the end
        w *= power_ema_beta(g, (k + 1) * batch, batch)
        w[k] += 1 - power_ema_beta(g, (k + 1) * batch, batch)
    t = (torch.arange(n // batch, dtype=torch.float64) + 1.0) * batch / n
    assert torch.allclose(w / w.sum(), t ** g / (t ** g).sum(), rtol=0.1, atol=2e-3 * (w / w.sum()).max())
    dcfg = replace(load_config_ddo(), P_std=1.6, P_std_rounds={17: 3.0, 20: 3.5})
    assert [P_std_of_round(dcfg, r) for r in (1, 16, 17, 19, 20, 24)] == [1.6, 1.6, 3.0, 3.0, 3.5, 3.5]
    net = for_training(build_network(dict(ARCHS["edm2"], use_fp16=True)).half())
    assert next(net.parameters()).dtype == torch.float32 and net.use_fp16 is False


def load_config_ddo():
    from repro.config import load_config

    return load_config(preset="micro").ddo
