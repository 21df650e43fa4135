"""The transfer family's feature cache: pool layout, exact augmentation, cache keys, corruption, head-on-base."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

from search_spaces import make_hypermodel
from search_spaces.base import FLIP_MODES
from feature_cache.features import (FeatureCache, FeatureExtractor, PooledFeatures, PoolSpec, TrainPool, flip,
                                    preprocess, rotate)
from feature_cache.head import ViewDraws, stack_views
from sweep.data import decode_images, list_images

SPEC = PoolSpec()
FACTORS = (0.0, 0.1, 0.2, 0.30000000000000004)  # what hp.Float(0, 0.3, step=0.1) gives


def test_pool_layout_and_candidates():
    # 4 unrotated flips, 4+1+1 rotations of the unflipped image, one view per band of each other flip
    assert SPEC.views_per_image == 4 + 6 + 3 * 3 and SPEC.sources == 6
    views, p = SPEC.candidates("none", 0.0)
    assert list(views) == [0] and list(p) == [1.0]
    views, p = SPEC.candidates("horizontal", 0.0)
    assert list(views) == [0, 1] and list(p) == [0.5, 0.5]
    views, p = SPEC.candidates("none", 0.1)
    assert list(views) == [4, 5, 6, 7] and np.allclose(p, 0.25)
    with pytest.raises(ValueError, match="not a multiple of 0.1"):
        SPEC.candidates("none", 0.15)
    with pytest.raises(ValueError, match="unknown flip mode"):
        SPEC.candidates("diagonal", 0.1)


@pytest.mark.parametrize("mode", FLIP_MODES)
@pytest.mark.parametrize("factor", FACTORS)
def test_every_setting_draws_among_enough_distinct_views(mode, factor):
    """A rotating setting draws among at least 4 views; one that does not rotate has all its 1 or 2 inputs."""
    views, p = SPEC.candidates(mode, factor)
    assert p.sum() == pytest.approx(1.0) and (p > 0).all()
    possible_without_rotation = 1 if mode == "none" else 2
    assert len(set(views)) >= (4 if factor > 0 else possible_without_rotation)
    exact = {("none", 0.1): 4, ("none", 0.2): 5, ("horizontal", 0.1): 5, ("horizontal_and_vertical", 0.2): 7,
             ("vertical", 0.30000000000000004): 9}
    if (mode, factor) in exact:
        assert len(set(views)) == exact[mode, factor]


def test_drawn_views_carry_their_flips_and_angles():
    sources, combos, angles = SPEC.draw(500, np.random.default_rng(0))
    assert sources.shape == (500, 6) and combos.shape == angles.shape == (500, 19)
    for c in range(4):
        assert (combos[:, c] == c).all() and (angles[:, c] == 0).all()
        for band in (1, 2, 3):
            for v in SPEC.cell(c, band):
                assert (combos[:, v] == c).all()
                magnitude = np.abs(angles[:, v]) / 360
                assert ((magnitude >= (band - 1) * 0.1 - 1e-6) & (magnitude <= band * 0.1 + 1e-6)).all()
                assert 0.4 < np.mean(angles[:, v] > 0) < 0.6


def test_rendered_views_are_the_pipelines_flip_then_rotation():
    """Each view, however computed (rotation, or the flip of a rotation), is rotate(flip(image)) at its angles."""
    x = preprocess(np.random.default_rng(3).uniform(0, 255, (2, 24, 24, 3)).astype("float32"))
    sources, combos, angles = SPEC.draw(2, np.random.default_rng(4))
    views = SPEC.render(x, sources)
    assert views.shape == (2, 19, 24, 24, 3)
    for i in range(2):
        flipped = flip(np.repeat(x[i:i + 1], 19, axis=0), combos[i])
        expected = rotate(flipped, angles[i])
        np.testing.assert_allclose(views[i], expected, atol=1e-4)
    assert len({views[0, v].tobytes() for v in range(19)}) == 19  # all distinct


@pytest.mark.parametrize("mode, factor, flips", [("horizontal_and_vertical", 0.2, {0: 0.5, 3: 0.5}),
                                                 ("horizontal", 0.3, {0: 0.5, 1: 0.5}), ("none", 0.1, {0: 1.0}),
                                                 ("vertical", 0.2, {0: 0.5, 2: 0.5})])
def test_sampled_views_follow_the_layers_distribution(mode, factor, flips):
    """Angles uniform on [-factor, factor] * 360 degrees; RandomFlip's coin at 1/2; drawn as a trial draws."""
    n = 20000
    sources, combos, angles = SPEC.draw(n, np.random.default_rng(1))
    features = np.zeros((n, SPEC.views_per_image, 1), "float32")
    draws = ViewDraws(TrainPool(SPEC, PooledFeatures(features, features), combos, angles), np.zeros(n), "global_max",
                      mode, factor, batch_size=32, seed=2)
    _, views = draws.draw()
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


