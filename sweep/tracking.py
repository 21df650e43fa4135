"""The one module that talks to MLflow while a sweep trains.

A parent run per sweep and a nested run per trial; the callers own each run's lifetime (``with`` blocks), so
an exception marks the run FAILED and Ctrl-C marks it KILLED. The Keras callback logs into the run it is
given and never starts one.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import keras
import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.config import TrackingSettings, require_store, sqlite_path
from sweep.errors import ConfigError

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
MODEL_ARTIFACT = "model/model.keras"  # the trained end-to-end model, kept for trials that improved their sweep


def use_experiment(settings: TrackingSettings) -> str:
    """Point MLflow at the configured store and return the experiment's id, creating it when new.

    Raises:
        ConfigError: the tracking store cannot be reached or the experiment was deleted.
    """
    database = sqlite_path(settings.tracking_uri)
    if database is not None:
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the MLflow store's folder {database.parent}: {exc.strerror}; "
                              "fix tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI.") from None
    mlflow.set_tracking_uri(settings.tracking_uri)
    with _store_lock(settings.tracking_uri):
        return _use_experiment(settings)


@contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """For a SQLite store, one process at a time creates tables and experiments: MLflow's schema migration
    is not safe against another process doing the same on a new database."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        yield
        return
    import fcntl

    with open(tracking_uri[len(prefix):] + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _use_experiment(settings: TrackingSettings) -> str:
    try:
        experiment = _retry_on_race(lambda: mlflow.get_experiment_by_name(settings.experiment))
        if experiment is None:
            location = settings.artifact_root.resolve().as_uri() if settings.is_local else None
            try:
                return mlflow.create_experiment(settings.experiment, artifact_location=location)
            except MlflowException as exc:
                if "already exists" not in exc.message:
                    raise
                experiment = mlflow.get_experiment_by_name(settings.experiment)  # another process made it first
    except MlflowException as exc:
        raise ConfigError(
            f"cannot use MLflow tracking store {settings.tracking_uri} ({exc.message.splitlines()[0]}); "
            "check tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI."
        ) from None
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"experiment {settings.experiment!r} is deleted in {settings.tracking_uri}; restore it in the MLflow UI "
            "or pick another name with --experiment."
        )
    return experiment.experiment_id


def _retry_on_race(call, attempts: int = 8):
    """Run ``call``; when several processes create a new SQLite store at once, all but one see its tables
    half-made ("already exists", "locked"): wait a moment and try again."""
    import sqlalchemy

    for attempt in range(attempts):
        try:
            return call()
        except (sqlalchemy.exc.OperationalError, MlflowException) as exc:
            text = str(exc)
            if attempt == attempts - 1 or not ("already exists" in text or "locked" in text):
                raise
            time.sleep(0.5 + attempt * 0.5)


@contextmanager
def sweep_run(experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str],
              resume_run_id: str | None = None) -> Iterator[str]:
    """Start the parent run of a sweep (or re-open it to resume); yields its run id."""
    with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id,
                          run_name=None if resume_run_id else name, tags=tags) as run:
        if resume_run_id is None:
            mlflow.log_params(params)
        yield run.info.run_id


@contextmanager
def trial_run(experiment_id: str, parent_run_id: str, name: str, params: dict[str, Any],
              tags: dict[str, str]) -> Iterator[str]:
    """Start a trial's run under the sweep's run; yields its run id.

    The parent need not be active in this process, so worker processes log trials under the chief's sweep.
    """
    active = mlflow.active_run()
    nested = active is not None and active.info.run_id == parent_run_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=nested,
                          parent_run_id=None if nested else parent_run_id, tags=tags) as run:
        mlflow.log_params(params)
        yield run.info.run_id


