"""`sweep best` and `sweep best --export`: ranking, the export folder, the registry and its champion, and what
is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from search_spaces import describe
from sweep.cli import main
from sweep.data import load_splits
from sweep.results import accuracy_interval, param_value
from sweep.spec import SweepSpec
from tests.conftest import make_image_folders, runs_in
from tests.helpers import free_port, stop, store_client, wait_http

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def parent_of(tracking_dir: Path, trial):
    return next(r for r in runs_in(tracking_dir) if r.info.run_id == trial.data.tags["mlflow.parentRunId"])


def test_best_prints_the_best_trial(swept, runner):
    result = runner.invoke(main, ["best"])
    assert result.exit_code == 0, result.output
    children = [r for r in runs_in(swept) if "mlflow.parentRunId" in r.data.tags]
    best = min(children, key=lambda r: (r.data.metrics["val_loss"], r.info.start_time))  # the default: val_loss
    assert "Best trial by val_loss" in result.output
    assert best.info.run_id in result.output
    assert f"(loss {best.data.metrics['val_loss']:.4f})" in result.output
    assert f"trial {best.data.tags['trial_number']}" in result.output
    low, high = accuracy_interval(best.data.metrics["test_accuracy"], 4)
    assert f"test accuracy {best.data.metrics['test_accuracy']:.2%} (95% CI {low:.1%}-{high:.1%}, 4 images)" \
        in result.output
    assert f"baseline {best.data.metrics['baseline_accuracy']:.2%}" in result.output
    assert f"family scratch, sweep {parent_of(swept, best).info.run_name}, trial" in result.output
    for metric, pick in (("val_accuracy", max), ("test_accuracy", max)):
        ranked = runner.invoke(main, ["best", "--metric", metric])
        assert ranked.exit_code == 0, ranked.output
        chosen = pick(children, key=lambda r: (r.data.metrics[metric], -r.info.start_time))
        assert f"Best trial by {metric}" in ranked.output and chosen.info.run_id in ranked.output


@pytest.mark.slow
def test_export_reproduces_the_logged_test_accuracy_registers_and_a_second_export_takes_the_alias(swept, runner,
                                                                                                    tiny_data):
    out = swept / "export"
    result = runner.invoke(main, ["best", "--export", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"model.keras", "saved_model", "formats.json", "hyperparameters.json",
                                               "metrics.json", "classes.json", "accuracy.png", "registered_model.json"}
    assert [row["format"] for row in json.loads((out / "formats.json").read_text())["formats"]] == \
        ["keras", "saved_model"]  # the default formats, both verified
    client = store_client()
    children = [r for r in runs_in(swept) if "mlflow.parentRunId" in r.data.tags]
    best = min(children, key=lambda r: (r.data.metrics["val_loss"], r.info.start_time))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] == best.data.metrics["test_accuracy"]
    assert metrics["reevaluated_test_accuracy"] == metrics["test_accuracy"]
    assert "Re-evaluated on the sweep's 4 test images (test_files.txt)" in result.output
    # test_files.txt lists the sweep's test split in `sha256sum` format: the tool itself checks it
    parent = next(r for r in runs_in(swept) if "mlflow.parentRunId" not in r.data.tags)
    manifest = Path(client.download_artifacts(parent.info.run_id, "test_files.txt", str(swept)))
    splits = load_splits(tiny_data, (32, 32), 4, 3)
    assert [line.split("  ", 1) for line in manifest.read_text().splitlines()] == \
        [[hashlib.sha256(Path(f).read_bytes()).hexdigest(), f] for f in splits.test.files]
    check = subprocess.run(["sha256sum", "--check", "--strict", str(manifest)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4, check.stdout + check.stderr
    assert json.loads((out / "classes.json").read_text()) == ["cats", "dogs"]
    hps = json.loads((out / "hyperparameters.json").read_text())
    assert set(hps) == {row["name"] for row in describe("scratch")}
    # typed and exact, as the trial drew them (MLflow holds each as its exact text)
    assert hps == {k: param_value(v) for k, v in best.data.params.items() if k not in SweepSpec.param_names()}
    assert isinstance(hps["learning_rate"], float) and isinstance(hps["conv1_filters"], int)

    import keras

    model = keras.models.load_model(out / "model.keras")
    _, accuracy = model.evaluate(splits.test.images, splits.test.labels, batch_size=4, verbose=0)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-12)

    registry = json.loads((out / "registered_model.json").read_text())
    assert registry == {"name": "sweep-best", "version": 1, "alias": "champion", "uri": "models:/sweep-best@champion",
                        "version_uri": "models:/sweep-best/1", "run_id": best.info.run_id,
                        "formats": ["keras", "saved_model"]}
    assert "registered as models:/sweep-best@champion" in result.output
    assert int(client.get_model_version_by_alias("sweep-best", "champion").version) == 1

    # a second export (here without the re-evaluation) is a new version, and the champion alias moves to it
    second = runner.invoke(main, ["best", "--export", str(swept / "export2"), "--no-verify", "--format", "keras"])
    assert second.exit_code == 0, second.output
    assert "Re-evaluated" not in second.output
    assert "reevaluated_test_accuracy" not in json.loads((swept / "export2" / "metrics.json").read_text())
    versions = client.search_model_versions("name='sweep-best'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {best.info.run_id}
    champion = client.get_model_version_by_alias("sweep-best", "champion")  # moved to the newest export
    assert int(champion.version) == 2
    assert json.loads((swept / "export2" / "registered_model.json").read_text())["version_uri"] == \
        "models:/sweep-best/2"


@pytest.fixture()
def own_data_hyperband_sweep(tmp_path, tracking_env, runner):
    """A Hyperband sweep on a data folder of its own (the test changes its files)."""
    data = make_image_folders(tmp_path / "own-data")
    result = runner.invoke(main, ["run", "--family", "scratch", "--tuner", "hyperband", "--trials", "1", "--epochs",
                                  "3", "--data-dir", str(data), "--batch-size", "4", "--image-size", "32", "--seed",
                                  "3", "-q"])
    assert result.exit_code == 0, result.output
    return data


@pytest.mark.slow
def test_export_refuses_a_changed_or_missing_test_image_and_writes_nothing(own_data_hyperband_sweep, tracking_env,
                                                                          runner, tmp_path):
    parent = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" not in r.data.tags)
    manifest = Path(store_client().download_artifacts(parent.info.run_id, "test_files.txt", str(tmp_path)))
    listed = Path(manifest.read_text().splitlines()[0].split("  ", 1)[1])
    original = listed.read_bytes()
    out = tracking_env / "champion"

    def refused(message: str) -> None:
        before = set(tracking_env.iterdir())
        result = runner.invoke(main, ["best", "--export", str(out)])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith(f"Error: {message}"), result.output
        assert "Traceback" not in result.output
        assert set(tracking_env.iterdir()) == before  # no export folder, no staging folder left behind
        assert store_client().search_registered_models() == []

    listed.write_bytes(original + b"\0")  # one byte more: still a readable JPEG, not the image that was scored
    refused(f"1 of the sweep's 4 test images changed since the sweep (first: {listed}); the logged test accuracy "
            "is not theirs.")
    listed.unlink()
    refused(f"1 of the sweep's 4 test images are missing (first: {listed});")

    listed.write_bytes(original)
    result = runner.invoke(main, ["best", "--export", str(out), "--format", "keras"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reevaluated_test_accuracy"] == metrics["test_accuracy"]
    # Hyperband's tuner/* bookkeeping (epochs, bracket, round) is no hyperparameter of the model
    hps = json.loads((out / "hyperparameters.json").read_text())
    assert set(hps) == {row["name"] for row in describe("scratch")}
    trials = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    for trial in trials:
        assert not any(name.startswith("tuner/") for name in trial.data.params)
        assert set(trial.data.params) == SweepSpec.param_names() | set(hps)


def test_export_refuses_a_non_empty_folder_and_writes_nothing(swept, runner):
    out = swept / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(main, ["best", "--export", str(out)])
    assert result.exit_code == 1
    assert f"export folder {out} already exists and is not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not store_client().search_registered_models()


def test_best_without_runs(tracking_env, runner):
    from sweep import tracking
    from sweep.config import load_tracking

    tracking.Store(load_tracking()).open_experiment()  # a store with an empty experiment, as a sweep's first step leaves
    result = runner.invoke(main, ["best", "--experiment", "nothing-here"])
    assert result.exit_code == 1
    assert "experiment 'nothing-here' has no runs" in result.output and "Traceback" not in result.output
    empty = runner.invoke(main, ["best"])
    assert empty.exit_code == 1 and "experiment 'test-exp' has no finished trial" in empty.output


def test_read_only_commands_refuse_a_store_that_is_not_there_and_create_nothing(tmp_path, runner, monkeypatch,
                                                                                no_exec):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "typo" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    for command in (["best"], ["report", "--out", str(tmp_path / "r")], ["ui"]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1, command
        assert f"Error: no MLflow store at {missing}; run `sweep run` first" in result.output, command
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no folder, no report


def test_output_paths_that_cannot_be_folders_get_one_line_and_nothing_is_written(swept, runner):
    a_file = swept / "a_file.txt"
    a_file.write_text("mine")
    cases = [(["best", "--export", str(a_file)], f"--export {a_file}: {a_file} is a file, not a folder"),
             (["best", "--export", str(a_file / "sub")], f"--export {a_file / 'sub'}: {a_file} is a file"),
             (["report", "--out", str(a_file / "sub")], f"--out {a_file / 'sub'}: {a_file} is a file"),
             (["data", "--out", str(a_file / "sub")], f"--out {a_file / 'sub'}: {a_file} is a file")]
    before = len(runs_in(swept))
    for command, message in cases:
        result = runner.invoke(main, command)
        assert result.exit_code == 1, (command, result.output)
        assert f"Error: {message}, not a folder; pick another path." in result.output or \
            f"Error: {message}; pick another path." in result.output, result.output
        assert "Traceback" not in result.output
    assert a_file.read_text() == "mine" and len(runs_in(swept)) == before
    assert not store_client().search_registered_models()


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_photo_with_its_class(swept, runner, tiny_data):
    """The registered version's pyfunc flavour (sweep/pyfunc_model.py): base64 images in, class names out, as
    `sweep predict` answers, through a real HTTP request to `mlflow models serve`."""
    out = swept / "export"
    assert runner.invoke(main, ["best", "--export", str(out), "--no-verify", "--format", "keras"]).exit_code == 0
    registry = json.loads((out / "registered_model.json").read_text())
    assert registry["uri"] == "models:/sweep-best@champion"
    port = free_port()
    # mlflow models serve starts `uvicorn` from PATH, as it would in an activated virtual environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{swept}/mlruns/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([MLFLOW, "models", "serve", "-m", "models:/sweep-best@champion", "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)],
                              cwd=swept, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=server)
        import base64

        from sweep.prediction import predict

        photos = sorted((tiny_data / "validation" / "cats").iterdir())[:1] + \
            sorted((tiny_data / "validation" / "dogs").iterdir())[:1]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(p.read_bytes()).decode()] for p in photos]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.load(response)["predictions"]
        expected = predict(out, photos)
        assert [p["class"] for p in predictions] == [e.label for e in expected]
        for got, want in zip(predictions, expected):
            assert got["probability"] == pytest.approx(want.probability, abs=1e-5)
            assert got["p_cats"] + got["p_dogs"] == pytest.approx(1.0, abs=1e-6)
    finally:
        stop(server)


# -- deployment formats ---------------------------------------------------------------------------------------
