"""Small CNN classifier for the 8x8 scikit-learn digits.

Its penultimate layer is the feature space of the tiny preset's metric,
"FD-digits": a Frechet distance computed exactly like FID, but with this
classifier in place of Inception-v3 (see :mod:`repro.evaluation.fidelity`, which wraps it
as a torch-fidelity feature extractor named ``"digits-classifier"``).
FD-digits numbers are NOT comparable to FID numbers.

This module deliberately does not import torch_fidelity.

Example::

    import numpy as np, sklearn.datasets
    d = sklearn.datasets.load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)[:, None]   # [N,1,8,8] uint8
    model, info = train_classifier(x, d.target, steps=1500, batch=128, lr=2e-3,
                                   seed=0, feature_dim=64, width=32)
    save_classifier(model, "digits_classifier.safetensors")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from repro.storage.files import load_safetensors, readable, save_safetensors

__all__ = [
    "DigitsClassifier",
    "u8_to_float",
    "train_classifier",
    "evaluate_accuracy",
    "save_classifier",
    "load_classifier",
]

_FORMAT = "repro.DigitsClassifier/1"


def u8_to_float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Convert uint8 images (0..255) to float32 in [-1, 1] via ``x / 127.5 - 1``.

    Example::

        >>> u8_to_float(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-1.,  1.])
    """
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got dtype {x.dtype}")
    return x.to(torch.float32) / 127.5 - 1.0


class DigitsClassifier(nn.Module):
    """Tiny CNN: 3 conv layers (two 2x downsamplings), a ``feature_dim`` hidden layer, a linear head.

    Input: float images in [-1, 1], shape ``[N, img_channels, img_resolution, img_resolution]``
    (use :func:`u8_to_float` for uint8 images).

    ``features(x)`` returns the penultimate activations ``[N, feature_dim]`` (after SiLU, so
    no unit is ever exactly dead -- that keeps the feature covariance well conditioned);
    ``forward(x)`` returns logits ``[N, num_classes]``.

    Example::

        >>> m = DigitsClassifier()
        >>> m.features(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 8,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 64,
    ):
        super().__init__()
        if img_resolution % 4 != 0:
            raise ValueError(f"img_resolution must be divisible by 4, got {img_resolution}")
        self.config = dict(
            img_channels=int(img_channels),
            img_resolution=int(img_resolution),
            num_classes=int(num_classes),
            width=int(width),
            feature_dim=int(feature_dim),
        )
        self.img_channels = int(img_channels)
        self.img_resolution = int(img_resolution)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        w = int(width)
        self.conv1 = nn.Conv2d(img_channels, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        r = img_resolution // 4
        self.fc = nn.Linear(2 * w * r * r, feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise TypeError(f"DigitsClassifier expects float images in [-1, 1], got dtype {x.dtype}")
        r = self.img_resolution
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.img_channels, r, r):
            raise ValueError(
                f"DigitsClassifier expects [N, {self.img_channels}, {r}, {r}] input, got {tuple(x.shape)}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, feature_dim]`` of float images in [-1, 1]."""
        self._check(x)
        h = F.silu(self.conv1(x))
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)
        h = F.avg_pool2d(F.silu(self.conv3(h)), 2)
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]`` of float images in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with -1 (background)."""
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # [N, H, 1]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # [N, 1, W]
    idx = torch.arange(n)[:, None, None]
    return xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate_accuracy(model: DigitsClassifier, images_u8: np.ndarray | torch.Tensor, labels, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``[N, C, H, W]``.

    Example::

        acc = evaluate_accuracy(model, x_u8, y)
    """
    was_training = model.training
    model.eval()
    x = torch.as_tensor(images_u8)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(u8_to_float(x[i : i + batch]))
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def train_classifier(
    images_u8: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    feature_dim: int,
    width: int,
    holdout: float = 0.2,
    progress: bool = True,
) -> tuple[DigitsClassifier, dict]:
    """Train a :class:`DigitsClassifier` with Adam (cosine LR decay) and +-1 pixel random shifts.

    Deterministic given ``seed``: the hold-out split, the minibatch order and the augmentation
    come from a seeded ``torch.Generator``; weight init and dropout run under
    ``torch.random.fork_rng`` seeded with ``seed`` (the caller's global RNG is untouched).

    Args:
        images_u8: uint8 array ``[N, C, H, W]`` (values 0..255).
        labels: integer class labels ``[N]``.
        holdout: fraction of the images held out (random, seeded) for ``holdout_accuracy``;
            0 trains on everything and reports ``holdout_accuracy = None``.

    Returns:
        ``(model, info)``: the model in eval mode, and
        ``{"train_accuracy", "holdout_accuracy", "steps", "n_train", "n_holdout"}``.

    Example::

        model, info = train_classifier(x_u8, y, steps=1500, batch=128, lr=2e-3, seed=0,
                                       feature_dim=64, width=32, progress=False)
        assert info["holdout_accuracy"] > 0.95
    """
    x_all = torch.as_tensor(np.ascontiguousarray(images_u8))
    if x_all.dtype != torch.uint8 or x_all.dim() != 4:
        raise ValueError(f"images_u8 must be uint8 [N, C, H, W], got {x_all.dtype} {tuple(x_all.shape)}")
    if x_all.shape[2] != x_all.shape[3]:
        raise ValueError(f"images must be square, got {tuple(x_all.shape)}")
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y_all) != len(x_all):
        raise ValueError(f"{len(x_all)} images but {len(y_all)} labels")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    num_classes = int(y_all.max()) + 1

    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(x_all), generator=gen)
    n_hold = int(round(holdout * len(x_all)))
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]
    x_train, y_train = u8_to_float(x_all[train_idx]), y_all[train_idx]

    config = dict(
        img_channels=int(x_all.shape[1]),
        img_resolution=int(x_all.shape[2]),
        num_classes=num_classes,
        width=width,
        feature_dim=feature_dim,
    )
    # The ops are tiny: intra-op threading only adds synchronisation (measured ~5-10x slower with
    # 2 threads than with 1 on a busy 2-core machine), so train single-threaded and restore after.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _train_loop(config, x_train, y_train, gen, int(steps), int(batch), float(lr), int(seed), progress)
        info = {
            "train_accuracy": evaluate_accuracy(model, x_all[train_idx], y_train),
            "holdout_accuracy": evaluate_accuracy(model, x_all[hold_idx], y_all[hold_idx]) if n_hold > 0 else None,
            "steps": int(steps),
            "n_train": int(len(train_idx)),
            "n_holdout": int(n_hold),
        }
    finally:
        torch.set_num_threads(n_threads)
    return model, info


