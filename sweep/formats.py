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
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from sweep.errors import SweepError, first_line
from sweep.native_output import captured

# How close a format must stay to the Keras model on the test split (agreement of the predicted class, and the
# accuracy gap in points): float formats compute the same function up to rounding; int8 quantises it.
FLOAT_AGREEMENT, FLOAT_GAP = 0.995, 0.5
INT8_AGREEMENT, INT8_GAP = 0.99, 1.0
REPRESENTATIVE_IMAGES = 100  # training images that calibrate int8's ranges (never test images)
LATENCY_WARMUP, LATENCY_RUNS = 5, 30
THROUGHPUT_BATCH = 32


@dataclass(frozen=True)
class Format:
    """One deployment format: where it goes in the export folder and what it needs."""

    name: str
    filename: str
    runtime: str
    min_agreement: float
    max_gap: float  # accuracy points
    modules: tuple[str, ...] = ()  # what must import to write and run it
    install: str = ""  # the pip command that brings those modules

    def missing(self) -> list[str]:
        """The modules this format needs that do not import here."""
        out = []
        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError:
                out.append(module)
        return out


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("keras", "model.keras", "Keras", FLOAT_AGREEMENT, FLOAT_GAP),
    Format("saved_model", "saved_model", "TensorFlow (serving_default)", FLOAT_AGREEMENT, FLOAT_GAP),
    Format("litert", "model.tflite", "LiteRT", FLOAT_AGREEMENT, FLOAT_GAP,
           ("ai_edge_litert.interpreter",), "pip install ai-edge-litert"),
    Format("litert_int8", "model_int8.tflite", "LiteRT", INT8_AGREEMENT, INT8_GAP,
           ("ai_edge_litert.interpreter",), "pip install ai-edge-litert"),
    Format("onnx", "model.onnx", "ONNX Runtime", FLOAT_AGREEMENT, FLOAT_GAP,
           ("tf2onnx", "onnx", "onnxruntime"), "pip install 'sweep[onnx]'"),
)}
DEFAULT_FORMATS = ("keras", "saved_model")
FORMAT_FILE = "formats.json"


def parse_formats(value: str) -> tuple[str, ...]:
    """``keras,onnx`` or ``all`` as format names, in the table's order, each once.

    Raises:
        SweepError: an unknown name, or none at all.
    """
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if not names:
        raise SweepError(f"--format {value!r} names no format; choose from {', '.join(FORMATS)} or all.")
    unknown = [n for n in names if n not in FORMATS and n != "all"]
    if unknown:
        hint = " (LiteRT is TensorFlow Lite's new name)" if any(n in ("tflite", "tf_lite") for n in unknown) else ""
        raise SweepError(f"--format {unknown[0]!r} is not a format; choose from {', '.join(FORMATS)} or all{hint}.")
    return tuple(FORMATS) if "all" in names else tuple(n for n in FORMATS if n in names)


def check_available(names: Sequence[str]) -> None:
    """Refuse, before anything is written, a format whose converter or runtime is not installed.

    Raises:
        SweepError: naming the format, what is missing and the install command.
    """
    for name in names:
        missing = FORMATS[name].missing()
        if missing:
            raise SweepError(f"--format {name} needs {', '.join(m.split('.')[0] for m in missing)}, which "
                             f"{'is' if len(missing) == 1 else 'are'} not installed; {FORMATS[name].install}, "
                             "or leave it out of --format.")


def write(name: str, model, keras_file: Path | None, dest: Path, representative: Callable[[], np.ndarray]) -> Path:
    """Write ``model`` in format ``name`` to ``dest`` through the format's public exporter.

    ``keras_file``, when given, is ``model``'s own ``.keras`` file, copied as it is for the keras format.

    ``representative`` gives the training images int8 calibrates on (only called for ``litert_int8``).
    """
    images = representative() if name == "litert_int8" else None
    with native_output_held():
        _write(name, model, keras_file, dest, images)
    return dest


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


def _write(name: str, model, keras_file: Path | None, dest: Path, images: np.ndarray | None) -> None:
    if name == "keras":
        if keras_file is not None:
            shutil.copy(keras_file, dest)  # the very file the trial logged
        else:
            model.save(dest)
    elif name == "saved_model":
        model.export(str(dest), format="tf_saved_model", verbose=False)
    elif name == "litert":
        model.export(str(dest), format="litert", verbose=False)
    elif name == "litert_int8":
        import tensorflow as tf

        def calibration() -> Iterator[list[np.ndarray]]:
            for image in images:
                yield [image[None]]

        # Dynamic-range weights plus int8 activations calibrated on training images; input and output stay
        # float32, so the file is called as model.tflite is.
        model.export(str(dest), format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT],
                     representative_dataset=calibration)
    elif name == "onnx":
        model.export(str(dest), format="onnx", verbose=False)
    else:
        raise SweepError(f"unknown format {name!r}")


