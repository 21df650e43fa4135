"""The dataset: find or download it, build the study's splits, check every image decodes (decoding them when used).

The study loads ``train/`` and ``validation/`` with ``image_dataset_from_directory`` (160x160, batch 32,
shuffled) and takes the first fifth of the validation batches as its test split. Its validation dataset
reshuffles on every pass, so its "test" images changed at every read and overlapped validation. Here the
validation images are ordered once by the sweep's seed, the first fifth of the batches is the test split and
the rest is validation: fixed, disjoint, and the same at every read.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sweep.config import keras_cache_dir
from sweep.errors import DataError
from sweep.spec import DATASET_URL

DATASET_NAME = "cats_and_dogs_filtered"
SPLIT_DIRS = ("train", "validation")
DECODE_THREADS = 2


@dataclass(eq=False)
class Split:
    """One split: its source files, integer labels, and the images decoded (float32 0-255) on first use.

    Nothing is decoded until ``images`` is read; a transfer sweep with a warm feature cache never reads the
    training images at all, and one that builds the cache streams them (``Splits.decode``).
    """

    name: str
    labels: np.ndarray
    files: tuple[str, ...]
    image_size: tuple[int, int]
    decoded: np.ndarray | None = field(default=None, repr=False)
    tensors: tuple | None = field(default=None, repr=False)  # (images, labels) as TensorFlow holds them

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def images(self) -> np.ndarray:
        if self.tensors is not None:  # handed to TensorFlow, which holds the only copy (a copy of it here)
            return self.tensors[0].numpy()
        if self.decoded is None:
            self.decoded = decode_images(self.files, self.image_size)
        return self.decoded

    def batches(self, batch_size: int, shuffle_seed: int | None = None):
        """The split as a ``tf.data`` pipeline of ``(images, labels)`` batches, for ``fit`` and ``evaluate``.

        Every pipeline gathers its batches from one tensor of the decoded images, made once per process:
        handing Keras the numpy array instead copies all of it again at every ``fit`` and ``evaluate`` (600 MB
        for the study's training split, each trial and each epoch's validation), and the process's memory
        crept up trial after trial. ``shuffle_seed`` reshuffles the order at every epoch, reproducibly; None
        keeps the files' order.
        """
        import tensorflow as tf

        if self.tensors is None:  # TensorFlow copies the array: keep its copy only
            self.tensors = (tf.convert_to_tensor(self.images), tf.convert_to_tensor(self.labels))
            self.decoded = None
        images, labels = self.tensors
        order = tf.data.Dataset.range(len(self))
        if shuffle_seed is not None:
            order = order.shuffle(len(self), seed=shuffle_seed, reshuffle_each_iteration=True)
        return (order.batch(batch_size)
                .map(lambda i: (tf.gather(images, i), tf.gather(labels, i)), num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))

    def class_counts(self, class_names: tuple[str, ...]) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(class_names))
        return {name: int(n) for name, n in zip(class_names, counts)}


@dataclass(frozen=True)
class Splits:
    """Train, validation and test splits with everything a sweep logs about them."""

    train: Split
    validation: Split
    test: Split
    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    batch_size: int
    seed: int
    source: str
    skipped: tuple[str, ...] = ()  # unreadable files, with the reason

    @property
    def majority_class(self) -> int:
        """The training split's most frequent class (the lowest index on a tie)."""
        return int(np.argmax(np.bincount(self.train.labels, minlength=len(self.class_names))))

    @property
    def baseline_accuracy(self) -> float:
        """Accuracy on the test split of always guessing the training split's majority class."""
        return float(np.mean(self.test.labels == self.majority_class))

    def decode(self, files: Sequence[str]) -> np.ndarray:
        """Decode ``files`` as every split is decoded (for streaming them without keeping them)."""
        return decode_images(files, self.image_size)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s.name: s.class_counts(self.class_names) for s in (self.train, self.validation, self.test)}

    def test_manifest(self) -> str:
        """The test split's files in ``sha256sum`` format (``<sha256>  <path>`` a line): what ``sweep best
        --export`` re-evaluates on, refusing a file that is missing or changed."""
        return "".join(f"{file_sha256(path)}  {path}\n" for path in self.test.files)

    def summary(self) -> dict:
        """A JSON-ready description: source, classes, counts, baseline."""
        return {
            "source": self.source,
            "class_names": list(self.class_names),
            "image_size": list(self.image_size),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "counts": self.counts(),
            "majority_class": self.class_names[self.majority_class],
            "baseline_accuracy": self.baseline_accuracy,
            "skipped_files": list(self.skipped),
        }