def _train_loop(config, x_train, y_train, gen, steps, batch, lr, seed, progress) -> DigitsClassifier:
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(**config)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        pos = 0
        bar = tqdm(range(steps), desc="train digits classifier", disable=not progress, leave=False)
        for _ in bar:
            if pos + batch > len(order):
                order = torch.randperm(len(x_train), generator=gen)
                pos = 0
            idx = order[pos : pos + batch]
            pos += batch
            xb = _random_shift(x_train[idx], gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    model.eval()
    model.requires_grad_(False)
    return model


def save_classifier(model: DigitsClassifier, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save weights as safetensors, with the constructor kwargs as JSON in the file metadata.

    The write is atomic (temporary file in the same directory, then ``os.replace``).
    ``metadata`` (optional, JSON-serialisable) is stored alongside, e.g. the training accuracy.

    Example::

        save_classifier(model, "runs/digits_classifier.safetensors", metadata=info)
        model2 = load_classifier("runs/digits_classifier.safetensors")
    """
    meta = {"format": _FORMAT, "config": json.dumps(model.config, sort_keys=True)}
    if metadata is not None:
        meta["extra"] = json.dumps(metadata, sort_keys=True)
    save_safetensors(Path(path), model.state_dict(), meta)


def read_classifier_metadata(path: str | os.PathLike) -> dict:
    """Return ``{"config": {...}, "extra": {...} | None}`` stored by :func:`save_classifier`."""
    from safetensors import safe_open

    with readable(os.fspath(path), "safetensors file"), safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"{os.fspath(path)!r} is not a DigitsClassifier file (metadata format={meta.get('format')!r})")
    extra = meta.get("extra")
    return {"config": json.loads(meta["config"]), "extra": json.loads(extra) if extra else None}


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load a classifier written by :func:`save_classifier` (eval mode, no grad).

    Keys and tensor shapes are checked strictly against the architecture described by the stored
    constructor kwargs; any mismatch raises ``ValueError`` naming the offending tensors.

    Example::

        model = load_classifier("runs/digits_classifier.safetensors")
        feats = model.features(u8_to_float(x_u8))
    """

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits classifier weights not found: {path!r}")
    config = read_classifier_metadata(path)["config"]
    model = DigitsClassifier(**config)
    state = load_safetensors(path, device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"classifier file {path!r} does not match DigitsClassifier({config}): "
            f"missing={missing} unexpected={unexpected} wrong_shape={bad_shape}"
        )
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model
