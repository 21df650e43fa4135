"""The transfer family's feature cache: pool layout, exact augmentation, cache keys, corruption, head-on-base."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

from search_spaces import make_hypermodel
from search_spaces.features import FeatureCache, FeatureExtractor, PooledFeatures, PoolSpec, TrainPool, flip, rotate
from search_spaces.head import ViewSampler, stack_views

SPEC = PoolSpec()


def test_pool_layout_and_candidates():
    assert SPEC.views_per_image == 16  # 4 flip combinations x (unrotated + 3 rotation bands)
    assert list(SPEC.candidates("none", 0.0)) == [0]
    assert list(SPEC.candidates("horizontal", 0.0)) == [0, 1]
    default = SPEC.candidates("horizontal_and_vertical", 0.2)
    assert list(default) == [SPEC.rotated_view(0, 1, 0), SPEC.rotated_view(0, 2, 0),
                             SPEC.rotated_view(3, 1, 0), SPEC.rotated_view(3, 2, 0)]
    assert len(SPEC.candidates("vertical", 0.30000000000000004)) == 6
    with pytest.raises(ValueError, match="not a multiple of 0.1"):
        SPEC.candidates("none", 0.15)
    with pytest.raises(ValueError, match="unknown flip mode"):
        SPEC.candidates("diagonal", 0.1)


def test_drawn_views_carry_their_flips_and_angles():
    combos, angles = SPEC.draw(500, np.random.default_rng(0))
    for c in range(4):
        assert (combos[:, SPEC.axis_view(c)] == c).all() and (angles[:, SPEC.axis_view(c)] == 0).all()
        for band in (1, 2, 3):
            v = SPEC.rotated_view(c, band, 0)
            assert (combos[:, v] == c).all()
            magnitude = np.abs(angles[:, v]) / 360
            assert ((magnitude >= (band - 1) * 0.1 - 1e-6) & (magnitude <= band * 0.1 + 1e-6)).all()
            assert 0.4 < np.mean(angles[:, v] > 0) < 0.6


@pytest.mark.parametrize("mode, factor, flips", [("horizontal_and_vertical", 0.2, {0: 0.5, 3: 0.5}),
                                                 ("horizontal", 0.3, {0: 0.5, 1: 0.5}), ("none", 0.1, {0: 1.0})])
def test_sampled_views_follow_the_layers_distribution(mode, factor, flips):
    """Angles uniform on [-factor, factor] * 360 degrees; RandomFlip's coin: both axes or none at 1/2."""
    n = 20000
    rng = np.random.default_rng(1)
    combos, angles = SPEC.draw(n, rng)
    candidates = SPEC.candidates(mode, factor)
    views = candidates[rng.integers(len(candidates), size=n)]
    drawn_angles = angles[np.arange(n), views] / 360
    drawn_combos = combos[np.arange(n), views]
    assert np.abs(drawn_angles).max() <= factor + 1e-6
    # uniform: each tenth of [-factor, factor] holds a tenth of the draws
    hist, _ = np.histogram(drawn_angles, bins=10, range=(-factor, factor))
    assert np.allclose(hist / n, 0.1, atol=0.012)
    for combo, share in flips.items():
        assert np.mean(drawn_combos == combo) == pytest.approx(share, abs=0.015)


def test_rotation_and_flip_match_keras_layers():
    x = np.random.default_rng(0).uniform(0, 255, (6, 40, 40, 3)).astype("float32")
    layer = keras.layers.RandomRotation(0.3, seed=5)
    transformation = layer.get_random_transformation(x, training=True)
    expected = np.asarray(layer.transform_images(x, transformation, training=True))
    # the same rotation through Keras' public affine_transform: equal up to float rounding of the matrix
    np.testing.assert_allclose(rotate(x, np.asarray(transformation["angle"])), expected, atol=0.01)
    for factor in (-0.3, -0.05, 0.12, 0.25):  # RandomRotation with a fixed angle
        fixed = keras.layers.RandomRotation((factor, factor), fill_mode="reflect")
        np.testing.assert_allclose(rotate(x, np.full(6, factor * 360.0, "float32")),
                                   np.asarray(fixed(x, training=True)), atol=0.01)
    assert np.abs(rotate(x, np.full(6, 30.0, "float32")) - x).mean() > 10  # it did rotate
    flipper = keras.layers.RandomFlip("horizontal_and_vertical")
    coins = np.array([True, False, True, False, False, True])
    expected = np.asarray(flipper.transform_images(x, {"flips": coins.reshape(6, 1, 1, 1)}, training=True))
    np.testing.assert_array_equal(flip(x, np.where(coins, 3, 0)), expected)
    horizontal = np.asarray(keras.layers.RandomFlip("horizontal").transform_images(
        x, {"flips": coins.reshape(6, 1, 1, 1)}, training=True))
    np.testing.assert_array_equal(flip(x, np.where(coins, 1, 0)), horizontal)


@pytest.fixture(scope="module")
def small_base():
    hypermodel = make_hypermodel("transfer", image_size=(32, 32), weights=None)
    return hypermodel


def make_cache(directory, hypermodel, weights_id="w1", calls=None, reports=None):
    def factory():
        if calls is not None:
            calls.append(1)
        return FeatureExtractor(hypermodel.build_base())

    return FeatureCache(directory, factory, weights_id, report=(reports.append if reports is not None else lambda m: None))


