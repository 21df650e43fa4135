"""Training the transfer family's head on cached base features, one freshly drawn view per image and epoch."""

from __future__ import annotations

import math

import keras
import numpy as np

from search_spaces.features import PooledFeatures, TrainPool


class ViewSampler(keras.utils.PyDataset):
    """Batches of pooled features: each epoch draws, per training image, one view among ``candidates``.

    The candidates are the pool views that the trial's flip mode and rotation factor could have produced
    (``PoolSpec.candidates``), so each epoch sees a new augmentation draw as the raw pipeline would, and the
    images are reshuffled as ``model.fit(shuffle=True)`` does.
    """

    def __init__(self, pool: TrainPool, labels: np.ndarray, pooling: str, flip_mode: str,
                 rotation_factor: float, batch_size: int, seed: int) -> None:
        super().__init__()
        self.features = pool.features.pooled(pooling)
        self.labels = labels
        self.candidates = pool.spec.candidates(flip_mode, rotation_factor)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.drawn_views: list[np.ndarray] = []
        self._draw()

    def _draw(self) -> None:
        n = len(self.labels)
        views = self.candidates[self.rng.integers(len(self.candidates), size=n)]
        order = self.rng.permutation(n)
        self.drawn_views.append(views)
        self.x = self.features[order, views[order]][:, None]  # one view per image: [images, 1, dim]
        self.y = self.labels[order]

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int):
        batch = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[batch], self.y[batch]

    def on_epoch_end(self) -> None:
        self._draw()


def stack_views(views: list[PooledFeatures], pooling: str) -> np.ndarray:
    """``[images, len(views), dim]``: the head's input for images seen through several views."""
    return np.stack([v.pooled(pooling) for v in views], axis=1)
