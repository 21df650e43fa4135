"""Cached MobileNetV2 features, so a transfer sweep trains only its head.

The transfer family's base is frozen and runs in inference mode, so its output for a given input never
changes across epochs or trials. This module computes it once per image and augmentation view, streaming:
each chunk of images is decoded, augmented, passed through the base and dropped, so the pool costs the
memory of its features, never of the decoded images.

* a *view pool* per training image, laid out the same way for every image (``PoolSpec``): the four flip
  combinations (none, horizontal, vertical, both) unrotated; then, for the unflipped image, ``source_views[k]``
  views rotated by an angle drawn uniformly in band ``k`` (|factor| in ((k-1)*step, k*step]) with a random
  sign; then for each other flip combination and band one view, the flip of one of those rotations. Flipping
  a rotated image is exactly rotating the flipped image by the opposite angle (both flips: the same angle),
  reflect fill included, so those views cost a flip, not a rotation; each carries its flips and its angle in
  the pipeline's order (flip, then rotate).
* *clean* (un-augmented) features of the validation folder's images and of their mirrors, for every seed's
  validation/test cut at once.

A trial with flip mode ``m`` and rotation factor ``f`` (a multiple of the step) draws, per image and epoch, a
view with the probabilities its own settings give (``PoolSpec.candidates``): each flip combination the mode
can produce with probability 1/2 (RandomFlip's coin; "horizontal_and_vertical" flips both axes at once), a
band uniformly among the first ``f / step``, then a view of that band. So each drawn view has exactly the
distribution of (flip, angle) the raw pipeline would give; the pool is finite, which is the only
approximation. Every setting that rotates draws among at least four distinct views per image; a setting that
does not rotate has only one or two possible inputs, and the pool holds them all.

Both pooled forms of the base's feature map are stored (global max and global average), since the head's
pooling is a hyperparameter. Pools are cached in memory and on disk, keyed by a content hash of the weights
file, of every image file, the image size and the pool layout, so a second sweep starts warm without
decoding its training images. A cache file that does not load (truncated, bad CRC, wrong shape) is rebuilt,
never trusted.

The base runs through LiteRT (XNNPACK) when ``ai_edge_litert`` is installed: on x86 CPUs it computed these
features 2-3x faster than TensorFlow, equal within float rounding. The LiteRT model is Keras' own
``Model.export(format="litert")`` of the very base the trials use, checked against TensorFlow on the first
batch; where LiteRT is missing or disagrees, TensorFlow computes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from search_spaces.base import MAX_ROTATION_FACTOR, ROTATION_STEP
from sweep.errors import first_line

CACHE_VERSION = 2
FLIP_COMBOS = ("none", "horizontal", "vertical", "both")
# RandomFlip draws one coin per image; "horizontal_and_vertical" flips both axes when it lands.
MODE_COMBOS = {"horizontal_and_vertical": (0, 3), "horizontal": (0, 1), "vertical": (0, 2), "none": (0,)}
# The rotation of a flipped image equals the flip of the image rotated by this sign times the angle.
FLIP_ANGLE_SIGN = {1: -1.0, 2: -1.0, 3: 1.0}
# Largest relative gap between LiteRT's and TensorFlow's features that still counts as the same numbers.
BACKEND_TOLERANCE = 1e-3
# Cut activations are stored as float16: half the disk and memory of float32.
ACTIVATION_DTYPE = "float16"
Reporter = Callable[[str], None]
Decoder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class PoolSpec:
    """The layout of every image's view pool (see the module docstring)."""

    bands: int = round(MAX_ROTATION_FACTOR / ROTATION_STEP)
    band_width: float = ROTATION_STEP
    # Rotations of the unflipped image per band: 4 in the first band, so the least diverse rotating setting
    # (no flip, factor one step) still draws among 4 views; flipped combinations reuse these rotations.
    source_views: tuple[int, ...] = (4, 1, 1)
    seed: int = 20261124

    def __post_init__(self) -> None:
        if len(self.source_views) != self.bands or min(self.source_views) < 1:
            raise ValueError(f"source_views needs one count >= 1 per band ({self.bands}), got {self.source_views}")

    @property
    def sources(self) -> int:
        """Rotations computed per image."""
        return sum(self.source_views)

    @property
    def views_per_image(self) -> int:
        return len(FLIP_COMBOS) + self.sources + (len(FLIP_COMBOS) - 1) * self.bands

    def source_index(self, band: int, j: int) -> int:
        """Index, among an image's rotations, of the ``j``-th rotation in band ``band`` (from 1)."""
        return sum(self.source_views[:band - 1]) + j

    def cell(self, combo: int, band: int) -> np.ndarray:
        """View indices of flip combination ``combo`` rotated within band ``band`` (from 1)."""
        start = len(FLIP_COMBOS)
        if combo == 0:
            first = start + self.source_index(band, 0)
            return np.arange(first, first + self.source_views[band - 1])
        return np.array([start + self.sources + (combo - 1) * self.bands + band - 1])

    def derived_source(self, combo: int, band: int) -> int:
        """The rotation (index among the image's rotations) that a flipped combination's view flips."""
        return self.source_index(band, combo % self.source_views[band - 1])

    def candidates(self, flip_mode: str, rotation_factor: float) -> tuple[np.ndarray, np.ndarray]:
        """The views a trial with these settings could have produced, and the probability of each."""
        if flip_mode not in MODE_COMBOS:
            raise ValueError(f"unknown flip mode {flip_mode!r}")
        bands = rotation_factor / self.band_width
        if abs(bands - round(bands)) > 1e-6 or not 0 <= round(bands) <= self.bands:
            raise ValueError(
                f"rotation factor {rotation_factor} is not a multiple of {self.band_width} in [0, "
                f"{self.bands * self.band_width}]; the feature cache has one band per step."
            )
        bands = round(bands)
        combos = MODE_COMBOS[flip_mode]
        views, probabilities = [], []
        for combo in combos:
            if bands == 0:
                views.append(np.array([combo]))
                probabilities.append(np.array([1.0 / len(combos)]))
                continue
            for band in range(1, bands + 1):
                cell = self.cell(combo, band)
                views.append(cell)
                probabilities.append(np.full(len(cell), 1.0 / (len(combos) * bands * len(cell))))
        return np.concatenate(views), np.concatenate(probabilities)

    def draw(self, n_images: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rotation angles (degrees) to compute per image [n, sources], and the flip combination and
        angle of every view [n, views]."""
        sources = np.zeros((n_images, self.sources), dtype="float32")
        for band in range(1, self.bands + 1):
            for j in range(self.source_views[band - 1]):
                low, high = (band - 1) * self.band_width, band * self.band_width
                sign = np.where(rng.random(n_images) < 0.5, -1.0, 1.0)
                sources[:, self.source_index(band, j)] = sign * rng.uniform(low, high, n_images) * 360.0
        combos = np.zeros((n_images, self.views_per_image), dtype="int8")
        angles = np.zeros((n_images, self.views_per_image), dtype="float32")
        combos[:, : len(FLIP_COMBOS)] = np.arange(len(FLIP_COMBOS))
        for band in range(1, self.bands + 1):
            for combo in range(len(FLIP_COMBOS)):
                cell = self.cell(combo, band)
                combos[:, cell] = combo
                if combo == 0:
                    angles[:, cell] = sources[:, [self.source_index(band, j) for j in range(len(cell))]]
                else:
                    angles[:, cell[0]] = FLIP_ANGLE_SIGN[combo] * sources[:, self.derived_source(combo, band)]
        return sources, combos, angles

    def render(self, x: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """Every view of images ``x`` [n, h, w, 3] (preprocessed), given their rotation angles [n, sources]:
        [n, views, h, w, 3]. Only ``sources`` rotations are computed per image; the rest are flips."""
        n = len(x)
        rotated = rotate(np.repeat(x, self.sources, axis=0), sources.reshape(-1)).reshape(n, self.sources, *x.shape[1:])
        views = np.empty((n, self.views_per_image, *x.shape[1:]), dtype="float32")
        for combo in range(len(FLIP_COMBOS)):
            views[:, combo] = flip_combo(x, combo)
        first = len(FLIP_COMBOS)
        views[:, first: first + self.sources] = rotated
        for combo in range(1, len(FLIP_COMBOS)):
            for band in range(1, self.bands + 1):
                views[:, self.cell(combo, band)[0]] = flip_combo(rotated[:, self.derived_source(combo, band)], combo)
        return views


@dataclass
class PooledFeatures:
    """Global-max and global-average pooled base features; leading axes are (image[, view]). ``cuts``: the
    activations at each fine-tuning cut point, with the same leading axes (float16)."""

    max: np.ndarray
    avg: np.ndarray
    cuts: dict[str, np.ndarray] = field(default_factory=dict)

    def pooled(self, pooling: str) -> np.ndarray:
        return {"global_max": self.max, "global_avg": self.avg}[pooling]

    def take(self, rows: np.ndarray) -> PooledFeatures:
        return PooledFeatures(self.max[rows], self.avg[rows], {name: a[rows] for name, a in self.cuts.items()})


def digest(*parts: object) -> str:
    """A content hash of arrays, files (Path) and JSON-able values."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype, part.shape)).encode())
            h.update(np.ascontiguousarray(part).data)
        elif isinstance(part, Path):
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


# -- augmentation, exactly as the model's layers do it ------------------------------------------------
def flip_combo(images: np.ndarray, combo: int) -> np.ndarray:
    """One flip combination (``FLIP_COMBOS``) of a channels-last batch."""
    if combo == 1:
        return images[:, :, ::-1]
    if combo == 2:
        return images[:, ::-1]
    if combo == 3:
        return images[:, ::-1, ::-1]
    return images


def flip(images: np.ndarray, combos: np.ndarray) -> np.ndarray:
    """Apply each image's flip combination (channels-last batch)."""
    out = images.copy()
    horizontal = np.isin(combos, (1, 3))
    vertical = np.isin(combos, (2, 3))
    out[horizontal] = out[horizontal][:, :, ::-1]
    out[vertical] = out[vertical][:, ::-1]
    return out


def rotate(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate each image of a channels-last batch by its angle (degrees) as Keras' RandomRotation does:
    about the centre, bilinear, reflect fill, through Keras' public ``ops.image.affine_transform``.

    The matrix is RandomRotation's (a test checks the two agree for fixed angles), written out here so no
    private Keras method is needed.
    """
    import keras

    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    theta = np.deg2rad(np.asarray(angles, dtype="float32"))
    cos, sin = np.cos(theta), np.sin(theta)
    cx, cy = np.float32(0.5 * (width - 1)), np.float32(0.5 * (height - 1))
    matrix = np.stack([cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos,
                       np.zeros(n, "float32"), np.zeros(n, "float32")], axis=1).astype("float32")
    return np.asarray(keras.ops.image.affine_transform(images, matrix, interpolation="bilinear",
                                                       fill_mode="reflect"))


def preprocess(images: np.ndarray) -> np.ndarray:
    """MobileNetV2's preprocess_input, as the model's Rescaling layer computes it."""
    return images.astype("float32") * np.float32(1.0 / 127.5) + np.float32(-1.0)


# -- the base's forward pass -----------------------------------------------------------------------------
class FeatureExtractor:
    """Preprocessed images -> frozen base (inference) -> global max and average pooling, in batches.

    ``backend`` "litert" runs Keras' LiteRT export of the base (``litert_file``: where the converted model is
    kept, so a second sweep skips the conversion); "tensorflow" runs the base itself; "auto" takes LiteRT
    where ``ai_edge_litert`` imports and its first batch agrees with TensorFlow's.
    """

    def __init__(self, base, batch_size: int = 32, backend: str = "auto", litert_file: Path | None = None,
                 report: Reporter = print, cuts: dict[str, str] | None = None) -> None:
        """``cuts``: name -> layer of ``base`` whose output is wanted too (the input of a fine-tuned top)."""
        import keras
        import tensorflow as tf

        self.base, self.batch_size, self.report = base, batch_size, report
        self.cuts = dict(cuts or {})
        self.cut_shapes = {name: tuple(base.get_layer(layer).output.shape[1:]) for name, layer in self.cuts.items()}
        if len(set(self.cut_shapes.values())) < len(self.cut_shapes):
            raise ValueError(f"cut outputs must differ in shape to be told apart: {self.cut_shapes}")
        # One model gives the base's output and every cut's: the cuts cost no extra pass.
        self._model = keras.Model(base.input, [base.output, *(base.get_layer(layer).output
                                                              for layer in self.cuts.values())])

        @tf.function(reduce_retracing=True)
        def _tensorflow(x):
            maps, *cut = self._outputs(x)
            return (tf.reduce_max(maps, axis=[1, 2]), tf.reduce_mean(maps, axis=[1, 2]), *cut)

        self._tensorflow = lambda x: tuple(t.numpy() for t in _tensorflow(x))
        self._litert = None
        self._max_first: bool | None = None
        self._litert_file = litert_file
        self.backend = "tensorflow"
        self._checked = backend != "auto"
        if backend in ("auto", "litert"):
            try:
                self._litert = self._load_litert(litert_file, required=backend == "litert")
            except Exception as exc:  # a converter or runtime that fails here must not stop the sweep
                if backend == "litert":
                    raise
                report(f"Warning: LiteRT could not run the base ({first_line(exc, 200)}); computing features with "
                       "TensorFlow.")
            if self._litert is not None:
                self.backend = "litert"

    def _outputs(self, x) -> list:
        """The base's feature maps, then each cut's activations."""
        out = self._model(x, training=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]  # a one-output model returns a tensor

    def _load_litert(self, litert_file: Path | None, required: bool):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            if required:
                raise
            return None
        import keras

        kept_file = litert_file if litert_file is not None and litert_file.exists() else None
        if kept_file is not None:
            content = kept_file.read_bytes()
        else:
            started = time.monotonic()
            inputs = keras.Input(self.base.input_shape[1:])
            maps, *cut = self._outputs(inputs)
            pooled = keras.Model(inputs, [keras.layers.GlobalMaxPooling2D()(maps),
                                          keras.layers.GlobalAveragePooling2D()(maps), *cut])
            with tempfile.TemporaryDirectory() as tmp:
                pooled.export(str(Path(tmp) / "base.tflite"), format="litert", verbose=False)
                content = (Path(tmp) / "base.tflite").read_bytes()
            if litert_file is not None:  # kept beside the feature cache, written whole or not at all
                _write_whole(litert_file, lambda f: f.write(content))
            self.report(f"Converted the base to LiteRT in {time.monotonic() - started:.0f}s.")
        try:
            interpreter = Interpreter(model_content=content, num_threads=os.cpu_count() or 1)
        except Exception:  # a kept file that is damaged: convert again, once
            if kept_file is None:
                raise
            kept_file.unlink(missing_ok=True)
            return self._load_litert(kept_file, required)
        entry = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(entry["index"], [self.batch_size, *self.base.input_shape[1:]])
        interpreter.allocate_tensors()
        # The outputs' order in the flatbuffer is the converter's: tell max from average by their values.
        outputs = [o["index"] for o in interpreter.get_output_details()]
        return interpreter, entry["index"], outputs

    def _run_litert(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        interpreter, entry, outputs = self._litert
        n = len(x)
        if n < self.batch_size:  # the interpreter's batch is fixed: pad the last one
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), dtype=x.dtype)])
        interpreter.set_tensor(entry, np.ascontiguousarray(x, dtype="float32"))
        interpreter.invoke()
        got = [interpreter.get_tensor(i)[:n].copy() for i in outputs]
        # The outputs' order in the flatbuffer is the converter's: cuts are told apart by their shapes, the
        # two pooled vectors by their values (max >= mean, element by element).
        by_shape = {g.shape[1:]: g for g in got if g.ndim == 4}
        a, b = (g for g in got if g.ndim == 2)
        if self._max_first is None:
            self._max_first = bool((a >= b - 1e-6).all())
        pooled = (a, b) if self._max_first else (b, a)
        return (*pooled, *(by_shape[shape] for shape in self.cut_shapes.values()))

    def _batch(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        if self._litert is None:
            return self._tensorflow(x)
        got = self._run_litert(x)
        if not self._checked:  # the first batch: LiteRT must give TensorFlow's numbers
            self._checked = True
            expected = self._tensorflow(x)
            gap = max(float(np.max(np.abs(g - e)) / (np.max(np.abs(e)) + 1e-6)) for g, e in zip(got, expected))
            if gap > BACKEND_TOLERANCE:
                self.report(f"Warning: LiteRT's features differ from TensorFlow's by {gap:.1e} (relative); "
                            "computing them with TensorFlow.")
                self._litert, self.backend = None, "tensorflow"
                if self._litert_file is not None:  # not kept: the next sweep converts afresh
                    self._litert_file.unlink(missing_ok=True)
                return expected
        return got

    def features(self, x: np.ndarray) -> PooledFeatures:
        """Pooled features of preprocessed images ``x`` [n, h, w, 3]."""
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> tuple[PooledFeatures, dict[str, np.ndarray]]:
        """Pooled features of preprocessed images ``x`` [n, h, w, 3], and each cut's activations."""
        parts = [self._batch(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        dim = self.base.output_shape[-1]
        if not parts:
            empty = np.empty((0, dim), "float32")
            return PooledFeatures(empty, empty), {n: np.empty((0, *s), "float32") for n, s in self.cut_shapes.items()}
        columns = [np.concatenate(column) for column in zip(*parts)]
        return PooledFeatures(columns[0], columns[1]), dict(zip(self.cuts, columns[2:]))


@dataclass
class TrainPool:
    """Every training image's view pool: features [n, views, dim], flip combination and angle per view.

    ``cut_files``: each cut's activations [n, views, h, w, c], as a ``.npy`` file (or, without a disk cache,
    an array); ``activations`` maps one into memory for a trial, so only the views a trial reads take memory,
    and only while it runs.
    """

    spec: PoolSpec
    features: PooledFeatures
    combos: np.ndarray
    angles: np.ndarray
    cut_files: dict[str, Path | np.ndarray] = field(default_factory=dict)

    def activations(self, cut: str) -> ActivationRows:
        return ActivationRows(self.cut_files[cut])


class ActivationRows:
    """A pool's activations at one cut, [images, views, h, w, c], read one (image, view) block at a time.

    From a ``.npy`` file, each block is read with a plain file read: only the batch in hand takes memory
    (a memory map would count every page it touched, and the whole file soon, as the process's own). From
    an array (no disk cache), it is indexed.
    """

    def __init__(self, source: Path | np.ndarray) -> None:
        self._file = None
        if isinstance(source, Path):
            self._file = open(source, "rb")
            if np.lib.format.read_magic(self._file) != (1, 0):
                raise ValueError(f"{source.name}: not a version 1.0 .npy file")
            self.shape, _, self.dtype = np.lib.format.read_array_header_1_0(self._file)
            self._start = self._file.tell()
            self._block = int(np.prod(self.shape[2:])) * self.dtype.itemsize
            self._array = None
        else:
            self._array, self.shape, self.dtype = source, source.shape, source.dtype

    def take(self, images: np.ndarray, views: np.ndarray) -> np.ndarray:
        """The blocks of (``images[k]``, ``views[k]``), as float32 [k, h, w, c]."""
        if self._array is not None:
            return np.asarray(self._array[images, views], dtype="float32")
        out = np.empty((len(images), *self.shape[2:]), dtype=self.dtype)
        for k, (image, view) in enumerate(zip(images, views)):
            self._file.seek(self._start + (int(image) * self.shape[1] + int(view)) * self._block)
            self._file.readinto(memoryview(out[k]).cast("B"))
        return out.astype("float32")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_whole(path: Path, write: Callable) -> None:
    """Write ``path`` through a temporary file renamed into place: a reader never sees half a file, and a
    failed write (a full disk) leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_digests(files: Sequence[str]) -> list[str]:
    """A content hash of each file: the cache key of images that need not be decoded to be recognised."""
    return [digest(Path(f)) for f in files]


# -- the cache -------------------------------------------------------------------------------------------
class FeatureCache:
    """Computes pools and clean features once, keeps them in memory and on disk (``directory``).

    ``decode`` turns image files into float32 0-255 arrays of ``image_size``, as the sweep's data loader does.
    """

    def __init__(self, directory: Path | None, extractor_factory: Callable[[], FeatureExtractor],
                 weights_id: str, image_size: tuple[int, int], decode: Decoder, feature_dim: int = 1280,
                 report: Reporter = print, chunk: int = 16, cut_shapes: dict[str, tuple] | None = None) -> None:
        """``cut_shapes``: the activation shape of each cut the extractor also outputs (``cuts``)."""
        self.directory = Path(directory) if directory is not None else None
        self.cut_shapes = {name: tuple(shape) for name, shape in (cut_shapes or {}).items()}
        self._factory = extractor_factory
        self._extractor: FeatureExtractor | None = None
        self.weights_id = weights_id
        self.image_size = tuple(image_size)
        self.decode = decode
        self.feature_dim = feature_dim
        self.report = report
        self.chunk = chunk
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = self._factory()
        return self._extractor

    def key(self, kind: str, files: Sequence[str], spec: PoolSpec | None = None) -> str:
        layout = asdict(spec) if spec is not None else None
        return digest(CACHE_VERSION, kind, self.weights_id, list(self.image_size), layout, file_digests(files))

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.npz" if self.directory is not None else None

    def _load(self, key: str, expected: dict[str, tuple]) -> dict[str, np.ndarray] | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            if {name: arrays[name].shape for name in expected} != expected:
                raise ValueError("unexpected shapes")
        except Exception as exc:  # truncated file, bad CRC, missing array: rebuild it
            self.report(f"Feature cache file {path.name} is unreadable ({type(exc).__name__}); rebuilding it.")
            return None
        self._memory[key] = arrays
        return arrays

    def _store(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self._memory[key] = arrays
        path = self._path(key)
        if path is None:
            return
        _write_whole(path, lambda f: np.savez(f, **arrays))

    def _cut_path(self, key: str, cut: str) -> Path | None:
        return self.directory / f"{key}-{cut}.npy" if self.directory is not None else None

    def _load_cuts(self, key: str, leading: tuple[int, ...]) -> dict[str, Path | np.ndarray] | None:
        """Each cut's activations file (checked by its header, never read whole), or None when one is missing
        or damaged: then everything is computed again, in one pass."""
        found = {}
        for cut, shape in self.cut_shapes.items():
            memory = self._memory.get(f"{key}-{cut}")
            if memory is not None:
                found[cut] = memory["activations"]
                continue
            path = self._cut_path(key, cut)
            if path is None or not path.exists():
                return None
            try:
                array = np.load(path, mmap_mode="r")
                if array.shape != (*leading, *shape) or array.dtype != np.dtype(ACTIVATION_DTYPE):
                    raise ValueError("unexpected shape")
                del array
            except Exception as exc:
                self.report(f"Feature cache file {path.name} is unreadable ({type(exc).__name__}); rebuilding it.")
                return None
            found[cut] = path
        return found

    def clean(self, files: Sequence[str], name: str) -> tuple[PooledFeatures, PooledFeatures]:
        """Un-augmented features of the images in ``files``, and of their mirrors (horizontal flips), in the
        order of ``files``, each with its activations at the cuts."""
        key = self.key("clean", files)
        n, dim = len(files), self.feature_dim
        arrays = self._load(key, {name: (n, dim) for name in ("max", "avg", "mirrored_max", "mirrored_avg")})
        cuts = self._load_cuts(key, (n, 2)) if arrays is not None else None
        if arrays is not None and cuts is not None:
            self.hits += 1
        else:
            self.misses += 1
            arrays, cuts = self._compute(key, files, f"{n} {name} images and their mirrors", 2,
                                         lambda x, _: np.stack([x, flip_combo(x, 1)], axis=1), {})
            arrays = {"max": arrays["max"][:, 0], "avg": arrays["avg"][:, 0],
                      "mirrored_max": arrays["max"][:, 1], "mirrored_avg": arrays["avg"][:, 1]}
            self._store(key, arrays)
        loaded = {cut: np.load(c) if isinstance(c, Path) else c for cut, c in cuts.items()}  # small: read whole
        return (PooledFeatures(arrays["max"], arrays["avg"], {cut: a[:, 0] for cut, a in loaded.items()}),
                PooledFeatures(arrays["mirrored_max"], arrays["mirrored_avg"], {cut: a[:, 1] for cut, a in loaded.items()}))

    def pool(self, files: Sequence[str], spec: PoolSpec) -> TrainPool:
        """The view pool of every training image, computed with a progress line every ~10 %."""
        key = self.key("pool", files, spec)
        n, v, dim = len(files), spec.views_per_image, self.feature_dim
        arrays = self._load(key, {"max": (n, v, dim), "avg": (n, v, dim), "combos": (n, v), "angles": (n, v)})
        cuts = self._load_cuts(key, (n, v)) if arrays is not None else None
        if arrays is not None and cuts is not None:
            self.hits += 1
        else:
            self.misses += 1
            sources, combos, angles = spec.draw(n, np.random.default_rng(spec.seed))
            arrays, cuts = self._compute(key, files, f"{n} training images x {v} augmented views", v,
                                         lambda x, rows: spec.render(x, sources[rows]),
                                         {"combos": combos, "angles": angles})
            self._store(key, arrays)
        return TrainPool(spec, PooledFeatures(arrays["max"], arrays["avg"]), arrays["combos"], arrays["angles"], cuts)

    def _compute(self, key: str, files: Sequence[str], what: str, views: int,
                 render: Callable[[np.ndarray, slice], np.ndarray],
                 extra: dict) -> tuple[dict[str, np.ndarray], dict[str, Path | np.ndarray]]:
        """Decode ``files`` a chunk at a time, render each image's ``views`` views, featurise, drop. The next
        chunk is decoded and rendered while the base runs on this one (``_rendered_ahead``).

        The cuts' activations are streamed to their ``.npy`` files chunk by chunk (in memory without a disk
        cache), so they never sit in memory whole: at 224 they are gigabytes.
        """
        n, dim = len(files), self.feature_dim
        maxes = np.empty((n, views, dim), dtype="float32")
        avgs = np.empty((n, views, dim), dtype="float32")
        extractor = self.extractor
        writers: dict[str, _ArrayWriter] = {}
        rendered = None
        try:  # from the first temporary file on: a stop (Ctrl-C, SIGTERM) at any point leaves none behind
            for cut, shape in self.cut_shapes.items():
                writers[cut] = _ArrayWriter(self._cut_path(key, cut), (n, views, *shape))
            started, next_report = time.monotonic(), 0.1
            self.report(f"Computing MobileNetV2 features of {what} ({n * views} forward passes through "
                        f"{extractor.backend}, once; cached on disk) ...")
            chunks = [slice(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]
            rendered = self._rendered_ahead(files, chunks, render)
            for rows, x in zip(chunks, rendered):
                count = len(x)
                feats, cut_maps = extractor.outputs(x.reshape(count * views, *x.shape[2:]))
                maxes[rows] = feats.max.reshape(count, views, dim)
                avgs[rows] = feats.avg.reshape(count, views, dim)
                for cut, writer in writers.items():
                    writer.write(cut_maps[cut].reshape(count, views, *cut_maps[cut].shape[1:]))
                done = rows.stop / n
                if done >= next_report or rows.stop == n:
                    elapsed = time.monotonic() - started
                    self.report(f"  features: {rows.stop}/{n} images ({elapsed:.0f}s, "
                                f"~{elapsed / done * (1 - done):.0f}s left)")
                    next_report = done + 0.1
            cuts = {cut: writer.close() for cut, writer in writers.items()}
        finally:
            if rendered is not None:
                rendered.close()  # stops the thread that renders ahead
            for writer in writers.values():
                writer.discard()
            if self.directory is not None:  # one opened but not yet in ``writers`` when the stop came
                for stray in self.directory.glob(f".{key}-*.{os.getpid()}.tmp"):
                    stray.unlink(missing_ok=True)
        for cut, value in cuts.items():
            if isinstance(value, np.ndarray):
                self._memory[f"{key}-{cut}"] = {"activations": value}
        return {"max": maxes, "avg": avgs, **extra}, cuts


    def _rendered_ahead(self, files: Sequence[str], chunks: list[slice],
                        render: Callable[[np.ndarray, slice], np.ndarray]):
        """Each chunk's rendered views, in order; the next chunk is decoded and rendered on a second thread
        while the caller runs the base on this one. The base's own threads leave the CPU idle between its
        batches and while Python copies views; decoding and rotating ran serially with it and took a quarter
        of the pass's wall time (docs/measurements.md). At most two chunks' views are held at once."""
        from concurrent.futures import ThreadPoolExecutor

        def prepare(rows: slice) -> np.ndarray:
            return render(preprocess(self.decode(files[rows])), rows)

        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render-ahead")
        try:
            pending = ahead.submit(prepare, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                x = pending.result()
                pending = ahead.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield x
        finally:  # a stop (Ctrl-C) or an error: no chunk is rendered after it
            ahead.shutdown(wait=True, cancel_futures=True)


class _ArrayWriter:
    """An array written row block by row block, in order: into a ``.npy`` file through a temporary file
    renamed into place when complete (as ``_write_whole``), or, without a path, into memory."""

    def __init__(self, path: Path | None, shape: tuple[int, ...]) -> None:
        self.path, self.shape = path, shape
        self._array = np.empty(shape, dtype=ACTIVATION_DTYPE) if path is None else None
        self._rows = 0
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            self._file = open(self._tmp, "wb")
            np.lib.format.write_array_header_1_0(self._file, {"descr": np.dtype(ACTIVATION_DTYPE).str,
                                                              "fortran_order": False, "shape": shape})

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=ACTIVATION_DTYPE)
        if self._file is None:
            self._array[self._rows:self._rows + len(rows)] = rows
        else:
            self._file.write(rows.data)
        self._rows += len(rows)

    def close(self) -> Path | np.ndarray:
        if self._rows != self.shape[0]:
            raise RuntimeError(f"wrote {self._rows} of {self.shape[0]} rows")
        if self._file is None:
            return self._array
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        """After ``close`` nothing; after a failure, the partial file goes."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)
