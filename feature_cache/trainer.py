"""Training the transfer family on cached base features: the engine behind ``HyperTransfer``'s ``prepare`` and
``fit`` (Keras Tuner's ``HyperModel.fit`` hook).

``CachedTraining`` is a mixin for a family with a frozen MobileNetV2 base (``build_base``, ``with_own_base``): its
``prepare`` computes or loads the base's features of every training view and of the clean held-out images
(``feature_cache.features``), its ``fit`` trains the head alone on them (``feature_cache.head``), and a trial with
``fine_tune_from`` then trains the top of a copy of the base on the cut's cached activations
(``feature_cache.finetune``). Without cached features it trains end to end on raw images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import keras
import keras_tuner as kt
import numpy as np

from feature_cache.features import FeatureCache, FeatureExtractor, PooledFeatures, PoolSpec, TrainPool, digest
from feature_cache.finetune import (CUT_LAYERS, CUTS, ActivationDraws, ScoreViewsEachEpoch, TopTrainer,
                                    fine_tune_rate, trainable_names, view_logits)
from feature_cache.head import RateDropout, ScoreEachEpoch, ViewDraws, score, stack_views
from search_spaces.base import Fitted, fitted

# Below this many forward passes a sweep's features come from TensorFlow, without converting the base.
LITERT_MIN_PASSES = 4000


class CachedTraining:
    """Mixin: a frozen-base family's trials on cached features (see the module's docstring). The family's
    ``stage_switch`` names the hyperparameter that picks the cut (a key of ``CUTS``, or its off value), and its
    ``stage_epochs(values)`` the fine-tuning stage's epochs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heads: dict[tuple[int, int], keras.Model] = {}
        self._trainers: dict[tuple[str, int], TopTrainer] = {}
        self.features: CachedFeatures | None = None  # set by ``prepare``

    def build_head(self, hp: kt.HyperParameters, feature_dim: int = 1280, steps_per_execution: int = 1,
                   seed: int = 0) -> keras.Model:
        """The trainable part alone, on pooled base features: Dropout then Dense, compiled like ``build``, set
        to ``hp``'s dropout and learning rate, a fresh optimizer state and a dropout stream from ``seed``.

        It takes ``[images, views, feature_dim]`` and averages the logits over the views: training feeds one
        drawn view per image, validation the clean view (and its mirror with ``test_time_flip``, which is
        what ``inference_model`` computes on raw images). Its ``logits`` weights drop into the end-to-end
        model built by ``build`` with the same ``hp``; the caller sets them before training (they are the
        trial's initial weights).

        One head is built and compiled per process and reconfigured for each trial: its dropout rate and
        learning rate are variables, so TensorFlow traces its training step once, not once per trial (the
        tracing took longer than the training).
        """
        values = self.declare(hp)
        key = (feature_dim, steps_per_execution)
        if key not in self._heads:
            inputs = keras.Input(shape=(None, feature_dim), name="pooled_features")
            x = RateDropout(name="dropout")(inputs)
            x = keras.layers.Dense(self.num_classes, name="logits")(x)
            outputs = keras.layers.GlobalAveragePooling1D(name="view_average")(x)
            model = keras.Model(inputs, outputs, name=f"{self.name}_head")
            self.compile(model, values, steps_per_execution=steps_per_execution)
            self._heads[key] = model
        model = self._heads[key]
        model.get_layer("dropout").reset(values["dropout"], seed)
        for variable in model.optimizer.variables:  # Adam's step count and moments start from zero
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
        model.optimizer.learning_rate = values["learning_rate"]
        return model

    def new_session(self) -> None:
        """A trial on cached features builds next to nothing (its head is reused): Keras' global state is
        reset without a garbage collection, which cost more than it freed there, even in a search's frozen heap.

        The base is built here, before the trial seeds Keras, so that building it (once per process, in
        whichever trial comes first) never shifts a trial's random draws: a trial's initial weights are the
        same in a warm or a cold process, first or not.
        """
        if self.features is None:
            super().new_session()
        else:
            keras.backend.clear_session(free_memory=False)
        self.build_base()

    def prepare(self, data: Any, cache_dir: Path | None, report: Callable[[str], None],
                fixed: dict[str, Any] | None = None) -> None:
        """Load or compute the base's features of every training view, and of the clean validation and test
        images and their mirrors; trials then train and score only the head. The same pass keeps the
        activations at every cut point a trial may fine-tune from (only the fixed one, with ``fixed``
        holding ``fine_tune_from``). The disk cache is used only with a weights file (random weights differ
        per process).

        ``data`` gives the splits' ``files`` and ``labels``, and ``decode(files)`` (float32 0-255 images).
        """
        fixed_cut = (fixed or {}).get(self.stage_switch[0])
        cuts = [c for c in CUTS if fixed_cut in (None, c)]
        base = self.build_base()
        cut_shapes = {c: tuple(base.get_layer(CUTS[c]).output.shape[1:]) for c in cuts}
        weights_id = digest(Path(self.weights)) if self.weights else None
        directory = Path(cache_dir) if (cache_dir and weights_id) else None
        outputs = "-".join(["pooled", *cuts])
        litert_file = (directory / f"base-{weights_id}-{self.image_size[0]}x{self.image_size[1]}-{outputs}.tflite"
                       if directory else None)
        held_out = sorted(set(data.validation.files) | set(data.test.files))
        passes = len(data.train.files) * PoolSpec().views_per_image + 2 * len(held_out)
        # Converting the base to LiteRT takes ~10 s: worth it for a real dataset, not for a handful of images.
        backend = "auto" if passes >= LITERT_MIN_PASSES else "tensorflow"
        cache = FeatureCache(directory, lambda: FeatureExtractor(base, backend=backend, litert_file=litert_file,
                                                                 report=report, cuts={c: CUTS[c] for c in cuts}),
                             weights_id or "random-init", self.image_size, data.decode, report=report,
                             cut_shapes=cut_shapes)
        pool = cache.pool(data.train.files, PoolSpec())
        # Validation and test are cut from one folder by the seed: cache the folder, so every seed is warm.
        clean, mirrored = cache.clean(held_out, "validation-folder")
        row = {file: i for i, file in enumerate(held_out)}

        def rows(split) -> np.ndarray:
            return np.array([row[f] for f in split.files], dtype="int64")

        self.features = CachedFeatures(pool, clean.take(rows(data.validation)), mirrored.take(rows(data.validation)),
                                       clean.take(rows(data.test)), mirrored.take(rows(data.test)))

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *, data: Any, batch_size: int, epochs: int,
            initial_epoch: int = 0, callbacks: list | None = None, verbose: int = 0, seed: int = 0) -> Fitted:
        """With cached features (``prepare``), train only the head, one freshly drawn view per image and epoch,
        and score it on the clean validation and test features (with their mirrors for ``test_time_flip``);
        the trained head then goes into ``model``. Without, train end to end on raw images.

        A trial with ``fine_tune_from`` then fine-tunes the top of a copy of the base with the head for
        ``fine_tune_epochs`` more epochs (on the cut's cached activations, or on raw images), on the same
        epoch axis: its score is the fine-tuned model's, and ``Fitted.stages`` says where fine-tuning began.
        """
        values = hp.values
        if self.features is None:
            head_stage = super().fit(hp, model, data=data, batch_size=batch_size, epochs=epochs,
                                     initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose, seed=seed)
            if not self.stage_epochs(values) or model.stop_training:  # stopped: no next stage
                return head_stage
            return fine_tune_raw(self, values, model, head_stage, data=data, batch_size=batch_size, epochs=epochs,
                                 callbacks=callbacks, verbose=verbose, seed=seed)
        f = self.features
        draws = ViewDraws(f.pool, data.train.labels, values["pooling"], values["flip_mode"],
                          values["rotation_factor"], batch_size, seed, tensor=f.tensor(values["pooling"]))
        head = self.build_head(hp, f.pool.features.max.shape[-1], steps_per_execution=draws.steps_per_epoch,
                               seed=seed)
        head.get_layer("logits").set_weights(model.get_layer("logits").get_weights())  # Hyperband: continue
        views = 2 if values["test_time_flip"] else 1
        validation = stack_views([f.validation, f.mirrored_validation][:views], values["pooling"])
        history = head.fit(draws.dataset(epochs - initial_epoch), epochs=epochs, initial_epoch=initial_epoch,
                           steps_per_epoch=draws.steps_per_epoch, shuffle=False, verbose=verbose,  # drawn shuffled
                           callbacks=[ScoreEachEpoch(validation, data.validation.labels), *(callbacks or [])])
        model.get_layer("logits").set_weights(head.get_layer("logits").get_weights())
        # a trial the oracle stopped (at the time budget) ends with its head stage
        if self.stage_epochs(values) and not head.stop_training:
            return self.fine_tune_cached(values, model, history.history, data=data, batch_size=batch_size,
                                         epochs=epochs, callbacks=callbacks, verbose=verbose, seed=seed)
        test = stack_views([f.test, f.mirrored_test][:views], values["pooling"])
        test_loss, test_accuracy = score(head, test, data.test.labels)
        return fitted(self.inference_model(model, values), history.history, test_loss, test_accuracy,
                      "cached_features")

    def fine_tune_cached(self, values: dict[str, Any], model: keras.Model, head_history: dict, *, data: Any,
                         batch_size: int, epochs: int, callbacks: list | None, verbose: int, seed: int) -> Fitted:
        """The fine-tuning stage on the cut's cached activations: the top (a copy of the base's, from its
        ImageNet weights) and the trained head train together; the result is ``model`` on its own copy of the
        base (``with_own_base``) holding the fine-tuned top, and ``model``'s head (shared) holds the tuned head."""
        cut, f = values[self.stage_switch[0]], self.features
        draws = ViewDraws(f.pool, data.train.labels, values["pooling"], values["flip_mode"],
                          values["rotation_factor"], batch_size, [seed, 1])  # its own stream of view draws
        batches = ActivationDraws(f.pool.activations(cut), data.train.labels, draws, batch_size)
        key = (cut, batches.steps_per_epoch)
        if key not in self._trainers:
            self._trainers[key] = TopTrainer(self.build_base(), cut, self.num_classes, batches.steps_per_epoch,
                                             self.compile)
        trainer = self._trainers[key]
        more = self.stage_epochs(values)
        tuned = trainer.reset(model.get_layer("logits").get_weights(), values, seed,
                              steps=more * batches.steps_per_epoch)
        views = 2 if values["test_time_flip"] else 1
        validation = [f.validation.cuts[cut], f.mirrored_validation.cuts[cut]][:views]
        try:
            history = tuned.fit(batches.dataset(more), epochs=epochs + more, initial_epoch=epochs,
                                steps_per_epoch=batches.steps_per_epoch, shuffle=False, verbose=verbose,
                                callbacks=[ScoreViewsEachEpoch(validation, data.validation.labels), *(callbacks or [])])
        finally:
            batches.activations.close()
        test_logits = view_logits(tuned, [f.test.cuts[cut], f.mirrored_test.cuts[cut]][:views])
        test_loss, test_accuracy = score(tuned, None, data.test.labels, test_logits)
        model = self.with_own_base(model)
        trainer.copy_into(own_base(model))
        model.get_layer("logits").set_weights(tuned.get_layer("logits").get_weights())
        return fine_tuned(self.inference_model(model, values), head_history, history.history, test_loss,
                          test_accuracy, "cached_features", epochs + 1)

    def evaluate_raw(self, result: Fitted, data: Any, batch_size: int,
                     splits: tuple[str, ...] = ("val", "test")) -> dict[str, float] | None:
        """The end-to-end model on the raw images of ``splits`` ("val", "test"): a check of the cached score.
        Images are decoded a batch at a time and dropped (at 224 the two splits would hold 600 MB)."""
        if result.scored_on != "cached_features":
            return None
        figures = {}
        for name, split in (("val", data.validation), ("test", data.test)):
            if name not in splits:
                continue
            logits = np.concatenate([
                np.asarray(result.model.predict_on_batch(data.decode(split.files[i:i + batch_size])))
                for i in range(0, len(split), batch_size)])
            loss, accuracy = score(result.model, None, split.labels, logits)
            figures.update({f"raw_{name}_loss": loss, f"raw_{name}_accuracy": accuracy})
        return figures



