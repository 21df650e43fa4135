"""The formats, one entry each, and what is done by an entry's fields: parse ``--format``, check what is
installed, write, load, recognise a model file.

Adding a format is one entry in ``FORMATS`` (with its writer in ``writers`` and, for a new kind of file, its
runtime in ``runtimes``); nothing else names a format.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from sweep.errors import SweepError, first_line
from sweep.formats.runtimes import KerasRuntime, LiteRTRuntime, OnnxRuntime, Runtime, SavedModelRuntime
from sweep.formats.writers import write_keras, write_litert, write_litert_int8, write_onnx, write_saved_model
from sweep.native_output import captured

# How close a format must stay to the Keras model on the test split (agreement of the predicted class, and the
# accuracy gap in points): float formats compute the same function up to rounding; int8 quantises it.
FLOAT_AGREEMENT, FLOAT_GAP = 0.995, 0.5
INT8_AGREEMENT, INT8_GAP = 0.99, 1.0
REPRESENTATIVE_IMAGES = 100  # training images that calibrate int8's ranges (never test images)

Writer = Callable[[Any, Path | None, Path, np.ndarray | None], None]


@dataclass(frozen=True)
class Format:
    """One deployment format: everything the export, ``predict`` and ``serve`` need to know about it.

    Attributes:
        name: what ``--format`` calls it.
        filename: its file (or folder) in an export folder.
        kind: what such a file is, in words ("ONNX file"), for the message when one cannot be read.
        runtime: what runs it, in words (the formats table's column).
        runtime_class: the ``Runtime`` that loads and runs it.
        writer: writes a model in this format (``writer(model, keras_file, dest, images)``; see ``writers``).
        min_agreement: the least share of test images on which it must predict Keras' class.
        max_gap: the most its test accuracy may differ from Keras', in points.
        suffix: how ``detect`` knows a file of this format by its name ("" for a folder format); where several
            formats share a suffix, a file named exactly ``filename`` is that format's, any other the first's.
        marker: the file inside a folder by which ``detect`` knows a folder of this format ("" for a file).
        calibrates: whether ``writer`` is given training images (``REPRESENTATIVE_IMAGES`` of them).
        modules: what must import to write and run it.
        install: the pip command that brings those modules.
    """

    name: str
    filename: str
    kind: str
    runtime: str
    runtime_class: type[Runtime]
    writer: Writer
    min_agreement: float = FLOAT_AGREEMENT
    max_gap: float = FLOAT_GAP
    suffix: str = ""
    marker: str = ""
    calibrates: bool = False
    modules: tuple[str, ...] = ()
    install: str = ""

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
    Format("keras", "model.keras", ".keras file", "Keras", KerasRuntime, write_keras, suffix=".keras"),
    Format("saved_model", "saved_model", "SavedModel folder", "TensorFlow (serving_default)", SavedModelRuntime,
           write_saved_model, marker="saved_model.pb"),
    Format("litert", "model.tflite", "LiteRT (.tflite) file", "LiteRT", LiteRTRuntime, write_litert,
           suffix=".tflite", modules=("ai_edge_litert.interpreter",), install="pip install ai-edge-litert"),
    Format("litert_int8", "model_int8.tflite", "LiteRT (.tflite) file", "LiteRT", LiteRTRuntime, write_litert_int8,
           INT8_AGREEMENT, INT8_GAP, suffix=".tflite", calibrates=True, modules=("ai_edge_litert.interpreter",),
           install="pip install ai-edge-litert"),
    Format("onnx", "model.onnx", "ONNX file", "ONNX Runtime", OnnxRuntime, write_onnx, suffix=".onnx",
           modules=("tf2onnx", "onnx", "onnxruntime"), install="pip install 'sweep[onnx]'"),
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
    """Write ``model`` in format ``name`` to ``dest`` through the format's writer.

    ``keras_file``, when given, is ``model``'s own ``.keras`` file, copied as it is for the keras format.

    ``representative`` gives the training images int8 calibrates on (only called for a format that calibrates).

    Raises:
        SweepError: ``name`` is not a format.
    """
    fmt = FORMATS.get(name)
    if fmt is None:
        raise SweepError(f"unknown format {name!r}")
    images = representative() if fmt.calibrates else None  # outside the hold: it reports what it reads
    with native_output_held():
        fmt.writer(model, keras_file, dest, images)
    return dest


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


def load(name: str, path: Path) -> Runtime:
    """Load ``path`` (a file or folder in format ``name``) in that format's runtime.

    Raises:
        SweepError: the runtime is not installed, or the file is not a model it can read.
    """
    check_available([name])
    fmt = FORMATS[name]
    try:
        with native_output_held():
            runtime = fmt.runtime_class(Path(path))
            # the runtime's first-call lines held too; the output tells the number of classes
            runtime.num_classes = int(runtime(np.zeros((1, *runtime.input_size, 3), dtype="float32")).shape[-1])
        return runtime
    except Exception as exc:  # damaged, or another kind of file under the expected name
        raise SweepError(f"cannot load model {path}: it is not a readable {fmt.kind} (damaged, or not a model; "
                         f"{fmt.runtime.split(' ')[0]} said {first_line(exc, 200)}). Pass an export "
                         "folder from `sweep best --export` or one of its model files.") from None


def detect(path: Path) -> tuple[str, Path]:
    """The format of ``path`` and the model in it: a file by its suffix, a folder by its marker file, or an
    export folder (then the first of its formats in ``FORMATS``' order).

    Raises:
        SweepError: nothing loadable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        for fmt in FORMATS.values():  # the model folder itself
            if fmt.marker and (path / fmt.marker).is_file():
                return fmt.name, path
        for fmt in FORMATS.values():
            candidate = path / fmt.filename
            if candidate.exists() and (not fmt.marker or (candidate / fmt.marker).is_file()):
                return fmt.name, candidate
    else:
        same_suffix = [fmt for fmt in FORMATS.values() if fmt.suffix and fmt.suffix == path.suffix]
        for fmt in same_suffix:
            if fmt.filename == path.name:
                return fmt.name, path
        if same_suffix:
            return same_suffix[0].name, path
    suffixes = list(dict.fromkeys(fmt.suffix for fmt in FORMATS.values() if fmt.suffix))
    folders = [fmt.kind for fmt in FORMATS.values() if fmt.marker]
    raise SweepError(f"{path} is not a model sweep can run: pass an export folder from `sweep best --export`, a "
                     f"{_either(suffixes)} file, or a {_either(folders)}.")


def classes_for(model_path: Path, n_classes: int) -> list[str]:
    """The class names in ``classes.json`` beside the model (or above a SavedModel folder); else 0, 1, ..."""
    model_path = Path(model_path)
    for folder in (model_path if model_path.is_dir() else model_path.parent, model_path.parent):
        if (folder / "classes.json").is_file():
            names = json.loads((folder / "classes.json").read_text())
            if len(names) == n_classes:
                return list(names)
    return [str(i) for i in range(n_classes)]


def _either(items: Sequence[str]) -> str:
    """``a, b or c``."""
    return " or ".join(filter(None, (", ".join(items[:-1]), items[-1])))
