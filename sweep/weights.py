"""Which MobileNetV2 weights a transfer sweep loads: ``--weights`` resolved to a local file, and the check that
the file's checkpoint was trained at the sweep's image size."""

from __future__ import annotations

import re
from pathlib import Path

from sweep.config import keras_cache_dir
from sweep.errors import WeightsError

WEIGHTS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
IMAGENET_SIZES = (96, 128, 160, 192, 224)
STUDY_IMAGE_SIZE = (160, 160)


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
        import keras

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


def checkpoint_size(weights_path: str | None) -> int | None:
    """The input size a weights file's name says its checkpoint was trained at (Keras' ``..._1.0_224_no_top``
    naming), else None."""
    if not weights_path:
        return None
    match = re.search(rf"_({'|'.join(map(str, IMAGENET_SIZES))})_no_top", Path(weights_path).name)
    return int(match.group(1)) if match else None


def default_image_size(family, weights: str | None) -> tuple[int, int]:
    """The image size a sweep runs at when ``--image-size`` is not given: for a family that ``uses_weights``
    with a weights file whose name carries Keras' size (``..._1.0_224_no_top...``), that size, since a
    checkpoint is most accurate at the size it was trained at; otherwise the study's 160 (with ``--weights
    imagenet``, Keras' own 160 checkpoint)."""
    if weights and str(weights).lower() not in ("imagenet", "none"):
        size = checkpoint_size(weights)
        if size is not None:
            from search_spaces import registry

            if registry.family_class(family).uses_weights:
                return size, size
    return STUDY_IMAGE_SIZE


def image_size_line(weights_path: str | None, image_size: tuple[int, int]) -> str | None:
    """The line a sweep of a family that loads weights starts with: which size it runs at and why, or a
    warning when the weights file's name says it is another size's checkpoint."""
    warning = checkpoint_size_warning(weights_path, image_size)
    if warning:
        return warning
    size = f"{image_size[0]}x{image_size[1]}"
    if checkpoint_size(weights_path) is not None:
        return (f"Image size {size}: {Path(weights_path).name} is MobileNetV2's {size} checkpoint, most accurate "
                "at its own size (--image-size overrides).")
    return f"Image size {size} (--image-size overrides)."


def checkpoint_size_warning(weights_path: str | None, image_size: tuple[int, int]) -> str | None:
    """A warning when a weights file's name says it is the checkpoint for another input size, else None.

    Keras trains one MobileNetV2 checkpoint per input size and names the file after it. A checkpoint runs at
    any size, but is most accurate at its own: the 224 one at 160x160 scored 1-2 points lower on
    cats_and_dogs_filtered validation than at 224 (docs/image-size.md).
    """
    size = checkpoint_size(weights_path)
    if size is None or tuple(image_size) == (size, size):
        return None
    return (
        f"Warning: {Path(weights_path).name} is MobileNetV2's {size}x{size} checkpoint, but images are "
        f"{image_size[0]}x{image_size[1]}; a checkpoint is most accurate at the size it was trained at "
        f"(pass --image-size {size})."
    )
