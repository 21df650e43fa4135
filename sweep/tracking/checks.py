"""Pre-flight checks of a tracking store: that a sweep could write to it, creating nothing."""

from __future__ import annotations

import os
from pathlib import Path

from sweep.config import TrackingSettings, folder_problem, sqlite_path
from sweep.errors import ConfigError
from sweep.server import check_server


def check_store(settings: TrackingSettings) -> None:
    """Check, creating nothing, that a sweep could write to the store: a local SQLite database and its folder
    writable (SQLite writes its journal beside the file), or a tracking server that lets this login log runs;
    and the Keras Tuner, feature cache and (local) artifact folders creatable.

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
    """Refuse a store file that is not a SQLite database (SQLAlchemy would raise a traceback).

    Raises:
        ConfigError: the file cannot be read, or is something else.
    """
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