def download_dataset() -> Path:
    """Fetch the study's archive through Keras' cache (``$KERAS_HOME/datasets``) and return its folder.

    Raises:
        DataError: the download failed (no network, say).
    """
    import keras

    try:
        archive = Path(keras.utils.get_file(
            "cats_and_dogs.zip", origin=DATASET_URL, extract=True, cache_dir=keras_cache_dir()
        ))
    except Exception as exc:  # get_file raises a bare Exception on network failures
        raise DataError(
            f"could not download the dataset from {DATASET_URL} ({exc.__class__.__name__}: {exc}). "
            "Pass --data-dir DIR with train/ and validation/ class folders instead."
        ) from None
    for candidate in (archive / DATASET_NAME, archive.parent / DATASET_NAME, archive):
        if (candidate / "train").is_dir():
            return candidate
    raise DataError(f"the downloaded archive at {archive} holds no {DATASET_NAME}/train folder.")


def check_layout(data_dir: Path) -> tuple[str, ...]:
    """Check ``data_dir`` holds ``train/`` and ``validation/`` with the same two or more class folders.

    Returns:
        The class names, sorted as Keras sorts them.

    Raises:
        DataError: naming the folder that is missing, empty or mismatched.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist; pass a folder holding train/ and validation/.")
    classes: dict[str, tuple[str, ...]] = {}
    for split in SPLIT_DIRS:
        folder = data_dir / split
        if not folder.is_dir():
            raise DataError(f"{folder} is missing; the data dir needs train/ and validation/ with one folder per class.")
        names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        if len(names) < 2:
            raise DataError(
                f"{folder} has {len(names)} class folder(s) ({', '.join(names) or 'none'}); "
                "a classifier needs at least two, one subfolder per class."
            )
        for name in names:
            if not any(p.is_file() for p in (folder / name).iterdir()):
                raise DataError(f"class folder {folder / name} is empty; add images or remove the folder.")
        classes[split] = names
    if classes["train"] != classes["validation"]:
        raise DataError(
            f"train/ has classes {', '.join(classes['train'])} but validation/ has {', '.join(classes['validation'])}; "
            "both need the same class folders."
        )
    return classes["train"]


IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what image_dataset_from_directory reads


def list_images(folder: Path, class_names: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Image files under each class folder (recursively, sorted), with their labels, as Keras indexes them."""
    files, labels = [], []
    for label, name in enumerate(class_names):
        for root, dirs, names in sorted(os.walk(folder / name)):
            dirs.sort()
            for file in sorted(names):
                if file.lower().endswith(IMAGE_SUFFIXES):
                    files.append(os.path.join(root, file))
                    labels.append(label)
    return files, labels


def decode_image(path: str, image_size: tuple[int, int]) -> np.ndarray:
    """One image file as ``image_dataset_from_directory`` decodes it (``decode_bytes``). Raises on a file that
    is not a readable image."""
    import tensorflow as tf

    return decode_bytes(tf.io.read_file(path), image_size)


def decode_bytes(data, image_size: tuple[int, int]) -> np.ndarray:
    """An encoded image (bytes or a string tensor: JPEG, PNG, GIF, BMP) as training decodes it: 3 channels (grey
    and RGBA become RGB, an animation its first frame), bilinear resize, float32 0-255. The one decoding of
    training, ``sweep predict`` and ``sweep serve``. Raises on data that is not a readable image."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.image.resize(image, image_size, method="bilinear").numpy()


def decode_error(exc: Exception, limit: int = 120) -> str:
    """The readable part of a decoding error (TensorFlow prefixes the op's internal name)."""
    text = re.sub(r"\{\{.*?\}\}\s*", "", str(exc)).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:limit]


def decode_images(files: Sequence[str], image_size: tuple[int, int]) -> np.ndarray:
    """Decode ``files`` into one float32 array [n, height, width, 3], two at a time (decoding releases the GIL)."""
    images = np.empty((len(files), *image_size, 3), dtype="float32")

    def one(i: int) -> None:
        images[i] = decode_image(files[i], image_size)

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        list(pool.map(one, range(len(files))))
    return images


def _readable(path: str) -> str | None:
    """None when ``path`` decodes, else the reason it does not (the resize, which cannot fail, is left out)."""
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except Exception as exc:  # corrupt, truncated or not an image at all
        return decode_error(exc, 100)
    return None


