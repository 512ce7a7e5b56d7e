"""Measured costs per image of one network evaluation, per architecture and device: what the dry runs turn into
device-hours. Every figure names the benchmark output it comes from; an architecture or device not measured here is
said to be unmeasured, never guessed.

seconds: the wall time of one forward pass per image (fp32, no gradient), i.e. ms/eval / batch from the benchmark.
A training step's forward+backward is counted as 3 forward passes (the usual rule). On the H200, DDO's training
forward in fp32 with TF32 off (ddo.precision fp32) ran about 6x slower per image than the sampler's forward with
PyTorch's default TF32 convolutions (benchmarks/results/gpu-h200-20261204/run2/ddo2.txt: 257.2 ms for 128 images),
so training hours here are a lower bound in that mode.
"""

from __future__ import annotations

# {architecture: {device: (seconds per image-forward, source)}}
FORWARD_SECONDS: dict[str, dict[str, tuple[float, str]]] = {
    "edm-cifar10-32x32": {
        "cpu (2 shared cores, the development VM)": (
            1.821, "benchmarks/results/bench_sampler_cpu.txt: 3642.5 ms/eval at batch 2, fp32"),
        "gpu (one NVIDIA H200)": (
            3.334e-4, "benchmarks/results/gpu-h200-20261204/run2/up2.txt: 85.7 images/s at 35 NFE, batch 256, fp32 "
            "(PyTorch's default TF32 convolutions); bf16 + compile: 204.3 images/s"),
    },
    "img64-s": {
        "cpu (2 shared cores, the development VM)": (
            10.517, "benchmarks/results/bench_sampler_cpu.txt: 21034.3 ms/eval at batch 2, fp32"),
        "gpu (one NVIDIA H200)": (
            1.197e-3, "benchmarks/results/gpu-h200-20261204/run1/bench_sampler_img64.txt: 306.4 ms/eval at batch "
            "256, the released snapshot's fp16 U-Net; bf16 autocast: 204.4 ms/eval"),
    },
    "img512-l": {
        "cpu (2 shared cores, the development VM)": (
            26.849, "benchmarks/results/bench_sampler_cpu.txt: 53698.4 ms/eval at batch 2, fp32"),
    },
}

# Discriminator guidance at DG's CIFAR-10 sizes (the frozen 32x32 ADM classifier, 47.8M parameters, + DG's head,
# 2.88M), seconds per image: a BCE training step (extractor forward, head forward+backward), an improved-DG training
# step (the gradient to the input and its backward: a double backward through both), and one guidance evaluation
# (forward + backward to the input, once per sampler step with w2 = 0). Random weights, fp32.
DISCRIMINATOR_SECONDS: dict[str, dict[str, dict[str, tuple[float, str]]]] = {
    "dg-adm-32x32": {
        "cpu (2 shared cores, the development VM)": {
            "bce_step": (0.415, "benchmarks/results/bench_dg_cpu.txt: DG training step 829.3 ms at batch 2"),
            "mse_step": (3.349, "benchmarks/results/bench_dg_cpu.txt: improved-DG training step 6697.3 ms at batch 2"),
            "guidance": (0.899, "benchmarks/results/bench_dg_cpu.txt: guidance evaluation 1797.3 ms at batch 2"),
        },
    },
}

# What the registry's architecture names are measured as.
FAMILY = {"edm-cifar10-32x32-cond-vp": "edm-cifar10-32x32", "edm-cifar10-32x32-uncond-vp": "edm-cifar10-32x32",
          "img64-s": "img64-s", "img512-l": "img512-l"}

# Training images of the data sets (for the fake banks: one fake per real image per round).
DATASET_SIZES = {"digits": 1797, "cifar10": 50000, "imagenet64": 1281167, "imagenet512": 1281167, "none": 0}

FWD_BWD = 3  # a forward+backward pass in forward-pass units


def device_hours(arch: str, image_forwards: float) -> dict[str, str]:
    """{device: hours} for ``image_forwards`` at ``arch``'s measured speeds, or a line saying none is measured."""
    measured = FORWARD_SECONDS.get(FAMILY.get(arch, arch), {})
    out = {dev: f"{image_forwards * s / 3600:,.1f} h ({src})" for dev, (s, src) in measured.items()}
    if not any(dev.startswith("gpu") for dev in measured):
        out["gpu"] = "not measured for this architecture (see benchmarks/results/gpu-h200-20261204)"
    return out


def discriminator_hours(arch: str, counts: dict[str, float]) -> dict[str, str]:
    """{device: hours} for ``counts`` = {"bce_step" | "mse_step" | "guidance": images} at ``arch``'s measured
    speeds, or a line saying none is measured."""
    measured = DISCRIMINATOR_SECONDS.get(arch, {})
    out = {}
    for dev, table in measured.items():
        secs = sum(n * table[k][0] for k, n in counts.items() if n)
        out[dev] = f"{secs / 3600:,.1f} h ({'; '.join(sorted({table[k][1] for k, n in counts.items() if n}))})"
    if not measured:
        out["cpu"] = f"not measured for {arch}"
    out["gpu"] = "not measured (the H200 checks timed no discriminator: benchmarks/results/gpu-h200-20261204)"
    return out