@contextlib.contextmanager
def native_output_held() -> Iterator[None]:
    """Hold what converters and runtimes write from C++ (progress and INFO lines on the file descriptors 1 and
    2, which Python's own redirection does not reach) and Python warnings; pass it all on only if the block
    raises, as the context of the error."""
    out = None
    try:
        with captured((1, 2)) as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        if out is not None:
            sys.stderr.write(out.text)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Runtimes: each loads one format and maps a float32 NHWC batch of raw images to logits.


class Runtime:
    """A loaded model: ``runtime(x)`` gives the logits of the batch ``x``; ``input_size`` is (height, width);
    ``num_classes`` is set by ``load``."""

    input_size: tuple[int, int]
    num_classes: int = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class KerasRuntime(Runtime):
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


RUNTIMES: dict[str, type[Runtime]] = {"keras": KerasRuntime, "saved_model": SavedModelRuntime,
                                      "litert": LiteRTRuntime, "litert_int8": LiteRTRuntime, "onnx": OnnxRuntime}


KINDS = {"keras": ".keras file", "saved_model": "SavedModel folder", "litert": "LiteRT (.tflite) file",
         "litert_int8": "LiteRT (.tflite) file", "onnx": "ONNX file"}


def load(name: str, path: Path) -> Runtime:
    """Load ``path`` (a file or folder in format ``name``) in that format's runtime.

    Raises:
        SweepError: the runtime is not installed, or the file is not a model it can read.
    """
    check_available([name])
    try:
        with native_output_held():
            runtime = RUNTIMES[name](Path(path))
            # the runtime's first-call lines held too; the output tells the number of classes
            runtime.num_classes = int(runtime(np.zeros((1, *runtime.input_size, 3), dtype="float32")).shape[-1])
        return runtime
    except Exception as exc:  # damaged, or another kind of file under the expected name
        raise SweepError(f"cannot load model {path}: it is not a readable {KINDS[name]} (damaged, or not a model; "
                         f"{FORMATS[name].runtime.split(' ')[0]} said {first_line(exc, 200)}). Pass an export "
                         "folder from `sweep best --export` or one of its model files.") from None


def detect(path: Path) -> tuple[str, Path]:
    """The format of ``path`` and the model in it: a ``.keras``, ``.tflite`` or ``.onnx`` file, a SavedModel
    folder, or an export folder (then the first of its formats in ``FORMATS``' order).

    Raises:
        SweepError: nothing loadable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model", path
        for fmt in FORMATS.values():
            candidate = path / fmt.filename
            if candidate.exists() and (fmt.name != "saved_model" or (candidate / "saved_model.pb").is_file()):
                return fmt.name, candidate
    elif path.suffix == ".keras":
        return "keras", path
    elif path.suffix == ".tflite":
        return ("litert_int8" if path.name == FORMATS["litert_int8"].filename else "litert"), path
    elif path.suffix == ".onnx":
        return "onnx", path
    raise SweepError(f"{path} is not a model sweep can run: pass an export folder from `sweep best --export`, a "
                     ".keras, .tflite or .onnx file, or a SavedModel folder.")


def classes_for(model_path: Path, n_classes: int) -> list[str]:
    """The class names in ``classes.json`` beside the model (or above a SavedModel folder); else 0, 1, ..."""
    import json

    model_path = Path(model_path)
    for folder in (model_path if model_path.is_dir() else model_path.parent, model_path.parent):
        if (folder / "classes.json").is_file():
            names = json.loads((folder / "classes.json").read_text())
            if len(names) == n_classes:
                return list(names)
    return [str(i) for i in range(n_classes)]


# ---------------------------------------------------------------------------------------------------------------
# Verification


@dataclass
class Verification:
    """One format's figures on the test split, beside the Keras model's."""

    format: str
    runtime: str
    path: str
    size_bytes: int
    accuracy: float
    keras_accuracy: float
    agreement: float
    same_twice: bool
    latency_ms_median: float
    latency_ms_p95: float
    images_per_s: float
    min_agreement: float
    max_gap: float
    passed: bool
    problem: str = ""

    def metrics(self) -> dict[str, float]:
        """MLflow metrics for the trial's run: ``export_<format>_<figure>``."""
        p = f"export_{self.format}_"
        return {p + "accuracy": self.accuracy, p + "agreement": self.agreement, p + "size_mb": self.size_bytes / 1e6,
                p + "latency_ms_median": self.latency_ms_median, p + "latency_ms_p95": self.latency_ms_p95,
                p + "images_per_s": self.images_per_s}


