"""Explicit run loggers: runs end FINISHED, FAILED or KILLED as their block ends, and a store that hiccups
never stops training."""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from sweep import tracking


@pytest.fixture()
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture()
def experiment(client, tmp_path):
    return client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (ValueError("bad"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED")])
def test_a_run_ends_as_its_block_ends(client, experiment, raised, status):
    seen = []
    with pytest.raises(type(raised)) if raised else _nothing():
        with tracking.open_run(client, experiment, "r", {"a": 1}, {"t": "x"}) as run:
            seen.append(run.run_id)
            if raised:
                raise raised
    logged = client.get_run(seen[0])
    assert logged.info.status == status
    assert logged.data.params == {"a": "1"} and logged.data.tags["t"] == "x"


def test_an_error_after_a_stop_request_ends_the_run_killed(client, experiment, monkeypatch):
    # TensorFlow can turn the KeyboardInterrupt of a signal into a RuntimeError in its C++ stack
    monkeypatch.setattr(tracking.runs, "STOP_REQUESTED", _set_event())
    with pytest.raises(RuntimeError):
        with tracking.open_run(client, experiment, "r", {}, {}) as run:
            raise RuntimeError("pybind11::error_already_set: ... REPLACED BY KeyboardInterrupt")
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_a_trial_run_nests_under_its_sweep_without_an_active_run(client, experiment):
    import mlflow

    with tracking.open_run(client, experiment, "sweep", {}, {}) as sweep:
        with tracking.open_run(client, experiment, "trial", {}, {}, parent_run_id=sweep.run_id) as trial:
            trial.log_metrics({"val_loss": 0.5}, step=3)
    assert mlflow.active_run() is None
    logged = client.get_run(trial.run_id)
    assert logged.data.tags["mlflow.parentRunId"] == sweep.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(trial.run_id, "val_loss")] == [(3, 0.5)]


def test_a_store_that_hiccups_is_retried_and_one_that_is_down_does_not_stop_training(client, experiment,
                                                                                     monkeypatch):
    lines = []
    with tracking.open_run(client, experiment, "trial", {}, {}, report=lines.append) as run:
        real = run.client.log_batch
        calls = {"n": 0}

        def flaky(run_id, metrics=(), params=(), tags=()):
            calls["n"] += 1
            if calls["n"] in (1, 2) or calls["n"] >= 5:  # epoch 1: two hiccups, then it lands; epoch 3: down
                raise ConnectionError("tracking server unreachable")
            return real(run_id, metrics=metrics, params=params, tags=tags)

        monkeypatch.setattr(run.client, "log_batch", flaky)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logger = tracking.EpochMetricsLogger(run, interval=0)  # every epoch sent on its own
        history = model.fit(np.zeros((8, 3)), np.zeros(8, "int32"), epochs=3, verbose=0, callbacks=[logger])
        monkeypatch.setattr(run.client, "log_batch", real)
    assert len(history.history["loss"]) == 3  # training went on
    assert logger.failed_epochs == [3]
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]
    assert len(lines) == 1 and lines[0].startswith("Warning: could not log epoch 3's metrics to MLflow run ")
    assert "ConnectionError: tracking server unreachable" in lines[0] and "training goes on" in lines[0]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_fast_epochs_reach_the_store_together_and_a_slow_trial_s_curve_grows_live(client, experiment, monkeypatch):
    with tracking.open_run(client, experiment, "trial", {}, {}) as run:
        real, requests = run.client.log_batch, []

        def counting(run_id, metrics=(), params=(), tags=()):
            requests.append(sorted({m.step for m in metrics}))
            return real(run_id, metrics=metrics, params=params, tags=tags)

        monkeypatch.setattr(run.client, "log_batch", counting)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(np.zeros((8, 3)), np.zeros(8, "int32"), epochs=5, verbose=0,
                  callbacks=[tracking.EpochMetricsLogger(run, interval=1e9)])
        assert requests == [[1, 2, 3, 4, 5]]  # one request at the end of training
        requests.clear()
        slow = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: time.sleep(0.06))
        model.fit(np.zeros((8, 3)), np.zeros(8, "int32"), epochs=3, verbose=0,
                  callbacks=[slow, tracking.EpochMetricsLogger(run, interval=0.05)])
        assert requests == [[1], [2], [3]]  # each epoch as it ends
        monkeypatch.setattr(run.client, "log_batch", real)
    # both fits' epochs are there (steps 1-5, then 1-3 again)
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2, 3, 4, 5, 1, 2, 3]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _set_event():
    import threading

    event = threading.Event()
    event.set()
    return event


