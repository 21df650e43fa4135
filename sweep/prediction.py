"""Predict with an exported model: each image's class and probability, with a model in any export format run in
its own runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sweep.data import decode_error, decode_image
from sweep.formats import Runtime, classes_for, detect, load


@dataclass
class Prediction:
    """One image's predicted class and probability, or why it could not be read."""

    path: Path
    label: str = ""
    probability: float = float("nan")
    error: str = ""


def load_model_and_classes(model_path: Path) -> tuple[Runtime, list[str], str]:
    """Load a model in any export format (an export folder, a ``.keras``, ``.tflite`` or ``.onnx`` file, a
    SavedModel folder) in its own runtime, with its class names (``classes.json`` beside it, else 0, 1, ...).

    Returns:
        (runtime, classes, format name)

    Raises:
        SweepError: nothing loadable at ``model_path``, or its runtime is not installed.
    """
    name, path = detect(Path(model_path))
    runtime = load(name, path)
    return runtime, classes_for(path, runtime.num_classes), name


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and every file under the folders named (sorted); missing paths are kept to be reported."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return files


def predict(model_path: Path, paths: list[Path], batch_size: int = 32) -> list[Prediction]:
    """Class and probability (softmax of the logits) for each image, with a model in any export format run in
    its own runtime; unreadable files carry an error.

    Raises:
        SweepError: nothing loadable at ``model_path``, or its runtime is not installed.
    """
    model, classes, _ = load_model_and_classes(model_path)
    size = model.input_size
    results, batch = [], []

    def flush() -> None:
        if not batch:
            return
        logits = model(np.stack([image for _, image in batch]))
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        for (prediction, _), p in zip(batch, probabilities):
            prediction.label, prediction.probability = classes[int(np.argmax(p))], float(np.max(p))
        batch.clear()

    for path in image_files(paths):
        prediction = Prediction(path)
        results.append(prediction)
        try:
            if not path.is_file():
                raise FileNotFoundError("no such file")
            batch.append((prediction, decode_image(str(path), size)))
        except Exception as exc:  # corrupt, truncated, or not an image at all
            prediction.error = f"not a readable image ({decode_error(exc)})"
        if len(batch) >= batch_size:
            flush()
    flush()
    return results