def log_result(metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
    """Log final metrics (no step) and tags into the active run."""
    mlflow.log_metrics(metrics)
    if tags:
        mlflow.set_tags(tags)


def log_figure(figure: Any, name: str) -> None:
    mlflow.log_figure(figure, name)


def log_text(text: str, name: str) -> None:
    mlflow.log_text(text, name)


def log_keras_model(model: keras.Model, artifact_path: str) -> None:
    """Save ``model`` as a ``.keras`` file under ``artifact_path`` (folder/name.keras) of the active run."""
    folder, name = artifact_path.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        model.save(path)
        mlflow.log_artifact(str(path), folder)


def log_json(data: Any, name: str) -> None:
    mlflow.log_text(json.dumps(data, indent=2, default=str), name)


class EpochMetricsLogger(keras.callbacks.Callback):
    """Logs loss, accuracy, val_loss and val_accuracy once per epoch (step = epoch number, from 1) into a run.

    It also keeps the values, since Keras Tuner keeps no per-epoch history of its own.
    """

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.history: dict[str, list[float]] = {name: [] for name in EPOCH_METRICS}
        self.first_epoch: int | None = None
        self._client: MlflowClient | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._client = MlflowClient()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.first_epoch is None:
            self.first_epoch = epoch + 1
        timestamp = int(time.time() * 1000)
        metrics = []
        for name in EPOCH_METRICS:
            if name in logs:
                value = float(logs[name])
                self.history[name].append(value)
                metrics.append(Metric(name, value, timestamp, epoch + 1))
        self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)


# -- reading results back ----------------------------------------------------------------------------------
def experiment_id_of(settings: TrackingSettings) -> str:
    """The id of an existing experiment.

    Raises:
        ConfigError: the store cannot be reached, or holds no such experiment.
    """
    require_store(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        experiment = mlflow.get_experiment_by_name(settings.experiment)
    except MlflowException as exc:
        raise ConfigError(f"cannot read MLflow store {settings.tracking_uri}: {exc.message.splitlines()[0]}") from None
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"experiment {settings.experiment!r} has no runs in {settings.tracking_uri}; run `sweep run` first "
            "or pick another with --experiment."
        )
    return experiment.experiment_id


def finished_trials(experiment_id: str, family: str | None = None) -> list:
    """Every finished trial run (nested under a sweep) of an experiment, optionally of one family."""
    query = "attributes.status = 'FINISHED'"
    if family:
        query += f" and tags.family = '{family}'"
    runs = MlflowClient().search_runs([experiment_id], filter_string=query, max_results=50000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags and "trial_id" in r.data.tags
            and "test_accuracy" in r.data.metrics]


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def download(run_id: str, artifact_path: str, destination: Path) -> Path:
    """Download one artifact of a run into ``destination`` and return its local path."""
    return Path(MlflowClient().download_artifacts(run_id, artifact_path, str(destination)))


def has_artifact(run_id: str, artifact_path: str) -> bool:
    folder = artifact_path.rsplit("/", 1)[0] if "/" in artifact_path else ""
    return any(a.path == artifact_path for a in MlflowClient().list_artifacts(run_id, folder or None))


def register_keras_model(run_id: str, model: keras.Model, name: str, signature: Any) -> int:
    """Log ``model`` in MLflow's Keras flavour into ``run_id`` and register it as a new version of ``name``."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.keras.log_model(model, name="registered_model", signature=signature,
                                      registered_model_name=name)
    version = info.registered_model_version
    return int(version) if version is not None else int(
        MlflowClient().get_latest_versions(name)[0].version)


def log_report_run(experiment_id: str, name: str, files: list[Path], metrics: dict[str, float],
                   tags: dict[str, str]) -> str:
    """A standalone run (not a sweep) that carries a report's files and headline numbers."""
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        for path in files:
            mlflow.log_artifact(str(path))
        if metrics:
            mlflow.log_metrics(metrics)
        return run.info.run_id


def find_sweep(experiment_id: str, family: str | None, name: str | None = None):
    """The sweep run named ``name``, else the newest unfinished sweep of ``family``; or None."""
    query = "tags.kind = 'sweep'" + (f" and tags.family = '{family}'" if family else "")
    if name:
        query += f" and tags.sweep = '{name}'"
    runs = MlflowClient().search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                                      max_results=100)
    if name:
        return runs[0] if runs else None
    return next((r for r in runs if r.info.status != "FINISHED"), None)


def child_runs(experiment_id: str, parent_run_id: str) -> list:
    """Every run whose parent is ``parent_run_id``."""
    return MlflowClient().search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                      max_results=50000)


def metric_history(run_id: str, name: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, name), key=lambda m: m.step)]


def mark_killed(run_id: str, reason: str) -> None:
    """Close a run that a dead process left RUNNING."""
    client = MlflowClient()
    client.set_tag(run_id, "error", reason)
    client.set_terminated(run_id, status="KILLED")