def _store():
    from sweep.config import load_tracking

    settings = load_tracking()  # tracking_env's mlflow.yaml: a SQLite store under tmp_path
    return settings, MlflowClient(settings.tracking_uri)


def test_a_new_experiment_is_marked_as_model_training_for_the_mlflow_ui(tracking_env):
    settings, client = _store()
    experiment_id = tracking.Store(settings).open_experiment()
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.Store(settings).open_experiment() == experiment_id  # opening it again changes nothing


def test_an_experiment_made_before_the_tag_gets_it_when_sweep_opens_it(tracking_env):
    settings, client = _store()
    old = client.create_experiment(settings.experiment, artifact_location=settings.artifact_root.resolve().as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking.Store(settings).open_experiment() == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_kind_chosen_in_the_ui_is_kept(tracking_env):
    settings, client = _store()
    chosen = client.create_experiment(settings.experiment, tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.Store(settings).open_experiment() == chosen
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_names_with_quotes_are_searched_for_not_parsed(tracking_env):
    """A sweep or family name is the user's text: one with a quote must find its runs, not break the query."""
    from mlflow import MlflowClient

    from sweep.errors import SweepError
    from sweep.tracking import filter_value, find_sweep, finished_trials

    client = MlflowClient("sqlite:///mlruns/mlflow.db")
    experiment = client.create_experiment("quotes")
    for family, sweep in (("it's", 'the "big" one'), ("plain", "other")):
        parent = client.create_run(experiment, tags={"kind": "sweep", "family": family, "sweep": sweep})
        child = client.create_run(experiment, tags={"family": family, "trial_id": "0",
                                                    "mlflow.parentRunId": parent.info.run_id})
        client.log_metric(child.info.run_id, "test_accuracy", 0.5)
        client.set_terminated(child.info.run_id)
    found = find_sweep(client, experiment, "it's", 'the "big" one')
    assert found is not None and found.data.tags["sweep"] == 'the "big" one'
    assert [r.data.tags["family"] for r in finished_trials(client, experiment, "it's")] == ["it's"]
    assert filter_value("plain") == "'plain'" and filter_value("it's") == '"it\'s"'
    with pytest.raises(SweepError, match="both kinds of quote"):
        filter_value("""it's "both\"""")


def test_the_one_lookup_finds_makes_or_refuses_an_experiment_and_sets_no_process_wide_state(tracking_env):
    import mlflow

    from sweep.config import load_tracking
    from sweep.errors import ConfigError

    before = mlflow.get_tracking_uri()
    store = tracking.Store(load_tracking())
    assert store.find_experiment() is None  # the template store holds only MLflow's Default experiment
    with pytest.raises(ConfigError, match="'test-exp' has no runs in sqlite:///.*run `sweep run` first"):
        store.experiment_id()
    made = store.open_experiment()
    assert store.find_experiment() == store.experiment_id() == store.open_experiment() == made
    with tracking.open_run(store.client, made, "r", {"a": 1}, {}) as run:
        run.log_metrics({"m": 1.0})
    assert mlflow.get_tracking_uri() == before and mlflow.active_run() is None  # nothing implicit was touched
    store.client.delete_experiment(made)
    assert store.find_experiment() is None
    for lookup in (store.experiment_id, store.open_experiment):
        with pytest.raises(ConfigError, match="'test-exp' is deleted .* restore it in the MLflow UI"):
            lookup()


@pytest.mark.no_store
def test_reading_a_store_that_is_not_there_refuses_and_creates_nothing(tracking_env):
    from sweep.config import load_tracking
    from sweep.errors import ConfigError

    store = tracking.Store(load_tracking())
    assert store.find_experiment() is None
    with pytest.raises(ConfigError, match="no MLflow store at .*mlflow.db; run `sweep run` first"):
        store.experiment_id()
    assert not (tracking_env / "mlruns").exists()
