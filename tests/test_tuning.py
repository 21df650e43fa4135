"""Oracles start from the study's defaults; sweeps log parents, trials, curves and artifacts to MLflow."""

from __future__ import annotations

import csv
import io
import json
import math

import keras_tuner as kt
import numpy as np
import pytest

from search_spaces import default_values, make_hypermodel
from sweep.cli import main
from sweep.results import accuracy_interval
from sweep.spec import SweepSpec
from sweep.tuning import build_oracle
from tests.conftest import runs_in
from tests.helpers import store_client, tiny_args





@pytest.mark.parametrize("tuner", ["random", "bayesian", "hyperband"])
def test_first_trial_is_the_defaults_then_the_search_moves_on(tuner, tmp_path):
    oracle = build_oracle(SweepSpec(family="augmented", tuner=tuner, trials=5, epochs=4, seed=0))
    oracle._set_project_dir(str(tmp_path), f"oracle-{tuner}")
    hp = kt.HyperParameters()
    make_hypermodel("augmented").declare(hp)
    oracle.update_space(hp)

    def drawn(trial):
        return {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}

    first = oracle.create_trial("tuner0")
    assert drawn(first) == default_values(hp)
    second = oracle.create_trial("tuner1")
    assert second.status == "RUNNING"
    assert drawn(second) != default_values(hp)


def test_sweep_logs_parent_trials_curves_and_artifacts(tiny_data, tracking_env, runner):
    # every epoch's curve point of both trials (pruning, which could stop trial 2 at epoch 1, has its own tests)
    result = runner.invoke(main, ["run", "--family", "scratch", "--trials", "2", "-q", "--no-prune",
                                  *tiny_args(tiny_data)])
    assert result.exit_code == 0, result.output
    assert "[scratch] trial 1/2" in result.output and "[scratch] trial 2/2" in result.output
    assert "search for the lowest val_loss" in result.output
    assert "| best trial " in result.output and "left" in result.output
    assert "scratch: best trial " in result.output and " (by val_loss) " in result.output

    runs = runs_in(tracking_env)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {r.info.status for r in runs} == {"FINISHED"}

    client = store_client()
    hp_names = {"dropout", "learning_rate", "conv1_filters", "conv2_filters", "conv3_filters", "pooling"}
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    for child in children:
        params = child.data.params
        assert set(params) == hp_names | {"test_time_flip"} | SweepSpec.param_names()
        assert (params["family"], params["tuner"], params["epochs"], params["batch_size"]) == ("scratch", "random", "2", "4")
        assert (params["image_size"], params["seed"]) == ("32x32", "3")
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert [m.step for m in history] == [1, 2], metric
        # 24 validation images in batches of 4: the test split is the first of 6 batches
        assert child.data.metrics["test_images"] == 4 and child.data.metrics["validation_images"] == 20
        low, high = child.data.metrics["test_accuracy_ci_low"], child.data.metrics["test_accuracy_ci_high"]
        assert (low, high) == pytest.approx(accuracy_interval(child.data.metrics["test_accuracy"], 4))
        assert 0.0 <= low <= child.data.metrics["test_accuracy"] <= high <= 1.0 and high - low > 0.3  # 4 images
        assert math.isfinite(child.data.metrics["test_loss"])
        assert child.data.metrics["test_accuracy"] * 4 in {0.0, 1.0, 2.0, 3.0, 4.0}  # a count of 4 images
        assert child.data.metrics["baseline_accuracy"] == parent.data.metrics["baseline_accuracy"]
        # the process's memory at the trial's end: TensorFlow alone holds more than 100 MiB
        assert 100 < child.data.metrics["rss_mib"] <= child.data.metrics["peak_rss_mib"] < 24 * 1024
        assert child.data.tags["family"] == "scratch"
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "accuracy.png" in artifacts
        png = client.download_artifacts(child.info.run_id, "accuracy.png", str(tracking_env))
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # trial 1 is the study's model
    defaults = {"dropout": "0.2", "learning_rate": "0.001", "conv1_filters": "32", "conv2_filters": "32",
                "conv3_filters": "64", "pooling": "flatten"}
    assert {k: by_number[1].data.params[k] for k in defaults} == defaults
    assert {k: by_number[2].data.params[k] for k in defaults} != defaults

    # one score per trial: Keras Tuner's (trial.json) is the last logged epoch's val_loss, exactly
    project = tracking_env / "mlruns" / "keras_tuner" / parent.data.tags["sweep"]
    for child in children:
        trial = json.loads((project / f"trial_{child.data.tags['trial_id']}" / "trial.json").read_text())
        assert trial["score"] == client.get_metric_history(child.info.run_id, "val_loss")[-1].value
    metrics = parent.data.metrics
    # the best trial has the lowest final validation loss (the default objective)
    assert parent.data.params["objective"] == "val_loss"
    best = min(children, key=lambda c: (client.get_metric_history(c.info.run_id, "val_loss")[-1].value,
                                        int(c.data.tags["trial_number"])))
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert metrics["best_val_loss"] == pytest.approx(best.data.metrics["val_loss"])
    assert metrics["best_test_accuracy"] == best.data.metrics["test_accuracy"]
    assert metrics["trials_finished"] == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.png", "trials.csv", "search_space.json", "data.json", "test_files.txt",
            "best_hyperparameters.json"} <= artifacts
    table = list(csv.DictReader(io.StringIO(open(client.download_artifacts(
        parent.info.run_id, "trials.csv", str(tracking_env))).read())))
    assert [row["run_id"] for row in table] == [by_number[1].info.run_id, by_number[2].info.run_id]
    space = json.load(open(client.download_artifacts(parent.info.run_id, "search_space.json", str(tracking_env))))
    assert space["defaults"]["conv3_filters"] == 64
    data = json.load(open(client.download_artifacts(parent.info.run_id, "data.json", str(tracking_env))))
    assert data["counts"]["train"] == {"cats": 16, "dogs": 16}
    manifest = open(client.download_artifacts(parent.info.run_id, "test_files.txt", str(tracking_env))).read()
    lines = [line.split("  ") for line in manifest.splitlines()]
    assert len(lines) == 4 and all(path.endswith(".jpg") for _, path in lines)
    # sha256sum format: each image's digest, so an export can refuse a changed file
    import hashlib

    assert all(digest == hashlib.sha256(open(path, "rb").read()).hexdigest() for digest, path in lines)


