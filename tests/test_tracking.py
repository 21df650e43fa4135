"""Explicit run loggers: runs end FINISHED, FAILED or KILLED as their block ends, and a store that hiccups
never stops training."""

from __future__ import annotations

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
    monkeypatch.setattr(tracking, "STOP_REQUESTED", _set_event())
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
        logger = run.epoch_logger()
        history = model.fit(np.zeros((8, 3)), np.zeros(8, "int32"), epochs=3, verbose=0, callbacks=[logger])
        monkeypatch.setattr(run.client, "log_batch", real)
    assert len(history.history["loss"]) == 3  # training went on
    assert logger.failed_epochs == [3]
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]
    assert len(lines) == 1 and lines[0].startswith("Warning: could not log epoch 3's metrics to MLflow run ")
    assert "ConnectionError: tracking server unreachable" in lines[0] and "training goes on" in lines[0]
    assert client.get_run(run.run_id).info.status == "FINISHED"


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
