"""Training the transfer family's head on cached base features, one freshly drawn view per image and epoch."""

from __future__ import annotations

import math

from typing import Any

import keras
import numpy as np

from feature_cache.features import PooledFeatures, TrainPool


class ViewDraws:
    """Which view of which training image every step of every epoch sees.

    Each epoch draws, per training image, one view with the probabilities the trial's flip mode and rotation
    factor give (``PoolSpec.candidates``), so each epoch sees a new augmentation draw as the raw pipeline
    would, and reshuffles the images as ``model.fit(shuffle=True)`` does: batches of ``batch_size`` with a
    smaller last one, as ``fit`` makes them from arrays.
    """

    def __init__(self, pool: TrainPool, labels: np.ndarray, pooling: str, flip_mode: str,
                 rotation_factor: float, batch_size: int, seed: int, tensor=None) -> None:
        """``tensor``: the pooled features already as a TensorFlow constant (made once, shared by trials)."""
        self.features = pool.features.pooled(pooling)
        self.tensor = tensor
        self.labels = np.asarray(labels, dtype="int32")
        self.candidates, self.probabilities = pool.spec.candidates(flip_mode, rotation_factor)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.drawn_views: list[np.ndarray] = []

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """One epoch: the shuffled image order and each image's drawn view (indexed by image)."""
        n = len(self.labels)
        views = self.rng.choice(self.candidates, size=n, p=self.probabilities)
        order = self.rng.permutation(n)
        self.drawn_views.append(views)
        return order, views

    def dataset(self, epochs: int):
        """A ``tf.data`` pipeline of ``epochs`` epochs of (features [batch, 1, dim], labels) batches; the
        features stay in one tensor and each batch is gathered from it, so nothing is copied per epoch."""
        import tensorflow as tf

        draws = [self.draw() for _ in range(epochs)]
        rows = np.stack([np.stack([order, views[order]], axis=1) for order, views in draws]).astype("int32")
        features = self.tensor if self.tensor is not None else tf.constant(self.features)
        labels = tf.constant(self.labels)
        batch = self.batch_size

        def one_epoch(epoch_rows):
            return tf.data.Dataset.from_tensor_slices(epoch_rows).batch(batch)

        return (tf.data.Dataset.from_tensor_slices(rows).flat_map(one_epoch)
                .map(lambda r: (tf.gather_nd(features, r)[:, None], tf.gather(labels, r[:, 0])))
                .prefetch(2))


def score(model: keras.Model, x: np.ndarray, y: np.ndarray, logits: np.ndarray | None = None) -> tuple[float, float]:
    """The model's mean loss and accuracy on ``x`` (or on ``logits`` already computed), in one call."""
    if logits is None:
        logits = model.predict_on_batch(x)  # Keras' predict step, traced once per model and input shape
    loss = model.loss(y, logits)
    hits = np.sum(np.argmax(np.asarray(logits), axis=-1) == y)
    return float(loss), float(np.float32(hits) / np.float32(len(y)))  # Keras' float32 accuracy, bit for bit


class ScoreEachEpoch(keras.callbacks.Callback):
    """Fills each epoch's ``val_loss``/``val_accuracy`` with the head's score on the validation features,
    for the callbacks after it: one call per epoch instead of ``fit``'s evaluation loop."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.x, self.y = x, np.asarray(y)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        loss, accuracy = score(self.model, self.x, self.y)
        if logs is not None:
            logs.update(val_loss=loss, val_accuracy=accuracy)


def stack_views(views: list[PooledFeatures], pooling: str) -> np.ndarray:
    """``[images, len(views), dim]``: the head's input for images seen through several views."""
    return np.stack([v.pooled(pooling) for v in views], axis=1)


class RateDropout(keras.layers.Layer):
    """Dropout whose rate is a variable (``reset``), for the head that trains every trial of a process."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(0)
        self.rate = self.add_weight(shape=(), initializer="zeros", trainable=False, name="rate")

    def reset(self, rate: float, seed: int) -> None:
        self.rate.assign(rate)
        self.seed_generator.state.assign(np.array([seed, 0], dtype=self.seed_generator.state.dtype))

    def call(self, inputs, training: bool = False):
        if not training:
            return inputs
        # inverted dropout, as keras.layers.Dropout: keep each unit with 1 - rate, scale the kept ones up
        keep = keras.random.uniform(keras.ops.shape(inputs), seed=self.seed_generator) >= self.rate
        return keras.ops.where(keep, inputs / (1.0 - self.rate), keras.ops.zeros_like(inputs))