@pytest.fixture(scope="module")
def image_files(tiny_data):
    files, _ = list_images(tiny_data / "train", ("cats", "dogs"))
    return files


def decode32(files):
    return decode_images(files, (32, 32))


def make_cache(directory, hypermodel, weights_id="w1", calls=None, reports=None, size=(32, 32), backend="tensorflow"):
    def factory():
        if calls is not None:
            calls.append(1)
        return FeatureExtractor(hypermodel.build_base(), backend=backend)

    return FeatureCache(directory, factory, weights_id, size, decode32,
                        report=(reports.append if reports is not None else lambda m: None))


def test_cache_hit_miss_and_keys(tmp_path, small_base, image_files, tiny_data):
    files = image_files[:3]
    calls: list = []
    first = make_cache(tmp_path, small_base, calls=calls)
    pool = first.pool(files, SPEC)
    assert (first.misses, first.hits, len(calls)) == (1, 0, 1)
    assert pool.features.max.shape == (3, 19, 1280) and pool.features.avg.shape == (3, 19, 1280)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    warm = make_cache(tmp_path, small_base, calls=calls)  # a new process: same key, read from disk
    again = warm.pool(files, SPEC)
    assert (warm.misses, warm.hits, len(calls)) == (0, 1, 1)  # the base was never built
    np.testing.assert_array_equal(again.features.max, pool.features.max)
    np.testing.assert_array_equal(again.angles, pool.angles)

    keys = {
        first.key("pool", files, SPEC),
        make_cache(tmp_path, small_base, weights_id="w2").key("pool", files, SPEC),  # other weights
        first.key("pool", files[::-1], SPEC),  # other order
        first.key("pool", image_files[3:6], SPEC),  # other images
        first.key("pool", files, PoolSpec(source_views=(4, 2, 1))),  # other augmentation layout
        make_cache(tmp_path, small_base, size=(40, 40)).key("pool", files, SPEC),  # other image size
        first.key("clean", files),
    }
    assert len(keys) == 7
    # the key is the files' content: a copy elsewhere is the same images
    copies = []
    for f in files:
        target = tmp_path / "copies" / f.split("/")[-1]
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(open(f, "rb").read())
        copies.append(str(target))
    assert first.key("pool", copies, SPEC) == first.key("pool", files, SPEC)


def test_clean_features_and_mirrors_in_the_files_order(small_base, image_files):
    cache = make_cache(None, small_base)
    clean, mirrored = cache.clean(image_files[:5], "validation")
    extractor = FeatureExtractor(small_base.build_base(), backend="tensorflow")
    images = preprocess(decode32(image_files[:5]))
    np.testing.assert_allclose(clean.max, extractor.features(images).max, rtol=1e-5, atol=0)
    np.testing.assert_allclose(mirrored.avg, extractor.features(images[:, :, ::-1]).avg, rtol=1e-5, atol=0)
    assert not np.allclose(clean.max, mirrored.max, rtol=1e-2, atol=0)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage"])
