"""Fine-tuning the top of the transfer family's MobileNetV2 base, on cached activations below the cut.

The study's tutorial ends by unfreezing the top of the ImageNet base and training it with the head at a lower
learning rate, BatchNormalization kept in inference mode (here: frozen, see ``trainable_names``). The layers
below the cut stay frozen, so their output for every (image, view) never changes during a trial: it is computed
once, with the pooled features, and a fine-tuning trial trains only the top blocks and the head on it.

``CUT_LAYERS`` maps each cut point (the first layer that trains) to the layer whose output is cached; ``CUTS``
are those a sweep offers: the last inverted-residual block with the final 1x1 convolution. The 1x1 convolution
alone (``conv_1``) never came near a sweep's best, and deeper cuts cost more per epoch than a sweep on two
cores can spend (docs/fine-tuning.md has the measurements).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from feature_cache.head import RateDropout, score

# cut point -> the layer of MobileNetV2 whose output the trainable top takes (cached per image and view).
# All measured by ``sweep bench --cut-costs``; ``CUTS`` are those a sweep offers.
CUT_LAYERS = {
    "conv_1": "block_16_project_BN",  # Conv_1 (320 -> 1280, 1x1)
    "block_16": "block_15_add",  # block 16 (expand, depthwise, project: 160 -> 320) and Conv_1
    "block_15": "block_14_add",
    "block_14": "block_13_project_BN",
    "block_13": "block_12_add",  # 14x14 maps at 224: a cache 2.4x larger per view
}
CUTS = {cut: CUT_LAYERS[cut] for cut in ("block_16",)}
FINE_TUNE_FROM = ("none", *CUTS)


def top_layers(base: keras.Model, cut: str) -> keras.Model:
    """The part of ``base`` from the cut to its output, sharing ``base``'s layers and weights."""
    return keras.Model(base.get_layer(CUT_LAYERS[cut]).output, base.output, name=f"top_from_{cut}")


def trainable_names(base: keras.Model, cut: str) -> list[str]:
    """The names of the base's layers that fine-tuning from ``cut`` trains: every layer with weights above
    the cut but BatchNormalization, which stays frozen and so in inference mode. (Keras 3 passes a model's
    ``training`` flag to every layer of a nested functional model, whatever that model was called with; a
    frozen BatchNormalization layer is the one that always uses its moving statistics.)"""
    return [layer.name for layer in top_layers(base, cut).layers[1:]
            if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]


class TopTrainer:
    """The top of the base (above the cut) and the head, as one model trained on cached activations.

    One is built and compiled per process and cut, and reset for each trial (the top's ImageNet weights, the
    trial's trained head, a fresh optimizer state, the trial's learning rate, dropout and pooling), so
    TensorFlow traces its training step once, not per trial. Its top is a copy: the shared base, whose
    features the cache holds, never changes.
    """

    def __init__(self, base: keras.Model, cut: str, num_classes: int, steps_per_execution: int,
                 compile_model) -> None:
        shared = top_layers(base, cut)
        self.cut = cut
        self.top = keras.models.clone_model(shared)
        self.top.set_weights(shared.get_weights())
        trains = set(trainable_names(base, cut))
        for layer in self.top.layers:  # the copy of a frozen base's layers comes frozen, layer by layer
            layer.trainable = layer.name in trains
        self.pristine = [np.array(w) for w in shared.get_weights()]
        inputs = keras.Input(shape=shared.input_shape[1:], name="activations")
        maps = self.top(inputs, training=False)  # as the study calls its base (BatchNormalization is frozen too)
        x = PoolingSwitch(name="pooling")(maps)
        x = RateDropout(name="dropout")(x)
        outputs = keras.layers.Dense(num_classes, name="logits")(x)
        self.model = keras.Model(inputs, outputs, name=f"fine_tune_from_{cut}")
        self.schedule = CosineToZero()
        compile_model(self.model, {"learning_rate": self.schedule}, steps_per_execution=steps_per_execution)

    def reset(self, head_weights: list[np.ndarray], values: dict[str, Any], seed: int, steps: int) -> keras.Model:
        """Ready for a trial of ``steps`` training steps: the base's own top weights, the trial's trained head,
        its settings, its learning rate decaying from ``learning_rate x fine_tune_lr_factor`` to zero."""
        model = self.model
        self.top.set_weights(self.pristine)
        model.get_layer("logits").set_weights(head_weights)
        model.get_layer("pooling").select(values["pooling"])
        model.get_layer("dropout").reset(values["dropout"], seed)
        for variable in model.optimizer.variables:  # Adam's moments, and its step count: the schedule restarts
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
        self.schedule.set(values["learning_rate"] * values["fine_tune_lr_factor"], steps)
        return model

    def copy_into(self, base: keras.Model) -> None:
        """Put the fine-tuned top's weights into ``base`` (a trial's own copy of the base), layer by layer."""
        for layer in self.top.layers[1:]:
            if layer.weights:
                base.get_layer(layer.name).set_weights(layer.get_weights())