def own_base(model: keras.Model) -> keras.Model:
    """The MobileNetV2 inside an end-to-end transfer model (or inside its test-time-flip wrapper)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if any(inner.name == CUT_LAYERS["conv_1"] for inner in layer.layers):
                return layer
            return own_base(layer)
    raise ValueError(f"{model.name} holds no MobileNetV2 base")


def fine_tune_raw(family: Any, values: dict[str, Any], model: keras.Model, head_stage: Fitted, *,
                  data: Any, batch_size: int, epochs: int, callbacks: list | None, verbose: int,
                  seed: int) -> Fitted:
    """The fine-tuning stage end to end on raw images (a sweep without the feature cache): the base's layers
    above the cut train with the head, in ``model`` on its own copy of the base (``with_own_base``; the
    shared base never trains), BatchNormalization still in inference mode."""
    from search_spaces.base import Validation, augmenting_pipeline

    model = family.with_own_base(model)
    base = own_base(model)
    cut = values[family.stage_switch[0]]  # the stage's switch names the cut: fine_tune_from
    top = set(trainable_names(base, cut))
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name in top
    more = family.stage_epochs(values)
    family.compile(model, {"learning_rate": fine_tune_rate(values, more * math.ceil(len(data.train) / batch_size))})
    final = family.inference_model(model, values)
    trained, train = augmenting_pipeline(model, data.train.batches(batch_size, shuffle_seed=seed))
    history = trained.fit(train, epochs=epochs + more,
                          initial_epoch=epochs, shuffle=False, verbose=verbose,  # the pipeline reshuffles
                          callbacks=[Validation(final, data.validation.batches(batch_size)), *(callbacks or [])])
    test_loss, test_accuracy = final.evaluate(data.test.batches(batch_size), verbose=0)
    return fine_tuned(final, head_stage.history, history.history, test_loss, test_accuracy, "raw_images", epochs + 1)


def fine_tuned(model: keras.Model, head_history: dict[str, list[float]], tune_history: dict[str, list[float]],
               test_loss: float, test_accuracy: float, scored_on: str, first_epoch: int) -> Fitted:
    """A fine-tuning trial's result: both stages' curves on one epoch axis, fine-tuning from ``first_epoch``,
    and the fine-tuned model's score (its last epoch's validation figures)."""
    both = {name: list(series) + list(tune_history.get(name, [])) for name, series in head_history.items()}
    result = fitted(model, both, test_loss, test_accuracy, scored_on)
    result.stages = {"fine_tune": first_epoch}
    return result



@dataclass
class CachedFeatures:
    """What a cached transfer trial trains and is scored on: the training view pool, and clean features of
    the validation and test images and of their mirrors (for ``test_time_flip`` trials)."""

    pool: TrainPool
    validation: PooledFeatures
    mirrored_validation: PooledFeatures
    test: PooledFeatures
    mirrored_test: PooledFeatures
    _tensors: dict = field(default_factory=dict, repr=False)

    def tensor(self, pooling: str):
        """The pool's features for ``pooling`` as one TensorFlow constant, made once: every trial gathers its
        batches from the same copy (hundreds of MB at 224) instead of making its own."""
        if pooling not in self._tensors:
            import tensorflow as tf

            self._tensors[pooling] = tf.constant(self.pool.features.pooled(pooling))
        return self._tensors[pooling]