def _decode_folder(folder: Path, class_names: tuple[str, ...], image_size: tuple[int, int]):
    """Check that every image of ``folder`` decodes; unreadable files are skipped and returned with the reason.
    The images are not kept: splits decode them when they are used."""
    paths, labels = list_images(folder, class_names)
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        reasons = list(pool.map(_readable, paths))
    kept = [p for p, r in zip(paths, reasons) if r is None]
    kept_labels = [label for label, r in zip(labels, reasons) if r is None]
    skipped = [f"{p} ({r})" for p, r in zip(paths, reasons) if r is not None]
    for label, name in enumerate(class_names):
        if label not in kept_labels:
            raise DataError(f"{folder / name} holds no readable image; add images or remove the folder.")
    return np.asarray(kept_labels, dtype="int32"), tuple(kept), skipped


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(text: str, class_names: tuple[str, ...] | list[str], image_size: tuple[int, int]) -> Split:
    """Decode the images a ``test_manifest`` lists; each label is its class folder under ``validation/``.

    Raises:
        DataError: a listed file is missing, changed since the sweep, or not under a class folder.
    """
    files, labels, digests = [], [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, path = line.partition("  ")
        folder = Path(path).parent
        while folder.name not in class_names or folder.parent.name != "validation":
            if folder == folder.parent:
                raise DataError(f"listed test file {path} is not under validation/<class>/; the sweep's "
                                "test_files.txt is not one `sweep` wrote.")
            folder = folder.parent
        files.append(path)
        labels.append(list(class_names).index(folder.name))
        digests.append(digest)
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of the sweep's {len(files)} test images are missing (first: {missing[0]}); "
                        "put the data back where the sweep read it, or export with --no-verify.")
    changed = [p for p, d in zip(files, digests) if file_sha256(p) != d]
    if changed:
        raise DataError(f"{len(changed)} of the sweep's {len(files)} test images changed since the sweep (first: "
                        f"{changed[0]}); the logged test accuracy is not theirs. Restore them, or export with "
                        "--no-verify.")
    return Split("test", np.asarray(labels, dtype="int32"), tuple(files), tuple(image_size))


def available_memory() -> int | None:
    """Bytes of memory this machine can still give a process (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_memory(images: int, image_size: tuple[int, int], available: int | None = None) -> None:
    """Refuse an image size whose decoded images (float32, held twice while TensorFlow takes its copy) cannot fit
    in this machine's memory, before any is decoded.

    Raises:
        DataError: naming the size, what it needs and what there is.
    """
    available = available_memory() if available is None else available
    need = 2 * images * image_size[0] * image_size[1] * 3 * 4
    if available is not None and need > available:
        raise DataError(
            f"--image-size {image_size[0]}x{image_size[1]}: {images:,} decoded images need {_size(need)} of memory, "
            f"and this machine has {_size(available)} free; use a smaller --image-size (the study's is 160)."
        )


def _size(count: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:,} bytes"


def load_splits(
    data_dir: Path | None,
    image_size: tuple[int, int] = (160, 160),
    batch_size: int = 32,
    seed: int = 42,
    source: str | None = None,
) -> Splits:
    """Load train / validation / test as the study does, with a test split fixed by ``seed``.

    Args:
        data_dir: a folder with ``train/`` and ``validation/`` class folders; ``None`` downloads the study's data.
        image_size: (height, width) every image is resized to (bilinear, as Keras does).
        batch_size: the study's batch size; the test split is the first fifth of the validation batches.
        seed: orders the validation images before the test split is cut.
        source: where the data came from, for the logs (default: the folder).

    Raises:
        DataError: the folders are missing, empty, have fewer than two classes, or too few validation images.
    """
    if data_dir is None:
        data_dir, source = download_dataset(), source or DATASET_URL
    data_dir = Path(data_dir)
    source = source or str(data_dir)
    class_names = check_layout(data_dir)
    y_train, f_train, skipped = _decode_folder(data_dir / "train", class_names, image_size)
    y_val, f_val, skipped_val = _decode_folder(data_dir / "validation", class_names, image_size)
    skipped += skipped_val

    check_memory(len(y_train) + len(y_val), tuple(image_size))
    n_batches = math.ceil(len(y_val) / batch_size)
    test_batches = n_batches // 5
    if test_batches == 0:
        raise DataError(
            f"validation/ has {len(y_val)} images, {n_batches} batch(es) of {batch_size}; the test split is the first "
            f"fifth of the validation batches, so it needs at least 5 batches: add images or lower --batch-size."
        )
    order = np.random.default_rng(seed).permutation(len(y_val))
    n_test = min(len(y_val), test_batches * batch_size)
    test_idx, val_idx = order[:n_test], order[n_test:]
    if len(val_idx) == 0:
        raise DataError(f"validation/ has {len(y_val)} images, all taken by the test split; add images.")

    size = tuple(image_size)

    def take(name: str, idx: np.ndarray) -> Split:
        return Split(name, y_val[idx], tuple(f_val[i] for i in idx), size)

    return Splits(
        train=Split("train", y_train, f_train, size),
        validation=take("validation", val_idx),
        test=take("test", test_idx),
        class_names=class_names,
        image_size=tuple(image_size),
        batch_size=batch_size,
        seed=seed,
        source=source,
        skipped=tuple(skipped),
    )
