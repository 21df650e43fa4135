"""The transfer family: a frozen ImageNet MobileNetV2 base with a small trainable head.

The study's model: preprocess_input, RandomFlip, RandomRotation(0.2), MobileNetV2 (no top, frozen, called
with ``training=False``), GlobalMaxPooling2D, Dropout 0.2, Dense(classes) on logits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt

from search_spaces.base import HyperFamily
from sweep.config import keras_cache_dir
from sweep.errors import WeightsError

WEIGHTS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
IMAGENET_SIZES = (96, 128, 160, 192, 224)


def imagenet_weights_name(image_size: tuple[int, int], alpha: float = 1.0) -> str:
    """Keras' own file name for MobileNetV2 no-top ImageNet weights at this input size."""
    rows = image_size[0] if image_size[0] in IMAGENET_SIZES else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"


def resolve_weights(weights: str | None, image_size: tuple[int, int]) -> str | None:
    """Turn ``--weights`` into what ``MobileNetV2(weights=...)`` takes, failing early with a clear message.

    Args:
        weights: "imagenet" (Keras' cache under ``$KERAS_HOME/models``, downloaded when missing), a path to a
            local ``.h5``, or None / "none" for random initialisation.
        image_size: the model's input size; picks Keras' file for the ImageNet weights.

    Returns:
        A local file path, or None.

    Raises:
        WeightsError: the path does not exist, or the ImageNet weights are not cached and cannot be downloaded.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        name = imagenet_weights_name(image_size)
        try:
            return keras.utils.get_file(
                name, WEIGHTS_ORIGIN + name, cache_subdir="models", cache_dir=keras_cache_dir()
            )
        except Exception as exc:  # get_file raises a bare Exception when the network is unreachable
            raise WeightsError(
                f"ImageNet weights {name} are not in the Keras cache and could not be downloaded ({exc}). "
                f"Pass --weights PATH to a local MobileNetV2 no-top .h5, or copy one to "
                f"$KERAS_HOME/models/{name}."
            ) from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {weights} does not exist; pass --weights imagenet, none, or a path to a MobileNetV2 .h5."
        )
    return str(path)


def checkpoint_size_warning(weights_path: str | None, image_size: tuple[int, int]) -> str | None:
    """A warning when a weights file's name says it is the checkpoint for another input size, else None.

    Keras trains one MobileNetV2 checkpoint per input size and names the file after it (``..._1.0_224_no_top.h5``).
    A checkpoint runs at any size, but is most accurate at its own: the 224 one at 160x160 scored 1-2 points
    lower on cats_and_dogs_filtered validation than at 224 (README, "Image size and the checkpoint").
    """
    if not weights_path:
        return None
    name = Path(weights_path).name
    match = re.search(rf"_({'|'.join(map(str, IMAGENET_SIZES))})_no_top", name)
    if match is None:
        return None
    size = int(match.group(1))
    if tuple(image_size) == (size, size):
        return None
    return (
        f"Warning: {name} is MobileNetV2's {size}x{size} checkpoint, but images are "
        f"{image_size[0]}x{image_size[1]}; a checkpoint is most accurate at the size it was trained at "
        f"(pass --image-size {size})."
    )


class HyperTransfer(HyperFamily):
    name = "transfer"
    description = "frozen ImageNet MobileNetV2 base + pooling/dropout/dense head (study: ~95-98 %)"

    def __init__(
        self,
        num_classes: int = 2,
        image_size: tuple[int, int] = (160, 160),
        weights: str | None = None,
    ) -> None:
        """``weights`` is a local file path or None; use ``resolve_weights`` to turn "imagenet" into a path."""
        super().__init__(num_classes=num_classes, image_size=image_size)
        self.weights = weights
        self._base: keras.Model | None = None

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
