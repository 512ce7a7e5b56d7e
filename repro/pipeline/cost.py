"""What a stage will cost, before it runs (the dry runs): its work counted in images and network evaluations, and
device-hours where the architecture's speed on a device was measured (repro.catalog.costs)."""

from __future__ import annotations

from repro.catalog import registry
from repro.catalog.costs import DATASET_SIZES, FWD_BWD, device_hours, discriminator_hours
from repro.config import Config
from repro.methods.ddo.control import control_lrs, forward_equivalents
from repro.methods.ddo.sweep import sweep_grid
from repro.nets.var import PATCH_NUMS
from repro.nets.vpsde import tau_from_sigma
from repro.sampling.edm import sigma_steps


def architecture(cfg: Config) -> str:
    """The base network's architecture name (a released checkpoint's, or 'trained here')."""
    return registry.get(cfg.pretrain.source).arch if cfg.pretrain.source != "train" else "trained here"


def is_ar(cfg: Config) -> bool:
    """Whether the base is an autoregressive (VAR) model, sampled scale by scale."""
    return cfg.is_ar


def scales(cfg: Config) -> int:
    """A VAR model's scales (sampling steps): the released ones', or those of the tokenizer trained here."""
    return len(cfg.ar.tokenizer.patch_nums if cfg.pretrain.source == "train" else PATCH_NUMS)


def nfe(cfg: Config) -> int:
    """Network evaluations per sample: EDM's Heun sampler, doubled when autoguidance evaluates a guide too; VAR: one
    per scale, doubled when classifier-free guidance runs the unconditional pass (upstream's cfg 1.0 does)."""
    if is_ar(cfg):
        return scales(cfg) * (2 if cfg.ar.guided else 1)
    return (2 * cfg.sampler.num_steps - 1) * (2 if cfg.sampler.guidance != 1.0 else 1)


