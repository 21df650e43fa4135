"""Deployment formats of an exported model: each written by its public exporter, run in its own runtime, and
verified there on the sweep's test split against the Keras model it came from.

| format        | file               | written by                                            | run by                     |
|---------------|--------------------|-------------------------------------------------------|----------------------------|
| `keras`       | `model.keras`      | the trial (logged to MLflow), in float32              | Keras                      |
| `saved_model` | `saved_model/`     | `Model.export(format="tf_saved_model")`               | its `serving_default` signature |
| `litert`      | `model.tflite`     | `Model.export(format="litert")`                       | the LiteRT interpreter     |
| `litert_int8` | `model_int8.tflite`| the same, with post-training quantisation             | the LiteRT interpreter     |
| `onnx`        | `model.onnx`       | `Model.export(format="onnx")` (tf2onnx)               | ONNX Runtime               |

Every format takes what ``model.keras`` takes: raw RGB images, 0-255, float32, NHWC at the sweep's image size,
any batch size; it gives logits, computed in float32 (a model trained in mixed_bfloat16 is exported as its
float32 equivalent: ``float32_copy``). The model exported is the inference model (no augmentation layers), so each
runtime answers the same input the same way twice.

Each format is one entry of ``FORMATS`` (``catalog``): its file, writer (``writers``), runtime (``runtimes``),
checks and what it needs installed. ``verification`` runs a written format on the test split and measures it.
"""

from __future__ import annotations

from sweep.formats.catalog import (
    DEFAULT_FORMATS,
    FLOAT_AGREEMENT,
    FLOAT_GAP,
    FORMAT_FILE,
    FORMATS,
    INT8_AGREEMENT,
    INT8_GAP,
    REPRESENTATIVE_IMAGES,
    Format,
    Writer,
    check_available,
    classes_for,
    detect,
    load,
    native_output_held,
    parse_formats,
    write,
)
from sweep.formats.runtimes import (
    THROUGHPUT_BATCH,
    KerasRuntime,
    LiteRTRuntime,
    OnnxRuntime,
    Runtime,
    SavedModelRuntime,
)
from sweep.formats.verification import LATENCY_RUNS, LATENCY_WARMUP, Verification, record, size_on_disk, table, verify
from sweep.formats.writers import float32_copy

__all__ = [
    "DEFAULT_FORMATS", "FLOAT_AGREEMENT", "FLOAT_GAP", "FORMAT_FILE", "FORMATS", "INT8_AGREEMENT", "INT8_GAP",
    "LATENCY_RUNS", "LATENCY_WARMUP", "REPRESENTATIVE_IMAGES", "THROUGHPUT_BATCH", "Format", "KerasRuntime",
    "LiteRTRuntime", "OnnxRuntime", "Runtime", "SavedModelRuntime", "Verification", "Writer", "check_available",
    "classes_for", "detect", "float32_copy", "load", "native_output_held", "parse_formats", "record",
    "size_on_disk", "table", "verify", "write",
]
