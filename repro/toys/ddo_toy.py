"""DDO on a 2-D Gaussian mixture with exact numbers: the base at its plateau, DDO rounds and the MLE control.

The data is a :class:`repro.toys.gmm.GaussianMixture` (exact density). The generator is a small MLP denoiser of
deliberately limited capacity with EDM's preconditioning (Karras et al. 2022, Table 1), trained with the package's
EDM loss (:func:`repro.methods.losses.edm_loss`) until its exact NLL curve is flat (:func:`plateau_reached`), then
fine-tuned by the package's diffusion DDO loss (:func:`repro.methods.ddo.loss.ddo_diffusion_loss`) in self-play
rounds (each round's reference is the previous round's model, its fakes are the reference's samples), with alpha,
beta and lr picked from a small grid by the selection latents; and, as the control, by the EDM loss from the same
base, its lr picked from ``control_lrs`` by the same latents, for the same number of steps and for the same compute
(:func:`equal_compute_steps`). Samples come from the package's EDM Heun sampler
(:func:`repro.sampling.edm.edm_sampler`).

Every model is scored on exact quantities (:func:`exact_metrics`): the NLL of its samples under the true density,
-E_x log p_data(x) (a cross-entropy: the row ``data`` is what exact samples score; samples piled on the modes'
centres would score lower, so the off-mode mass is reported beside it), and the mass off the modes (the fraction
of samples further than 3 standard deviations from every mode's mean).

The stages of the toy's DVC pipeline (``toys/toy2d/dvc.yaml``) are in :mod:`repro.toys.toy2d_stages`.

Example::

    cfg = Toy2DConfig(pretrain_max_steps=400, curve_every=100, round_steps=20, rounds=1, n_eval=256)
    data = toy_data(cfg)
    base, info = pretrain(data, cfg)            # info: {'curve': [...], 'steps': ..., 'plateau': ...}
    ddo_nets, chosen = ddo_search(base, data, cfg)
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from repro.methods.ddo.loss import ddo_diffusion_loss, ddo_objective
from repro.methods.losses import edm_loss
from repro.methods.plateau import plateau_reached
from repro.sampling.edm import edm_sampler
from repro.toys.gmm import GaussianMixture, grid, ring

__all__ = ["theorem33_check", "Toy2DConfig", "MLPDenoiser", "new_net", "toy_data", "exact_metrics", "sample",
           "plateau_reached", "pretrain", "selection_nll", "ddo_round", "ddo_search", "control", "control_search",
           "equal_compute_steps", "score", "data_row", "render_table"]


def _positive_tuple(name, value, cast=float):
    if not value or not all(cast(v) > 0 for v in value):
        raise ValueError(f"toy2d: {name} must be a non-empty list of positive numbers, got {list(value or [])}")


@dataclasses.dataclass(frozen=True)
class Toy2DConfig:
    """The toy2d comparison's settings (defaults: the committed run, toys/toy2d/params.yaml and results/toy2d/)."""

    data: str = "grid"           # "grid": modes = n*n equal Gaussians 1 apart; "ring": modes on a circle of radius 2
    modes: int = 16
    mode_std: float = 0.1
    width: int = 8               # the MLP denoiser: deliberately small (limited capacity is DDO's premise)
    depth: int = 2
    sigma_data: float = 1.4      # ~ the data's per-coordinate std
    P_mean: float = -2.0         # EDM's -1.2 leaves the modes' small scales underweighted here
    P_std: float = 1.2
    batch: int = 256
    # the base: constant lr until the plateau rule (plateau_reached) holds on the curve, or pretrain_max_steps
    pretrain_lr: float = 3e-3
    pretrain_max_steps: int = 16000
    pretrain_cooldown: int = 1000  # then this many steps with the lr decayed linearly to 0 (0: none)
    curve_every: int = 1000      # K: the exact NLL is evaluated every K steps ...
    curve_window: int = 3        # M: ... and the last M evaluations' mean is compared with the M before
    curve_seeds: tuple = (2000, 2001)  # latent seeds of the curve (neither evaluation nor selection latents)
    curve_n: int = 8000
    # DDO: self-play rounds; (alpha, beta, lr) picked from the grid by the selection latents
    rounds: int = 2
    round_steps: int = 200
    evals_per_round: int = 2     # checkpoints per round scored on the selection latents; the best is the round's model
    ddo_alphas: tuple = (1.0,)
    ddo_betas: tuple = (0.1, 0.5)
    ddo_lrs: tuple = (3e-4, 1e-3)
    n_fakes: int = 4096          # fake bank per round (the reference's samples)
    # the MLE control: the EDM loss from the same base, lr picked from control_lrs by the selection latents
    control_lrs: tuple = (3e-4, 1e-3, 3e-3)
    num_steps: int = 18          # Heun steps of the sampler
    n_select: int = 4000         # samples of the selection latents
    n_eval: int = 8000           # samples per evaluation seed range
    eval_seeds: tuple = (0, 1)   # seed ranges of the final evaluation (disjoint latents)
    selection_seed: int = 1000   # DDO's and the control's hyperparameters and DDO's checkpoints: other latents
    theorem33_n: int = 10000     # theorem33_check's real and fake samples and Adam steps (the table stage)
    theorem33_steps: int = 300
    seed: int = 0                # training seed (initialisation, data draws, sigma/noise draws)

    def __post_init__(self):
        for name in ("modes", "width", "depth", "pretrain_max_steps", "curve_every", "curve_window", "curve_n", "batch",
                     "round_steps", "evals_per_round", "n_fakes", "num_steps", "n_select", "n_eval", "theorem33_n",
                     "theorem33_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"toy2d: {name} must be an integer > 0, got {v!r}")
        if self.data not in ("grid", "ring"):
            raise ValueError(f"toy2d: data must be 'grid' or 'ring', got {self.data!r}")
        if self.data == "grid" and round(math.sqrt(self.modes)) ** 2 != self.modes:
            raise ValueError(f"toy2d: modes must be a square number for data 'grid' (n x n modes), got {self.modes}")
        if not isinstance(self.pretrain_cooldown, int) or self.pretrain_cooldown < 0:
            raise ValueError(f"toy2d: pretrain_cooldown must be an integer >= 0, got {self.pretrain_cooldown!r}")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"toy2d: rounds must be an integer >= 0, got {self.rounds!r}")
        for name in ("mode_std", "sigma_data", "P_std", "pretrain_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"toy2d: {name} must be > 0, got {getattr(self, name)}")
        for name in ("ddo_alphas", "ddo_betas", "ddo_lrs", "control_lrs"):
            _positive_tuple(name, getattr(self, name))
        if not self.eval_seeds or len(self.curve_seeds) < 2:
            raise ValueError("toy2d: eval_seeds must be non-empty and curve_seeds must hold at least 2 seeds (the "
                             "curve's noise is their range)")
        used = {self.selection_seed, *self.eval_seeds}
        if used & set(self.curve_seeds) or self.selection_seed in self.eval_seeds:
            raise ValueError(f"toy2d: curve_seeds {list(self.curve_seeds)}, eval_seeds {list(self.eval_seeds)} and "
                             f"selection_seed {self.selection_seed} must be distinct latents")


def toy_data(cfg: Toy2DConfig) -> GaussianMixture:
    if cfg.data == "grid":
        return grid(n=round(math.sqrt(cfg.modes)), spacing=1.0, std=cfg.mode_std)
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


def new_net(cfg: Toy2DConfig) -> MLPDenoiser:
    return MLPDenoiser(cfg.width, cfg.depth, cfg.sigma_data)


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


def _edm_steps(net: torch.nn.Module, data: GaussianMixture, cfg: Toy2DConfig, steps: int, opt, g: torch.Generator,
               lr_at=None):
    for i in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
        y = _real(data, cfg.batch, g)
        sigma, eps = _sigma_noise(cfg.batch, cfg, g)
        loss = edm_loss(net, y, None, sigma, eps, cfg.sigma_data).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def pretrain(data: GaussianMixture, cfg: Toy2DConfig) -> tuple[MLPDenoiser, dict]:
    """The base model: the EDM loss on exact data samples, Adam at constant ``pretrain_lr``, the exact NLL on the
    curve seeds every ``curve_every`` steps, stopped at the first evaluation where :func:`plateau_reached` holds (or
    at ``pretrain_max_steps``); then ``pretrain_cooldown`` steps with the lr decayed linearly to 0 (one more curve
    point, ``cooldown``). Returns the net and {'curve', 'steps', 'constant_lr_steps', 'plateau': the rule held}."""
    torch.manual_seed(cfg.seed)
    net = new_net(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.pretrain_lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    def evaluate():
        return [exact_metrics(data, sample(net, cfg.curve_n, s, cfg.num_steps))["nll"] for s in cfg.curve_seeds]

    curve, steps, plateau = [], 0, False
    while steps < cfg.pretrain_max_steps and not plateau:
        k = min(cfg.curve_every, cfg.pretrain_max_steps - steps)
        _edm_steps(net, data, cfg, k, opt, g)
        steps += k
        curve.append({"step": steps, "nll": evaluate()})
        plateau = plateau_reached(curve, cfg.curve_window)
    constant = steps
    if cfg.pretrain_cooldown:  # lr linearly to 0: the base keeps what a lower lr gains at once
        n = cfg.pretrain_cooldown
        _edm_steps(net, data, cfg, n, opt, g, lr_at=lambda i: cfg.pretrain_lr * (1 - i / n))
        steps += n
        curve.append({"step": steps, "nll": evaluate(), "cooldown": True})
    return net, {"curve": curve, "steps": steps, "constant_lr_steps": constant, "plateau": plateau}


def selection_nll(net, data: GaussianMixture, cfg: Toy2DConfig) -> float:
    return exact_metrics(data, sample(net, cfg.n_select, cfg.selection_seed, cfg.num_steps))["nll"]


def ddo_round(net: torch.nn.Module, data: GaussianMixture, cfg: Toy2DConfig, r: int, alpha: float, beta: float,
              lr: float) -> torch.nn.Module:
    """One self-play round: the reference is ``net`` frozen, its samples the fakes; returns the round's checkpoint
    with the best NLL on the selection latents (``evals_per_round`` of them, the start not among them)."""
    ref = copy.deepcopy(net).requires_grad_(False)
    fakes = sample(ref, cfg.n_fakes, seed=10_000_000 + r, num_steps=cfg.num_steps).float()
    theta = copy.deepcopy(net)
    opt = torch.optim.Adam(theta.parameters(), lr=lr)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 100 + r)
    every = max(cfg.round_steps // cfg.evals_per_round, 1)
    best = (math.inf, theta)
    for step in range(1, cfg.round_steps + 1):
        x_real = _real(data, cfg.batch, g)
        x_fake = fakes[torch.randint(len(fakes), (cfg.batch,), generator=g)]
        sigma, eps = _sigma_noise(cfg.batch, cfg, g)
        loss, _ = ddo_diffusion_loss(theta, ref, x_real, None, x_fake, None, sigma, eps, alpha=alpha, beta=beta,
                                     sigma_data=cfg.sigma_data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == cfg.round_steps:
            score = selection_nll(theta, data, cfg)
            if score < best[0]:
                best = (score, copy.deepcopy(theta))
    return best[1]


def ddo_search(base: torch.nn.Module, data: GaussianMixture, cfg: Toy2DConfig) -> tuple[list, dict]:
    """DDO's rounds for every (alpha, beta, lr) of the grid from ``base``; the setting whose last round has the
    lowest NLL on the selection latents is kept. Returns (its round models, {'chosen', 'grid': [scores]})."""
    best, grid_scores = None, []
    for alpha in cfg.ddo_alphas:
        for beta in cfg.ddo_betas:
            for lr in cfg.ddo_lrs:
                nets, net = [], base
                for r in range(1, cfg.rounds + 1):
                    net = ddo_round(net, data, cfg, r, alpha, beta, lr)
                    nets.append(net)
                score = selection_nll(net, data, cfg)
                grid_scores.append({"alpha": alpha, "beta": beta, "lr": lr, "selection_nll": score})
                if best is None or score < best[0]:
                    best = (score, {"alpha": alpha, "beta": beta, "lr": lr}, nets)
    return best[2], {"chosen": best[1], "grid": grid_scores}


def control(base: torch.nn.Module, data: GaussianMixture, cfg: Toy2DConfig, lr: float, steps: int) -> torch.nn.Module:
    """The MLE control: the base trained further with the EDM loss (a fresh Adam at ``lr``) for ``steps`` steps."""
    net = copy.deepcopy(base)
    _edm_steps(net, data, cfg, steps, torch.optim.Adam(net.parameters(), lr=lr),
               torch.Generator().manual_seed(cfg.seed * 1000 + 7))
    return net


def control_search(base, data: GaussianMixture, cfg: Toy2DConfig, steps: int) -> tuple[torch.nn.Module, dict]:
    """The control at each lr of ``control_lrs``; the lowest NLL on the selection latents is kept."""
    best, scores = None, []
    for lr in cfg.control_lrs:
        c = control(base, data, cfg, lr, steps)
        score = selection_nll(c, data, cfg)
        scores.append({"lr": lr, "selection_nll": score})
        if best is None or score < best[0]:
            best = (score, lr, c)
    return best[2], {"lr": best[1], "steps": steps, "grid": scores}


def equal_compute_steps(cfg: Toy2DConfig) -> int:
    """Control steps costing what one DDO setting's rounds cost, counted in per-sample network passes (a forward
    pass 1, a backward pass 2): a DDO step runs theta on the real and the fake sample with gradient and the
    reference on both without (8 per pair); each round also samples its fake bank and its checkpoints' selection
    latents (2 num_steps - 1 forward passes per point); a control step is 3 per sample. (Either side's
    hyperparameter search is not counted: DDO tries len(grid) settings, the control len(control_lrs).)"""
    nfe = 2 * cfg.num_steps - 1
    per_round = cfg.round_steps * cfg.batch * 8 + cfg.n_fakes * nfe + cfg.evals_per_round * cfg.n_select * nfe
    return math.ceil(cfg.rounds * per_round / (3 * cfg.batch))


def score(net, data: GaussianMixture, cfg: Toy2DConfig) -> dict:
    """Exact metrics on each evaluation seed range (``per_seed``) and their mean."""
    per = [exact_metrics(data, sample(net, cfg.n_eval, s, cfg.num_steps)) for s in cfg.eval_seeds]
    return {k: sum(p[k] for p in per) / len(per) for k in per[0]} | {"per_seed": per}


def data_row(data: GaussianMixture, cfg: Toy2DConfig) -> dict:
    """The exact data samples' scores on the evaluation seeds (the reference row ``data``)."""
    per = [exact_metrics(data, data.sample(cfg.n_eval, torch.Generator().manual_seed(s))) for s in cfg.eval_seeds]
    return {k: sum(p[k] for p in per) / len(per) for k in per[0]} | {"per_seed": per}


def _f(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else str(v)


def render_table(rows: list[dict], cfg: Toy2DConfig) -> str:
    """Markdown table of one training seed: NLL and off-mode mass (mean of the seed ranges, and each range)."""
    seeds = ", ".join(str(s) for s in cfg.eval_seeds)
    lines = [f"| model | NLL (mean of seed ranges {seeds}) | NLL per range | off-mode mass | "
             "off-mode per range | Δ NLL vs base |", "|---|---:|---:|---:|---:|---:|"]
    base = next((r for r in rows if r["model"] == "base"), None)
    for r in rows:
        delta = "–" if base is None or r["model"] in ("base", "data") else _f(r["nll"] - base["nll"])
        lines.append(f"| {r['model']}{r.get('note', '')} | {_f(r['nll'])} | "
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
