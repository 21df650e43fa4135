"""The one module that talks to MLflow while a sweep trains.

A parent run per sweep and a nested run per trial; the callers own each run's lifetime (``with`` blocks), so
an exception marks the run FAILED and Ctrl-C marks it KILLED. The Keras callback logs into the run it is
given and never starts one.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import keras
import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.config import TrackingSettings, folder_problem, require_store, sqlite_path
from sweep.errors import ConfigError, SweepError, first_line
from sweep.server import check_server, redact

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's documented system tag for nested runs
MODEL_ARTIFACT = "model/model.keras"  # the trained end-to-end model, kept for trials that improved their sweep
RETRY_ATTEMPTS = 3
Reporter = Callable[[str], None]


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
    check_server(settings.tracking_uri, settings.experiment, write=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    with _store_lock(settings.tracking_uri):
        return _use_experiment(settings)


def check_store(settings: TrackingSettings) -> None:
    """Check, creating nothing, that a sweep could write to the store: a local SQLite database and its folder
    writable (SQLite writes its journal beside the file), or a tracking server that lets this login log runs.

    Raises:
        ConfigError: naming the path or the server and the fix.
    """
    where = f"in {settings.source}" if settings.source != "defaults" else "in mlflow.yaml"
    for key, path in (("tuner_dir", settings.tuner_dir), ("cache_dir", settings.cache_dir)) + (
            (("artifact_root", settings.artifact_root),) if settings.is_local else ()):
        _check_folder(path, f"{key} {where}")
    database = sqlite_path(settings.tracking_uri)
    if database is None:
        check_server(settings.tracking_uri, settings.experiment, write=True)
        return
    fix = "fix tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI, or the permissions."
    _check_folder(database.parent, "the MLflow store's folder", fix)
    if database.exists():
        check_sqlite_file(database)
        if not os.access(database, os.R_OK | os.W_OK):
            raise ConfigError(f"the MLflow store {database} is read-only; {fix}")


def check_sqlite_file(database: Path) -> None:
    """Refuse a store file that is not a SQLite database (SQLAlchemy would raise a traceback)."""
    try:
        with open(database, "rb") as handle:
            header = handle.read(16)
    except OSError as exc:
        raise ConfigError(f"cannot read the MLflow store {database} ({exc.strerror}); fix the permissions.") from None
    if header and header != b"SQLite format 3\x00":
        raise ConfigError(f"the MLflow store {database} is not a SQLite database; move it away, or point "
                          "tracking_uri in mlflow.yaml (or MLFLOW_TRACKING_URI) at your store.")


def _check_folder(folder: Path, what: str, fix: str = "pick another path, or fix the permissions.") -> None:
    """A folder that can be created (or written) where ``folder`` is, creating nothing."""
    found = folder_problem(folder)
    if found is None:
        return
    existing, problem = found
    if problem == "file":
        raise ConfigError(f"cannot create {what} {folder}: {existing} is a file; {fix}")
    if problem == "read-only":
        raise ConfigError(f"{what} {folder} cannot be written ({existing} is read-only); {fix}")
    raise ConfigError(f"{what} {folder}: cannot reach {existing} {problem.removeprefix('unreachable ')}; {fix}")


def existing_experiment_id(settings: TrackingSettings) -> str | None:
    """The experiment's id when the store and the experiment exist; None otherwise. Creates nothing."""
    database = sqlite_path(settings.tracking_uri)
    if database is not None and not database.is_file():
        return None
    if database is not None:
        check_sqlite_file(database)
    check_server(settings.tracking_uri, settings.experiment)
    mlflow.set_tracking_uri(settings.tracking_uri)
    with _store_lock(settings.tracking_uri):
        try:
            experiment = _retry_on_race(lambda: mlflow.get_experiment_by_name(settings.experiment))
        except MlflowException as exc:
            raise ConfigError(f"cannot read MLflow store {redact(settings.tracking_uri)}: "
                              f"{exc.message.splitlines()[0]}") from None
    return None if experiment is None or experiment.lifecycle_stage == "deleted" else experiment.experiment_id


