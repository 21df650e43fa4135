"""Taking results away: best, export + registry, predict, report, data, and serving over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from search_spaces import describe
from sweep.cli import main
from sweep.data import load_splits
from sweep.results import accuracy_interval
from sweep.results import param_value
from sweep.spec import SweepSpec
from tests.conftest import make_image_folders, runs_in
from tests.helpers import free_port, stop, store_client, wait_http

# Every trial runs its two epochs: these tests rank and export trials (pruning, at epoch 1 here, has its own tests).
SWEEP = ["--data-dir", None, "--batch-size", "4", "--image-size", "32", "--epochs", "2", "--seed", "3", "-q",
         "--no-prune"]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def sweep_args(data_dir, family, trials=2):
    args = list(SWEEP)
    args[1] = str(data_dir)
    return ["run", "--family", family, "--trials", str(trials), *args]









@pytest.fixture()
def no_exec(monkeypatch):
    """`sweep ui` replaces its process with MLflow's UI; inside pytest that must fail loudly instead."""
    def refuse(*args):
        raise AssertionError(f"sweep ui went on to start the UI: {args}")

    monkeypatch.setattr(os, "execv", refuse)


@pytest.fixture(scope="module")
def swept_store(tiny_data, tmp_path_factory):
    """One 2-trial scratch sweep for the module, in a store of its own (made once: it costs seconds)."""
    from click.testing import CliRunner

    store = tmp_path_factory.mktemp("swept")
    (store / "mlflow.yaml").write_text(
        "tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_root: mlruns/artifacts\n"
        "experiment: test-exp\ntuner_dir: mlruns/keras_tuner\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        result = CliRunner().invoke(main, sweep_args(tiny_data, "scratch"))
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture()
def swept(swept_store, tracking_env):
    """A copy of the module's swept store as this test's tracking folder, to change freely. Its runs keep their
    artifacts in the module's store, where an export only adds a logged model under a new id."""
    shutil.rmtree(tracking_env / "mlruns", ignore_errors=True)  # the empty store tracking_env starts with
    shutil.copytree(swept_store / "mlruns", tracking_env / "mlruns")
    return tracking_env


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
def test_export_reproduces_the_logged_test_accuracy_and_registers(swept, runner, tiny_data):
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


@pytest.mark.slow
def test_a_second_export_is_a_new_version_and_takes_the_champion_alias(swept, runner):
    client = store_client()
    children = [r for r in runs_in(swept) if "mlflow.parentRunId" in r.data.tags]
    best = min(children, key=lambda r: (r.data.metrics["val_loss"], r.info.start_time))
    first = runner.invoke(main, ["best", "--export", str(swept / "export"), "--format", "keras"])
    assert first.exit_code == 0, first.output
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


@pytest.mark.no_store
def test_ui_refuses_a_store_mlflow_cannot_open_and_best_refuses_a_lone_no_verify(tracking_env, runner, monkeypatch,
                                                                                  no_exec):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    result = runner.invoke(main, ["ui"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: tracking URI bogus://x has an unknown scheme 'bogus'; use http:// or ")
    assert "MLflow UI for" not in result.output and "Traceback" not in result.output
    (tracking_env / "mlruns").mkdir()
    (tracking_env / "mlruns" / "mlflow.db").write_text("not a database")  # a store MLflow cannot open
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = runner.invoke(main, ["ui"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot read MLflow store sqlite:///{tracking_env}/mlruns/mlflow.db: ")
    assert "fix tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI." in result.output
    assert "MLflow UI for" not in result.output and "Traceback" not in result.output
    lone = runner.invoke(main, ["best", "--no-verify"])
    assert lone.exit_code == 2 and "--no-verify only applies with --export DIR." in lone.output


def test_ui_refuses_a_port_in_use(swept, runner, no_exec):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = runner.invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 1
    assert f"Error: cannot serve on 127.0.0.1:{port} (Address already in use); pick another with --port." \
        in result.output


def test_ui_prints_the_link_that_opens_the_experiments_training_runs(swept, runner, monkeypatch):
    started = []
    monkeypatch.setattr(os, "execv", lambda *args: started.append(args))
    port = free_port()
    result = runner.invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 0, result.output
    experiment = store_client().get_experiment_by_name("test-exp")
    # MLflow 3's UI opens an experiment on its GenAI overview unless the link asks for the training runs
    assert (f"Experiment 'test-exp', its runs: http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
            "/runs?workflowType=machine_learning") in result.output
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert started and started[0][1][1:3] == ["ui", "--backend-store-uri"]


@pytest.mark.slow
def test_report_compares_two_families_with_the_baseline(swept, runner, tiny_data):
    assert runner.invoke(main, sweep_args(tiny_data, "preprocessed")).exit_code == 0
    out = swept / "report"
    result = runner.invoke(main, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "| scratch | 32x32 | 2 (0) |" in text and "| preprocessed | 32x32 | 2 (0) |" in text and "| baseline |" in text
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for family in ("scratch", "preprocessed"):
        children = [r for r in runs_in(swept) if r.data.tags.get("family") == family and "trial_id" in r.data.tags]
        best = min(children, key=lambda r: (r.data.metrics["val_loss"], r.info.start_time))
        gain = (best.data.metrics["test_accuracy"] - best.data.metrics["baseline_accuracy"]) * 100
        gap = (best.data.metrics["accuracy"] - best.data.metrics["val_accuracy"]) * 100
        test, n = best.data.metrics["test_accuracy"], int(best.data.metrics["test_images"])
        low, high = accuracy_interval(test, n)
        assert 0.0 <= low <= test <= high <= 1.0 and n == 4
        assert f"{test:.1%} (95% CI {low:.1%}-{high:.1%}, 4 images) | {gain:+.1f} | {gap:+.1f} |" in text
    assert "Wilson score interval over the test images (one image of 4 is 25.00 points)" in text
    report_runs = [r for r in runs_in(swept) if r.data.tags.get("kind") == "report"]
    assert len(report_runs) == 1
    artifacts = {a.path for a in store_client().list_artifacts(report_runs[0].info.run_id)}
    assert artifacts == {"report.md", "report.png"}


def test_data_overview(tiny_data, tracking_env, runner):
    out = tracking_env / "data"
    result = runner.invoke(main, ["data", "--data-dir", str(tiny_data), "--batch-size", "4", "--image-size", "32",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train       cats 16  dogs 16" in result.output
    assert "baseline: always 'cats'" in result.output
    assert {p.name for p in out.iterdir()} == {"data.json", "samples.png", "augmentation.png"}
    run = next(r for r in runs_in(tracking_env) if r.data.tags.get("kind") == "data")
    assert run.data.metrics["train_cats"] == 16
    assert {a.path for a in store_client().list_artifacts(run.info.run_id)} == {"data.json", "samples.png",
                                                                                  "augmentation.png"}


@pytest.mark.slow
def test_ui_serves_the_configured_store(swept):
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("sweep")), "ui", "--port", str(port)], cwd=swept,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=test-exp")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["experiment"]["name"] == "test-exp"
    finally:
        stop(proc)


@pytest.mark.slow
def test_mlflow_server_receives_a_sweep(tiny_data, tmp_path, runner, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=server)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "remote-exp")
        result = runner.invoke(main, sweep_args(tiny_data, "scratch"))
        assert result.exit_code == 0, result.output
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        with urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=remote-exp") as response:
            experiment_id = json.load(response)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode()
        request = urllib.request.Request(f"{api}/runs/search", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            runs = json.load(response)["runs"]
        assert len(runs) == 3
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [t for t in tags if "mlflow.parentRunId" not in t]
        assert len(parents) == 1
        assert sum(1 for t in tags if "mlflow.parentRunId" in t) == 2
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
        assert list((tmp_path / "artifacts").rglob("accuracy.png"))
    finally:
        stop(server)


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
