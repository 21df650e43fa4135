"""Search-space construction: defaults are the study's models; each hyperparameter changes what it says."""

from __future__ import annotations

import warnings

import keras
import keras_tuner as kt
import numpy as np
import pytest

from search_spaces import default_values, describe, make_hypermodel, registry

FAMILIES = registry.study_families()


def build(family: str, image_size=(160, 160), weights=None, **fixed):
    hp = kt.HyperParameters()
    for name, value in fixed.items():
        hp.Fixed(name, value)
    model = make_hypermodel(family, num_classes=2, image_size=image_size, weights=weights).build(hp)
    return model, hp


def layer_summary(model):
    return [(type(layer).__name__, tuple(layer.output.shape)) for layer in model.layers]


CONV_TRUNK = [
    ("Conv2D", (None, 158, 158, 32)),
    ("MaxPooling2D", (None, 79, 79, 32)),
    ("Conv2D", (None, 77, 77, 32)),
    ("MaxPooling2D", (None, 38, 38, 32)),
    ("Conv2D", (None, 36, 36, 64)),
    ("Flatten", (None, 82944)),
    ("Dropout", (None, 82944)),
    ("Dense", (None, 2)),
]
STUDY_LAYERS = {
    "scratch": [("InputLayer", (None, 160, 160, 3))] + CONV_TRUNK,
    "augmented": [("InputLayer", (None, 160, 160, 3)), ("RandomFlip", (None, 160, 160, 3)),
                  ("RandomRotation", (None, 160, 160, 3))] + CONV_TRUNK,
    "preprocessed": [("InputLayer", (None, 160, 160, 3)), ("Rescaling", (None, 160, 160, 3))] + CONV_TRUNK,
}


@pytest.mark.parametrize("family", ["scratch", "augmented", "preprocessed"])
def test_conv_family_defaults_are_the_study_model(family):
    model, hp = build(family)
    assert layer_summary(model) == STUDY_LAYERS[family]
    # 896 + 9,248 + 18,496 conv parameters and 82,944 * 2 + 2 in the dense head
    assert model.count_params() == 194_530
    assert model.get_layer("dropout").rate == pytest.approx(0.2)
    assert [model.get_layer(f"conv{i}").kernel_size for i in (1, 2, 3)] == [(3, 3)] * 3
    assert all(model.get_layer(f"conv{i}").activation.__name__ == "relu" for i in (1, 2, 3))
    assert model.get_layer("logits").activation.__name__ == "linear"  # logits, as the loss expects
    assert model.loss.get_config()["from_logits"] is True
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert isinstance(model.optimizer, keras.optimizers.Adam)


def test_augmented_defaults_match_study_layers():
    model, _ = build("augmented")
    assert model.get_layer("random_flip").mode == "horizontal_and_vertical"
    assert model.get_layer("random_rotation").factor == (-0.2, 0.2)


def test_preprocessed_scaling_is_mobilenet_preprocess_input():
    model, _ = build("preprocessed")
    layer = model.get_layer("preprocess")
    pixels = np.array([[0.0, 127.5, 255.0]], dtype="float32")
    expected = keras.applications.mobilenet_v2.preprocess_input(pixels.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(pixels)), expected, atol=1e-6)


def test_transfer_defaults_are_the_study_model():
    model, _ = build("transfer")
    names = [type(layer).__name__ for layer in model.layers]
    assert names == ["InputLayer", "Rescaling", "RandomFlip", "RandomRotation", "Functional",
                     "GlobalMaxPooling2D", "Dropout", "Dense"]
    base = model.layers[4]
    assert base.name.startswith("mobilenetv2_1.00_160")
    assert tuple(base.output.shape) == (None, 5, 5, 1280)
    assert base.trainable is False
    assert base.count_params() == 2_257_984
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 1280 * 2 + 2
    assert model.get_layer("random_rotation").factor == (-0.2, 0.2)


def test_transfer_base_is_called_in_inference_mode():
    """Dropout and BatchNorm of the base must not change outputs between calls in training mode."""
    model, _ = build("transfer", image_size=(32, 32), pooling="global_avg", dropout=0.0,
                     flip_mode="none", rotation_factor=0.0)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), atol=1e-5)


