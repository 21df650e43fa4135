"""The three from-scratch families: one small CNN, optionally behind augmentation or preprocessing.

The study's network: Conv2D 32 -> MaxPool -> Conv2D 32 -> MaxPool -> Conv2D 64 (3x3, relu), Flatten,
Dropout 0.2, Dense(classes) on logits.
"""

from __future__ import annotations

from typing import Any

import keras
import keras_tuner as kt

from search_spaces.base import HyperFamily


class HyperConv(HyperFamily):
    """The study's small CNN with tunable widths and head pooling."""

    use_augmentation = False
    use_preprocessing = False

    def declare(self, hp: kt.HyperParameters) -> dict[str, Any]:
        values = super().declare(hp)
        values["conv1_filters"] = hp.Choice("conv1_filters", [16, 32, 64], default=32)
        values["conv2_filters"] = hp.Choice("conv2_filters", [16, 32, 64], default=32)
        values["conv3_filters"] = hp.Choice("conv3_filters", [32, 64, 128], default=64)
        values["pooling"] = hp.Choice("pooling", ["flatten", "global_max", "global_avg"], default="flatten")
        if self.use_augmentation:
            values.update(self.declare_augmentation(hp))
        return values

    def build_layers(self, inputs: keras.KerasTensor, values: dict[str, Any]) -> keras.KerasTensor:
        x = inputs
        if self.use_preprocessing:
            x = self.preprocess(x)
        if self.use_augmentation:
            x = self.augment(x, values)
        policy = self.dtype_policy  # float32, or mixed_bfloat16 (sweep/precision.py); the logits stay float32
        x = keras.layers.Conv2D(values["conv1_filters"], 3, activation="relu", name="conv1", dtype=policy)(x)
        x = keras.layers.MaxPooling2D(name="pool1", dtype=policy)(x)
        x = keras.layers.Conv2D(values["conv2_filters"], 3, activation="relu", name="conv2", dtype=policy)(x)
        x = keras.layers.MaxPooling2D(name="pool2", dtype=policy)(x)
        x = keras.layers.Conv2D(values["conv3_filters"], 3, activation="relu", name="conv3", dtype=policy)(x)
        return self.head(x, values)


class HyperScratch(HyperConv):
    name = "scratch"
    description = "small CNN on raw pixels (study: ~58-62 % validation)"
    study_range = (0.58, 0.62)
    study_model = 1


class HyperAugmented(HyperConv):
    name = "augmented"
    description = "small CNN behind RandomFlip + RandomRotation (study: ~58-64 %)"
    study_range = (0.58, 0.64)
    study_model = 2
    use_augmentation = True


class HyperPreprocessed(HyperConv):
    name = "preprocessed"
    description = "small CNN behind MobileNetV2 preprocess_input scaling (study: ~68-73 %)"
    study_range = (0.68, 0.73)
    study_model = 3
    use_preprocessing = True