def test_cache_hit_miss_and_keys(tmp_path, small_base):
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    calls: list = []
    first = make_cache(tmp_path, small_base, calls=calls)
    pool = first.pool(images, SPEC)
    assert (first.misses, first.hits, len(calls)) == (1, 0, 1)
    assert pool.features.max.shape == (3, 16, 1280) and pool.features.avg.shape == (3, 16, 1280)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    warm = make_cache(tmp_path, small_base, calls=calls)  # a new process: same key, read from disk
    again = warm.pool(images, SPEC)
    assert (warm.misses, warm.hits, len(calls)) == (0, 1, 1)  # the base was never built
    np.testing.assert_array_equal(again.features.max, pool.features.max)
    np.testing.assert_array_equal(again.angles, pool.angles)

    keys = {
        first.key("pool", images, SPEC),
        make_cache(tmp_path, small_base, weights_id="w2").key("pool", images, SPEC),  # other weights
        first.key("pool", images[::-1].copy(), SPEC),  # other images
        first.key("pool", images, PoolSpec(views_per_cell=2)),  # other augmentation settings
        first.key("pool", np.zeros((3, 40, 40, 3), "float32"), SPEC),  # other image size
        first.key("clean", images),
    }
    assert len(keys) == 6


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage"])
def test_corrupt_cache_file_is_rebuilt(tmp_path, small_base, damage):
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    good = make_cache(tmp_path, small_base).clean(images, "validation")
    path = next(tmp_path.glob("*.npz"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_bytes":
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
    else:
        data = bytearray(b"not a zip file at all")
    path.write_bytes(bytes(data))
    reports: list = []
    cache = make_cache(tmp_path, small_base, reports=reports)
    rebuilt = cache.clean(images, "validation")
    assert cache.misses == 1 and any("unreadable" in r and "rebuilding" in r for r in reports)
    np.testing.assert_allclose(rebuilt.max, good.max, atol=1e-6)
    reread = make_cache(tmp_path, small_base)
    reread.clean(images, "validation")
    assert reread.hits == 1  # the rebuilt file is whole again


@pytest.mark.slow
@pytest.mark.parametrize("test_time_flip", [False, True])
def test_head_trained_on_cached_features_predicts_like_the_end_to_end_model(small_base, test_time_flip):
    hp = kt.HyperParameters()
    hp.Fixed("pooling", "global_avg")
    hp.Fixed("test_time_flip", test_time_flip)
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 2, 24)
    cache = make_cache(None, small_base)
    pool = cache.pool(images, SPEC)
    views = [cache.clean(images, "validation")]
    if test_time_flip:
        views.append(cache.clean(np.ascontiguousarray(images[:, :, ::-1]), "mirrored validation"))
    head = small_base.build_head(hp)
    sampler = ViewSampler(pool, labels, "global_avg", "horizontal_and_vertical", 0.2, batch_size=8, seed=0)
    head.fit(sampler, epochs=2, verbose=0)
    model = small_base.build(hp)
    model.get_layer("logits").set_weights(head.get_layer("logits").get_weights())
    final = small_base.inference_model(model, hp.values)
    assert (final is model) != test_time_flip
    expected = head.predict(stack_views(views, "global_avg"), verbose=0)
    np.testing.assert_allclose(final.predict(images, verbose=0), expected, atol=1e-5)
    # every epoch drew new views, all among those the trial's settings allow
    assert len(sampler.drawn_views) >= 2
    allowed = set(SPEC.candidates("horizontal_and_vertical", 0.2))
    assert all(set(v) <= allowed for v in sampler.drawn_views)
    assert not np.array_equal(sampler.drawn_views[0], sampler.drawn_views[1])


def test_sampler_pairs_each_feature_with_its_label():
    pool_features = np.arange(5 * 16 * 3, dtype="float32").reshape(5, 16, 3)

    combos, angles = SPEC.draw(5, np.random.default_rng(0))
    pool = TrainPool(SPEC, PooledFeatures(pool_features, pool_features), combos, angles)
    labels = np.array([0, 1, 2, 3, 4])
    sampler = ViewSampler(pool, labels, "global_max", "none", 0.1, batch_size=2, seed=3)
    xs, ys = zip(*(sampler[i] for i in range(len(sampler))))
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert sorted(y) == [0, 1, 2, 3, 4]
    for row, label in zip(x, y):
        view = int(row[0, 0] // 3) - label * 16
        assert view in (SPEC.rotated_view(0, 1, 0),)


@pytest.mark.parametrize("test_time_flip", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_cached_trial_scores_what_the_end_to_end_model_scores_on_raw_images(tiny_data, test_time_flip):
    """The family's fit on cached features gives one score; the kept model on raw images must agree."""
    from sweep.data import load_splits

    splits = load_splits(tiny_data, (32, 32), 4, 3)
    family = make_hypermodel("transfer", image_size=(32, 32), weights=None)
    family.prepare(splits, None, lambda line: None)
    hp = kt.HyperParameters()
    hp.Fixed("test_time_flip", test_time_flip)
    model = family.build(hp)
    seen = []
    fitted = family.fit(hp, model, data=splits, batch_size=4, epochs=2, seed=1,
                        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(logs))])
    assert fitted.scored_on == "cached_features"
    assert [logs["val_loss"] for logs in seen] == fitted.history["val_loss"]
    assert fitted.val_loss == seen[-1]["val_loss"] and fitted.val_accuracy == seen[-1]["val_accuracy"]
    raw = family.evaluate_raw(fitted, splits, batch_size=4)
    assert raw["raw_val_loss"] == pytest.approx(fitted.val_loss, abs=1e-5)
    assert raw["raw_val_accuracy"] == fitted.val_accuracy
    assert raw["raw_test_loss"] == pytest.approx(fitted.test_loss, abs=1e-5)
    assert raw["raw_test_accuracy"] == fitted.test_accuracy
    if test_time_flip:
        assert "test_time_flip" in [layer.name for layer in fitted.model.layers]
    else:
        assert fitted.model is model
