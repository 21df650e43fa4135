"""The transfer family: a frozen ImageNet MobileNetV2 base with a small trainable head.

The study's model: preprocess_input, RandomFlip, RandomRotation(0.2), MobileNetV2 (no top, frozen, called
with ``training=False``), GlobalMaxPooling2D, Dropout 0.2, Dense(classes) on logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import keras_tuner as kt
import numpy as np

from search_spaces.base import Fitted, HyperFamily, fitted
from search_spaces.features import FeatureCache, FeatureExtractor, PooledFeatures, PoolSpec, TrainPool, digest
from search_spaces.head import ViewSampler, stack_views
from sweep.errors import WeightsError


class HyperTransfer(HyperFamily):
    name = "transfer"
    description = "frozen ImageNet MobileNetV2 base + pooling/dropout/dense head (study: ~95-98 %)"

    def __init__(
        self,
        num_classes: int = 2,
        image_size: tuple[int, int] = (160, 160),
        weights: str | None = None,
    ) -> None:
        """``weights`` is a local file path or None (``sweep.weights.resolve_weights`` turns "imagenet" into one)."""
        super().__init__(num_classes=num_classes, image_size=image_size)
        self.weights = weights
        self._base: keras.Model | None = None
        self.features: CachedFeatures | None = None  # set by ``prepare``

    def declare(self, hp: kt.HyperParameters) -> dict[str, Any]:
        values = super().declare(hp)
        values["pooling"] = hp.Choice("pooling", ["global_max", "global_avg"], default="global_max")
        values.update(self.declare_augmentation(hp))
        return values

    def build_base(self) -> keras.Model:
        """The frozen base, built and loaded once and shared by every model this hypermodel builds.

        Sharing is safe because the base never trains, and it makes every trial's model use the very
        weights the feature cache was computed with (with ``weights=None`` too).
        """
        if self._base is not None:
            return self._base
        try:
            base = keras.applications.MobileNetV2(
                input_shape=(*self.image_size, 3), include_top=False, weights=self.weights
            )
        except (ValueError, OSError) as exc:
            raise WeightsError(f"could not load MobileNetV2 weights from {self.weights}: {exc}") from None
        base.trainable = False
        self._base = base
        return base

    def build_head(self, hp: kt.HyperParameters, feature_dim: int = 1280) -> keras.Model:
        """The trainable part alone, on pooled base features: Dropout then Dense, compiled like ``build``.

        It takes ``[images, views, feature_dim]`` and averages the logits over the views: training feeds one
        drawn view per image, validation the clean view (and its mirror with ``test_time_flip``, which is
        what ``inference_model`` computes on raw images). Its ``logits`` weights drop into the end-to-end
        model built by ``build`` with the same ``hp``.
        """
        values = self.declare(hp)
        inputs = keras.Input(shape=(None, feature_dim), name=f"{values['pooling']}_features")
        x = keras.layers.Dropout(values["dropout"], name="dropout")(inputs)
        x = keras.layers.Dense(self.num_classes, name="logits")(x)
        outputs = keras.layers.GlobalAveragePooling1D(name="view_average")(x)
        model = keras.Model(inputs, outputs, name=f"{self.name}_head")
        self.compile(model, values)
        return model

    def build_layers(self, inputs: keras.KerasTensor, values: dict[str, Any]) -> keras.KerasTensor:
        x = self.preprocess(inputs)
        x = self.augment(x, values)
        x = self.build_base()(x, training=False)
        return self.head(x, values)

    # -- training on cached features -------------------------------------------------------------------
    def prepare(self, data: Any, cache_dir: Path | None, report: Callable[[str], None]) -> None:
        """Load or compute the base's features of every training view, and of the clean validation and test
        images and their mirrors; trials then train and score only the head. The disk cache is used only
        with a weights file (random weights differ per process)."""
        weights_id = digest(Path(self.weights)) if self.weights else None
        cache = FeatureCache(cache_dir if weights_id else None, lambda: FeatureExtractor(self.build_base()),
                             weights_id or "random-init", report=report)

        def clean(split, name: str) -> tuple[PooledFeatures, PooledFeatures]:
            mirrored = np.ascontiguousarray(split.images[:, :, ::-1])
            return cache.clean(split.images, name), cache.clean(mirrored, f"mirrored {name}")

        pool = cache.pool(data.train.images, PoolSpec())
        self.features = CachedFeatures(pool, *clean(data.validation, "validation"), *clean(data.test, "test"))

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *, data: Any, batch_size: int, epochs: int,
            initial_epoch: int = 0, callbacks: list | None = None, verbose: int = 0, seed: int = 0) -> Fitted:
        """With cached features (``prepare``), train only the head, one freshly drawn view per image and epoch,
        and score it on the clean validation and test features (with their mirrors for ``test_time_flip``);
        the trained head then goes into ``model``. Without, train end to end on raw images."""
        if self.features is None:
            return super().fit(hp, model, data=data, batch_size=batch_size, epochs=epochs,
                               initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose, seed=seed)
        values, f = hp.values, self.features
        head = self.build_head(hp, f.pool.features.max.shape[-1])
        head.get_layer("logits").set_weights(model.get_layer("logits").get_weights())  # Hyperband: continue
        sampler = ViewSampler(f.pool, data.train.labels, values["pooling"], values["flip_mode"],
                              values["rotation_factor"], batch_size, seed)
        views = 2 if values["test_time_flip"] else 1
        validation = stack_views([f.validation, f.mirrored_validation][:views], values["pooling"])
        history = head.fit(sampler, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                           verbose=verbose, validation_data=(validation, data.validation.labels))
        test = stack_views([f.test, f.mirrored_test][:views], values["pooling"])
        test_loss, test_accuracy = head.evaluate(test, data.test.labels, batch_size=batch_size, verbose=0)
        model.get_layer("logits").set_weights(head.get_layer("logits").get_weights())
        return fitted(self.inference_model(model, values), history.history, test_loss, test_accuracy,
                      "cached_features")

    def evaluate_raw(self, result: Fitted, data: Any, batch_size: int) -> dict[str, float] | None:
        """The end-to-end model on the raw validation and test images: a check of the cached score."""
        if result.scored_on != "cached_features":
            return None
        figures = {}
        for name, split in (("val", data.validation), ("test", data.test)):
            loss, accuracy = result.model.evaluate(split.images, split.labels, batch_size=batch_size, verbose=0)
            figures.update({f"raw_{name}_loss": float(loss), f"raw_{name}_accuracy": float(accuracy)})
        return figures


@dataclass
class CachedFeatures:
    """What a cached transfer trial trains and is scored on: the training view pool, and clean features of
    the validation and test images and of their mirrors (for ``test_time_flip`` trials)."""

    pool: TrainPool
    validation: PooledFeatures
    mirrored_validation: PooledFeatures
    test: PooledFeatures
    mirrored_test: PooledFeatures
