"""Which weights a transfer sweep loads: --weights resolved offline, and the checkpoint-size warning."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

from search_spaces import make_hypermodel
from sweep.errors import WeightsError
from sweep.spec import SweepSpec
from sweep.weights import (checkpoint_size, checkpoint_size_warning, default_image_size, image_size_line,
                           imagenet_weights_name, resolve_weights)


def build(image_size=(160, 160), weights=None):
    model = make_hypermodel("transfer", image_size=image_size, weights=weights).build(kt.HyperParameters())
    return model, None


def test_resolve_weights_reads_the_keras_cache_without_network(keras_cache):
    path = resolve_weights("imagenet", (224, 224))
    assert path == str(keras_cache / "models" / imagenet_weights_name((224, 224)))
    model, _ = build(weights=path)  # the 224 checkpoint runs at 160 too
    reference = keras.applications.MobileNetV2(input_shape=(160, 160, 3), include_top=False, weights=path)
    loaded = model.layers[4].get_layer("Conv1").get_weights()[0]
    np.testing.assert_array_equal(loaded, reference.get_layer("Conv1").get_weights()[0])
    random = keras.applications.MobileNetV2(input_shape=(160, 160, 3), include_top=False, weights=None)
    assert not np.allclose(loaded, random.get_layer("Conv1").get_weights()[0])


def test_resolve_weights_offline_without_cache_says_how_to_fix(empty_keras_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError, match=r"--weights PATH.*KERAS_HOME/models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5"):
        resolve_weights("imagenet", (160, 160))


def test_resolve_weights_missing_path_and_none(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(str(tmp_path / "nope.h5"), (160, 160))
    assert resolve_weights("none", (160, 160)) is None
    assert resolve_weights(None, (160, 160)) is None


SHARED_NAME = "mobilenet_v2_1.0_224_no_top.coral-ptq-dequant.h5"


def test_checkpoint_size_warning_names_the_files_size_and_the_fix():
    warning = checkpoint_size_warning(f"/some/where/{SHARED_NAME}", (160, 160))
    assert warning == (
        f"Warning: {SHARED_NAME} is MobileNetV2's 224x224 checkpoint, but images are 160x160; a checkpoint is "
        "most accurate at the size it was trained at (pass --image-size 224)."
    )
    assert "images are 224x200" in checkpoint_size_warning(SHARED_NAME, (224, 200))
    assert "128x128 checkpoint" in checkpoint_size_warning(imagenet_weights_name((128, 128)), (96, 96))


@pytest.mark.parametrize("path, size", [
    (SHARED_NAME, (224, 224)),                                 # the file at its own size
    (imagenet_weights_name((160, 160)), (160, 160)),          # what --weights imagenet picks for 160
    (imagenet_weights_name((96, 96)), (96, 96)),
    ("/tmp/my_finetuned_base.h5", (160, 160)),                 # no size in the name: nothing to say
    (None, (160, 160)),                                        # --weights none
])
def test_checkpoint_size_warning_is_quiet_when_sizes_match_or_are_unknown(path, size):
    assert checkpoint_size_warning(path, size) is None


def test_checkpoint_size_reads_keras_naming_only():
    assert checkpoint_size(f"/w/{SHARED_NAME}") == 224
    assert checkpoint_size(imagenet_weights_name((128, 128))) == 128
    assert checkpoint_size("/w/mobilenet_v2_1.0_300_no_top.h5") is None  # not one of Keras' sizes
    assert checkpoint_size(None) is None


@pytest.mark.parametrize("family, weights, size", [
    ("transfer", f"/w/{SHARED_NAME}", (224, 224)),                  # the checkpoint's own size
    ("transfer", f"/w/{imagenet_weights_name((128, 128))}", (128, 128)),
    ("transfer", "imagenet", (160, 160)),                          # the study's size, Keras' 160 file
    ("transfer", "/w/my_base.h5", (160, 160)),                     # the name says nothing
    ("transfer", "none", (160, 160)),
    ("scratch", f"/w/{SHARED_NAME}", (160, 160)),                  # no checkpoint in this family
])
def test_the_image_size_follows_the_checkpoint_unless_given(family, weights, size):
    assert default_image_size(family, weights) == size
    assert SweepSpec(family=family, weights=weights).image_size == size
    assert SweepSpec(family=family, weights=weights, image_size=(192, 192)).image_size == (192, 192)
    assert SweepSpec(family=family, weights=weights).to_params()["image_size"] == f"{size[0]}x{size[1]}"


def test_one_line_says_which_size_and_why():
    path = f"/w/{SHARED_NAME}"
    assert image_size_line(path, (224, 224)) == (
        f"Image size 224x224: {SHARED_NAME} is MobileNetV2's 224x224 checkpoint, most accurate at its own size "
        "(--image-size overrides).")
    assert image_size_line(path, (160, 160)).startswith("Warning:")  # --image-size 160 given
    assert image_size_line("/w/my_base.h5", (160, 160)) == "Image size 160x160 (--image-size overrides)."
