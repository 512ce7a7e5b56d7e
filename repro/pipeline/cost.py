"""What a stage will cost, before it runs (the dry runs): its work counted in images and network evaluations, and
device-hours where the architecture's speed on a device was measured (repro.catalog.costs)."""

from __future__ import annotations

from repro.catalog import registry
from repro.catalog.costs import DATASET_SIZES, FWD_BWD, device_hours
from repro.config import Config
from repro.methods.ddo.sweep import sweep_grid


def architecture(cfg: Config) -> str:
    """The base network's architecture name (a released checkpoint's, or 'trained here')."""
    return registry.get(cfg.pretrain.source).arch if cfg.pretrain.source != "train" else "trained here"


def nfe(cfg: Config) -> int:
    """Network evaluations per sample: EDM's Heun sampler, doubled when autoguidance evaluates a guide too."""
    return (2 * cfg.sampler.num_steps - 1) * (2 if cfg.sampler.guidance != 1.0 else 1)


def ddo_cost(cfg: Config) -> dict:
    """The ddo stage's work: per round a fake bank (one fake per real image), the reference's selection score, and
    per (alpha, beta) candidate the training steps and the selection evaluations; the MLE control beside it."""
    d = cfg.ddo
    if d.rounds == 0:
        return {"rounds": 0, "image_forwards": 0, "what": "nothing (an evaluation: no rounds)"}
    n_data = DATASET_SIZES[cfg.data.dataset]
    k = 2 * cfg.sampler.num_steps - 1  # DDO's fakes and selection samples are drawn without guidance
    candidates = max(len(sweep_grid(d)), 1)
    steps = -(-d.nimg_per_round // d.batch)
    evals = -(-d.nimg_per_round // d.eval_every_nimg)
    fakes = n_data * k
    reference_score = d.selection_samples * k
    # a DDO step: theta forward+backward on the real and the fake half, two reference forwards
    train = steps * d.batch * (2 * FWD_BWD + 2)
    selection = evals * d.selection_samples * k
    per_round = fakes + reference_score + candidates * (train + selection)
    control = (steps * 2 * d.batch * FWD_BWD + selection) if d.control else 0
    total = d.rounds * (per_round + control)
    return {
        "rounds": d.rounds, "candidates_per_round": candidates, "steps_per_candidate": steps,
        "per_round": {"fake_bank_images": n_data, "fake_bank_forwards": fakes, "training_forwards": train,
                      "selection_evaluations": evals, "selection_forwards": selection,
                      "image_forwards": per_round + control},
        "image_forwards": total,
        "device_hours": device_hours(architecture(cfg), total),
    }


def sample_cost(cfg: Config) -> dict:
    """The sample stage: every model's evaluation seeds through the sampler (guide included)."""
    rounds = min(cfg.ddo.rounds, 1) if cfg.sample.models == "base-and-last" else cfg.ddo.rounds
    models = 1 + rounds + (1 if cfg.ddo.control and cfg.ddo.rounds else 0)
    images = models * cfg.sample.repeats * cfg.sample.n_samples
    total = images * nfe(cfg)
    return {"models": models, "images": images, "network_evaluations_per_image": nfe(cfg),
            "image_forwards": total, "device_hours": device_hours(architecture(cfg), total)}
