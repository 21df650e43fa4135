"""What every family shares: the head, the optimizer and the hyperparameters that go with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import keras
import keras_tuner as kt

FLIP_MODES = ("horizontal_and_vertical", "horizontal", "vertical", "none")
MAX_ROTATION_FACTOR = 0.3
# The transfer family's feature cache keeps one band of rotations per step (feature_cache/features.py).
ROTATION_STEP = 0.1


@dataclass
class Fitted:
    """What one trial's training produced: the model it is judged, kept and exported as, and its one score.

    ``model`` takes raw 0-255 images and returns logits (the trained model, or its flip-averaged form).
    ``val_loss``/``val_accuracy`` are the last epoch's validation figures, the very numbers the per-epoch
    curve ends on and the oracle scores; ``test_*`` come from the same computation on the test split.
    """

    model: keras.Model
    history: dict[str, list[float]]
    val_loss: float
    val_accuracy: float
    test_loss: float
    test_accuracy: float
    scored_on: str = "raw_images"  # or "cached_features"
    stages: dict[str, int] = field(default_factory=dict)  # a later training stage -> its first epoch


class Validation(keras.callbacks.Callback):
    """Scores ``model`` (a trial's model as it will be judged) on the validation split after every epoch.

    It fills the epoch's ``val_loss`` and ``val_accuracy`` for the callbacks after it, so the logged curve
    ends at the very value the tuner scores, flip-averaged for a ``test_time_flip`` trial.
    """

    def __init__(self, model: keras.Model, batches) -> None:
        super().__init__()
        self.scored, self.batches = model, batches

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        loss, accuracy = self.scored.evaluate(self.batches, verbose=0)
        if logs is not None:
            logs.update(val_loss=loss, val_accuracy=accuracy)


class HyperFamily(kt.HyperModel):
    """What the sweep's trial loop asks of a model family: the one interface, and its defaults.

    A family is at least a Keras Tuner ``HyperModel`` whose ``build(hp)`` returns a Keras model from raw RGB
    images (the sweep's size, values 0-255) to one output per class; ``search_spaces.registry.make`` wraps any
    such class in ``PlainFamily``, which gives it everything below. A subclass of this class may declare more,
    and the loop asks the class, never its name:

    * attributes: ``description``; ``study_range`` (a published validation-accuracy range the report shows
      beside its best trial); ``study_model`` (its place in the study, which ``--family all`` sweeps);
      ``prunable`` and ``first_rung`` (stop hopeless trials at successive halving's rungs, the first at that epoch);
      ``mixed_precision`` (its layers follow ``dtype_policy``); ``uses_weights`` (its constructor takes the
      ``--weights`` file, and the sweep runs at the size that checkpoint was trained at); ``stage_switch`` and
      ``stage_epochs`` (a costly later training stage, searched on the best trials only);
    * hyperparameters the loop reads when the family declares them: ``learning_rate`` (Adam's, where the loop
      compiles) and ``test_time_flip`` (the kept model averages each image with its mirror);
    * hooks, as Keras Tuner's ``HyperModel.fit``: ``new_session`` before each trial, ``prepare`` once per
      process (a cache of a frozen part's features), ``fit`` (train, return a ``Fitted``: the judged model and
      its one score), ``evaluate_raw`` (the end-to-end check of a score computed another way).

    The built-in families declare their hyperparameters in ``declare`` (each with an explicit default, the
    study's model) and build their layers in ``build_layers``; this class adds the study's compile step (Adam,
    sparse categorical cross-entropy from logits, accuracy).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    study_range: ClassVar[tuple[float, float] | None] = None  # the study's published validation accuracy
    study_model: ClassVar[int | None] = None  # which of the study's models it is (1-4): `--family all` sweeps these
    # (hyperparameter, value that leaves it off) of a costly optional stage, which a sweep may search only on its
    # best trials without it (sweep/staging.py); None: every hyperparameter is always drawn jointly.
    stage_switch: ClassVar[tuple[str, Any] | None] = None
    # Whether a sweep may stop this family's hopeless trials early (sweep/pruning.py), and the epoch it first
    # judges them at (then every REDUCTION_FACTOR times as many: 1, 3, 9 of 20); a family whose models start slowly
    # (heavy augmentation, batch normalisation) is judged later.
    prunable: ClassVar[bool] = True
    first_rung: ClassVar[int] = 1
    # Whether its trials may compute in mixed bfloat16 (sweep/precision.py); ``dtype_policy`` is the one they use.
    mixed_precision: ClassVar[bool] = True
    # Whether it loads a pretrained checkpoint (``--weights``, passed to its constructor as a local file or None).
    uses_weights: ClassVar[bool] = False
    dtype_policy: str = "float32"

    def __init__(self, num_classes: int = 2, image_size: tuple[int, int] = (160, 160)) -> None:
        super().__init__(name=self.name, tunable=True)
        self.num_classes = num_classes
        self.image_size = tuple(image_size)

    # -- hyperparameters -------------------------------------------------------------------------------
    def declare(self, hp: kt.HyperParameters) -> dict[str, Any]:
        """Declare this family's hyperparameters on ``hp`` and return their current values."""
        return {
            "dropout": hp.Float("dropout", 0.0, 0.5, step=0.05, default=0.2),
            "learning_rate": hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3),
            "test_time_flip": hp.Boolean("test_time_flip", default=False),
        }

    @staticmethod
    def declare_augmentation(hp: kt.HyperParameters) -> dict[str, Any]:
        return {
            "flip_mode": hp.Choice("flip_mode", list(FLIP_MODES), default="horizontal_and_vertical"),
            "rotation_factor": hp.Float(
                "rotation_factor", 0.0, MAX_ROTATION_FACTOR, step=ROTATION_STEP, default=0.2
            ),
        }

    def declared_space(self) -> kt.HyperParameters:
        """Every hyperparameter of the family at its default, declared without building a model."""
        hp = kt.HyperParameters()
        self.declare(hp)
        return hp

    @staticmethod
    def stage_epochs(values: dict[str, Any]) -> int:
        """Epochs a trial with these values trains after its ``--epochs`` (a later stage's); none here."""
        return 0

    # -- training (Keras Tuner's HyperModel.fit hook) ---------------------------------------------------
    def new_session(self) -> None:
        """Called before each trial: release the previous trial's Keras state and collect its garbage (cheap
        inside a sweep's search, which freezes what was alive before it: ``sweep.tuning.frozen_heap``)."""
        keras.backend.clear_session()

    def prepare(self, data: Any, cache_dir: Path | None, report: Callable[[str], None],
                fixed: dict[str, Any] | None = None) -> None:
        """Called once per process that trains, before its first trial, when the sweep caches features
        (``fixed``: the sweep's fixed hyperparameters). Families without a frozen part have nothing to cache."""

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *, data: Any, batch_size: int, epochs: int,
            initial_epoch: int = 0, callbacks: list | None = None, verbose: int = 0, seed: int = 0) -> Fitted:
        """Train ``model`` (built from ``hp``) on the raw training images and score it.

        Args:
            data: the splits (``sweep.data.Split``): ``data.train``, ``data.validation``, ``data.test``.
            callbacks: run after this family's own validation callback, so they see ``val_*`` each epoch.
            seed: the trial's seed (Keras' global seed is set by the caller).

        Returns:
            The judged model and its one score.
        """
        final = self.inference_model(model, hp.values)
        trained, train = augmenting_pipeline(model, data.train.batches(batch_size, shuffle_seed=seed))
        history = trained.fit(
            train, epochs=epochs, initial_epoch=initial_epoch,
            shuffle=False,  # the pipeline reshuffles each epoch
            verbose=verbose, callbacks=[Validation(final, data.validation.batches(batch_size)), *(callbacks or [])],
        )
        test_loss, test_accuracy = final.evaluate(data.test.batches(batch_size), verbose=0)
        return fitted(final, history.history, test_loss, test_accuracy, "raw_images")

    def evaluate_raw(self, result: Fitted, data: Any, batch_size: int,
                     splits: tuple[str, ...] = ("val", "test")) -> dict[str, float] | None:
        """The judged model's figures on the raw images of ``splits`` ("val", "test": ``raw_<split>_loss`` and
        ``raw_<split>_accuracy``), for a family that scored it another way (cached features); None when the
        score already is the raw images' figure."""
        return None

    # -- model -----------------------------------------------------------------------------------------
    def build_layers(self, inputs: keras.KerasTensor, values: dict[str, Any]) -> keras.KerasTensor:
        raise NotImplementedError

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        values = self.declare(hp)
        inputs = keras.Input(shape=(*self.image_size, 3), name="image")
        outputs = self.build_layers(inputs, values)
        model = keras.Model(inputs, outputs, name=self.name)
        self.compile(model, values)
        return model

    def inference_model(self, model: keras.Model, values: dict[str, Any]) -> keras.Model:
        """The model a trial is scored, logged and exported as: ``model`` without its augmentation layers
        (``without_augmentation``: the same weights, deterministic whichever way it is called), or with
        ``test_time_flip`` the mean of its logits on each image and on the image's mirror (horizontal flip).

        Training never sees the mirror pass (it trains ``model``, augmentation and all); the wrapper shares
        ``model``'s weights and is built from stock Keras layers and ops, so the saved file loads anywhere
        without custom objects.
        """
        model = without_augmentation(model)
        if not values.get("test_time_flip", False):
            return model
        inputs = keras.Input(shape=model.input_shape[1:], name="image")
        mirrored = keras.ops.flip(inputs, axis=2)  # (batch, height, width, channels): width is axis 2
        # One pass over the images and their mirrors stacked as one batch: one call site of ``model``, so an
        # exported graph holds the network once (an int8 LiteRT file of two call sites carried a second set of
        # quantised biases and scales, 10 % more bytes), and batch-1 inference is one invocation.
        logits = model(keras.ops.concatenate([inputs, mirrored], axis=0))
        outputs = keras.layers.Average(name="test_time_flip")(keras.ops.split(logits, 2, axis=0))
        wrapped = keras.Model(inputs, outputs, name=f"{model.name}_test_time_flip")
        self.compile(wrapped, values)
        return wrapped

    @staticmethod
    def compile(model: keras.Model, values: dict[str, Any], steps_per_execution: int = 1) -> None:
        """The study's training setup: Adam, sparse categorical cross-entropy from logits, accuracy.
        ``steps_per_execution`` runs that many batches per call into TensorFlow (the same updates, less
        overhead: for the transfer head, whose steps are tiny)."""
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=values["learning_rate"]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution,
        )
        # Built now: a model saved before it trained (the transfer head's weights are copied in, never fitted
        # end to end) would otherwise load with "Skipping variable loading for optimizer".
        model.optimizer.build(model.trainable_variables)

    # -- shared blocks ---------------------------------------------------------------------------------
    @staticmethod
    def preprocess(x: keras.KerasTensor) -> keras.KerasTensor:
        """MobileNetV2's ``preprocess_input`` (x / 127.5 - 1) as a serialisable layer."""
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(x)

    @staticmethod
    def augment(x: keras.KerasTensor, values: dict[str, Any]) -> keras.KerasTensor:
        """RandomFlip then RandomRotation, as the study; a flip mode of "none" or a factor of 0 drops the layer."""
        if values["flip_mode"] != "none":
            x = keras.layers.RandomFlip(values["flip_mode"], name="random_flip")(x)
        if values["rotation_factor"] > 0:
            x = keras.layers.RandomRotation(values["rotation_factor"], name="random_rotation")(x)
        return x

    def head(self, x: keras.KerasTensor, values: dict[str, Any]) -> keras.KerasTensor:
        pooling = values["pooling"]
        policy = self.dtype_policy
        if pooling == "flatten":
            x = keras.layers.Flatten(name="flatten", dtype=policy)(x)
        elif pooling == "global_max":
            x = keras.layers.GlobalMaxPooling2D(name="global_max_pooling", dtype=policy)(x)
        elif pooling == "global_avg":
            x = keras.layers.GlobalAveragePooling2D(name="global_avg_pooling", dtype=policy)(x)
        else:  # hp.Choice guards this; a hand-made HyperParameters may not
            raise ValueError(f"unknown pooling {pooling!r}")
        x = keras.layers.Dropout(values["dropout"], name="dropout", dtype=policy)(x)
        return keras.layers.Dense(self.num_classes, name="logits", dtype="float32")(x)  # logits and loss in float32


# Keras' random augmentation layers (RandomFlip, RandomRotation, RandomZoom, RandomContrast, ...), which augment
# whenever a model is called without ``training=False``. RandomCrop is not among them: it changes the shape.
AUGMENTATION_LAYERS = tuple(getattr(keras.layers, name) for name in dir(keras.layers)
                            if name.startswith("Random") and name != "RandomCrop"
                            and isinstance(getattr(keras.layers, name), type))


def without_augmentation(model: keras.Model) -> keras.Model:
    """``model`` with its random augmentation layers (``AUGMENTATION_LAYERS``) taken out, every other layer (and so every weight,
    and the optimizer) shared: ``model`` itself when it has none.

    Keras 3's random layers augment whenever they are called without ``training=False``: ``model(x)`` and
    ``Model.export`` of a model that holds them give a different answer for the same image each time. The
    model a trial is scored, kept and exported as is this one, so every way of calling it is deterministic.
    """
    if not any(isinstance(layer, AUGMENTATION_LAYERS) for layer in model.layers):
        return model

    def call(layer, *args, **kwargs):
        return args[0] if isinstance(layer, AUGMENTATION_LAYERS) else layer(*args, **kwargs)

    stripped = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    stripped.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    return stripped


def augmenting_pipeline(model: keras.Model, batches):
    """``model`` as it trains fastest on ``batches``: its leading layers, up to its last random augmentation
    layer, run in the ``tf.data`` pipeline, and the rest of the model trains on their output.

    Inside the model, RandomRotation runs in the training step, on the cores the convolutions wait for; in the
    pipeline it runs while the previous batch trains (the study's network, measured side by side: a median of
    10.8 s an epoch inside the model, 9.9 s in the pipeline, 8 % less CPU time). The layers are the model's own
    (same modes, factors and seeds, called with ``training=True`` as ``fit`` would), mapped one batch after
    another so their random draws come in the same order in every run; the returned model shares every weight
    and the optimizer with ``model``, which keeps the augmentation layers (the model a trial scores, keeps and
    exports is ``without_augmentation(model)``).

    Returns:
        (the model to ``fit``, the batches to fit it on): ``(model, batches)`` itself for a model without
        augmentation layers.
    """
    layers = model.layers[1:]  # after the InputLayer
    last = max((i for i, layer in enumerate(layers) if isinstance(layer, AUGMENTATION_LAYERS)), default=None)
    if last is None:
        return model, batches
    front = layers[:last + 1]
    previous = model.inputs[0]
    for layer in front:  # a chain from the input (as every family builds it); anything else trains as built
        if layer.input is not previous:
            return model, batches
        previous = layer.output
    rest = keras.Model(previous, model.outputs[0], name=f"{model.name}_after_augmentation")
    rest.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])

    def augment(images, labels):
        for layer in front:
            images = layer(images, training=True)
        return images, labels

    import tensorflow as tf

    return rest, batches.map(augment).prefetch(tf.data.AUTOTUNE)


def fitted(final: keras.Model, history: dict, test_loss: float, test_accuracy: float, scored_on: str) -> Fitted:
    """A ``Fitted`` whose validation score is the last epoch's of ``history`` (Keras' ``History.history``)."""
    history = {name: [float(v) for v in history.get(name, [])] for name in ("loss", "accuracy", "val_loss",
                                                                          "val_accuracy")}
    return Fitted(final, history, history["val_loss"][-1] if history["val_loss"] else float("nan"),
                  history["val_accuracy"][-1] if history["val_accuracy"] else float("nan"),
                  float(test_loss), float(test_accuracy), scored_on)
