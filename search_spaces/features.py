"""Cached MobileNetV2 features, so a transfer sweep trains only its head.

The transfer family's base is frozen and runs in inference mode, so its output for a given input never
changes across epochs or trials. This module computes it once per image and augmentation view:

* a *view pool* per training image, laid out the same way for every image: the four flip combinations
  (none, horizontal, vertical, both) unrotated, then for each flip combination and each rotation band
  ``k`` (|factor| in ((k-1)*step, k*step]) ``views_per_cell`` views rotated by an angle drawn uniformly in
  that band with a random sign. Each view carries its flips and angle.
* *clean* (un-augmented) features of the validation and test images.

A trial with flip mode ``m`` and rotation factor ``f`` (a multiple of the step) draws, per image and epoch,
uniformly among the views its own settings could have produced: Keras' RandomFlip flips with probability
1/2 (both axes at once for "horizontal_and_vertical"), and picking a band uniformly among the first
``f / step`` and then a view inside it gives an angle uniform in [-f, f]. So each drawn view has exactly the
distribution the raw pipeline would give; the pool is finite, which is the only approximation.

Both pooled forms of the 5x5x1280 feature map are stored (global max and global average), since the head's
pooling is a hyperparameter. Pools are cached in memory and on disk, keyed by a content hash of the weights
file, the decoded images, the image size and the pool layout, so a second sweep starts warm. A cache file
that does not load (truncated, bad CRC, wrong shape) is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from search_spaces.base import MAX_ROTATION_FACTOR, ROTATION_STEP

CACHE_VERSION = 1
FLIP_COMBOS = ("none", "horizontal", "vertical", "both")
# RandomFlip draws one coin per image; "horizontal_and_vertical" flips both axes when it lands.
MODE_COMBOS = {"horizontal_and_vertical": (0, 3), "horizontal": (0, 1), "vertical": (0, 2), "none": (0,)}
Reporter = Callable[[str], None]


@dataclass(frozen=True)
class PoolSpec:
    """The layout of every image's view pool."""

    bands: int = round(MAX_ROTATION_FACTOR / ROTATION_STEP)
    band_width: float = ROTATION_STEP
    views_per_cell: int = 1
    seed: int = 20261124

    @property
    def views_per_image(self) -> int:
        return len(FLIP_COMBOS) * (1 + self.bands * self.views_per_cell)

    def axis_view(self, combo: int) -> int:
        """Index of the unrotated view of a flip combination (combo 0 is the clean image)."""
        return combo

    def rotated_view(self, combo: int, band: int, j: int) -> int:
        """Index of the ``j``-th view of flip combination ``combo`` rotated within band ``band`` (from 1)."""
        return len(FLIP_COMBOS) + (combo * self.bands + band - 1) * self.views_per_cell + j

    def candidates(self, flip_mode: str, rotation_factor: float) -> np.ndarray:
        """The view indices a trial with these settings could have produced, equally likely."""
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
        if bands == 0:
            return np.array([self.axis_view(c) for c in combos])
        return np.array([self.rotated_view(c, k, j) for c in combos for k in range(1, bands + 1)
                         for j in range(self.views_per_cell)])

    def draw(self, n_images: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Flip combination and angle (degrees) of every view of ``n_images`` images."""
        combos = np.zeros((n_images, self.views_per_image), dtype="int8")
        angles = np.zeros((n_images, self.views_per_image), dtype="float32")
        for c in range(len(FLIP_COMBOS)):
            combos[:, self.axis_view(c)] = c
            for k in range(1, self.bands + 1):
                for j in range(self.views_per_cell):
                    v = self.rotated_view(c, k, j)
                    combos[:, v] = c
                    magnitude = rng.uniform((k - 1) * self.band_width, k * self.band_width, n_images)
                    angles[:, v] = np.where(rng.random(n_images) < 0.5, -1, 1) * magnitude * 360.0
        return combos, angles


@dataclass
class PooledFeatures:
    """Global-max and global-average pooled base features; leading axes are (image[, view])."""

    max: np.ndarray
    avg: np.ndarray

    def pooled(self, pooling: str) -> np.ndarray:
        return {"global_max": self.max, "global_avg": self.avg}[pooling]


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


class FeatureExtractor:
    """preprocess_input -> [flip -> rotate] -> frozen base (inference) -> global max and average pooling."""

    def __init__(self, base, batch_size: int = 64) -> None:
        import tensorflow as tf

        self.base = base
        self.batch_size = batch_size

        @tf.function(reduce_retracing=True)
        def _features(x):
            maps = base(x, training=False)
            return tf.reduce_max(maps, axis=[1, 2]), tf.reduce_mean(maps, axis=[1, 2])

        self._features = _features

    @staticmethod
    def preprocess(images: np.ndarray) -> np.ndarray:
        """MobileNetV2's preprocess_input, as the model's Rescaling layer computes it."""
        return images.astype("float32") * np.float32(1.0 / 127.5) + np.float32(-1.0)

    def views(self, images: np.ndarray, combos: np.ndarray, angles: np.ndarray) -> PooledFeatures:
        """Features of one view per image: ``images`` [n, h, w, 3] (0-255), flips and angles per image."""
        x = flip(self.preprocess(images), combos)
        turned = angles != 0
        if turned.any():
            x[turned] = rotate(x[turned], angles[turned])
        maxes, avgs = [], []
        for i in range(0, len(x), self.batch_size):
            m, a = self._features(x[i:i + self.batch_size])
            maxes.append(m.numpy())
            avgs.append(a.numpy())
        return PooledFeatures(np.concatenate(maxes), np.concatenate(avgs))

    def clean(self, images: np.ndarray) -> PooledFeatures:
        zeros = np.zeros(len(images), dtype="float32")
        return self.views(images, zeros.astype("int8"), zeros)


@dataclass
class TrainPool:
    """Every training image's view pool: features [n, views, dim], flip combination and angle per view."""

    spec: PoolSpec
    features: PooledFeatures
    combos: np.ndarray
    angles: np.ndarray


# -- the cache -------------------------------------------------------------------------------------------
class FeatureCache:
    """Computes pools and clean features once, keeps them in memory and on disk (``directory``)."""

    def __init__(self, directory: Path | None, extractor_factory: Callable[[], FeatureExtractor],
                 weights_id: str, feature_dim: int = 1280, report: Reporter = print) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._factory = extractor_factory
        self._extractor: FeatureExtractor | None = None
        self.weights_id = weights_id
        self.feature_dim = feature_dim
        self.report = report
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = self._factory()
        return self._extractor

    def key(self, kind: str, images: np.ndarray, spec: PoolSpec | None = None) -> str:
        layout = asdict(spec) if spec is not None else None
        return digest(CACHE_VERSION, kind, self.weights_id, list(images.shape[1:3]), layout, images)

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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    def clean(self, images: np.ndarray, name: str) -> PooledFeatures:
        """Un-augmented features of ``images`` (validation and test splits)."""
        key = self.key("clean", images)
        n, dim = len(images), self.feature_dim
        arrays = self._load(key, {"max": (n, dim), "avg": (n, dim)})
        if arrays is not None:
            self.hits += 1
        else:
            self.misses += 1
            started = time.monotonic()
            feats = self.extractor.clean(images)
            arrays = {"max": feats.max, "avg": feats.avg}
            self._store(key, arrays)
            self.report(f"Computed base features of {n} {name} images in {time.monotonic() - started:.0f}s.")
        return PooledFeatures(arrays["max"], arrays["avg"])

    def pool(self, images: np.ndarray, spec: PoolSpec) -> TrainPool:
        """The view pool of every training image, computed with a progress line every ~10 %."""
        key = self.key("pool", images, spec)
        n, v, dim = len(images), spec.views_per_image, self.feature_dim
        arrays = self._load(key, {"max": (n, v, dim), "avg": (n, v, dim), "combos": (n, v), "angles": (n, v)})
        if arrays is not None:
            self.hits += 1
        else:
            self.misses += 1
            arrays = self._compute_pool(images, spec)
            self._store(key, arrays)
        return TrainPool(spec, PooledFeatures(arrays["max"], arrays["avg"]), arrays["combos"], arrays["angles"])

    def _compute_pool(self, images: np.ndarray, spec: PoolSpec) -> dict[str, np.ndarray]:
        n, v, dim = len(images), spec.views_per_image, self.feature_dim
        combos, angles = spec.draw(n, np.random.default_rng(spec.seed))
        maxes = np.empty((n, v, dim), dtype="float32")
        avgs = np.empty((n, v, dim), dtype="float32")
        started, step, next_report = time.monotonic(), 16, 0.1
        self.report(f"Computing MobileNetV2 features of {n} training images x {v} augmented views "
                    f"({n * v} forward passes, once; cached on disk) ...")
        for i in range(0, n, step):
            chunk = slice(i, min(i + step, n))
            count = chunk.stop - chunk.start
            batch = np.repeat(images[chunk], v, axis=0)
            feats = self.extractor.views(batch, combos[chunk].reshape(-1), angles[chunk].reshape(-1))
            maxes[chunk] = feats.max.reshape(count, v, dim)
            avgs[chunk] = feats.avg.reshape(count, v, dim)
            done = chunk.stop / n
            if done >= next_report or chunk.stop == n:
                elapsed = time.monotonic() - started
                self.report(f"  features: {chunk.stop}/{n} images ({elapsed:.0f}s, "
                            f"~{elapsed / done * (1 - done):.0f}s left)")
                next_report = done + 0.1
        return {"max": maxes, "avg": avgs, "combos": combos, "angles": angles}