def _improvers(children, metric: str, better) -> set[str]:
    """Run ids of the trials that improved on every earlier trial's ``metric``, in trial order."""
    kept, best = set(), None
    for child in sorted(children, key=lambda c: int(c.data.tags["trial_number"])):
        value = child.data.metrics[metric]
        if best is None or better(value, best):
            kept.add(child.info.run_id)
            best = value
    return kept


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["val_loss", "val_accuracy"])
def test_the_objective_drives_the_tuner_the_best_trial_and_the_kept_models(tiny_data, tracking_env, runner, objective):
    result = runner.invoke(main, ["run", "--family", "scratch", "--trials", "4", "-q", "--objective", objective,
                                  *tiny_args(tiny_data)])
    assert result.exit_code == 0, result.output
    runs = runs_in(tracking_env)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.data.params["objective"] == objective and len(children) == 4
    lower = objective == "val_loss"
    number = lambda c: int(c.data.tags["trial_number"])  # noqa: E731
    if lower:
        best = min(children, key=lambda c: (c.data.metrics[objective], number(c)))
    else:
        best = max(children, key=lambda c: (c.data.metrics[objective], -number(c)))
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert f"scratch: best trial {best.data.tags['trial_number']} (by {objective})" in result.output
    # Keras Tuner's oracle scored each trial by the same figure
    project = tracking_env / "mlruns" / "keras_tuner" / parent.data.tags["sweep"]
    for child in children:
        trial = json.loads((project / f"trial_{child.data.tags['trial_id']}" / "trial.json").read_text())
        assert trial["score"] == child.data.metrics[objective]  # one number, not two close ones
    # a trial keeps its model exactly when it improves on the sweep's best objective so far
    better = (lambda a, b: a < b) if lower else (lambda a, b: a > b)
    kept = {c.info.run_id for c in children if c.data.tags.get("model_kept") == "true"}
    assert kept == _improvers(children, objective, better) and best.info.run_id in kept
    assert {c.data.params["objective"] for c in children} == {objective}
    # `sweep best` and `sweep report` rank by the objective the sweep ran with, unless told otherwise
    picked = runner.invoke(main, ["best"])
    assert picked.exit_code == 0, picked.output
    assert f"Best trial by {objective}" in picked.output and best.info.run_id in picked.output
    other = "val_accuracy" if lower else "val_loss"
    assert f"Best trial by {other}" in runner.invoke(main, ["best", "--metric", other]).output
    report = runner.invoke(main, ["report", "--out", str(tracking_env / "report")])
    assert report.exit_code == 0, report.output
    assert f"Best trial per family by final {objective};" in report.output and best.info.run_id in report.output