def size_on_disk(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _logits(runtime: Runtime, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Logits of ``images`` in batches of 32, and the images per second of that pass."""
    started = time.perf_counter()
    out = np.concatenate([runtime(images[i:i + THROUGHPUT_BATCH]) for i in range(0, len(images), THROUGHPUT_BATCH)])
    return out, len(images) / (time.perf_counter() - started)


def verify(name: str, path: Path, images: np.ndarray, labels: np.ndarray, keras_classes: np.ndarray) -> Verification:
    """Run ``path`` in its runtime on the test split: accuracy, agreement with the Keras model's classes, the same
    logits for the same input twice, size, batch-1 latency (median and p95 after warm-up), images/s at batch 32.
    """
    fmt = FORMATS[name]
    runtime = load(name, path)
    first, _ = _logits(runtime, images)  # also the warm-up of the batch-32 path
    second, images_per_s = _logits(runtime, images)
    for i in range(LATENCY_WARMUP):
        runtime(images[i % len(images)][None])
    times = []
    for i in range(LATENCY_RUNS):
        x = images[i % len(images)][None]
        started = time.perf_counter()
        runtime(x)
        times.append((time.perf_counter() - started) * 1000)
    classes = first.argmax(axis=1)
    accuracy = float(np.mean(classes == labels))
    keras_accuracy = float(np.mean(keras_classes == labels))
    agreement = float(np.mean(classes == keras_classes))
    same_twice = bool(np.array_equal(first, second))
    problems = []
    if agreement < fmt.min_agreement:
        problems.append(f"agrees with Keras on {agreement:.1%} of the test images (needs {fmt.min_agreement:.1%})")
    if abs(accuracy - keras_accuracy) * 100 > fmt.max_gap + 1e-9:
        problems.append(f"accuracy {accuracy:.2%} against Keras' {keras_accuracy:.2%} (more than {fmt.max_gap:g} "
                        "points apart)")
    if not same_twice:
        problems.append(f"answers the same images differently twice (by up to {np.abs(first - second).max():.3g})")
    times.sort()
    return Verification(
        format=name, runtime=fmt.runtime, path=Path(path).name, size_bytes=size_on_disk(path), accuracy=accuracy,
        keras_accuracy=keras_accuracy, agreement=agreement, same_twice=same_twice,
        latency_ms_median=statistics.median(times), latency_ms_p95=float(np.percentile(times, 95)),
        images_per_s=images_per_s, min_agreement=fmt.min_agreement, max_gap=fmt.max_gap, passed=not problems,
        problem="; ".join(problems))


def table(rows: Sequence[Verification], test_images: int) -> str:
    """The formats table as printed (and as the README shows it)."""
    head = (f"{'format':<12} {'runtime':<29} {'size':>8} {'accuracy':>9} {'agreement':>9} {'same twice':>10} "
            f"{'batch-1 median / p95':>20} {'images/s':>8}")
    lines = [f"Formats, verified on the sweep's {test_images} test images (agreement: the predicted class equals "
             "Keras'; images/s at batch 32):", head]
    for r in rows:
        lines.append(f"{r.format:<12} {r.runtime:<29} {r.size_bytes / 1e6:>5.1f} MB {r.accuracy:>9.2%} "
                     f"{r.agreement:>9.1%} {'yes' if r.same_twice else 'NO':>10} "
                     f"{r.latency_ms_median:>9.1f} / {r.latency_ms_p95:>5.1f} ms {r.images_per_s:>8.0f}"
                     f"{'' if r.passed else '  FAILED'}")
    return "\n".join(lines)


def record(rows: Sequence[Verification], test_images: int, verified: bool, formats: Sequence[str]) -> dict:
    """What ``formats.json`` holds: every format's file and, when verified, its figures and thresholds."""
    import platform

    return {
        "verified": verified,
        "test_images": test_images,
        "input": "float32 RGB 0-255, NHWC at the sweep's image size, any batch size; output: logits",
        "machine": {"processor": _cpu_name() or platform.processor(), "cores": os.cpu_count()},
        "formats": ([asdict(r) for r in rows] if verified
                    else [{"format": f, "path": FORMATS[f].filename} for f in formats]),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