def new_client() -> MlflowClient:
    """A client on the current tracking store. For a SQLite store, made under the store's lock: a new database's
    tables are created when its first client opens it, and two processes doing that at once can collide."""
    database = sqlite_path(mlflow.get_tracking_uri())
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)  # checked writable before (check_store)
    with _store_lock(mlflow.get_tracking_uri()):
        client = _retry_on_race(MlflowClient)
        _retry_on_race(lambda: client.search_experiments(max_results=1))  # opens (and on first use creates) it
    return client


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


# Marks a sweep's experiment as model training: MLflow's UI reads this tag (its ExperimentKind enum, shown as
# "Machine learning") to choose between its GenAI and model-training pages when its sidebar's GenAI / Model training
# switch is not in use. MLflow 3.17's UI has that switch on and follows it instead (GenAI until clicked, or
# ?workflowType=machine_learning in a link), so there the tag does not change which page opens.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _use_experiment(settings: TrackingSettings) -> str:
    try:
        experiment = _retry_on_race(lambda: mlflow.get_experiment_by_name(settings.experiment))
        if experiment is None:
            location = settings.artifact_root.resolve().as_uri() if settings.is_local else None
            try:
                return mlflow.create_experiment(settings.experiment, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = mlflow.get_experiment_by_name(settings.experiment)  # another process made it first
    except MlflowException as exc:
        raise ConfigError(
            f"cannot use MLflow tracking store {redact(settings.tracking_uri)} ({exc.message.splitlines()[0]}); "
            "check tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI."
        ) from None
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"experiment {settings.experiment!r} is deleted in {redact(settings.tracking_uri)}; restore it in the MLflow UI "
            "or pick another name with --experiment."
        )
    _mark_kind(experiment)
    return experiment.experiment_id


def _mark_kind(experiment) -> None:
    """Tag an experiment made by an older sweep (or by hand) as model training; a kind already set (in the UI's
    experiment-type selector, say) is kept."""
    if EXPERIMENT_KIND_TAG in experiment.tags:
        return
    try:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except MlflowException as exc:  # a read-only store or server: the sweep goes on, only the tag is missing
        print(f"Warning: could not tag MLflow experiment {experiment.name!r} as model training "
              f"({exc.message.splitlines()[0]}); the MLflow UI may open it on its GenAI overview.")


def _retry_on_race(call):
    """Run ``call``; when several processes create a new SQLite store at once, all but one can see its tables
    half-made (SQLAlchemy's OperationalError: a table exists, the database is locked): wait and try again."""
    import sqlalchemy
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

    for attempt in Retrying(retry=retry_if_exception_type(sqlalchemy.exc.OperationalError),
                            stop=stop_after_attempt(8), wait=wait_fixed(0.5), reraise=True):
        with attempt:
            return call()


class RunLogger:
    """Writes into one MLflow run, named by id, through a client: never MLflow's implicit active run."""

    def __init__(self, client: MlflowClient, run_id: str, report: Reporter = print) -> None:
        self.client, self.run_id, self.report = client, run_id, report

    def log_params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_json(self, data: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def log_keras_model(self, model: keras.Model, artifact_path: str) -> None:
        """Save ``model`` as a ``.keras`` file under ``artifact_path`` (folder/name.keras)."""
        folder, name = artifact_path.rsplit("/", 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            model.save(path)
            self.client.log_artifact(self.run_id, str(path), folder)

    def epoch_logger(self) -> EpochMetricsLogger:
        return EpochMetricsLogger(self)


@contextmanager
def open_run(client: MlflowClient, experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str],
             parent_run_id: str | None = None, resume_run_id: str | None = None,
             report: Reporter = print) -> Iterator[RunLogger]:
    """A run for a sweep (or a trial, under ``parent_run_id``), re-opened when ``resume_run_id`` is given.

    The caller owns its lifetime: the run ends FINISHED when the block ends, KILLED when the process is
    interrupted (Ctrl-C, SIGTERM) and FAILED on any other exception, which propagates.
    """
    if resume_run_id is not None:
        client.update_run(resume_run_id, status="RUNNING")
        run_id = resume_run_id
    else:
        if parent_run_id is not None:
            tags = {**tags, PARENT_RUN_TAG: parent_run_id}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    logger = RunLogger(client, run_id, report)
    status = "FAILED"
    try:
        if resume_run_id is None and params:
            logger.log_params(params)
        yield logger
        status = "FINISHED"
    except BaseException as exc:
        if interrupted(exc):
            status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status=status)