@pytest.mark.slow
def test_hyperband_continues_trials_from_the_earlier_rounds_weights(tiny_data, tracking_env, runner, monkeypatch):
    import keras

    loads, saves = [], {}
    load_weights, save_weights = keras.Model.load_weights, keras.Model.save_weights

    def spy_load(model, path, *args, **kwargs):
        load_weights(model, path, *args, **kwargs)
        loads.append((str(path), [w.copy() for w in model.get_weights()]))

    def spy_save(model, path, *args, **kwargs):
        save_weights(model, path, *args, **kwargs)
        saves[str(path)] = [w.copy() for w in model.get_weights()]

    monkeypatch.setattr(keras.Model, "load_weights", spy_load)
    monkeypatch.setattr(keras.Model, "save_weights", spy_save)
    result = runner.invoke(main, ["run", "--family", "scratch", "--tuner", "hyperband", "--trials", "6", "-q",
                                  *tiny_args(tiny_data)[:-4], "--epochs", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    runs = runs_in(tracking_env)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    project = tracking_env / "mlruns" / "keras_tuner" / parent.data.tags["sweep"]
    trials = {t.parent.name[len("trial_"):]: json.loads(t.read_text()) for t in project.glob("trial_*/trial.json")}
    continued = {tid: t for tid, t in trials.items() if "tuner/trial_id" in t["hyperparameters"]["values"]}
    assert continued, "Hyperband ran no second round"
    assert len(loads) == len(continued)
    client = store_client()
    by_id = {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}
    for (path, weights), (tid, trial) in zip(sorted(loads), sorted(continued.items(), key=lambda kv: kv[0])):
        values = trial["hyperparameters"]["values"]
        assert path.endswith(f"trial_{values['tuner/trial_id']}/checkpoint.weights.h5")
        # the continued trial starts from exactly what the earlier round trained and saved
        assert all(np.array_equal(a, b) for a, b in zip(weights, saves[path], strict=True))
        steps = [m.step for m in client.get_metric_history(by_id[tid].info.run_id, "val_loss")]
        assert steps == list(range(values["tuner/initial_epoch"] + 1, values["tuner/epochs"] + 1))
        # Hyperband's bookkeeping is not a hyperparameter
        assert not any(k.startswith("tuner/") for k in by_id[tid].data.params)


@pytest.mark.slow
def test_bayesian_sweep_end_to_end(tiny_data, tracking_env, runner):
    result = runner.invoke(main, ["run", "--family", "scratch", "--tuner", "bayesian", "--trials", "3", "-q",
                                  *tiny_args(tiny_data)])
    assert result.exit_code == 0, result.output
    runs = runs_in(tracking_env)
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags),
                      key=lambda r: int(r.data.tags["trial_number"]))
    assert [c.data.tags["trial_number"] for c in children] == ["1", "2", "3"]
    assert {c.data.params["tuner"] for c in children} == {"bayesian"}
    assert children[0].data.params["conv3_filters"] == "64"  # trial 1 is the study's model
    assert len({tuple(sorted((k, v) for k, v in c.data.params.items())) for c in children}) == 3


@pytest.mark.parametrize("weights_name, warned", [
    ("mobilenet_v2_1.0_224_no_top.coral-ptq-dequant.h5", True),  # the 224 checkpoint on 32x32 images
    ("mobilenet_v2_1.0_32_no_top.h5", False),                     # no Keras size: nothing to say
])
def test_a_sweep_warns_when_the_weights_file_is_another_sizes_checkpoint(tiny_data, tracking_env, tmp_path,
                                                                          weights_name, warned):
    from sweep.config import load_tracking
    from sweep.study import prepare

    weights = tmp_path / weights_name
    weights.write_bytes(b"not read before the sweep starts")
    lines = []
    spec = SweepSpec(family="transfer", data_dir=tiny_data, image_size=(32, 32), batch_size=4, weights=str(weights))
    prepared = prepare(spec, load_tracking(), need_weights=True, report=lines.append)
    assert prepared.weights_path == str(weights)
    expected = (f"Warning: {weights_name} is MobileNetV2's 224x224 checkpoint, but images are 32x32; a checkpoint "
                "is most accurate at the size it was trained at (pass --image-size 224).")
    assert (expected in lines) is warned
    assert not any("checkpoint" in line for line in lines if line != expected)


