"""Evaluation protocols as data: what a paper's metric cell means, so that a run can match it and say so.

A protocol names the number of samples, the seed ranges and how their values are reduced (EDM reports the
minimum over three ranges), the label mode (random per seed, or class-balanced as DDO re-balances ImageNet),
the sampler and its NFE, the feature extractor and its weights, and the reference statistics. Presets pick the
protocol of their table cell (``sample.protocol``); the config refuses a preset whose sample/sampler settings
disagree with it, and every metrics file records it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Protocol:
    name: str
    cell: str                 # which paper numbers it produces
    n_samples: int
    seed_ranges: tuple[tuple[int, int], ...]
    reduce: str               # "min" or "mean" over the seed ranges
    label_mode: str           # "random" (per-seed generator), "balanced" (seed i -> class i mod K), or "none"
    num_steps: int            # EDM Heun steps (NFE = 2 * num_steps - 1), or VAR's scales (NFE = num_steps)
    extractor: str
    extractor_weights: str
    reference: str
    reference_format: str
    source: str
    sampler: str = "edm-heun"  # edm-heun | var-next-scale (one network evaluation per scale)

    @property
    def nfe(self) -> int:
        return self.num_steps if self.sampler == "var-next-scale" else 2 * self.num_steps - 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seed_ranges"] = [list(r) for r in self.seed_ranges]
        d["nfe"] = self.nfe
        return d


INCEPTION = ("inception-v3-compat (Inception-v3 2015-12-05, 2048-d pool features); weights "
             "weights-inception-2015-12-05-6726825d.pth, offline from `repro inception-weights`")

EDM_REF = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz"
IMG64_REF = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img64.pkl"
IMG512_REF = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl"
IMG256_REF = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
              "VIRTUAL_imagenet256_labeled.npz")
ONE_RANGE = ((0, 50000),)
THREE_RANGES = ((0, 50000), (50000, 100000), (100000, 150000))

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol("tiny-fd-digits", "the tiny preset's own table (not a paper cell)", 1797, ((0, 1797), (1797, 3594)),
             "mean", "balanced", 10, "digits-classifier", "models/extractor.safetensors (extractor stage)",
             "data/digits.npz, all 1,797 real images", "repro-npz", "this package"),
    # DDO's own evaluation (its README, "Reproducing FID Results"): EDM's generate.py with --seeds=0-49999 and
    # EDM's fid.py calc once, i.e. ONE range of 50k seeds; EDM's generate.py draws each seed's label from the
    # seed's generator. Its "EDM (retested)" 1.85 (vs EDM's published 1.79, a minimum of three) fits one range.
    Protocol("ddo-cifar10-fid50k", "DDO Table 1 (CIFAR-10: EDM retested 1.97/1.85, DDO 1.38/1.30)", 50000, ONE_RANGE,
             "mean", "random", 18, "inception-v3-compat", INCEPTION, EDM_REF, "edm-npz",
             "NVlabs/DDO README (generate.py --seeds=0-49999, fid.py calc); research/ddo.md section 4"),
    Protocol("edm-cifar10-fid50k", "EDM's own CIFAR-10 numbers (1.79 cond, 1.97 uncond: minimum of three ranges)",
             50000, THREE_RANGES, "min", "random", 18, "inception-v3-compat", INCEPTION, EDM_REF, "edm-npz",
             "EDM generate.py/fid.py and README (min of 3 seed ranges); research/ddo.md section 4"),
    # DG's CIFAR-10 evaluation (alsdudrla10/DG README steps 6-7; research/dg.md a.2, a.3): its generate.py makes 50k
    # samples with EDM's Heun sampler, 18 steps (35 NFE), and fid_npzs.py computes FID-50k once against EDM's
    # cifar10-32x32.npz with the Inception-v3 2015-12-05 weights: EDM's FID pipeline, one range (its EDM baselines,
    # 2.03 / 1.82, are its own measurements of the released EDM nets, not EDM's minimum of three). DG seeds its run
    # once (--seed 0), not per image: seeds 0-49999 per image are ours. Conditional labels: drawn at random per
    # sample, as EDM's generate.py (assumed: the notes do not say how DG draws them).
    Protocol("dg-cifar10-fid50k", "DG's CIFAR-10 rows: EDM 2.03 -> 1.77 uncond, 1.82 -> 1.64 cond", 50000, ONE_RANGE,
             "mean", "random", 18, "inception-v3-compat", INCEPTION, EDM_REF, "edm-npz",
             "alsdudrla10/DG README (generate.py 50k, fid_npzs.py --num_samples=50000, EDM's cifar10-32x32.npz); "
             "research/dg.md a.2, a.3"),
    # DDO's EDM2_sample.py: seeds 0-49999, seed i gets class i mod 1000 (strict class balance), Heun 32 steps.
    Protocol("ddo-img64-fid50k", "DDO Table 2 (ImageNet-64: EDM2-S retested 1.60, DDO 0.97)", 50000, ONE_RANGE,
             "mean", "balanced", 32, "inception-v3-compat", INCEPTION, IMG64_REF, "edm2-pkl",
             "NVlabs/DDO README + EDM2_sample.py (class-balanced seeds 0-49999) + EDM2 calculate_metrics.py; "
             "research/ddo.md section 4"),
    Protocol("ddo-img512-fid50k", "DDO ImageNet-512 (EDM2-L retested 1.96, DDO 1.26, +AG 1.21)", 50000, ONE_RANGE,
             "mean", "balanced", 32, "inception-v3-compat", INCEPTION, IMG512_REF, "edm2-pkl",
             "NVlabs/DDO README + EDM2_sample.py + EDM2 calculate_metrics.py; research/ddo.md section 4"),
    # DDO's VAR_sample.py: 1000 classes x 50 images (class-balanced), next-scale sampling over 10 scales without
    # top-k/top-p; the OpenAI evaluator (its TF graph is the same Inception-v3 2015-12-05 as our port; the two have
    # not been compared on ImageNet-256 here) against VIRTUAL_imagenet256_labeled.npz. The guidance convention is the
    # preset's (ar.cfg, ar.cfg_mode; research/ddo.md 4, CFG caveat).
    Protocol("ddo-var-imagenet256-fid50k", "DDO Table 3 (ImageNet-256 VAR: d16 11.33/3.71 -> 3.12/2.54, d30 4.74/1.92 "
             "-> 1.79/1.73)", 50000, ONE_RANGE, "mean", "balanced", 10, "inception-v3-compat", INCEPTION, IMG256_REF,
             "openai-npz", "NVlabs/DDO VAR_sample.py + OpenAI evaluator; research/ddo.md section 4",
             sampler="var-next-scale"),
]}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
