"""DDO on a 2-D Gaussian mixture with exact numbers: base, DDO rounds and the MLE control, scored exactly.

The data is a :class:`repro.toys.gmm.GaussianMixture` (exact density). The generator is a small MLP denoiser of
deliberately limited capacity with EDM's preconditioning (Karras et al. 2022, Table 1), trained with the package's
EDM loss (:func:`repro.methods.losses.edm_loss`), then fine-tuned by the package's diffusion DDO loss
(:func:`repro.methods.ddo.loss.ddo_diffusion_loss`) in self-play rounds (each round's reference is the previous
round's model, its fakes are the reference's samples), and, as the control, by the EDM loss for the same number of
steps from the same base, at each learning rate of ``control_lrs`` (the best one by the selection seeds is kept).
Samples come from the package's EDM Heun sampler (:func:`repro.sampling.edm.edm_sampler`).

Every model is scored on exact quantities (:func:`exact_metrics`): the NLL of its samples under the true density,
-E_x log p_data(x) (the cross-entropy; its floor is the data's entropy, the row ``data``), and the mass off the
modes (the fraction of samples further than 3 standard deviations from every mode's mean).

This is a standalone comparison (``benchmarks/toy2d.py``); it does not go through the DVC stages.

Example::

    cfg = Toy2DConfig(pretrain_steps=200, round_steps=20, rounds=1, n_eval=256)
    rows = run(cfg)                # [{'model': 'base', 'round': 0, 'nll': ..., 'off_mode': ...}, ...]
    print(render_table(rows, cfg))
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from repro.methods.ddo.loss import ddo_diffusion_loss, ddo_objective
from repro.methods.losses import edm_loss
from repro.sampling.edm import edm_sampler
from repro.toys.gmm import GaussianMixture, ring

__all__ = ["theorem33_check", "Toy2DConfig", "MLPDenoiser", "toy_data", "exact_metrics", "sample", "pretrain", "ddo_round",
           "control", "equal_compute_steps", "run", "render_table"]


@dataclasses.dataclass(frozen=True)
class Toy2DConfig:
    """The toy2d comparison's settings (defaults: the committed run, results/toy2d/)."""

    modes: int = 8               # data: ``modes`` equal Gaussians on a circle of radius 2, std ``mode_std``
    mode_std: float = 0.2
    width: int = 32              # the MLP denoiser: deliberately small (limited capacity is DDO's premise)
    depth: int = 2
    sigma_data: float = 1.4      # ~ the data's per-coordinate std (radius 2 / sqrt 2)
    P_mean: float = -2.0       # EDM's -1.2 leaves the modes' small scales underweighted here
    P_std: float = 1.2
    pretrain_steps: int = 4000
    pretrain_lr: float = 2e-3   # decayed linearly to 0: the base ends at its plateau
    batch: int = 256
    rounds: int = 3
    round_steps: int = 200       # Adam steps per DDO round (and per control round)
    evals_per_round: int = 4     # checkpoints per round scored on the selection seeds; the best is the round's model
    alpha: float = 1.0
    beta: float = 0.3
    ddo_lr: float = 2e-4         # with beta: the best of beta {0.05, 0.1, 0.3, 1} x lr {2e-4, 1e-3} tried by hand
    control_lrs: tuple = (2e-4, 1e-3)  # the control's learning-rate search, best by the selection seeds
    n_fakes: int = 4096          # fake bank per round (the reference's samples)
    num_steps: int = 18          # Heun steps of the sampler
    n_eval: int = 4000           # samples per seed range
    eval_seeds: tuple = (0, 1)   # seed ranges of the final evaluation (disjoint latents)
    selection_seed: int = 1000   # the control's lr selection: other latents than the evaluation's
    seed: int = 0                # training seed (initialisation, data draws, sigma/noise draws)

    def __post_init__(self):
        for name in ("modes", "width", "depth", "pretrain_steps", "batch", "round_steps", "evals_per_round", "n_fakes",
                     "num_steps", "n_eval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"toy2d: {name} must be > 0, got {getattr(self, name)}")
        if self.rounds < 0:
            raise ValueError(f"toy2d: rounds must be >= 0, got {self.rounds}")
        for name in ("mode_std", "sigma_data", "P_std", "pretrain_lr", "alpha", "beta", "ddo_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"toy2d: {name} must be > 0, got {getattr(self, name)}")
        if not self.control_lrs or not all(lr > 0 for lr in self.control_lrs):
            raise ValueError(f"toy2d: control_lrs must be positive learning rates, got {self.control_lrs}")


def toy_data(cfg: Toy2DConfig) -> GaussianMixture:
    return ring(k=cfg.modes, radius=2.0, std=cfg.mode_std)


class MLPDenoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's preconditioning; F an MLP (SiLU)."""

    def __init__(self, width: int = 32, depth: int = 2, sigma_data: float = 1.4, dim: int = 2):
        super().__init__()
        self.sigma_data = sigma_data
        layers, d_in = [], dim + 1
        for _ in range(depth):
            layers += [torch.nn.Linear(d_in, width), torch.nn.SiLU()]
            d_in = width
        self.F = torch.nn.Sequential(*layers, torch.nn.Linear(d_in, dim))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.F(torch.cat([c_in * x, c_noise], dim=1))


def exact_metrics(data: GaussianMixture, x: torch.Tensor, radius: float = 3.0) -> dict[str, float]:
    """NLL of the points under the exact density (-mean log p_data) and the mass off the modes (the fraction
    further than ``radius`` standard deviations from every mode's mean)."""
    return {"nll": float(-data.log_prob(x.to(torch.float64)).mean()),
            "off_mode": float(1 - data.mode_mass(x, radius))}


def sample(net: torch.nn.Module, n: int, seed: int, num_steps: int) -> torch.Tensor:
    """n points [n, 2] from the EDM Heun sampler (float64 state), latents from ``seed``."""
    latents = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        return edm_sampler(net, latents, None, num_steps=num_steps)


def _sigma_noise(n: int, cfg: Toy2DConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = (torch.randn(n, 1, generator=g) * cfg.P_std + cfg.P_mean).exp()
    return sigma, torch.randn(n, 2, generator=g)


def _real(data: GaussianMixture, n: int, g: torch.Generator) -> torch.Tensor:
    return data.sample(n, g).float()


def _edm_steps(net: torch.nn.Module, data: GaussianMixture, cfg: Toy2DConfig, steps: int, lr: float,
               g: torch.Generator, decay: bool = False) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for i in range(steps):
        if decay:  # linear to 0
            for group in opt.param_groups:
                group["lr"] = lr * (1 - i / steps)
        y = _real(data, cfg.batch, g)
        sigma, eps = _sigma_noise(cfg.batch, cfg, g)
        loss = edm_loss(net, y, None, sigma, eps, cfg.sigma_data).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def pretrain(data: GaussianMixture, cfg: Toy2DConfig) -> MLPDenoiser:
    """The base model: the EDM loss on exact data samples for ``pretrain_steps`` Adam steps (lr decayed to 0)."""
    torch.manual_seed(cfg.seed)
    net = MLPDenoiser(cfg.width, cfg.depth, cfg.sigma_data)
    _edm_steps(net, data, cfg, cfg.pretrain_steps, cfg.pretrain_lr, torch.Generator().manual_seed(cfg.seed + 1),
               decay=True)
    return net


def ddo_round(net: torch.nn.Module, data: GaussianMixture, cfg: Toy2DConfig, r: int) -> torch.nn.Module:
    """One self-play round: the reference is ``net`` frozen, its samples the fakes; returns the round's checkpoint
    with the best NLL on the selection seeds (``evals_per_round`` of them, the start not among them)."""
    ref = copy.deepcopy(net).requires_grad_(False)
    fakes = sample(ref, cfg.n_fakes, seed=10_000_000 + r, num_steps=cfg.num_steps).float()
    theta = copy.deepcopy(net)
    opt = torch.optim.Adam(theta.parameters(), lr=cfg.ddo_lr)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 100 + r)
    every = max(cfg.round_steps // cfg.evals_per_round, 1)
    best = (math.inf, theta)
    for step in range(1, cfg.round_steps + 1):
        x_real = _real(data, cfg.batch, g)
        x_fake = fakes[torch.randint(len(fakes), (cfg.batch,), generator=g)]
        sigma, eps = _sigma_noise(cfg.batch, cfg, g)
        loss, _ = ddo_diffusion_loss(theta, ref, x_real, None, x_fake, None, sigma, eps, alpha=cfg.alpha,
                                     beta=cfg.beta, sigma_data=cfg.sigma_data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == cfg.round_steps:
            score = _selection_nll(theta, data, cfg)
            if score < best[0]:
                best = (score, copy.deepcopy(theta))
    return best[1]


def _selection_nll(net, data: GaussianMixture, cfg: Toy2DConfig) -> float:
    return exact_metrics(data, sample(net, cfg.n_eval, cfg.selection_seed, cfg.num_steps))["nll"]


def control(base: torch.nn.Module, data: GaussianMixture, cfg: Toy2DConfig, lr: float,
            steps: int | None = None) -> torch.nn.Module:
    """The MLE control: the base trained further with the EDM loss, by default for the DDO rounds' total step count
    (equal steps; :func:`equal_compute_steps` for equal compute)."""
    net = copy.deepcopy(base)
    steps = cfg.rounds * cfg.round_steps if steps is None else steps
    _edm_steps(net, data, cfg, steps, lr, torch.Generator().manual_seed(cfg.seed * 1000 + 7))
    return net


def equal_compute_steps(cfg: Toy2DConfig) -> int:
    """Control steps costing what the DDO rounds cost, counted in per-sample network passes (a forward pass 1, a
    backward pass 2): a DDO step runs theta on the real and the fake sample with gradient and the reference on
    both without (8 per pair); each round also samples its fake bank and its checkpoints' selection latents
    (2 num_steps - 1 forward passes per point); a control step is 3 per sample."""
    nfe = 2 * cfg.num_steps - 1
    per_round = cfg.round_steps * cfg.batch * 8 + cfg.n_fakes * nfe + cfg.evals_per_round * cfg.n_eval * nfe
    return math.ceil(cfg.rounds * per_round / (3 * cfg.batch))


def _score(net, data, cfg, seeds) -> dict:
    per = [exact_metrics(data, sample(net, cfg.n_eval, s, cfg.num_steps)) for s in seeds]
    return {k: sum(p[k] for p in per) / len(per) for k in per[0]} | {"per_seed": per}


def run(cfg: Toy2DConfig) -> list[dict]:
    """Train base, DDO rounds and the lr-searched control; score each on the evaluation seed ranges.

    Rows: data (exact samples: the floor), base, ddo-round1..R, control-roundR (equal steps) and
    control-equal-compute (:func:`equal_compute_steps`), each control with its selected lr."""
    data = toy_data(cfg)
    rows = []
    exact = [exact_metrics(data, data.sample(cfg.n_eval, torch.Generator().manual_seed(s))) for s in cfg.eval_seeds]
    rows.append({"model": "data", "round": None, **{k: sum(e[k] for e in exact) / len(exact) for k in exact[0]},
                 "per_seed": exact})
    base = pretrain(data, cfg)
    rows.append({"model": "base", "round": 0, **_score(base, data, cfg, cfg.eval_seeds)})
    net = base
    for r in range(1, cfg.rounds + 1):
        net = ddo_round(net, data, cfg, r)
        rows.append({"model": f"ddo-round{r}", "round": r, **_score(net, data, cfg, cfg.eval_seeds)})
    if cfg.rounds:
        for name, steps in ((f"control-round{cfg.rounds}", None), ("control-equal-compute", equal_compute_steps(cfg))):
            best = None
            for lr in cfg.control_lrs:
                c = control(base, data, cfg, lr, steps)
                sel = _selection_nll(c, data, cfg)
                if best is None or sel < best[0]:
                    best = (sel, lr, c)
            rows.append({"model": name, "round": cfg.rounds, "lr": best[1],
                         "steps": steps or cfg.rounds * cfg.round_steps, "selection_nll": best[0], **_score(best[2], data, cfg, cfg.eval_seeds)})
    return rows


def _f(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else str(v)


def render_table(rows: list[dict], cfg: Toy2DConfig) -> str:
    """Markdown table: NLL and off-mode mass (mean of the seed ranges, and each range), delta vs base."""
    seeds = ", ".join(str(s) for s in cfg.eval_seeds)
    lines = [f"| model | round | NLL (mean of seed ranges {seeds}) | NLL per range | off-mode mass | "
             "off-mode per range | Δ NLL vs base |", "|---|---:|---:|---:|---:|---:|---:|"]
    base = next((r for r in rows if r["model"] == "base"), None)
    for r in rows:
        name = r["model"] + (f" (lr {r['lr']:g}, {r['steps']} steps)" if "lr" in r else "")
        delta = "–" if base is None or r["model"] in ("base", "data") else _f(r["nll"] - base["nll"])
        lines.append(f"| {name} | {'–' if r['round'] is None else r['round']} | {_f(r['nll'])} | "
                     f"{' / '.join(_f(p['nll']) for p in r['per_seed'])} | {r['off_mode']:.4f} | "
                     f"{' / '.join(format(p['off_mode'], '.4f') for p in r['per_seed'])} | {delta} |")
    return "\n".join(lines) + "\n"


def theorem33_check(beta: float, n: int = 20000, steps: int = 400, seed: int = 0) -> dict:
    """The fixed point of Theorem 3.3 (Zheng et al. 2025), checked with exact log-likelihoods.

    Data: 8 equal modes on a circle (std 0.1, 15 std apart); reference: the same modes with weights 1:...:8; the
    model family: the same modes with free weights (softmax of logits), so log p_theta is exact. For modes this far
    apart, p_ref^(1-1/beta) p_data^(1/beta) / Z is the mixture of the same modes with weights
    w_ref^(1-1/beta) w_data^(1/beta) / Z, Z = sum of those. The GAN optimum sig(beta r) = p_data / (p_data +
    alpha p_ref) gives p_theta = alpha^(-1/beta) p_ref^(1-1/beta) p_data^(1/beta), a density when alpha = Z^beta:
    "for certain alpha". Minimising the DDO objective (the package's :func:`ddo_objective`, Eq. 13) over the weights
    on n real and n fake samples must then land on those weights. Returns the fitted and predicted weights and
    their largest difference.
    """
    data = ring(k=8, radius=2.0, std=0.1)
    ref = ring(k=8, radius=2.0, std=0.1, weights=torch.arange(1, 9, dtype=torch.float64))
    target = ref.weights ** (1 - 1 / beta) * data.weights ** (1 / beta)
    z = target.sum()
    target = target / z
    alpha = float(z ** beta)
    g = torch.Generator().manual_seed(seed)
    real, fake = data.sample(n, g), ref.sample(n, g)
    logits = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)

    with torch.no_grad():
        ref_real, ref_fake = ref.log_prob(real), ref.log_prob(fake)
        # log N(x; mu_k, s_k^2 I) per component: log p_theta = logsumexp_k(that + log w_theta_k)
        comp_real = ref._parts(real, 0.0)[0] - torch.log(ref.weights)
        comp_fake = ref._parts(fake, 0.0)[0] - torch.log(ref.weights)
    for _ in range(steps):
        log_w = torch.log_softmax(logits, 0)
        lp_real = torch.logsumexp(comp_real + log_w, 1)
        lp_fake = torch.logsumexp(comp_fake + log_w, 1)
        loss = ddo_objective(lp_real - ref_real, lp_fake - ref_fake, alpha, beta).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fitted = torch.softmax(logits.detach(), 0)
    return {"beta": beta, "alpha": alpha, "fitted": fitted.tolist(), "predicted": target.tolist(),
            "data": data.weights.tolist(), "max_abs_diff": float((fitted - target).abs().max())}
