"""The plateau rule: when a training curve is flat within its seed noise (pretraining's early stop)."""

from __future__ import annotations


def plateau_reached(curve: list[dict], window: int, key: str = "nll", tol: float = 0.0) -> bool:
    """The plateau rule on a lower-is-better curve (evaluations ``{..., key: [one value per seed set]}``, in
    order): with M = ``window``, the mean of the last M evaluations is lower than the mean of the M before it by
    less than ``tol``, or, with ``tol`` 0, by less than the curve's seed noise (the mean over the last M
    evaluations of the range max - min across the seed sets).

    The 2-D toy's base uses the seed noise (exact NLL on two independent latent seeds). The pretrain stage's curve
    scores the same selection seeds at every point, so its points share their seed noise and the curve is far
    smoother than the range between two seed halves: there a fixed ``tol`` (pretrain.plateau_tol) says how much
    gain per window still counts as training."""
    if window < 1 or len(curve) < 2 * window:
        return False
    mean = [sum(c[key]) / len(c[key]) for c in curve]
    last, before = sum(mean[-window:]) / window, sum(mean[-2 * window:-window]) / window
    noise = tol or sum(max(c[key]) - min(c[key]) for c in curve[-window:]) / window
    return before - last < noise
