"""The CUDA paths, on a GPU: sampling in fp32/bf16/fp16 with and without torch.compile, DDO and pretraining steps in
fp32 (TF32 off) against the CPU, NCCL through torchrun, and the Inception extractor on CUDA against the CPU.

Skipped without CUDA (the reason is printed); run on a GPU machine with ``python -m pytest -m cuda tests/test_cuda.py``.
With ``REPRO_CUDA_REPORT=<file>`` each test appends what it measured (one JSON object per line), which
benchmarks/gpu_check.sh keeps beside the benchmark figures.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

from repro.config.schema import SamplerConfig
from repro.methods.ddo.loss import ddo_diffusion_loss
from repro.methods.ddo.rounds import eval_forward
from repro.methods.losses import edm_loss
from repro.methods.training import for_training, training_precision
from repro.nets.factory import build_network
from repro.nets.layers import disable_dropout
from repro.sampling.edm import edm_sampler
from repro.sampling.generate import sampling_denoiser

# REPRO_CUDA_TESTS_DEVICE=cpu runs the same checks with the CPU in the GPU's place (fp16 and NCCL left out): a dry
# run of the tests' own logic on a machine without a GPU, before spending GPU time on them.
DEV = os.environ.get("REPRO_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (none visible to torch)")]

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {
    "edm": dict(precond="edm", img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                num_blocks=2, attn_resolutions=[8], dropout=0.0),
    "edm2": dict(precond="edm2", img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
                 channel_mult=[1, 2], num_blocks=2, attn_resolutions=[8], channels_per_head=16, dropout=0.0),
}


def report(**fields) -> None:
    """Append what a test measured to $REPRO_CUDA_REPORT (and print it: `pytest -s` shows it)."""
    line = json.dumps(fields, sort_keys=True)
    print(line)
    path = os.environ.get("REPRO_CUDA_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(autouse=True)
def no_tf32():
    """Every comparison here runs with TF32 off (matmuls and cuDNN), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _net(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return for_training(disable_dropout(build_network(ARCHS[family]))).eval().requires_grad_(False)


def _latents(family: str, n: int = 32, seed: int = 1):
    a = ARCHS[family]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, a["img_channels"], a["img_resolution"], a["img_resolution"], generator=g)
    y = torch.nn.functional.one_hot(torch.randint(a["label_dim"], [n], generator=g), a["label_dim"]).float()
    return x, y


def _sample(net, x, y, dtype="fp32", compile=False, device=DEV, steps=8):
    sampler = SamplerConfig(num_steps=steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0,
                            S_max=float("inf"), S_noise=1.0, batch=len(x), label_mode="random", dtype=dtype,
                            compile=compile)
    denoise = sampling_denoiser(net, sampler, device=device)
    with torch.no_grad():
        return edm_sampler(denoise, x.to(device), y.to(device), num_steps=steps).float().cpu()


@pytest.mark.parametrize("family", ["edm", "edm2"])
def test_cuda_fp32_sampling_matches_the_cpu(family):
    """The same latents, labels and weights give the same images on CUDA (fp32, TF32 off) as on the CPU."""
    net = _net(family)
    x, y = _latents(family)
    cpu = _sample(net, x, y, device="cpu")
    gpu = _sample(copy.deepcopy(net).to(DEV), x, y)
    diff = (cpu - gpu).abs()
    report(test="sampling_cuda_vs_cpu", family=family, max_abs=diff.max().item(), mean_abs=diff.mean().item(),
           scale=cpu.abs().mean().item())
    assert torch.isfinite(gpu).all()
    assert diff.max().item() < 1e-3, f"CUDA fp32 sampling differs from the CPU by {diff.max().item():.2e}"


@pytest.mark.parametrize("family", ["edm", "edm2"])
def test_cuda_sampling_dtypes_and_compile_against_fp32(family):
    """bf16 and fp16 autocast and torch.compile, each against eager fp32 on CUDA: compile alone changes nothing
    beyond float rounding; half precision stays close (the difference is reported; its FD effect is measured by
    benchmarks/bench_cuda_precision.py)."""
    net = _net(family).to(DEV)
    x, y = _latents(family)
    ref = _sample(net, x, y)
    for dtype in ("fp32", "bf16", "fp16") if DEV == "cuda" else ("fp32", "bf16"):
        for comp in (False, True):
            if dtype == "fp32" and not comp:
                continue
            out = _sample(net, x, y, dtype=dtype, compile=comp)
            diff = (out - ref).abs()
            report(test="sampling_dtype_vs_fp32", family=family, dtype=dtype, compile=comp,
                   max_abs=diff.max().item(), mean_abs=diff.mean().item())
            assert torch.isfinite(out).all(), (dtype, comp)
            if dtype == "fp32":
                assert diff.max().item() < 1e-3, f"compiled fp32 differs from eager fp32 by {diff.max().item():.2e}"
            else:
                # images live in [-1, 1]; half-precision networks move pixels by a fraction of a grey level on average
                assert diff.mean().item() < 0.02, f"{dtype} (compile {comp}) mean pixel change {diff.mean().item():.3f}"


