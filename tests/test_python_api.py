"""The Python API: its surface, and docs/python-api.md's code blocks run as written on a sample of the real
cats_and_dogs_filtered images with the real ImageNet weights (the page cannot rot, and a transfer sweep on real
images is held to beating the baseline)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REAL_DATA, SHARED_WEIGHTS, copy_sample
from tests.helpers import store_client

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
SURFACE = ["SweepSpec", "SweepResult", "TrialRecord", "BestTrial", "Export", "Verification", "Prediction",
           "run_sweep", "find_best", "export_best", "predict", "tracking_settings", "FORMATS", "DEFAULT_FORMATS",
           "SweepError", "ConfigError", "DataError", "WeightsError", "FamilyError", "HyperFamily", "Fitted"]


def test_the_surface_is_stable_and_importing_it_loads_neither_tensorflow_nor_mlflow():
    code = ("import sys, sweep\n"
            "from sweep import SweepSpec, run_sweep, find_best, export_best, predict, SweepError\n"
            "print(sorted(sweep.__all__)); print('tensorflow' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(sorted(SURFACE)), "False False"]
    import sweep

    for name in SURFACE:
        assert getattr(sweep, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sweep.nope  # noqa: B018


def test_api_errors_are_exceptions_never_exits(tmp_path, monkeypatch):
    """A notebook user gets a SweepError to catch, never SystemExit."""
    import sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(sweep.ConfigError, match="trials must be at least 1"):
        sweep.SweepSpec(family="scratch", trials=0)
    with pytest.raises(sweep.SweepError, match="no MLflow store at"):
        sweep.find_best()
    with pytest.raises(sweep.SweepError, match="is not a model sweep can run"):
        sweep.predict(tmp_path, [tmp_path])
    with pytest.raises(sweep.SweepError, match="'tflite' is not a format"):
        sweep.export_best(None, tmp_path / "out", formats="tflite")
    with pytest.raises(sweep.SweepError, match="run_sweep takes a SweepSpec"):
        sweep.run_sweep(["scratch"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created by any of them


def code_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_python_api_page_runs_as_written(tmp_path, monkeypatch):
    if not (REAL_DATA / "train").is_dir() or not SHARED_WEIGHTS.is_file():
        pytest.skip("the real images or the ImageNet weights are not available")
    # what the page expects: the data and the checkpoint under those names, no mlflow.yaml
    copy_sample(REAL_DATA, tmp_path / "data" / "cats_and_dogs_filtered", {"train": 50, "validation": 80})
    (tmp_path / "weights").mkdir()
    os.symlink(SHARED_WEIGHTS, tmp_path / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    blocks = code_blocks(PAGE)
    assert len(blocks) == 4
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102
    out = printed.getvalue()

    result, export, predictions = namespace["result"], namespace["export"], namespace["predictions"]
    assert len(result.trials) == 2 and result.run_id in out
    assert all(t.hyperparameters["fine_tune_from"] == "none" for t in result.trials)
    # the 224 checkpoint runs at its own size; trial 1 is the study's model

    client = store_client()
    first = next(t for t in result.trials if t.number == 1)
    params = client.get_run(first.run_id).data.params
    assert params["image_size"] == "224x224" and client.get_run(result.run_id).data.params["image_size"] == "224x224"
    assert first.hyperparameters["pooling"] == "global_max" and first.hyperparameters["rotation_factor"] == 0.2
    # 160 validation images in batches of 32: the test split is the first of 5 batches, 32 images
    assert first.test_images == 32 and result.baseline_accuracy in {i / 32 for i in range(33)}
    # ImageNet features separate cats from dogs after a few epochs on 100 images
    val = client.get_metric_history(first.run_id, "val_accuracy")
    assert [m.step for m in val] == [1, 2, 3, 4, 5] and val[-1].value >= 0.85
    assert first.test_accuracy >= 0.8 and first.test_accuracy > result.baseline_accuracy + 0.25
    assert [c.format for c in export.checks] == ["keras", "litert"] and all(c.passed for c in export.checks)
    assert (tmp_path / "best-model" / "model.tflite").is_file() and "registered as models:/sweep-best@champion" in out
    assert len(predictions) == 80 and not any(p.error for p in predictions)
    cats = sum(p.label == "cats" for p in predictions)
    assert f"{cats} of 80 validation cats predicted as cats" in out and cats >= 64
    assert "refused: export folder best-model already exists and is not empty" in out
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()  # the default store, as the page says
