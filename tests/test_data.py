"""Splits as the study builds them, with a test split fixed by the seed; counts and baseline from labels."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sweep.data import check_layout, load_splits
from sweep.errors import DataError
from tests.conftest import make_image_folders


def test_splits_sizes_counts_and_baseline(tiny_data):
    splits = load_splits(tiny_data, image_size=(32, 32), batch_size=4, seed=1)
    assert splits.class_names == ("cats", "dogs")
    assert len(splits.train) == 32
    # 24 validation images = 6 batches of 4; the test split is the first 6 // 5 = 1 batch
    assert len(splits.test) == 4 and len(splits.validation) == 20
    assert splits.train.images.shape == (32, 32, 32, 3) and splits.train.images.dtype == np.float32
    assert splits.counts()["train"] == {"cats": 16, "dogs": 16}
    total = {c: splits.counts()["validation"][c] + splits.counts()["test"][c] for c in splits.class_names}
    assert total == {"cats": 12, "dogs": 12}
    # majority of train is a tie: Keras' argmax picks the first class; baseline measured on the test labels
    assert splits.majority_class == 0
    assert splits.baseline_accuracy == pytest.approx(np.mean(splits.test.labels == 0))
    assert splits.summary()["baseline_accuracy"] == splits.baseline_accuracy


def test_test_split_is_fixed_by_seed_and_disjoint(tiny_data):
    a = load_splits(tiny_data, image_size=(32, 32), batch_size=4, seed=7)
    b = load_splits(tiny_data, image_size=(32, 32), batch_size=4, seed=7)
    c = load_splits(tiny_data, image_size=(32, 32), batch_size=4, seed=8)
    assert a.test.files == b.test.files
    np.testing.assert_array_equal(a.test.images, b.test.images)
    assert a.test.files != c.test.files
    assert not set(a.test.files) & set(a.validation.files)
    assert len(set(a.test.files) | set(a.validation.files)) == 24


def test_labels_follow_folders(tiny_data):
    splits = load_splits(tiny_data, image_size=(32, 32), batch_size=4, seed=1)
    for files, labels in ((splits.train.files, splits.train.labels), (splits.test.files, splits.test.labels)):
        for path, label in zip(files, labels):
            assert f"/{splits.class_names[label]}/" in path


def test_majority_class_is_computed(tmp_path):
    root = make_image_folders(tmp_path / "d", train=10, validation=12)
    for extra in range(6):  # 16 dogs vs 10 cats in train
        shutil.copy(root / "train/dogs/dogs.0.jpg", root / f"train/dogs/extra{extra}.jpg")
    splits = load_splits(root, image_size=(32, 32), batch_size=4, seed=0)
    assert splits.class_names[splits.majority_class] == "dogs"
    assert splits.baseline_accuracy == pytest.approx(np.mean(splits.test.labels == 1))


def test_three_classes(tmp_path):
    root = make_image_folders(tmp_path / "d", classes=("a", "b", "c"), train=4, validation=8)
    splits = load_splits(root, image_size=(32, 32), batch_size=4, seed=0)
    assert splits.class_names == ("a", "b", "c")
    assert set(np.unique(splits.train.labels)) == {0, 1, 2}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: shutil.rmtree(r / "validation"), "validation is missing"),
        (lambda r: shutil.rmtree(r / "train" / "dogs"), "train has 1 class folder"),
        (lambda r: [p.unlink() for p in (r / "train" / "dogs").iterdir()], "is empty"),
        (lambda r: (r / "validation" / "dogs").rename(r / "validation" / "wolves"), "both need the same class folders"),
    ],
)
def test_bad_layouts(tmp_path, damage, message):
    root = make_image_folders(tmp_path / "d", train=2, validation=2)
    damage(root)
    with pytest.raises(DataError, match=message):
        check_layout(root)


def test_missing_dir_and_too_few_validation_images(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_layout(tmp_path / "nowhere")
    root = make_image_folders(tmp_path / "d", train=4, validation=4)
    with pytest.raises(DataError, match="at least 5 batches"):
        load_splits(root, image_size=(32, 32), batch_size=32)


def test_decoding_matches_image_dataset_from_directory(tiny_data):
    import keras

    splits = load_splits(tiny_data, image_size=(32, 32), batch_size=4, seed=1)
    reference = keras.utils.image_dataset_from_directory(tiny_data / "train", image_size=(32, 32), batch_size=None,
                                                         shuffle=False)
    expected = np.stack([x.numpy() for x, _ in reference])
    assert list(reference.file_paths) == list(splits.train.files)
    np.testing.assert_array_equal(splits.train.images, expected)


def test_bad_files_are_skipped_and_named(tmp_path):
    from PIL import Image

    root = make_image_folders(tmp_path / "d", train=6, validation=12)
    cats = root / "train" / "cats"
    good = (cats / "cats.0.jpg").read_bytes()
    (cats / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (cats / "notes.jpg").write_text("this is text, not a JPEG")
    (cats / "readme.txt").write_text("ignored: not an image extension")
    Image.new("L", (50, 30), 128).save(cats / "grey.png")  # greyscale, other size
    Image.new("RGBA", (20, 70), (10, 200, 30, 128)).save(cats / "alpha.png")  # RGBA, other size
    splits = load_splits(root, image_size=(32, 32), batch_size=4, seed=0)
    skipped = " ".join(splits.skipped)
    assert "notes.jpg" in skipped
    names = {p.rsplit("/", 1)[-1] for p in splits.train.files}
    assert {"grey.png", "alpha.png"} <= names and "notes.jpg" not in names and "readme.txt" not in names
    grey = splits.train.images[splits.train.files.index(str(cats / "grey.png"))]
    assert grey.shape == (32, 32, 3) and np.allclose(grey, 128)
    assert len(splits.train) == 12 + 2 + ("truncated.jpg" in names)
    assert splits.summary()["skipped_files"] == list(splits.skipped)


def test_a_class_with_no_readable_image_is_refused(tmp_path):
    root = make_image_folders(tmp_path / "d", train=2, validation=12)
    for path in (root / "train" / "dogs").iterdir():
        path.write_text("broken")
    with pytest.raises(DataError, match="train/dogs holds no readable image"):
        load_splits(root, image_size=(32, 32), batch_size=4)


def test_batches_gather_from_one_tensor_in_a_seeded_order_reshuffled_each_epoch(tiny_data):
    splits = load_splits(tiny_data, (32, 32), 4, 3)
    train = splits.train
    images, labels = train.images.copy(), train.labels.copy()

    def epochs(seed, n=2):
        pipeline = train.batches(4, shuffle_seed=seed)
        return [np.concatenate([y.numpy() for _, y in pipeline]) for _ in range(n)], pipeline

    (first, second), pipeline = epochs(7)
    held = train.tensors[0]
    assert train.decoded is None  # TensorFlow's copy is the only one kept
    again, _ = epochs(7)
    assert train.tensors[0] is held  # made once, not per pipeline
    assert all(np.array_equal(a, b) for a, b in zip([first, second], again))  # reproducible by seed
    assert not np.array_equal(first, second)  # reshuffled at every epoch
    assert sorted(first) == sorted(labels)  # every image once an epoch
    # each batch pairs an image with its own label, at the batch size
    index = {img.tobytes(): label for img, label in zip(images, labels)}
    for x, y in pipeline:
        assert x.shape[0] <= 4 and [index[img.tobytes()] for img in x.numpy()] == list(y.numpy())
    # in order without a seed, and the images still read back as they were decoded
    in_order = np.concatenate([x.numpy() for x, _ in train.batches(4)])
    np.testing.assert_array_equal(in_order, images)
    np.testing.assert_array_equal(train.images, images)


def test_an_image_size_that_cannot_fit_in_memory_is_refused_before_decoding(tiny_data, tracking_env, runner):
    from sweep.cli import main
    from sweep.data import check_memory
    from sweep.errors import DataError
    from tests.conftest import runs_in

    check_memory(3000, (160, 160), available=8 * 2**30)  # the study: 1.8 GiB of 8
    with pytest.raises(DataError) as caught:
        check_memory(3000, (1024, 1024), available=8 * 2**30)
    assert str(caught.value) == ("--image-size 1024x1024: 3,000 decoded images need 70.3 GiB of memory, and this "
                                 "machine has 8.0 GiB free; use a smaller --image-size (the study's is 160).")
    result = runner.invoke(main, ["run", "--family", "scratch", "--trials", "1", "--data-dir", str(tiny_data),
                                  "--image-size", "100000"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(
        "Error: --image-size 100000x100000: 56 decoded images need 12.2 TiB of memory, and this machine has ")
    assert runs_in(tracking_env) == []


@pytest.mark.no_store
def test_a_rejected_input_leaves_no_store_behind(tiny_data, tracking_env, runner):
    """Data that fails its checks (here a batch too large for the test split) stops the run before the MLflow
    store, the experiment or a named sweep's lookup writes anything."""
    from sweep.cli import main

    for extra in ([], ["--sweep", "named"]):
        result = runner.invoke(main, ["run", "--family", "scratch", "--trials", "1", "--data-dir", str(tiny_data),
                                      "--image-size", "32", "--batch-size", "32", *extra])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "the test split is the first fifth of the validation batches" in result.output
        assert not (tracking_env / "mlruns").exists()


def test_a_store_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    import os

    from sweep.config import load_tracking
    from sweep.errors import ConfigError
    from sweep.tracking import check_store

    (tmp_path / "afile").write_text("")
    settings = load_tracking(environ={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/afile/sub/mlflow.db"})
    with pytest.raises(ConfigError) as caught:
        check_store(settings)
    assert str(caught.value) == (f"cannot create the MLflow store's folder {tmp_path}/afile/sub: {tmp_path}/afile is "
                                 "a file; fix tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI, or the permissions.")
    check_store(load_tracking(environ={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/new/mlflow.db"}))
    assert not (tmp_path / "new").exists()  # checked, not created
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere: the read-only cases need an ordinary user")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    with pytest.raises(ConfigError, match=f"the MLflow store's folder {tmp_path}/ro is read-only"):
        check_store(load_tracking(environ={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/ro/mlflow.db"}))
