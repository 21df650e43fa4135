"""Writers: each writes a Keras model in one format through that format's public exporter.

A writer is called as ``writer(model, keras_file, dest, images)``: ``keras_file`` is ``model``'s own ``.keras``
file when there is one, ``dest`` the path to write, ``images`` the training images int8 calibrates on (None for
a format whose entry does not ask for them).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np


def write_keras(model, keras_file: Path | None, dest: Path, images: np.ndarray | None) -> None:
    """The ``.keras`` file: the very file the trial logged when given, else ``model`` saved."""
    if keras_file is not None:
        shutil.copy(keras_file, dest)
    else:
        model.save(dest)


def write_saved_model(model, keras_file: Path | None, dest: Path, images: np.ndarray | None) -> None:
    """A SavedModel folder with a ``serving_default`` signature."""
    model.export(str(dest), format="tf_saved_model", verbose=False)


def write_litert(model, keras_file: Path | None, dest: Path, images: np.ndarray | None) -> None:
    """A float32 LiteRT (``.tflite``) file."""
    model.export(str(dest), format="litert", verbose=False)


def write_litert_int8(model, keras_file: Path | None, dest: Path, images: np.ndarray | None) -> None:
    """A LiteRT file with dynamic-range weights plus int8 activations calibrated on ``images``; input and output
    stay float32, so the file is called as ``model.tflite`` is."""
    import tensorflow as tf

    def calibration() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[None]]

    model.export(str(dest), format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT],
                 representative_dataset=calibration)


def write_onnx(model, keras_file: Path | None, dest: Path, images: np.ndarray | None) -> None:
    """An ONNX file (through tf2onnx)."""
    model.export(str(dest), format="onnx", verbose=False)


def float32_copy(model):
    """``model`` computing in float32 throughout, with the same weights.

    A sweep trained in ``mixed_bfloat16`` keeps that policy in its layers; converters then emit bfloat16
    convolutions that LiteRT's built-in kernels do not have (``FlexConv2D``), and CPUs without native bfloat16
    run them slowly. The weights themselves are float32 under a mixed policy, so nothing is lost: the copy is
    the trained function computed more precisely (its logits differ from bfloat16's by bfloat16's rounding).
    """
    import json

    import keras

    policies = {layer.dtype_policy.name for layer in _layers(model)}
    if policies <= {"float32"}:
        return model

    def to_float32(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {k: to_float32(v) for k, v in node.items()}
        if isinstance(node, list):
            return [to_float32(v) for v in node]
        return node

    config = to_float32(json.loads(model.to_json()))
    copy = keras.models.model_from_json(json.dumps(config))
    copy.set_weights(model.get_weights())
    return copy


def _layers(model) -> Iterator:
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)
