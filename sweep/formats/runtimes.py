"""Runtimes: each loads one format's file and maps a float32 NHWC batch of raw images to logits.

Each imports its runtime only when a model is loaded, so naming the formats imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

THROUGHPUT_BATCH = 32  # the batch Keras predicts in, and the one images/s is measured at


class Runtime:
    """A loaded model: ``runtime(x)`` gives the logits of the batch ``x``; ``input_size`` is (height, width);
    ``num_classes`` is set by ``load``."""

    input_size: tuple[int, int]
    num_classes: int = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class KerasRuntime(Runtime):
    """A ``.keras`` file in Keras."""

    def __init__(self, path: Path) -> None:
        import keras

        self.model = keras.models.load_model(path)
        self.input_size = tuple(int(v) for v in self.model.input_shape[1:3])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(x, batch_size=THROUGHPUT_BATCH, verbose=0))


class SavedModelRuntime(Runtime):
    """Through the ``serving_default`` signature: what TensorFlow Serving calls."""

    def __init__(self, path: Path) -> None:
        import tensorflow as tf

        self._tf = tf
        self.loaded = tf.saved_model.load(str(path))
        self.signature = self.loaded.signatures["serving_default"]
        (self.input_name, spec), = self.signature.structured_input_signature[1].items()
        self.input_size = (int(spec.shape[1]), int(spec.shape[2]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outputs = self.signature(**{self.input_name: self._tf.constant(x, dtype=self._tf.float32)})
        (logits,) = outputs.values()
        return logits.numpy()


class LiteRTRuntime(Runtime):
    """A ``.tflite`` file (float or int8) in the LiteRT interpreter, on every core."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.input_size = (int(self.input["shape"][1]), int(self.input["shape"][2]))
        self.batch = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.batch != len(x):
            self.interpreter.resize_tensor_input(self.input["index"], [len(x), *x.shape[1:]])
            self.interpreter.allocate_tensors()
            self.batch = len(x)
        self.interpreter.set_tensor(self.input["index"], np.ascontiguousarray(x, dtype=np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()


class OnnxRuntime(Runtime):
    """A ``.onnx`` file in ONNX Runtime, on the CPU."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        entry = self.session.get_inputs()[0]
        self.input_name = entry.name
        self.input_size = (int(entry.shape[1]), int(entry.shape[2]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