def test_corrupt_cache_file_is_rebuilt(tmp_path, small_base, image_files, damage):
    files = image_files[:2]
    good, _ = make_cache(tmp_path, small_base).clean(files, "validation")
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
    rebuilt, _ = cache.clean(files, "validation")
    assert cache.misses == 1 and any("unreadable" in r and "rebuilding" in r for r in reports)
    np.testing.assert_allclose(rebuilt.max, good.max, atol=1e-6)
    reread = make_cache(tmp_path, small_base)
    reread.clean(files, "validation")
    assert reread.hits == 1  # the rebuilt file is whole again


@pytest.mark.slow
def test_litert_features_equal_tensorflows(tmp_path, small_base, image_files):
    """The LiteRT export of the base computes TensorFlow's features; the converted file is kept and reused."""
    pytest.importorskip("ai_edge_litert")
    reports: list = []
    litert_file = tmp_path / "base.tflite"
    lite = FeatureExtractor(small_base.build_base(), backend="auto", litert_file=litert_file, report=reports.append)
    assert lite.backend == "litert" and litert_file.exists() and any("LiteRT" in r for r in reports)
    tf_path = FeatureExtractor(small_base.build_base(), backend="tensorflow")
    images = preprocess(decode32(image_files[:40]))  # a full batch and a padded one
    got, expected = lite.features(images), tf_path.features(images)
    assert lite.backend == "litert"  # the first batch's check passed
    np.testing.assert_allclose(got.max, expected.max, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got.avg, expected.avg, atol=1e-4, rtol=1e-4)
    again = FeatureExtractor(small_base.build_base(), backend="litert", litert_file=litert_file,
                             report=reports.append)
    assert sum("Converted" in r for r in reports) == 1  # the second extractor read the kept file
    np.testing.assert_array_equal(again.features(images[:5]).max, got.max[:5])
    litert_file.write_bytes(b"not a flatbuffer")  # damaged: converted again, not trusted
    repaired = FeatureExtractor(small_base.build_base(), backend="auto", litert_file=litert_file,
                                report=reports.append)
    assert repaired.backend == "litert" and sum("Converted" in r for r in reports) == 2
    np.testing.assert_array_equal(repaired.features(images[:5]).max, got.max[:5])


@pytest.mark.slow
@pytest.mark.parametrize("test_time_flip", [False, True])
def test_head_trained_on_cached_features_predicts_like_the_end_to_end_model(small_base, image_files,
                                                                             test_time_flip):
    hp = kt.HyperParameters()
    hp.Fixed("pooling", "global_avg")
    hp.Fixed("test_time_flip", test_time_flip)
    files = image_files[:24]
    labels = np.random.default_rng(2).integers(0, 2, 24)
    cache = make_cache(None, small_base)
    pool = cache.pool(files, SPEC)
    clean, mirrored = cache.clean(files, "validation")
    views = [clean, mirrored] if test_time_flip else [clean]
    draws = ViewDraws(pool, labels, "global_avg", "horizontal_and_vertical", 0.2, batch_size=8, seed=0)
    head = small_base.build_head(hp, steps_per_execution=draws.steps_per_epoch)
    head.fit(draws.dataset(2), epochs=2, steps_per_epoch=draws.steps_per_epoch, shuffle=False, verbose=0)
    model = small_base.build(hp)
    model.get_layer("logits").set_weights(head.get_layer("logits").get_weights())
    final = small_base.inference_model(model, hp.values)
    assert ("test_time_flip" in [layer.name for layer in final.layers]) == test_time_flip
    assert not any(layer.name.startswith("random_") for layer in final.layers)  # an inference model
    expected = head.predict(stack_views(views, "global_avg"), verbose=0)
    np.testing.assert_allclose(final.predict(decode32(files), verbose=0), expected, atol=1e-5)
    # every epoch drew new views, all among those the trial's settings allow
    assert len(draws.drawn_views) == 2
    allowed = set(SPEC.candidates("horizontal_and_vertical", 0.2)[0])
    assert all(set(v) <= allowed for v in draws.drawn_views)
    assert not np.array_equal(draws.drawn_views[0], draws.drawn_views[1])


