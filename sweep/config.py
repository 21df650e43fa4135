"""Tracking settings: ``mlflow.yaml`` and environment overrides, as a frozen dataclass (a sweep's own
settings are ``sweep.spec.SweepSpec``).

Precedence for tracking settings: environment (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``) over
``mlflow.yaml`` over built-in defaults. Relative paths in ``mlflow.yaml`` are resolved against the file's folder,
so a sweep logs to the same store whatever the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from sweep.errors import ConfigError
from sweep.server import check_uri

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"
DEFAULT_EXPERIMENT = "cats-vs-dogs"
CONFIG_FILE = "mlflow.yaml"
DEFAULT_TUNER_DIR = "mlruns/keras_tuner"
DEFAULT_CACHE_DIR = "mlruns/feature_cache"
DEFAULT_REGISTERED_MODEL = "sweep-best"
KNOWN_KEYS = {"tracking_uri", "artifact_root", "experiment", "tuner_dir", "cache_dir", "registered_model"}


@dataclass(frozen=True)
class TrackingSettings:
    """Where runs and artifacts go."""

    tracking_uri: str
    artifact_root: Path
    experiment: str
    tuner_dir: Path
    cache_dir: Path
    registered_model: str = DEFAULT_REGISTERED_MODEL
    source: str = "defaults"

    @property
    def is_local(self) -> bool:
        """True when runs are stored on this machine (SQLite or a file store), not on a tracking server."""
        return not self.tracking_uri.startswith(("http://", "https://", "databricks"))


def keras_cache_dir() -> str | None:
    """``$KERAS_HOME`` as it is now (Keras reads it only once, at import); None means Keras' default."""
    return os.environ.get("KERAS_HOME") or None


SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    return Path(uri[len(SQLITE_PREFIX):].split("?", 1)[0]) if uri.startswith(SQLITE_PREFIX) else None


def require_store(settings: TrackingSettings) -> None:
    """Refuse a local SQLite store that does not exist (a typo in the path), rather than create an empty one.

    Raises:
        ConfigError: the database file is not there.
    """
    database = sqlite_path(settings.tracking_uri)
    if database is not None and not database.is_file():
        raise ConfigError(
            f"no MLflow store at {database}; run `sweep run` first, or point tracking_uri in mlflow.yaml (or "
            "MLFLOW_TRACKING_URI) at your store."
        )


def _resolve_sqlite(uri: str, base: Path) -> str:
    """Make a relative ``sqlite:///path`` absolute against ``base``. Nothing is created here: a sweep creates
    the store when it first logs, and the commands that only read refuse a store that is not there."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    return SQLITE_PREFIX + str(base / uri[len(SQLITE_PREFIX):])  # any ?options stay


def load_tracking(config_path: Path | None = None, environ: dict[str, str] | None = None) -> TrackingSettings:
    """Read tracking settings.

    Args:
        config_path: an explicit ``mlflow.yaml``; by default ``./mlflow.yaml`` when it exists.
        environ: the environment to read overrides from (``os.environ`` by default).

    Raises:
        ConfigError: the file is missing (when named), not YAML, not a mapping, or has unknown or empty keys.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    base = Path.cwd()
    source = "defaults"
    if config_path is None and Path(CONFIG_FILE).exists():
        config_path = Path(CONFIG_FILE)
    if config_path is not None:
        config_path = Path(config_path)
        if config_path.is_dir():
            raise ConfigError(f"config file {config_path} is a folder, not a file; move it away or name the file "
                              "with --config.")
        if not config_path.is_file():
            raise ConfigError(f"config file {config_path} does not exist; create it or drop --config.")
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" (line {where.line + 1})" if where else ""
            raise ConfigError(f"{config_path} is not valid YAML{line}: fix the syntax or delete the file.") from None
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{config_path} must be a mapping of the keys "
                f"{', '.join(sorted(KNOWN_KEYS))}, "
                f"got a {type(loaded).__name__}."
            )
        unknown = sorted(set(map(str, loaded)) - KNOWN_KEYS)
        if unknown:
            raise ConfigError(
                f"{config_path} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(KNOWN_KEYS))}."
            )
        for key, value in loaded.items():
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{config_path}: {key} must be a non-empty string, got {value!r}.")
            values[key] = value.strip()
        base = config_path.resolve().parent
        source = str(config_path)

    tracking_uri = environ.get("MLFLOW_TRACKING_URI") or values.get("tracking_uri", DEFAULT_TRACKING_URI)
    check_uri(tracking_uri)
    experiment = environ.get("MLFLOW_EXPERIMENT_NAME") or values.get("experiment", DEFAULT_EXPERIMENT)
    artifact_root = base / values.get("artifact_root", DEFAULT_ARTIFACT_ROOT)  # an absolute path stays as is
    tuner_dir, cache_dir = (base / values.get(key, default) for key, default in
                            (("tuner_dir", DEFAULT_TUNER_DIR), ("cache_dir", DEFAULT_CACHE_DIR)))
    return TrackingSettings(
        tracking_uri=_resolve_sqlite(tracking_uri, base),
        tuner_dir=tuner_dir,
        cache_dir=cache_dir,
        registered_model=values.get("registered_model", DEFAULT_REGISTERED_MODEL),
        artifact_root=artifact_root,
        experiment=experiment,
        source=source,
    )


def folder_problem(folder: Path) -> tuple[Path, str] | None:
    """Why ``folder`` could not be created (or written) where it is, creating nothing: None when it can, else the
    nearest path that exists at or above it and ``"file"`` (a file in the way), ``"read-only"``, or
    ``"unreachable (REASON)"`` (a parent that cannot be searched)."""
    probe = Path(folder).absolute()
    try:
        while not probe.exists():
            probe = probe.parent
    except OSError as exc:
        return probe, f"unreachable ({exc.strerror})"
    if not probe.is_dir():
        return probe, "file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return probe, "read-only"
    return None

