"""`sweep predict`: every format, good, corrupt and non-image files, and damaged models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sweep.cli import main


@pytest.mark.slow
def test_predict_good_corrupt_and_non_image_files(swept, runner, tiny_data):
    out = swept / "export"
    assert runner.invoke(main, ["best", "--export", str(out), "--no-verify", "--format", "keras"]).exit_code == 0
    folder = swept / "images"
    folder.mkdir()
    shutil.copy(tiny_data / "validation/cats/cats.0.jpg", folder / "a_cat.jpg")
    shutil.copy(tiny_data / "validation/dogs/dogs.0.jpg", folder / "b_dog.jpg")
    good = (tiny_data / "validation/dogs/dogs.1.jpg").read_bytes()
    (folder / "c_truncated.jpg").write_bytes(good[:40])
    (folder / "d_notes.txt").write_text("not an image")
    result = runner.invoke(main, ["predict", str(out), str(folder)])
    assert result.exit_code == 1
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [Path(line[0]).name for line in lines] == ["a_cat.jpg", "b_dog.jpg"]
    import keras

    from sweep.data import decode_image

    model = keras.models.load_model(out / "model.keras")
    logits = model.predict(np.stack([decode_image(str(folder / n), (32, 32)) for n in ("a_cat.jpg", "b_dog.jpg")]),
                           verbose=0)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    assert [line[1] for line in lines] == [["cats", "dogs"][i] for i in probabilities.argmax(axis=1)]
    assert [line[2] for line in lines] == [f"{p:.4f}" for p in probabilities.max(axis=1)]
    assert "c_truncated.jpg: skipped, not a readable image" in result.stderr
    assert "d_notes.txt: skipped, not a readable image" in result.stderr
    assert result.stderr.splitlines()[-1] == "2 predicted, 2 skipped"

    bare = swept / "bare"
    bare.mkdir()
    shutil.copy(out / "model.keras", bare / "model.keras")  # no classes.json beside it: classes are numbered
    only_good = runner.invoke(main, ["predict", str(bare / "model.keras"), str(folder / "a_cat.jpg")])
    assert only_good.exit_code == 0, only_good.output
    assert only_good.stdout.split("\t")[1] == str(int(probabilities[0].argmax()))


def test_predict_rejects_a_non_model(tmp_path, runner):
    bogus = tmp_path / "model.keras"
    bogus.write_text("nope")
    result = runner.invoke(main, ["predict", str(bogus), str(tmp_path)])
    assert result.exit_code == 1
    assert f"cannot load model {bogus}: it is not a readable .keras file (damaged" in result.output
    assert "Traceback" not in result.output


def test_predict_names_a_damaged_model_file_of_each_kind(tmp_path, runner):
    for name, kind in (("model.tflite", "LiteRT (.tflite) file"), ("model.onnx", "ONNX file")):
        bogus = tmp_path / name
        bogus.write_bytes(b"not a model")
        result = runner.invoke(main, ["predict", str(bogus), str(tmp_path)])
        assert result.exit_code == 1, result.output
        assert f"Error: cannot load model {bogus}: it is not a readable {kind}" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, ["predict", str(tmp_path / "model.onnx"), str(tmp_path / "a.txt")])
    assert result.exit_code == 1  # the model is refused before any image is read
    for args, message in ((["predict", str(tmp_path / "nope"), str(tmp_path)], "Path '"),
                          (["predict", str(tmp_path / "model.onnx")], "Missing argument 'IMAGES...'"),
                          (["predict", "--model", str(tmp_path / "nope"), str(tmp_path)], "does not exist")):
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and message in result.output, result.output
    plain = tmp_path / "folder"
    plain.mkdir()
    result = runner.invoke(main, ["predict", str(plain), str(tmp_path)])
    assert result.exit_code == 1
    assert f"Error: {plain} is not a model sweep can run: pass an export folder" in result.output