def _step_grads(net, device, kind, family):
    """One DDO (or EDM-loss) step's loss and gradients on ``device`` in fp32 with TF32 off, from fixed inputs."""
    net = copy.deepcopy(net).to(device).train().requires_grad_(True)
    ref = copy.deepcopy(net).eval().requires_grad_(False)
    with torch.no_grad():  # theta a little away from the reference, so the log-ratios are not zero
        g = torch.Generator().manual_seed(5)
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(device))
    g = torch.Generator().manual_seed(3)
    a = ARCHS[family]
    shape = (8, a["img_channels"], a["img_resolution"], a["img_resolution"])
    xr, xf = (torch.rand(shape, generator=g) * 2 - 1 for _ in range(2))
    y = torch.nn.functional.one_hot(torch.randint(10, [8], generator=g), 10).float()
    sigma = torch.exp(torch.randn(8, 1, 1, 1, generator=g) * 1.2 - 1.2)
    eps = torch.randn(shape, generator=g)
    xr, xf, y, sigma, eps = (t.to(device) for t in (xr, xf, y, sigma, eps))
    with training_precision("fp32", device) as autocast, autocast():
        if kind == "ddo":
            # theta's fake pass in eval mode, as the DDO round runs it (EDM2's train-mode weight normalisation is in place)
            loss, _ = ddo_diffusion_loss(net, ref, xr, y, xf, y, sigma, eps, alpha=1.5, beta=0.2, sigma_data=0.5,
                                         net_fake=partial(eval_forward, net))
        else:
            loss = edm_loss(net, xr, y, sigma, eps, 0.5).mean()
        loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().cpu() for p in net.parameters() if p.grad is not None])


@pytest.mark.parametrize("family", ["edm", "edm2"])
@pytest.mark.parametrize("kind", ["ddo", "pretrain"])
def test_cuda_training_steps_match_the_cpu_in_fp32(family, kind):
    """A DDO step and a pretraining (EDM-loss) step in fp32 with TF32 off: the loss and every gradient on CUDA equal
    the CPU's up to float32 summation order."""
    net = _net(family)
    loss_cpu, g_cpu = _step_grads(net, "cpu", kind, family)
    loss_gpu, g_gpu = _step_grads(net, DEV, kind, family)
    rel = ((g_cpu - g_gpu).norm() / g_cpu.norm()).item()
    report(test="training_step_cuda_vs_cpu", family=family, kind=kind, loss_cpu=loss_cpu, loss_cuda=loss_gpu,
           grad_rel_l2=rel)
    assert abs(loss_cpu - loss_gpu) <= 1e-4 * max(1.0, abs(loss_cpu))
    assert rel < 1e-4, f"{kind} gradients on CUDA differ from the CPU's by {rel:.2e} (relative L2)"


@pytest.mark.skipif(DEV != "cuda", reason="TF32 exists on CUDA GPUs only")
def test_tf32_mode_changes_cuda_results_and_fp32_mode_turns_it_off():
    """ddo.precision: fp32 really runs without TF32 on CUDA (its result differs from tf32's, which differs from the
    CPU's by more), so the setting is not a no-op on the hardware it is for."""
    net = _net("edm")
    _, g_cpu = _step_grads(net, "cpu", "pretrain", "edm")
    _, g_fp32 = _step_grads(net, "cuda", "pretrain", "edm")

    def with_tf32():
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            n = copy.deepcopy(net).cuda()
            # _step_grads sets fp32 mode; call the loss directly under tf32
            n.train().requires_grad_(True)
            g = torch.Generator().manual_seed(3)
            shape = (8, 3, 16, 16)
            xr = (torch.rand(shape, generator=g) * 2 - 1).cuda()
            y = torch.nn.functional.one_hot(torch.randint(10, [8], generator=g), 10).float().cuda()
            sigma = torch.exp(torch.randn(8, 1, 1, 1, generator=g) * 1.2 - 1.2).cuda()
            eps = torch.randn(shape, generator=g).cuda()
            with training_precision("tf32", "cuda"):
                edm_loss(n, xr, y, sigma, eps, 0.5).mean().backward()
            return torch.cat([p.grad.flatten().cpu() for p in n.parameters() if p.grad is not None])
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    g_tf32 = with_tf32()
    e_fp32 = ((g_cpu - g_fp32).norm() / g_cpu.norm()).item()
    e_tf32 = ((g_cpu - g_tf32).norm() / g_cpu.norm()).item()
    report(test="tf32_vs_fp32", grad_rel_l2_fp32=e_fp32, grad_rel_l2_tf32=e_tf32)
    assert e_fp32 < 1e-4
    assert e_tf32 > 10 * e_fp32, "TF32 mode gave fp32's results: the precision switch did not reach cuBLAS/cuDNN"


