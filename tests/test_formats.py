"""Deployment formats: each one entry, written, verified in its own runtime and refused when it misses its check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sweep.cli import main
from tests.conftest import runs_in
from tests.helpers import store_client


@pytest.mark.no_store
def test_format_names_are_checked_before_anything_runs(tracking_env, runner, monkeypatch):
    from sweep.formats import FORMATS, parse_formats

    assert parse_formats("onnx, keras") == ("keras", "onnx")  # the table's order, each once
    assert parse_formats("all") == tuple(FORMATS) == ("keras", "saved_model", "litert", "litert_int8", "onnx")
    for args, message in (
        (["best", "--export", "out", "--format", "tflite"],
         "Invalid value for '--format': 'tflite' is not a format; choose from keras, saved_model, litert, "
         "litert_int8, onnx or all (LiteRT is TensorFlow Lite's new name)."),
        (["best", "--export", "out", "--format", ","], "Invalid value for '--format': ',' names no format"),
        (["best", "--format", "onnx"], "--format only applies with --export DIR."),
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    # a converter or runtime that is not installed: the install command, before the store is even opened
    import dataclasses

    monkeypatch.setitem(FORMATS, "onnx", dataclasses.replace(FORMATS["onnx"], modules=("onnxruntime_absent",)))
    result = runner.invoke(main, ["best", "--export", "out", "--format", "keras,onnx"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --format onnx needs onnxruntime_absent, which is not installed; "
                                     "pip install 'sweep[onnx]', or leave it out of --format.")
    assert sorted(p.name for p in tracking_env.iterdir()) == ["mlflow.yaml"]  # no store, no folder
    (tracking_env / "m.onnx").write_bytes(b"\0")
    result = runner.invoke(main, ["predict", str(tracking_env / "m.onnx"), str(tracking_env)])
    assert result.exit_code == 1 and "--format onnx needs onnxruntime_absent" in result.output


def test_a_format_is_one_entry_that_detect_write_and_load_follow(tmp_path, monkeypatch):
    """Everything about a format is its ``FORMATS`` entry: ``detect`` knows its file alone and in an export
    folder, ``write`` calls its writer (with training images only where it calibrates), ``load`` runs its
    runtime; a new entry is a new format everywhere."""
    import dataclasses

    from sweep.errors import SweepError
    from sweep.formats import FORMATS, Format, Runtime, detect, load, parse_formats, write

    for fmt in FORMATS.values():
        assert fmt.filename and fmt.kind and fmt.runtime and callable(fmt.writer), fmt.name
        assert issubclass(fmt.runtime_class, Runtime) and fmt.runtime_class is not Runtime, fmt.name
        assert bool(fmt.suffix) != bool(fmt.marker), fmt.name  # known by its name, or by the file in its folder
        folder = tmp_path / fmt.name  # an export folder holding only this format's model
        folder.mkdir()
        model = folder / fmt.filename
        if fmt.marker:
            model.mkdir()
            (model / fmt.marker).write_bytes(b"")
        else:
            model.write_bytes(b"")
        assert detect(folder) == (fmt.name, model) and detect(model) == (fmt.name, model)
    assert detect(tmp_path / "other.tflite") == ("litert", tmp_path / "other.tflite")  # a shared suffix: the first's
    mixed = tmp_path / "mixed"
    (mixed / "saved_model").mkdir(parents=True)  # no saved_model.pb: not a SavedModel, passed over
    for name in ("model_int8.tflite", "model.tflite", "model.onnx"):
        (mixed / name).write_bytes(b"")
    assert detect(mixed) == ("litert", mixed / "model.tflite")  # the first of FORMATS' order it holds
    with pytest.raises(SweepError) as caught:
        detect(tmp_path / "notes.txt")
    assert str(caught.value) == (f"{tmp_path / 'notes.txt'} is not a model sweep can run: pass an export folder from "
                                 "`sweep best --export`, a .keras, .tflite or .onnx file, or a SavedModel folder.")

    class Zeros(Runtime):
        def __init__(self, path: Path) -> None:
            self.input_size = (2, 2)

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return np.zeros((len(x), 3), dtype="float32")

    given = []

    def writer(model, keras_file, dest, images):
        given.append(images)
        Path(dest).write_text(model)

    def no_images():
        raise AssertionError("training images read for a format that does not calibrate")

    fake = Format("fake", "model.fake", "fake file", "Fake", Zeros, writer, suffix=".fake", calibrates=True)
    monkeypatch.setitem(FORMATS, "fake", fake)
    assert parse_formats("all")[-1] == "fake" and parse_formats("fake") == ("fake",)
    path = write("fake", "weights", None, tmp_path / "model.fake", lambda: "training images")
    assert given == ["training images"] and path.read_text() == "weights"
    assert detect(path) == ("fake", path) and load("fake", path).num_classes == 3
    with pytest.raises(SweepError, match=r"a \.keras, \.tflite, \.onnx or \.fake file, or a SavedModel folder"):
        detect(tmp_path / "notes.txt")
    monkeypatch.setitem(FORMATS, "fake", dataclasses.replace(fake, calibrates=False))
    write("fake", "again", None, tmp_path / "model.fake", no_images)
    assert given == ["training images", None]


@pytest.mark.slow  # an export end to end, through LiteRT and ONNX
def test_a_format_that_misses_its_check_fails_with_its_figures_and_nothing_is_exported(swept, runner,
                                                                                      monkeypatch):
    """A deliberately broken conversion (the LiteRT file of a model whose last layer is negated, so every class
    flips): one Error line with its figures, no export folder nor staging left, nothing registered or logged."""
    import dataclasses

    import keras

    from sweep.formats import FORMATS

    real = FORMATS["litert"].writer

    def broken(model, keras_file, dest, images):
        weights = model.get_weights()
        model = keras.models.clone_model(model)
        model.set_weights(weights)
        last = model.layers[-1]  # logits negated: with two classes, every prediction flips
        last.set_weights([-w for w in last.get_weights()])
        return real(model, keras_file, dest, images)

    monkeypatch.setitem(FORMATS, "litert", dataclasses.replace(FORMATS["litert"], writer=broken))
    out = swept / "out"
    result = runner.invoke(main, ["best", "--export", str(out), "--format", "keras,litert"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "Error: --format litert missed its check on the sweep's 4 test images: agrees with Keras on 0.0% of the test "
        "images (needs 99.5%)")
    assert errors[0].endswith("; nothing was exported. Export the others with --format keras.")
    assert "litert       LiteRT" in result.output and "FAILED" in result.output  # the table, with its figures
    assert not out.exists() and not list(swept.glob(".out.*"))
    assert not store_client().search_registered_models()
    assert not [k for r in runs_in(swept) for k in r.data.metrics if k.startswith("export_")]

    def failing(model, keras_file, dest, images):
        raise RuntimeError("converter crashed")

    monkeypatch.setitem(FORMATS, "onnx", dataclasses.replace(FORMATS["onnx"], writer=failing))
    result = runner.invoke(main, ["best", "--export", str(out), "--format", "onnx"])
    assert result.exit_code == 1
    assert "Error: could not write --format onnx (RuntimeError: converter crashed); nothing was exported. Leave " \
           "it out of --format." in result.output
    assert not out.exists() and not list(swept.glob(".out.*"))


@pytest.mark.slow
def test_every_format_is_written_verified_logged_and_predicts_as_keras_does(swept, runner, tiny_data):
    from sweep.formats import FORMATS

    out = swept / "out"
    result = runner.invoke(main, ["best", "--export", str(out), "--format", "all"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "formats.json").read_text())
    rows = {row["format"]: row for row in record["formats"]}
    assert list(rows) == list(FORMATS) and record["verified"] and record["test_images"] == 4
    for name, row in rows.items():
        path = out / FORMATS[name].filename
        assert path.exists() and row["path"] == path.name
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        assert row["size_bytes"] == size
        assert row["passed"] and row["same_twice"] and row["agreement"] == 1.0, row
        assert row["accuracy"] == row["keras_accuracy"]
        assert 0 < row["latency_ms_median"] <= row["latency_ms_p95"] and row["images_per_s"] > 0
        assert f"\n{name:<12} {row['runtime']:<29} {size / 1e6:>5.1f} MB" in result.output  # the printed table
    assert rows["litert_int8"]["size_bytes"] < rows["litert"]["size_bytes"] / 2
    assert "litert_int8: calibrating on 32 training images from" in result.output  # train/, never the test split

    client = store_client()
    registry = json.loads((out / "registered_model.json").read_text())
    run = client.get_run(registry["run_id"])
    for name, row in rows.items():  # the figures on the trial's run
        assert run.data.metrics[f"export_{name}_accuracy"] == row["accuracy"]
        assert run.data.metrics[f"export_{name}_latency_ms_median"] == pytest.approx(row["latency_ms_median"])
    version = client.get_model_version_by_alias("sweep-best", "champion")
    model_id = run.outputs.model_outputs[-1].model_id  # the trial run's logged model, which the version points at
    assert client.get_logged_model(model_id).status == "READY" and model_id in version.source
    assert sorted(a.path for a in client.list_logged_model_artifacts(model_id, "artifacts/formats")) == [
        "artifacts/formats/classes.json", "artifacts/formats/formats.json", "artifacts/formats/hyperparameters.json",
        "artifacts/formats/metrics.json", "artifacts/formats/model.keras", "artifacts/formats/model.onnx",
        "artifacts/formats/model.tflite", "artifacts/formats/model_int8.tflite", "artifacts/formats/saved_model"]

    images = tiny_data / "validation"
    predicted = {}
    for target in ("", "model.keras", "saved_model", "model.tflite", "model_int8.tflite", "model.onnx"):
        model = ["--model"] if target == "model.onnx" else []  # either form names the model
        got = runner.invoke(main, ["predict", *model, str(out / target) if target else str(out), str(images)])
        assert got.exit_code == 0, got.output
        predicted[target] = [line.split("\t") for line in got.stdout.splitlines()]
    keras_rows = predicted["model.keras"]
    assert len(keras_rows) == 24 and predicted[""] == keras_rows  # the export folder runs its model.keras
    for target in ("saved_model", "model.tflite", "model.onnx"):  # float formats: Keras' classes and probabilities
        assert [r[:2] for r in predicted[target]] == [r[:2] for r in keras_rows], target
        assert np.allclose([float(r[2]) for r in predicted[target]], [float(r[2]) for r in keras_rows], atol=2e-4)
    assert [r[0] for r in predicted["model_int8.tflite"]] == [r[0] for r in keras_rows]


def test_a_mixed_bfloat16_model_exports_as_its_float32_equivalent_that_litert_runs(tmp_path):
    """Layers trained under mixed_bfloat16 keep that policy; their LiteRT conversion needed Flex ops
    (FlexConv2D) that the interpreter lacks. The export is the same weights computing in float32."""
    import keras

    from sweep.formats import float32_copy, load, write

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((16, 16, 3))
        inner = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()])
        model = keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(inner(inputs)))
    finally:
        keras.config.set_dtype_policy(previous)
    assert inner.layers[0].dtype_policy.name == "mixed_bfloat16"
    copy = float32_copy(model)
    assert {layer.dtype_policy.name for layer in copy.layers[1].layers} == {"float32"}
    for a, b in zip(model.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    expected = copy.predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=0.05, atol=0.5)  # bfloat16's rounding
    assert float32_copy(copy) is copy  # a float32 model is itself
    path = write("litert", copy, None, tmp_path / "model.tflite", lambda: None)
    np.testing.assert_allclose(load("litert", path)(x), expected, atol=1e-4)