@pytest.mark.slow
def test_all_families_run_in_turn_each_at_its_own_size(tiny_data, tracking_env, runner, tmp_path):
    import keras

    # a (randomly initialised) 96x96 checkpoint, named the way Keras names its files
    weights = tmp_path / "mobilenet_v2_1.0_96_no_top.weights.h5"
    keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False, weights=None).save_weights(weights)
    args = ["--data-dir", str(tiny_data), "--batch-size", "4", "--epochs", "1", "--seed", "3"]
    result = runner.invoke(main, ["run", "--family", "all", "--trials", "1", "--weights", str(weights), "-q", *args])
    assert result.exit_code == 0, result.output
    parents = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" not in r.data.tags]
    assert {p.data.params["family"]: p.data.params["image_size"] for p in parents} == {
        "scratch": "160x160", "augmented": "160x160", "preprocessed": "160x160", "transfer": "96x96"}
    assert f"Image size 96x96: {weights.name} is MobileNetV2's 96x96 checkpoint" in result.output
    for family in ("scratch", "augmented", "preprocessed", "transfer"):
        assert f"{family}: best trial 1" in result.output


@pytest.mark.slow
def test_transfer_trains_on_cached_features_and_a_second_sweep_starts_warm(tiny_data, tracking_env, runner,
                                                                          shared_weights):
    args = ["run", "--family", "transfer", "--trials", "2", "-q", "--weights", str(shared_weights),
            "--hp", "fine_tune_from=none",  # the frozen head's path (fine-tuning: tests/test_finetune.py)
            *tiny_args(tiny_data, image_size="96")]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "Computing MobileNetV2 features of 32 training images x 19 augmented views" in first.output
    # the pool, and the validation folder's images with their mirrors (every seed's validation and test)
    assert len(list((tracking_env / "mlruns" / "feature_cache").glob("*.npz"))) == 2
    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "Computing" not in second.output  # read from the disk cache

    client = store_client()
    children = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    for child in children:
        assert child.data.tags["training"] == "cached_features"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2]
    # the same seed gives the same trials, whether the cache was cold or warm
    by_sweep = {}
    for child in children:
        by_sweep.setdefault(child.data.tags["mlflow.parentRunId"], {})[child.data.tags["trial_number"]] = child
    cold, warm = by_sweep.values()
    project = tracking_env / "mlruns" / "keras_tuner"
    for number in ("1", "2"):
        assert cold[number].data.metrics["test_accuracy"] == warm[number].data.metrics["test_accuracy"]
        assert cold[number].data.metrics["val_loss"] == warm[number].data.metrics["val_loss"]
    # one score per trial: the oracle's (trial.json) is the last logged epoch's val_loss, exactly
    for child in children:
        sweep = next(r for r in runs_in(tracking_env) if r.info.run_id == child.data.tags["mlflow.parentRunId"])
        trial = json.loads((project / sweep.data.tags["sweep"] / f"trial_{child.data.tags['trial_id']}" /
                            "trial.json").read_text())
        assert trial["score"] == client.get_metric_history(child.info.run_id, "val_loss")[-1].value
    # each sweep's last kept model (its best) was checked on raw images once, at the end, and agrees
    for sweep_trials in (cold, warm):
        kept = sorted((c for c in sweep_trials.values() if c.data.tags.get("model_kept") == "true"),
                      key=lambda c: int(c.data.tags["trial_number"]))
        last = client.get_run(kept[-1].info.run_id)
        assert last.data.tags["raw_check"] == "passed"
        assert last.data.metrics["raw_test_accuracy"] == last.data.metrics["test_accuracy"]
        assert last.data.metrics["raw_test_loss"] == pytest.approx(last.data.metrics["test_loss"], abs=1e-4)
        assert "raw_val_loss" not in last.data.metrics  # the check runs on the test split only
        assert all("raw_check" not in c.data.tags for c in kept[:-1])
    assert "raw test images: " in first.output and "checked end to end" in first.output
    verified = [c for c in children if "raw_test_loss" in client.get_run(c.info.run_id).data.metrics]
    assert len(verified) == 2  # one per sweep

    # a cache that no longer matches the model (here: its clean features scaled) fails the sweep at the check
    cache = tracking_env / "mlruns" / "feature_cache"
    for path in cache.glob("*.npz"):
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
        if "mirrored_max" in arrays:
            arrays = {name: a * 1.5 if a.dtype == np.float32 else a for name, a in arrays.items()}
            np.savez(path, **arrays)
    third = runner.invoke(main, args)
    assert third.exit_code == 1, third.output
    assert "Error: transfer trial " in third.output and "the feature cache does not match the model" in third.output
    assert "Traceback" not in third.output
    failed = [r for r in runs_in(tracking_env) if r.data.tags.get("raw_check") == "failed"]
    assert len(failed) == 1 and failed[0].data.metrics["raw_test_loss"] != failed[0].data.metrics["test_loss"]


