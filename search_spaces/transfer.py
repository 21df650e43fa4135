"""The transfer family: a frozen ImageNet MobileNetV2 base with a small trainable head.

The study's model: preprocess_input, RandomFlip, RandomRotation(0.2), MobileNetV2 (no top, frozen, called
with ``training=False``), GlobalMaxPooling2D, Dropout 0.2, Dense(classes) on logits. A trial may then
fine-tune the top of the base with the head (``fine_tune_from``).

This module declares the search space and builds the model; how its trials train fast (cached base features,
the fine-tuning stage on cached activations) is the ``feature_cache`` package's ``CachedTraining``.
"""

from __future__ import annotations

from typing import Any

import keras
import keras_tuner as kt

from feature_cache.finetune import CUTS, FINE_TUNE_FROM
from feature_cache.trainer import CachedTraining
from search_spaces.base import HyperFamily
from sweep.errors import WeightsError


class HyperTransfer(CachedTraining, HyperFamily):
    name = "transfer"
    description = ("frozen ImageNet MobileNetV2 base + pooling/dropout/dense head, optionally then fine-tuned from "
                   "a cut point (study: ~95-98 %)")
    study_range = (0.95, 0.98)
    study_model = 4
    stage_switch = ("fine_tune_from", "none")  # --fine-tune: which trials fine-tune (sweep/staging.py)
    prunable = False  # a trial on cached features takes seconds: nothing to save
    mixed_precision = False  # its head trains on cached features in float32
    uses_weights = True  # --weights: the base's checkpoint (sweep/weights.py resolves it to a file)

    @classmethod
    def stage_epochs(cls, values: dict[str, Any]) -> int:
        """A fine-tuning trial's ``fine_tune_epochs``, after the head's (the stage is on by ``stage_switch``)."""
        switch, off = cls.stage_switch
        return int(values.get("fine_tune_epochs", 0)) if values.get(switch, off) != off else 0

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

    def declare(self, hp: kt.HyperParameters) -> dict[str, Any]:
        values = super().declare(hp)
        values["pooling"] = hp.Choice("pooling", ["global_max", "global_avg"], default="global_max")
        values.update(self.declare_augmentation(hp))
        # Fine-tuning: after the head's epochs, train the base from the cut upwards with the head, at the
        # head's learning rate times the factor. "none" is the study's model.
        values["fine_tune_from"] = hp.Choice("fine_tune_from", list(FINE_TUNE_FROM), default="none")
        with hp.conditional_scope("fine_tune_from", list(CUTS)):
            values["fine_tune_epochs"] = hp.Int("fine_tune_epochs", 1, 3, default=2)
            values["fine_tune_lr_factor"] = hp.Float("fine_tune_lr_factor", 0.01, 0.3, sampling="log", default=0.1)
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

    def build_layers(self, inputs: keras.KerasTensor, values: dict[str, Any]) -> keras.KerasTensor:
        x = self.preprocess(inputs)
        x = self.augment(x, values)
        x = self.build_base()(x, training=False)
        return self.head(x, values)

    def with_own_base(self, model: keras.Model) -> keras.Model:
        """``model`` (built by ``build``) on its own copy of the shared base, every other layer (and so the
        trained head) shared with it: what a trial fine-tunes, keeps and exports.

        Made when the fine-tuning stage begins, not when the trial's model is built: copying the base draws
        from Keras' random stream (its layers are initialised before the weights are copied in), and a trial
        that fine-tunes must draw its head stage exactly as a frozen trial with the same seed does (the staged
        search fine-tunes the very model that led, sweep/staging.py).
        """
        shared = self.build_base()
        own = keras.models.clone_model(shared)
        own.set_weights(shared.get_weights())
        own.trainable = False  # as the study's base: what trains is chosen by the fine-tuning stage
        return keras.models.clone_model(model, clone_function=lambda layer: own if layer is shared else layer)
