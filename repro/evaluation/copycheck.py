"""The copy check: do a model's samples sit closer to training images than unseen real images do?

Statistic (one, fixed): the **copy rate**, the fraction of samples whose nearest training image (Euclidean distance
in pixel space, images as uint8 values) is nearer than the 5th percentile of the held-out images' nearest-training-
image distances. The held-out images are real digits the model never saw, so they score 5% by construction; a model
that returns training images scores 100%; a model that generalises like fresh data scores about 5%. Pixel space, not
the metric's feature space, so that a near-duplicate of a training image is flagged even where the classifier's
features would call any well-formed digit "close" (the test of memorisation in Carlini et al. 2023 is also in
pixel space). The metric's feature space stays for the Fréchet distances.

Memory: the training images (N_train x pixels, float32) plus one batch of samples against one block of training
images at a time; the samples are counted as they stream, never kept.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

PERCENTILE = 5.0  # the held-out images' nearest-neighbour distance percentile below which a sample counts as a copy


def _flat(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    return x.reshape(len(x), -1).to(torch.float32)


def nearest_distances(queries, train: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Each query image's Euclidean distance to its nearest row of ``train`` ([N, D] float32), ``block`` queries at
    a time (memory: block x N distances)."""
    q = _flat(queries)
    out = []
    for i in range(0, len(q), block):
        out.append(torch.cdist(q[i:i + block], train).min(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0)


class CopyCheck:
    """The copy rate of streamed sample batches against the training images, thresholded by the held-out images."""

    def __init__(self, train_images, heldout_images, percentile: float = PERCENTILE):
        if not len(train_images) or not len(heldout_images):
            raise ValueError("the copy check needs training and held-out images (data.holdout > 0)")
        self.train = _flat(train_images)
        self.heldout_nn = nearest_distances(heldout_images, self.train)
        self.percentile = percentile
        self.threshold = float(np.percentile(self.heldout_nn.numpy(), percentile))
        self.n = 0
        self.copies = 0

    def reset(self) -> None:
        self.n, self.copies = 0, 0

    def update(self, batch) -> None:
        d = nearest_distances(batch, self.train)
        self.n += len(d)
        self.copies += int((d < self.threshold).sum())

    def watch(self, batches: Iterable) -> Iterator:
        """``batches`` unchanged, each counted on its way through (to tap a stream another consumer reads)."""
        for b in batches:
            self.update(b)
            yield b

    @property
    def rate(self) -> float:
        if not self.n:
            raise ValueError("the copy check saw no samples")
        return self.copies / self.n

    def protocol(self) -> dict:
        h = self.heldout_nn.numpy()
        return {"statistic": f"fraction of samples whose nearest training image (pixel L2) is nearer than the "
                             f"{self.percentile:g}th percentile of the held-out images' nearest-training-image "
                             "distances (held-out images: ~5% by construction; training images: 100%)",
                "percentile": self.percentile, "threshold": self.threshold, "n_train": len(self.train),
                "n_heldout": len(h), "heldout_nn_median": float(np.median(h))}
