"""Benchmark: closed-form kernel guidance and DCD on the 2-D toys, on exact metrics (repro.toys.dg_toy).

Kernel guidance: EDM's Heun sampler (12 steps) on the toy model's exact denoiser (repro.toys.dg_toy.toy_pair: data =
8 modes of std 0.1 on a circle of radius 2, model = std 0.2, radius 2.1, weights 1 : ... : 8), guided by the
closed-form critic of 600 real and 600 model samples, for both kernels, several weights, and both places the
kernel can act (``noised``: x_t vs the banks noised to sigma; ``denoised``: the denoised estimate vs the clean
banks). DCD: Langevin from model samples with the true log-density ratio and the model's score (the chain's target
is the data), and with a trained WGAN-GP critic (a ring of radius 2.5 vs the data's 2), 20 steps. Metrics: the
exact NLL under the data mixture, the mass within 3 std of a data mode, the mode-frequency error (total variation).

    python benchmarks/kernel_dcd_toy.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from repro.methods.dcd import CriticTrainConfig, MLPCritic, critic_grad, langevin, train_critic  # noqa: E402
from repro.methods.kernel import KernelCritic, KernelGuidance  # noqa: E402
from repro.sampling.edm import edm_sampler  # noqa: E402
from repro.toys.dg_toy import sample_metrics, toy_banks, toy_pair  # noqa: E402
from repro.toys.gmm import log_ratio, ring  # noqa: E402

F64 = torch.float64


def fmt(m: dict) -> str:
    return f"nll {m['nll']:8.3f}  mode_mass {m['mode_mass']:.3f}  mode_tv {m['mode_tv']:.3f}"


def kernel_rows() -> None:
    data, model = toy_pair()
    real, fake = toy_banks(data, model, 600, 600, seed=0)
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    z = torch.randn(600, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    print("# kernel guidance, 600 samples, banks 600 + 600, EDM Heun 12 steps")
    print(f"{'unguided':40s}  {fmt(sample_metrics(data, edm_sampler(model.denoiser(), z, num_steps=12)))}")
    for kernel, h in (("gaussian", 0.3), ("polyharmonic", 0.3)):
        critic = KernelCritic(real, fake, kernel, h)
        for where in ("noised", "denoised"):
            for w in (1.0, 3.0, 10.0):
                g = KernelGuidance(critic, w=w, where=where, denoise=model.denoiser())
                x = edm_sampler(model.denoiser(), z, num_steps=12, correction=g)
                print(f"{kernel + ' h=' + str(h) + ' ' + where + ' w=' + str(w):40s}  {fmt(sample_metrics(data, x))}")


def dcd_rows() -> None:
    print("# DCD: true log-ratio critic + the model's score, 400 samples, 150 steps of 2e-3 (pixel space)")
    data, model = ring(8, 2.0, 0.1), ring(8, 2.1, 0.2)
    g = torch.Generator().manual_seed(0)
    x0, exact = model.sample(400, g), data.sample(400, g)
    x = langevin(x0, critic_grad(lambda x: log_ratio(data, model, x)), steps=150, step_size=2e-3, prior=model.score,
                 generator=g)
    for name, v in (("model samples", x0), ("exact data samples", exact), ("after Langevin", x)):
        print(f"{name:40s}  {fmt(sample_metrics(data, v))}")
    print("# DCD: WGAN-GP critic (MLP 64 x 2, 400 steps of 64) on 1000 + 1000, 20 steps of 2e-2, no noise")
    data, model = ring(8, 2.0, 0.1), ring(8, 2.5, 0.15)
    real, fake = toy_banks(data, model, 1000, 1000, 0)
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    torch.manual_seed(0)
    critic = MLPCritic(2, width=64, depth=2)
    train_critic(critic, real, fake, CriticTrainConfig(steps=400, batch=64, lr=2e-3))
    x0 = fake[:400].double()
    x = langevin(x0, critic_grad(critic.double()), steps=20, step_size=2e-2, noise=0.0)
    for name, v in (("model samples", x0), ("after 20 DCD steps", x)):
        print(f"{name:40s}  {fmt(sample_metrics(data, v))}")


if __name__ == "__main__":
    kernel_rows()
    dcd_rows()