def fine_tune_rate(values: dict[str, Any], steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """The fine-tuning stage's learning rate: ``learning_rate x fine_tune_lr_factor``, cosine-decayed to zero
    over the stage's ``steps``. The decay settles the top at the end of the stage, so the last epoch (the
    trial's score) is not one noisy step of many: with a constant rate, the validation loss of one
    fine-tuning stage moved by up to 40 % from one epoch to the next (docs/fine-tuning.md)."""
    return keras.optimizers.schedules.CosineDecay(values["learning_rate"] * values["fine_tune_lr_factor"],
                                                  decay_steps=max(steps, 1))


class CosineToZero(keras.optimizers.schedules.LearningRateSchedule):
    """``fine_tune_rate``'s schedule with its peak and length in variables (``set``), for the top model that
    is compiled once per process and serves every trial."""

    def __init__(self) -> None:
        self.peak = keras.Variable(1e-3, trainable=False, dtype="float32", name="peak_learning_rate")
        self.steps = keras.Variable(1.0, trainable=False, dtype="float32", name="decay_steps")

    def set(self, peak: float, steps: int) -> None:
        self.peak.assign(peak)
        self.steps.assign(float(max(steps, 1)))

    def __call__(self, step):
        progress = keras.ops.minimum(keras.ops.cast(step, "float32") / self.steps, 1.0)
        return self.peak * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))

    def get_config(self) -> dict:
        return {}


class PoolingSwitch(keras.layers.Layer):
    """Global max or global average pooling, chosen per trial by a variable (``select``), so one compiled
    model serves both settings of the ``pooling`` hyperparameter."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_max = self.add_weight(shape=(), initializer="ones", trainable=False, name="use_max")

    def select(self, pooling: str) -> None:
        self.use_max.assign({"global_max": 1.0, "global_avg": 0.0}[pooling])

    def call(self, maps):
        maxed = keras.ops.max(maps, axis=(1, 2))
        averaged = keras.ops.mean(maps, axis=(1, 2))
        return self.use_max * maxed + (1.0 - self.use_max) * averaged


class ActivationDraws:
    """Batches of cached activations, one drawn view per training image and epoch (``ViewDraws``'s draws)."""

    def __init__(self, activations, labels: np.ndarray, draws, batch_size: int) -> None:
        """``activations``: an ``ActivationRows`` [images, views, h, w, c]; ``draws``: a ``ViewDraws``."""
        self.activations, self.labels = activations, np.asarray(labels, dtype="int32")
        self.draws, self.batch_size = draws, batch_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def dataset(self, epochs: int):
        import tensorflow as tf

        def batches():
            for _ in range(epochs):
                order, views = self.draws.draw()
                for i in range(0, len(order), self.batch_size):
                    rows = order[i:i + self.batch_size]
                    picked = np.sort(rows)  # reads the file in order; the order within a batch is immaterial
                    yield self.activations.take(picked, views[picked]), self.labels[picked]

        shape = self.activations.shape[2:]
        return tf.data.Dataset.from_generator(batches, output_signature=(
            tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int32))).prefetch(2)


def view_logits(model: keras.Model, views: list[np.ndarray], batch_size: int = 200) -> np.ndarray:
    """The model's logits averaged over ``views`` (the clean images, and their mirrors for test-time flip)."""
    total = None
    for x in views:
        logits = np.concatenate([np.asarray(model.predict_on_batch(np.asarray(x[i:i + batch_size], "float32")))
                                 for i in range(0, len(x), batch_size)])
        total = logits if total is None else total + logits
    return total / len(views)


class ScoreViewsEachEpoch(keras.callbacks.Callback):
    """Fills each epoch's ``val_loss``/``val_accuracy`` with the model's score on the clean validation
    activations (averaged with their mirrors' for test-time flip), as ``ScoreEachEpoch`` does for the head."""

    def __init__(self, views: list[np.ndarray], labels: np.ndarray) -> None:
        super().__init__()
        self.views, self.y = views, np.asarray(labels)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        loss, accuracy = score(self.model, None, self.y, view_logits(self.model, self.views))
        if logs is not None:
            logs.update(val_loss=loss, val_accuracy=accuracy)