def test_the_reused_head_starts_every_trial_afresh():
    """One head is reused by every trial of a process: a trial's result must not depend on the trials before."""
    from types import SimpleNamespace

    from feature_cache.trainer import CachedFeatures

    rng = np.random.default_rng(0)
    n, v, dim = 40, SPEC.views_per_image, 1280
    labels = rng.integers(0, 2, n)
    features = (rng.normal(size=(n, v, dim)) + labels[:, None, None] * 0.3).astype("float32")
    _, combos, angles = SPEC.draw(n, rng)

    def clean(count):
        return PooledFeatures(*(rng.normal(size=(count, dim)).astype("float32") for _ in range(2)))

    family = make_hypermodel("transfer", image_size=(32, 32), weights=None)
    family.features = CachedFeatures(TrainPool(SPEC, PooledFeatures(features, features), combos, angles),
                                     clean(12), clean(12), clean(8), clean(8))
    data = SimpleNamespace(train=SimpleNamespace(labels=labels), validation=SimpleNamespace(labels=labels[:12]),
                           test=SimpleNamespace(labels=labels[:8]))

    def trial(seed, initial_epoch=0, **fixed):
        hp = kt.HyperParameters()
        for name, value in fixed.items():
            hp.Fixed(name, value)
        family.new_session()
        keras.utils.set_random_seed(seed)
        return family.fit(hp, family.build(hp), data=data, batch_size=8, epochs=4, initial_epoch=initial_epoch,
                          seed=seed)

    first = trial(1, dropout=0.3, learning_rate=0.003)
    other = trial(2, dropout=0.0, learning_rate=0.0001, test_time_flip=True)
    again = trial(1, dropout=0.3, learning_rate=0.003)
    assert again.history == first.history and again.test_loss == first.test_loss
    assert other.history != first.history
    continued = trial(3, initial_epoch=2)  # Hyperband's later round: epochs 3 and 4 only
    assert len(continued.history["loss"]) == 2