@pytest.mark.slow
def test_no_cache_trains_transfer_on_raw_images(tiny_data, tracking_env, runner):
    result = runner.invoke(main, ["run", "--family", "transfer", "--trials", "1", "--weights", "none",
                                  "--no-cache", "-q", *tiny_args(tiny_data)])
    assert result.exit_code == 0, result.output
    assert "Computing" not in result.output
    child = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags)
    assert child.data.tags["training"] == "raw_images"
    assert not (tracking_env / "mlruns" / "feature_cache").exists()


def test_validation_callback_logs_the_score_of_the_flip_averaged_model(tiny_data):
    import keras

    from search_spaces.base import Validation
    from sweep.data import load_splits

    splits = load_splits(tiny_data, (32, 32), 4, 3)
    hypermodel = make_hypermodel("augmented", num_classes=2, image_size=(32, 32))
    hp = kt.HyperParameters()
    hp.Fixed("test_time_flip", True)
    model = hypermodel.build(hp)
    final = hypermodel.inference_model(model, hp.values)
    seen = []
    model.fit(splits.train.images, splits.train.labels, batch_size=4, epochs=2, verbose=0,
              callbacks=[Validation(final, splits.validation.batches(4)),
                         keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(dict(logs)))])
    assert len(seen) == 2 and all({"loss", "accuracy", "val_loss", "val_accuracy"} <= set(logs) for logs in seen)
    loss, accuracy = final.evaluate(splits.validation.images, splits.validation.labels, batch_size=4, verbose=0)
    assert seen[-1]["val_accuracy"] == pytest.approx(accuracy)
    assert seen[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)
    # what was scored is the flip-averaged model, not the single-view one
    images = splits.validation.images
    assert not np.allclose(final.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False])
def test_a_test_time_flip_trial_logs_keeps_and_exports_the_flip_averaged_model(tiny_data, tracking_env, runner,
                                                                              shared_weights, monkeypatch, cached):
    import keras

    from search_spaces.transfer import HyperTransfer
    from sweep.data import load_splits

    declare = HyperTransfer.declare

    def flip_first(self, hp):  # trial 1 (the defaults) with test_time_flip on
        hp.Fixed("test_time_flip", True)
        return declare(self, hp)

    monkeypatch.setattr(HyperTransfer, "declare", flip_first)
    extra = [] if cached else ["--no-cache"]
    result = runner.invoke(main, ["run", "--family", "transfer", "--trials", "1", "-q", *extra,
                                  "--weights", str(shared_weights), *tiny_args(tiny_data, image_size="96")])
    assert result.exit_code == 0, result.output
    child = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags)
    assert child.data.params["test_time_flip"] == "True"
    assert child.data.tags["training"] == ("cached_features" if cached else "raw_images")
    logged_val = store_client().get_metric_history(child.info.run_id, "val_accuracy")[-1].value

    # the flip-averaged model through a SavedModel and its serving signature too, once
    formats = ["--format", "keras"] if cached else []
    exported = runner.invoke(main, ["best", "--export", str(tracking_env / "out"), *formats])
    assert exported.exit_code == 0, exported.output
    model = keras.models.load_model(tracking_env / "out" / "model.keras")
    assert model.get_layer("test_time_flip") is not None  # the flip-averaged model was kept and exported
    splits = load_splits(tiny_data, (96, 96), 4, 3)
    _, val = model.evaluate(splits.validation.images, splits.validation.labels, batch_size=4, verbose=0)
    _, test = model.evaluate(splits.test.images, splits.test.labels, batch_size=4, verbose=0)
    # the last logged epoch, the tuner's score and the logged test accuracy are this model's
    assert val == pytest.approx(logged_val, abs=1e-6)
    assert test == pytest.approx(child.data.metrics["test_accuracy"], abs=1e-6)


def test_a_search_freezes_the_heap_it_found_and_unfreezes_it_however_it_ends(monkeypatch):
    import gc

    from sweep.tuning import SweepTuner, frozen_heap

    assert gc.get_freeze_count() == 0
    seen = []
    monkeypatch.setattr(kt.Tuner, "search", lambda self, *a, **k: seen.append(gc.get_freeze_count()))
    SweepTuner.__new__(SweepTuner).search(verbose=0)  # trials run with what was alive before frozen
    assert seen[0] > 10_000 and gc.get_freeze_count() == 0
    with pytest.raises(KeyboardInterrupt), frozen_heap():
        raise KeyboardInterrupt  # Ctrl-C in a trial
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller that froze its own heap keeps it frozen
    try:
        frozen = gc.get_freeze_count()
        with frozen_heap():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