# Set when the process was asked to stop (Ctrl-C, SIGTERM). TensorFlow can turn the KeyboardInterrupt raised
# in its C++ call stack into a RuntimeError; with this set, that error is an interruption too.
STOP_REQUESTED = threading.Event()


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` ends work because the process was told to stop, not because the work failed."""
    return isinstance(exc, KeyboardInterrupt) or STOP_REQUESTED.is_set()


class EpochMetricsLogger(keras.callbacks.Callback):
    """Logs loss, accuracy, val_loss and val_accuracy per epoch (step = epoch number, from 1) into a run.

    Epochs are sent at most every ``interval`` seconds (and at the end of training), several in one request:
    a long trial's curve still grows live, and a trial on cached features, whose twenty epochs take a second,
    costs one request instead of twenty. As MLflow's own Keras callback, it never stops training: a store
    that hiccups is retried a few times (tenacity, with backoff), then those epochs are skipped with one
    warning and training goes on (``failed_epochs``).
    """

    def __init__(self, run: RunLogger, interval: float = 2.0) -> None:
        super().__init__()
        self.run, self.interval = run, interval
        self.failed_epochs: list[int] = []
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._last = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._pending.append((epoch + 1, {name: float(logs[name]) for name in EPOCH_METRICS
                                          if logs and name in logs}))
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        pending, self._pending, self._last = self._pending, [], time.monotonic()
        if not pending:
            return
        timestamp = int(time.time() * 1000)
        metrics = [Metric(name, value, timestamp, step) for step, values in pending for name, value in values.items()]
        try:
            _with_retries(self.run.client.log_batch, self.run.run_id, metrics=metrics)
        except Exception as exc:  # the store is down: the trial's result matters more than a few epochs' curve
            steps = [step for step, _ in pending]
            self.failed_epochs.extend(steps)
            which = f"epoch {steps[0]}'s" if len(steps) == 1 else f"epochs {steps[0]}-{steps[-1]}'s"
            self.run.report(f"Warning: could not log {which} metrics to MLflow run {self.run.run_id} "
                            f"({first_line(exc, 200)}); training goes on.")


def _with_retries(call, *args, **kwargs):
    from tenacity import Retrying, stop_after_attempt, wait_exponential

    for attempt in Retrying(stop=stop_after_attempt(RETRY_ATTEMPTS), wait=wait_exponential(multiplier=0.2, max=2),
                            reraise=True):
        with attempt:
            return call(*args, **kwargs)


# -- reading results back ----------------------------------------------------------------------------------
def experiment_id_of(settings: TrackingSettings) -> str:
    """The id of an existing experiment.

    Raises:
        ConfigError: the store cannot be reached, or holds no such experiment.
    """
    require_store(settings)
    database = sqlite_path(settings.tracking_uri)
    if database is not None:
        check_sqlite_file(database)
    check_server(settings.tracking_uri, settings.experiment)
    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        experiment = mlflow.get_experiment_by_name(settings.experiment)
    except MlflowException as exc:
        raise ConfigError(f"cannot read MLflow store {redact(settings.tracking_uri)}: {exc.message.splitlines()[0]}") from None
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"experiment {settings.experiment!r} is deleted in {redact(settings.tracking_uri)}; restore it in the MLflow "
            "UI or pick another with --experiment."
        )
    if experiment is None:
        raise ConfigError(
            f"experiment {settings.experiment!r} has no runs in {redact(settings.tracking_uri)}; run `sweep run` first "
            "or pick another with --experiment."
        )
    return experiment.experiment_id


def filter_value(text: str) -> str:
    """``text`` as a quoted value of an MLflow search filter. MLflow's filter grammar has no escape inside a
    quoted value, so a value holding a single quote is put in double quotes, and one holding both kinds of
    quote cannot be searched for (a user-given sweep or family name, say).

    Raises:
        SweepError: ``text`` holds both ``'`` and ``"``.
    """
    text = str(text)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise SweepError(f"the name {text!r} holds both kinds of quote, which MLflow's search cannot match; rename it "
                     "without one of them.")


def finished_trials(experiment_id: str, family: str | None = None) -> list:
    """Every finished trial run (nested under a sweep) of an experiment, optionally of one family."""
    query = "attributes.status = 'FINISHED'"
    if family:
        query += f" and tags.family = {filter_value(family)}"
    runs = MlflowClient().search_runs([experiment_id], filter_string=query, max_results=50000)
    return [r for r in runs if PARENT_RUN_TAG in r.data.tags and "trial_id" in r.data.tags
            and "test_accuracy" in r.data.metrics]


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def download(run_id: str, artifact_path: str, destination: Path) -> Path:
    """Download one artifact of a run into ``destination`` and return its local path."""
    return Path(MlflowClient().download_artifacts(run_id, artifact_path, str(destination)))


def has_artifact(run_id: str, artifact_path: str) -> bool:
    folder = artifact_path.rsplit("/", 1)[0] if "/" in artifact_path else ""
    return any(a.path == artifact_path for a in MlflowClient().list_artifacts(run_id, folder or None))


def register_model(run_id: str, files: Path, classes: list[str], name: str, alias: str,
                   metrics: dict[str, float] | None = None) -> int:
    """Log the export folder ``files`` into ``run_id`` as a model in MLflow's pyfunc flavour
    (``sweep.pyfunc_model.ImageClassifier``: encoded images in, class names out; the files are its
    ``formats`` artifacts), with ``metrics`` on the run; register it as a new version of ``name`` and point the
    registry alias ``alias`` at that version (MLflow's aliases replace the deprecated stages)."""
    import keras
    import tensorflow as tf

    from sweep.pyfunc_model import ImageClassifier, signature

    client = MlflowClient()
    with mlflow.start_run(run_id=run_id):  # log_model logs into a started run only
        info = mlflow.pyfunc.log_model(name="registered_model", python_model=ImageClassifier(),
                                       artifacts={"formats": str(files)}, signature=signature(classes),
                                       pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                                                         f"mlflow=={mlflow.__version__}"])
        if metrics:
            mlflow.log_metrics(metrics)
    version = int(mlflow.register_model(info.model_uri, name).version)
    client.set_registered_model_alias(name, alias, version)
    return version


def log_report_run(experiment_id: str, name: str, files: list[Path], metrics: dict[str, float],
                   tags: dict[str, str]) -> str:
    """A standalone run (not a sweep) that carries a report's files and headline numbers."""
    client = MlflowClient()
    with open_run(client, experiment_id, name, {}, tags) as run:
        for path in files:
            client.log_artifact(run.run_id, str(path))
        if metrics:
            run.log_metrics(metrics)
        return run.run_id


def find_sweep(experiment_id: str, family: str | None, name: str | None = None):
    """The sweep run named ``name``, else the newest unfinished sweep of ``family``; or None."""
    query = "tags.kind = 'sweep'" + (f" and tags.family = {filter_value(family)}" if family else "")
    if name:
        query += f" and tags.sweep = {filter_value(name)}"
    runs = MlflowClient().search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                                      max_results=100)
    if name:
        return runs[0] if runs else None
    # unfinished: still RUNNING, killed, failed, or ended at its --time-budget with trials left
    return next((r for r in runs if r.info.status != "FINISHED" or r.data.tags.get("stopped") == "time_budget"),
                None)


def clear_tag(run_id: str, key: str) -> None:
    """Remove a tag from a run (one that no longer holds, e.g. a resumed sweep's "stopped")."""
    _with_retries(MlflowClient().delete_tag, run_id, key)


def sweep_runs(experiment_id: str) -> list:
    """Every sweep's own run in the experiment (the parents of the trial runs)."""
    return MlflowClient().search_runs([experiment_id], filter_string="tags.kind = 'sweep'", max_results=50000)


def child_runs(experiment_id: str, parent_run_id: str) -> list:
    """Every run whose parent is ``parent_run_id``."""
    return MlflowClient().search_runs([experiment_id],
                                      filter_string=f"tags.{PARENT_RUN_TAG} = {filter_value(parent_run_id)}",
                                      max_results=50000)


def metric_history(run_id: str, name: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, name), key=lambda m: m.step)]


def mark_killed(run_id: str, reason: str) -> None:
    """Close a run that a dead process left RUNNING."""
    client = MlflowClient()
    client.set_tag(run_id, "error", reason)
    client.set_terminated(run_id, status="KILLED")