def test_batches_pair_each_feature_with_its_label():
    n, v = 5, SPEC.views_per_image
    pool_features = np.arange(n * v * 3, dtype="float32").reshape(n, v, 3)
    _, combos, angles = SPEC.draw(n, np.random.default_rng(0))
    pool = TrainPool(SPEC, PooledFeatures(pool_features, pool_features), combos, angles)
    labels = np.array([0, 1, 2, 3, 4])
    draws = ViewDraws(pool, labels, "global_max", "none", 0.1, batch_size=2, seed=3)
    batches = list(draws.dataset(2).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [2, 2, 1, 2, 2, 1]  # fit's batches of each epoch, the last smaller
    for epoch in (batches[:3], batches[3:]):
        x = np.concatenate([b[0] for b in epoch])
        y = np.concatenate([b[1] for b in epoch])
        assert sorted(y) == [0, 1, 2, 3, 4]
        for row, label in zip(x, y):
            view = int(row[0, 0] // 3) - label * v
            assert view in set(SPEC.cell(0, 1))


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
    else:  # the trained model without its augmentation layers, sharing its weights
        assert not any(layer.name.startswith("random_") for layer in fitted.model.layers)
        assert fitted.model.get_layer("logits").kernel is model.get_layer("logits").kernel


@pytest.mark.slow
def test_cut_activations_are_streamed_to_files_and_read_back_block_by_block(tmp_path, small_base, image_files):
    from feature_cache.features import ActivationRows, flip_combo
    from feature_cache.finetune import CUTS

    base = small_base.build_base()
    shapes = {cut: tuple(base.get_layer(layer).output.shape[1:]) for cut, layer in CUTS.items()}
    calls, reports = [], []

    def cache():
        def factory():
            calls.append(1)
            return FeatureExtractor(base, backend="tensorflow", cuts=CUTS)
        return FeatureCache(tmp_path, factory, "w1", (32, 32), decode32, cut_shapes=shapes, report=reports.append)

    files = image_files[:3]
    cold = cache()
    pool = cold.pool(files, SPEC)
    images = preprocess(decode32(files))
    for cut, shape in shapes.items():
        stored = np.load(pool.cut_files[cut])
        assert stored.shape == (3, 19, *shape) and stored.dtype == np.float16
        for combo in range(4):  # the unrotated views: the base's activations of the flipped images
            expected = FeatureExtractor(base, backend="tensorflow", cuts=CUTS).outputs(flip_combo(images, combo))[1][cut]
            np.testing.assert_allclose(stored[:, combo].astype("float32"), expected, rtol=2e-3, atol=2e-3)
        rows = pool.activations(cut)
        assert rows.shape == stored.shape
        np.testing.assert_array_equal(rows.take(np.array([2, 0, 2]), np.array([5, 18, 0])),
                                      stored[[2, 0, 2], [5, 18, 0]].astype("float32"))
        rows.close()
        in_memory = ActivationRows(stored)
        np.testing.assert_array_equal(in_memory.take(np.array([1]), np.array([3])), stored[[1], [3]].astype("float32"))
    assert not list(tmp_path.glob(".*.tmp"))  # written through temporary files, renamed when whole

    warm = cache()
    warm.pool(files, SPEC)
    assert (warm.hits, warm.misses, len(calls)) == (1, 0, 1)  # nothing computed: both cut files found
    pool.cut_files["block_16"].write_bytes(b"\x93NUMPY damaged")  # a damaged file is rebuilt, never trusted
    again = cache()
    again.pool(files, SPEC)
    assert (again.hits, again.misses) == (0, 1)
    assert any("block_16.npy is unreadable" in r for r in reports)
    assert np.load(pool.cut_files["block_16"]).shape == (3, 19, *shapes["block_16"])


@pytest.mark.parametrize("stop_on", ["Computing", "  features:"])
def test_a_stop_at_any_point_of_the_pass_leaves_no_temporary_file(tmp_path, small_base, image_files, stop_on):
    """Ctrl-C or SIGTERM raise KeyboardInterrupt wherever Python is: right after the "Computing" line (before the
    loop; a real SIGTERM once landed there and left a ``.tmp`` behind) or mid-pass. Nothing half-written stays."""
    from feature_cache.finetune import CUTS

    base = small_base.build_base()
    shapes = {cut: tuple(base.get_layer(layer).output.shape[1:]) for cut, layer in CUTS.items()}

    def report(line: str) -> None:
        if line.startswith(stop_on):
            assert list(tmp_path.glob(".*.tmp")), "the temporary files are open by now"
            raise KeyboardInterrupt

    cache = FeatureCache(tmp_path, lambda: FeatureExtractor(base, backend="tensorflow", cuts=CUTS), "w1", (32, 32),
                         decode32, cut_shapes=shapes, report=report, chunk=2)
    with pytest.raises(KeyboardInterrupt):
        cache.pool(image_files[:5], SPEC)
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.npy"))


def test_the_next_chunk_is_rendered_ahead_on_another_thread_in_order():
    """The pass decodes and renders chunk k+1 on a second thread while the base runs on chunk k; the chunks
    still come in order, and a pass stopped early leaves no thread behind."""
    import threading

    cache = FeatureCache(None, lambda: None, "w", (4, 4),
                         lambda files: np.stack([np.full((4, 4, 3), float(f), "float32") for f in files]))
    threads = []

    def render(x, rows):
        threads.append(threading.current_thread().name)
        return x[:, None]  # one view per image

    files, chunks = ["0", "51", "102", "153", "204"], [slice(0, 2), slice(2, 4), slice(4, 5)]
    out = list(cache._rendered_ahead(files, chunks, render))
    assert [chunk[:, 0, 0, 0, 0].tolist() for chunk in out] == [pytest.approx([-1.0, -0.6]), pytest.approx([-0.2, 0.2]),
                                                            pytest.approx([0.6])]
    assert len(threads) == 3 and all(name.startswith("render-ahead") for name in threads)
    stopped = cache._rendered_ahead(files, chunks, render)
    next(stopped)
    stopped.close()
    assert not any(t.name.startswith("render-ahead") for t in threading.enumerate())