NCCL_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from repro.cluster import distributed
    from repro.nets.factory import build_network
    from repro.nets.layers import disable_dropout
    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        assert distributed.init_from_env(), "init_from_env did not start a process group"
    else:  # one GPU: NCCL refuses two ranks on one device, so one rank runs the NCCL code paths
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
    assert dist.get_backend() == "nccl", dist.get_backend()
    r = distributed.rank()
    # collectives through our helpers, over NCCL
    assert distributed.all_gather_object({"rank": r}) == [{"rank": i} for i in range(world)]
    assert distributed.broadcast_object(("x", r)) == ("x", 0)
    assert distributed.all_mean([float(r), 1.0]) == [sum(range(world)) / world, 1.0]
    assert distributed.all_max(r) == world - 1
    assert distributed.gather_chunks([r]) == list(range(world)) or world == 1
    # a DDP step: gradients averaged over the ranks equal one process's gradient of the mean loss
    torch.manual_seed(0)
    arch = dict(precond="edm", img_resolution=8, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[], dropout=0.0)
    net = disable_dropout(build_network(arch)).cuda().train()
    ddp = distributed.wrap_ddp(net)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2 * world, 1, 8, 8, generator=g).cuda()
    s = torch.full([2 * world], 1.0).cuda()
    mine = slice(2 * r, 2 * r + 2)
    ddp(x[mine], s[mine]).square().mean().backward()
    got = torch.cat([p.grad.flatten() for p in net.parameters()])
    single = disable_dropout(build_network(arch)).cuda().train()
    single.load_state_dict(net.state_dict())
    single(x, s).square().mean().backward()
    want = torch.cat([p.grad.flatten() for p in single.parameters()])
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, err
    if r == 0:
        print(f"NCCL OK: world {world}, {torch.cuda.get_device_name()}, DDP gradient rel err {err:.1e}")
    dist.destroy_process_group()
""")


@pytest.mark.skipif(DEV != "cuda", reason="NCCL needs CUDA GPUs")
def test_nccl_collectives_and_ddp_through_torchrun(tmp_path):
    """torchrun on all visible GPUs (one rank per GPU; with one GPU a single NCCL rank): our collective helpers and
    a DDP step run over NCCL, and the averaged gradient equals one process's on the whole batch."""
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_SCRIPT)
    n = torch.cuda.device_count()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NCCL_DEBUG": "WARN"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                          str(script)], env=env, capture_output=True, text=True, timeout=300)
    report(test="nccl_torchrun", gpus=n, rc=res.returncode, out=res.stdout.strip()[-300:])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "NCCL OK" in res.stdout


def test_inception_extractor_on_cuda_matches_the_cpu(tmp_path):
    """torch-fidelity's Inception-v3 (FID's extractor) through our make_extractor/extract_features: CUDA features of
    the same uint8 images equal the CPU's (random weights in the released layout; TF32 off)."""
    from repro.evaluation.fidelity import INCEPTION_EXTRACTOR, default_feature, extract_features, make_extractor
    from repro.evaluation.inception import random_inception_weights

    path = random_inception_weights(tmp_path / "inception-random.pth")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    feature = default_feature(INCEPTION_EXTRACTOR)
    cpu = extract_features(make_extractor(INCEPTION_EXTRACTOR, path, device="cpu"), images, feature).float().cpu()
    gpu = extract_features(make_extractor(INCEPTION_EXTRACTOR, path, device=DEV), images, feature)
    gpu = gpu.float().cpu()
    rel = ((cpu - gpu).norm() / cpu.norm()).item()
    report(test="inception_cuda_vs_cpu", rel_l2=rel, dim=cpu.shape[1])
    assert cpu.shape == gpu.shape == (16, 2048)
    assert rel < 1e-3, f"Inception features on CUDA differ from the CPU's by {rel:.2e} (relative L2)"