def ddo_cost(cfg: Config) -> dict:
    """The ddo stage's work: per round a fake bank (one fake per real image), the reference's selection score, and
    per (alpha, beta) candidate the training steps and the selection evaluations; the MLE control beside it; all of
    it once per training seed (ddo.seeds: each replicate trains every round again)."""
    d = cfg.ddo
    if d.rounds == 0:
        return {"rounds": 0, "image_forwards": 0, "what": "nothing (an evaluation: no rounds)"}
    n_data = DATASET_SIZES[cfg.data.dataset]
    # DDO's fakes and selection samples are drawn without guidance (VAR: one pass per scale)
    k = scales(cfg) if is_ar(cfg) else 2 * cfg.sampler.num_steps - 1
    candidates = max(len(sweep_grid(d)), 1)
    steps = -(-d.nimg_per_round // d.batch)
    evals = -(-d.nimg_per_round // d.eval_every_nimg)
    fakes = n_data * k
    reference_score = d.selection_samples * k
    # a DDO step: theta forward+backward on the real and the fake half, two reference forwards
    train = steps * d.batch * (2 * FWD_BWD + 2)
    selection = evals * d.selection_samples * k
    per_round = fakes + reference_score + candidates * (train + selection)
    control_steps = steps
    if d.control and d.control_budget == "compute":  # a DDO round's compute (the config refuses it for VAR models)
        n_train = n_data - int(round(cfg.data.holdout * n_data))  # the bank: one fake per training image
        control_steps = forward_equivalents(batch=d.batch, nimg_per_round=d.nimg_per_round,
                                            eval_every_nimg=d.eval_every_nimg, bank_images=n_train, nfe=k,
                                            selection_samples=d.selection_samples, budget="compute")["control_steps"]
    # the control: per learning-rate candidate, steps on 2 x batch real images and the selection evaluations
    control = len(control_lrs(d)) * (control_steps * 2 * d.batch * FWD_BWD + selection) if d.control else 0
    total = d.seeds * d.rounds * (per_round + control)
    return {
        "rounds": d.rounds, **({"training_seeds": d.seeds} if d.seeds > 1 else {}),
        "candidates_per_round": candidates, "steps_per_candidate": steps,
        **({"control": {"lr_candidates": len(control_lrs(d)), "budget": d.control_budget,
                        "steps_per_candidate": control_steps}}
           if d.control and (d.control_lrs or d.control_budget != "steps") else {}),
        "per_round": {"fake_bank_images": n_data, "fake_bank_forwards": fakes, "training_forwards": train,
                      "selection_evaluations": evals, "selection_forwards": selection,
                      "image_forwards": per_round + control},
        "image_forwards": total,
        "device_hours": device_hours(architecture(cfg), total),
    }


def sample_cost(cfg: Config) -> dict:
    """The sample stage: every model's evaluation seeds through the sampler (guide included); training-seed
    replicates (ddo.seeds) add their last DDO round and the control's."""
    rounds = min(cfg.ddo.rounds, 1) if cfg.sample.models == "base-and-last" else cfg.ddo.rounds
    last = (1 + (1 if cfg.ddo.control else 0)) if cfg.ddo.rounds else 0  # a replicate's: last DDO round, control's
    models = 1 + rounds + (1 if cfg.ddo.control and cfg.ddo.rounds else 0) + (cfg.ddo.seeds - 1) * last
    images = models * cfg.sample.repeats * cfg.sample.n_samples
    total = images * nfe(cfg)
    return {"models": models, "images": images, "network_evaluations_per_image": nfe(cfg),
            "image_forwards": total, "device_hours": device_hours(architecture(cfg), total)}


def guidance_cost(cfg: Config, guided: list[dict]) -> dict:
    """The guidance stages' work (``guided``: repro.methods.guidance.describe): the fake banks (generator forwards),
    the discriminators' training (image steps, the improved objective's through the generator too) and the guided
    samples (generator forwards and discriminator evaluations, one per step inside the window, two with w2 != 0)."""
    n_data = DATASET_SIZES[cfg.data.dataset]
    k = nfe(cfg)
    arch = architecture(cfg)
    d, g = cfg.discriminator, cfg.guidance
    n_fakes = g.fakes or n_data
    banks = sorted({x["model"] for x in guided if x["fake_bank"]})
    fake_forwards = len(banks) * n_fakes * k
    disc_arch = "dg-adm-32x32" if d.arch == "adm" else f"encoder, width {d.width} (trained here)"
    real = min(d.num_data or n_data, n_data)
    steps = {"bce_step": 0, "mse_step": 0}
    gen_forwards = 0
    critic_images = 0
    for x in guided:
        if x["trained"] and x["objective"] == "wgan-gp":  # DCD's critic: its own steps, real + fake per step
            critic_images += cfg.dcd.critic_steps * 2 * cfg.dcd.batch
        elif x["trained"]:
            fake = min(d.num_data or n_fakes, n_fakes)
            steps[f"{x['objective']}_step"] += d.epochs * (real + (fake if x["objective"] == "bce" else 0))
            gen_forwards += d.epochs * real if x["objective"] == "mse" else 0
    # the guided sampler: the generator's NFE, and the discriminator at each step whose tau(sigma) is in the window
    s = cfg.sampler
    tau = tau_from_sigma(sigma_steps(s.num_steps, s.sigma_min, s.sigma_max, s.rho)[:-1])
    n = cfg.sample.repeats * cfg.sample.n_samples
    images, evaluations, kernel_pairs, langevin = len(guided) * n, 0, 0, 0
    for x in guided:
        g = x["sampler"]
        if x["variant"] == "dcd":  # unguided sampling, then Langevin steps (a critic gradient each)
            langevin += n * cfg.dcd.steps
            continue
        inside = int(((tau >= g["tau_min"]) & (tau <= g["tau_max"])).sum())
        calls = n * ((inside if g["w"] else 0) + (max(inside - 1, 0) if g["w2"] else 0))
        if x["variant"] == "kernel":  # each call: the image against both (subsampled) banks
            bank = min(cfg.kernel.max_bank or n_data, n_data) + min(cfg.kernel.max_bank or n_fakes, n_fakes)
            kernel_pairs += calls * bank
        else:
            evaluations += calls
    per_image = evaluations // images if images else 0
    return {
        "fakes": {"banks": banks, "images": len(banks) * n_fakes, "image_forwards": fake_forwards,
                  "device_hours": device_hours(arch, fake_forwards)},
        "discriminator": {"discriminator": disc_arch, "trained": sum(x["trained"] for x in guided),
                          "epochs": d.epochs, "image_steps": {k_: v for k_, v in steps.items() if v},
                          "generator_forwards": gen_forwards,
                          "device_hours": {"discriminator": discriminator_hours(disc_arch, steps),
                                           **({"generator": device_hours(arch, gen_forwards)} if gen_forwards else {})}
                          if any(steps.values()) else
                          ("see dcd_critic_hours" if critic_images else "nothing to train"),
                          **({"dcd_critic_images": critic_images, "dcd_critic_hours": "not measured"}
                             if critic_images else {})},
        "guided": {"models": len(guided), "images": images, "network_evaluations_per_image": k,
                   "discriminator_evaluations_per_image": per_image, "image_forwards": images * k,
                   "discriminator_evaluations": evaluations,
                   **({"kernel_image_pairs": kernel_pairs, "kernel_hours": "not measured (benchmarks/kernel_banks.py "
                       "prints time and memory against bank size on this machine)"} if kernel_pairs else {}),
                   **({"dcd_langevin_critic_gradients": langevin, "dcd_hours": "not measured"} if langevin else {}),
                   "device_hours": {"generator": device_hours(arch, images * k),
                                    "discriminator": discriminator_hours(disc_arch, {"guidance": evaluations})
                                    if evaluations else "no discriminator evaluations"}},
    }
