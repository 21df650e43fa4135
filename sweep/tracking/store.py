"""The tracking store and experiment a command works in: one MLflow client, made from the settings, and the
one lookup of the experiment (found, made, or refused).

Nothing here sets MLflow's process-wide tracking URI: every read and write goes through ``Store.client``, so
two stores in one process (a test, a notebook) do not see each other's runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property
from typing import Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.config import TrackingSettings, require_store, sqlite_path
from sweep.errors import ConfigError
from sweep.server import check_server, redact
from sweep.tracking.checks import check_sqlite_file

# Marks a sweep's experiment as model training: MLflow's UI reads this tag (its ExperimentKind enum, shown as
# "Machine learning") to choose between its GenAI and model-training pages when its sidebar's GenAI / Model training
# switch is not in use. MLflow 3.17's UI has that switch on and follows it instead (GenAI until clicked, or
# ?workflowType=machine_learning in a link), so there the tag does not change which page opens.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class Store:
    """One tracking store and experiment, from ``settings``.

    ``client`` is made on first use: a command refused by a later check (a weights file that does not load,
    say) leaves no new SQLite database behind.
    """

    def __init__(self, settings: TrackingSettings) -> None:
        self.settings = settings

    @property
    def tracking_uri(self) -> str:
        return self.settings.tracking_uri

    @cached_property
    def client(self) -> MlflowClient:
        """The client every read and write goes through. For a SQLite store, made under the store's lock: a new
        database's tables are created when its first client opens it, and two processes doing that at once can
        collide."""
        database = sqlite_path(self.tracking_uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)  # checked writable before (check_store)
        with store_lock(self.tracking_uri):
            client = retry_on_race(lambda: MlflowClient(self.tracking_uri))
            retry_on_race(lambda: client.search_experiments(max_results=1))  # opens (and on first use creates) it
        return client

    def open_experiment(self) -> str:
        """The experiment's id, making the store and the experiment when new (what a sweep does first).

        Raises:
            ConfigError: the store cannot be reached or written, or the experiment was deleted.
        """
        return self._lookup(create=True)

    def experiment_id(self) -> str:
        """The id of the existing experiment (what the commands that read results need). Creates nothing.

        Raises:
            ConfigError: no store, an unreadable one, or no such (or a deleted) experiment.
        """
        return self._lookup(required=True)

    def find_experiment(self) -> str | None:
        """The experiment's id when the store and the experiment exist; None otherwise. Creates nothing.

        Raises:
            ConfigError: the store is there but cannot be read.
        """
        return self._lookup()

    def _lookup(self, create: bool = False, required: bool = False) -> str | None:
        settings, uri = self.settings, self.tracking_uri
        database = sqlite_path(uri)
        if database is not None:
            if create:
                try:
                    database.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(f"cannot create the MLflow store's folder {database.parent}: {exc.strerror}; "
                                      "fix tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI.") from None
            elif not database.is_file():
                if required:
                    require_store(settings)
                return None
            else:
                check_sqlite_file(database)
        check_server(uri, settings.experiment, write=create)
        try:
            client = self.client  # opened (a new database's tables made) under the lock, before this one is taken
            with store_lock(uri):
                experiment = retry_on_race(lambda: client.get_experiment_by_name(settings.experiment))
                if experiment is None and create:
                    experiment = self._create_experiment()
        except MlflowException as exc:
            doing = "use MLflow tracking store" if create else "read MLflow store"
            raise ConfigError(f"cannot {doing} {redact(uri)} ({exc.message.splitlines()[0]}); check "
                              "tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI.") from None
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            if not (create or required):
                return None
            raise ConfigError(f"experiment {settings.experiment!r} is deleted in {redact(uri)}; restore it in the "
                              "MLflow UI or pick another name with --experiment.")
        if experiment is None:
            if required:
                raise ConfigError(f"experiment {settings.experiment!r} has no runs in {redact(uri)}; run `sweep run` "
                                  "first or pick another with --experiment.")
            return None
        if create:
            self._mark_kind(experiment)
        return experiment.experiment_id

    def _create_experiment(self):
        settings = self.settings
        location = settings.artifact_root.resolve().as_uri() if settings.is_local else None
        try:
            experiment_id = self.client.create_experiment(settings.experiment, artifact_location=location,
                                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(settings.experiment)  # another process made it first
        return self.client.get_experiment(experiment_id)

    def _mark_kind(self, experiment) -> None:
        """Tag an experiment made by an older sweep (or by hand) as model training; a kind already set (in the
        UI's experiment-type selector, say) is kept."""
        if EXPERIMENT_KIND_TAG in experiment.tags:
            return
        try:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except MlflowException as exc:  # a read-only store or server: the sweep goes on, only the tag is missing
            print(f"Warning: could not tag MLflow experiment {experiment.name!r} as model training "
                  f"({exc.message.splitlines()[0]}); the MLflow UI may open it on its GenAI overview.")


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
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


def retry_on_race(call):
    """Run ``call``; when several processes create a new SQLite store at once, all but one can see its tables
    half-made (SQLAlchemy's OperationalError: a table exists, the database is locked): wait and try again."""
    import sqlalchemy
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

    for attempt in Retrying(retry=retry_if_exception_type(sqlalchemy.exc.OperationalError),
                            stop=stop_after_attempt(8), wait=wait_fixed(0.5), reraise=True):
        with attempt:
            return call()