@pytest.mark.parametrize(
    "family, fixed, check",
    [
        ("scratch", {"conv1_filters": 16}, lambda m: m.get_layer("conv1").filters == 16),
        ("scratch", {"conv2_filters": 64}, lambda m: m.get_layer("conv2").filters == 64),
        ("scratch", {"conv3_filters": 128}, lambda m: tuple(m.get_layer("conv3").output.shape)[-1] == 128),
        ("scratch", {"pooling": "global_max"}, lambda m: tuple(m.get_layer("global_max_pooling").output.shape) == (None, 64)),
        ("scratch", {"pooling": "global_avg"}, lambda m: m.count_params() == 896 + 9248 + 18496 + 64 * 2 + 2),
        ("scratch", {"dropout": 0.45}, lambda m: m.get_layer("dropout").rate == pytest.approx(0.45)),
        ("scratch", {"learning_rate": 3e-4}, lambda m: float(m.optimizer.learning_rate) == pytest.approx(3e-4)),
        ("augmented", {"flip_mode": "horizontal"}, lambda m: m.get_layer("random_flip").mode == "horizontal"),
        ("augmented", {"flip_mode": "none"}, lambda m: "random_flip" not in [l.name for l in m.layers]),
        ("augmented", {"rotation_factor": 0.1}, lambda m: m.get_layer("random_rotation").factor == (-0.1, 0.1)),
        ("augmented", {"rotation_factor": 0.0}, lambda m: "random_rotation" not in [l.name for l in m.layers]),
        ("transfer", {"pooling": "global_avg"}, lambda m: type(m.layers[-3]).__name__ == "GlobalAveragePooling2D"),
        ("transfer", {"rotation_factor": 0.3}, lambda m: m.get_layer("random_rotation").factor == (-0.3, 0.3)),
        ("transfer", {"dropout": 0.0}, lambda m: m.get_layer("dropout").rate == 0.0),
    ],
)
def test_each_hyperparameter_changes_the_model(family, fixed, check):
    model, hp = build(family, **fixed)
    for name, value in fixed.items():
        assert hp.get(name) == value
    assert check(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_training_step_lowers_the_loss(family):
    model, _ = build(family, image_size=(32, 32), learning_rate=1e-2, dropout=0.0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.array([0, 1] * 4)
    before = [w.copy() for w in model.get_weights()]
    first = float(model.train_on_batch(x, y)[0])
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
    assert np.isfinite(first)
    assert any(changed)
    assert len(model.trainable_weights) >= 2


@pytest.mark.parametrize("family", ["scratch", "augmented"])
def test_test_time_flip_averages_the_logits_of_each_image_and_its_mirror(family, tmp_path):
    hypermodel = make_hypermodel(family, num_classes=2, image_size=(32, 32))
    plain_hp = kt.HyperParameters()
    plain = hypermodel.build(plain_hp)
    assert plain_hp.get("test_time_flip") is False  # the study's model scores single images
    kept = hypermodel.inference_model(plain, plain_hp.values)
    if family == "scratch":
        assert kept is plain
    else:  # the same layers but the random ones
        assert [layer.name for layer in kept.layers[1:]] == [
            layer.name for layer in plain.layers[1:] if not layer.name.startswith("random_")]

    hp = kt.HyperParameters()
    hp.Fixed("test_time_flip", True)
    model = hypermodel.build(hp)
    final = hypermodel.inference_model(model, hp.values)
    images = np.random.default_rng(4).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    mirrored = images[:, :, ::-1]
    expected = (model.predict(images, verbose=0) + model.predict(mirrored, verbose=0)) / 2
    np.testing.assert_allclose(final.predict(images, verbose=0), expected, atol=1e-5)
    assert not np.allclose(model.predict(images, verbose=0), expected, atol=1e-3)  # the mirror pass matters
    # the inference model shares the trained weights and is scored like the model itself
    # the same variables, not copies (all but the augmentation layers' random-seed state, which it leaves out)
    assert {id(v) for v in model.trainable_weights} <= {id(v) for v in final.weights} <= {id(v) for v in model.weights}
    assert len(final.evaluate(images, np.array([0, 1] * 3), verbose=0)) == 2
    # stock layers and ops only: the saved file loads with plain Keras, no custom objects
    final.save(tmp_path / "model.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Skipping variable loading for optimizer"
        reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_describe_lists_every_hyperparameter_with_its_default(family):
    rows = {row["name"]: row for row in describe(family)}
    _, hp = build(family)
    always = {name for name, row in rows.items() if not row["when"]}
    assert always == set(default_values(hp))  # the conditional ones are inactive in the study's model
    for name, value in default_values(hp).items():
        assert rows[name]["default"] == value
    assert rows["learning_rate"]["domain"] == "[0.0001, 0.01] (log)"


def test_a_fixed_fine_tuning_setting_holds_in_every_draw():
    """--hp fine_tune_epochs=3: the setting exists only when fine-tuning, and then it is 3 in every trial."""
    from search_spaces import fixed_space
    from search_spaces.transfer import HyperTransfer

    oracle = kt.oracles.RandomSearchOracle(objective="val_loss", max_trials=40, seed=1, tune_new_entries=True,
                                           hyperparameters=fixed_space("transfer", {"fine_tune_epochs": 3}))
    space = oracle.get_space()
    HyperTransfer().declare(space)
    oracle.update_space(space)
    assert [item.name for item in oracle.hyperparameters.space].count("fine_tune_epochs") == 1
    draws = [oracle.populate_space(str(i))["values"] for i in range(30)]
    tuned = [d for d in draws if d["fine_tune_from"] != "none"]
    assert tuned and all(d["fine_tune_epochs"] == 3 for d in tuned)
    assert all("fine_tune_epochs" not in d for d in draws if d["fine_tune_from"] == "none")


def test_augmentation_runs_in_the_input_pipeline_with_the_models_own_layers():
    """The augmented family trains its network on batches its own RandomFlip/RandomRotation augmented in
    tf.data: the same draws for the same seed, new draws each epoch, and every weight shared with the model."""
    from search_spaces.base import augmenting_pipeline
    import tensorflow as tf

    x = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3)).astype("float32")
    y = np.arange(48) % 2

    def trained():
        keras.backend.clear_session()
        keras.utils.set_random_seed(3)
        model, _ = build("augmented", image_size=(32, 32))
        rest, batches = augmenting_pipeline(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
        epochs = [np.concatenate([images.numpy() for images, _ in batches]) for _ in range(2)]
        rest.fit(batches, epochs=2, verbose=0)
        return model, rest, epochs

    model, rest, (first, second) = trained()
    assert [type(layer).__name__ for layer in rest.layers[1:]] == [name for name, _ in CONV_TRUNK]
    assert rest.get_layer("conv1").kernel is model.get_layer("conv1").kernel
    assert rest.optimizer is model.optimizer and int(model.optimizer.iterations) == 6  # 2 epochs of 3 batches
    assert first.shape == x.shape and not np.allclose(first, x) and not np.allclose(first, second)
    # a flip or a rotation keeps an image's pixels' range and, within interpolation, its mean brightness
    assert first.min() >= 0 and first.max() <= 255
    assert abs(first.mean() - x.mean()) < 10

    again, _, (first_again, second_again) = trained()
    np.testing.assert_array_equal(first, first_again)
    np.testing.assert_array_equal(second, second_again)
    for ours, theirs in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    # at inference the augmentation layers pass images through: the kept model is the trained network
    np.testing.assert_allclose(model.predict(x, verbose=0), rest.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("family", ["scratch", "preprocessed"])
def test_a_family_without_augmentation_trains_as_built(family):
    from search_spaces.base import augmenting_pipeline

    model, _ = build(family, image_size=(32, 32))
    batches = object()
    assert augmenting_pipeline(model, batches) == (model, batches)


@pytest.mark.parametrize("family, flip", [("augmented", False), ("transfer", False), ("augmented", True)])
def test_the_scored_and_kept_model_has_no_augmentation_and_answers_the_same_each_call(family, flip, tmp_path):
    """Keras 3's random layers augment when called without training=False: the kept model (the one a trial is
    scored, logged and exported as) leaves them out, shares every weight, and gives one answer per image."""
    size = (32, 32) if family == "augmented" else (96, 96)
    model, hp = build(family, image_size=size, test_time_flip=flip)
    assert any(type(layer).__name__ == "RandomRotation" for layer in model.layers)  # the trained model has them
    family_model = make_hypermodel(family, num_classes=2, image_size=size)
    kept = family_model.inference_model(model, hp.values)
    inner = kept.layers[1] if flip else kept
    names = [type(layer).__name__ for layer in inner.layers]
    assert "RandomFlip" not in names and "RandomRotation" not in names
    assert inner.get_layer("logits").kernel is model.get_layer("logits").kernel  # shared, not copied
    x = np.random.default_rng(0).uniform(0, 255, (4, *size, 3)).astype("float32")
    first, second = np.asarray(kept(x)), np.asarray(kept(x))  # called, not predict: training defaults apply
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, kept.predict(x, verbose=0), atol=1e-5)
    if not flip:
        np.testing.assert_allclose(first, model.predict(x, verbose=0), atol=1e-5)  # the trained model, at inference
    assert not np.allclose(np.asarray(model(x, training=True)), first, rtol=1e-2, atol=0)  # augmentation changes it
    kept.save(tmp_path / "kept.keras")
    loaded = keras.models.load_model(tmp_path / "kept.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), first, atol=1e-5)


def test_a_new_session_frees_the_last_trials_model():
    import gc
    import weakref

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    model.compile("adam", "mse")
    model.fit(np.zeros((4, 8, 8, 3)), np.zeros((4, 2)), verbose=0)
    gone = weakref.ref(model)
    del model
    gc.disable()  # only new_session may collect (a model's layers hold it in reference cycles)
    try:
        assert gone() is not None
        make_hypermodel("scratch").new_session()
    finally:
        gc.enable()
    assert gone() is None
