"""Tracking settings: mlflow.yaml, environment overrides, clear errors for malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.config import load_tracking
from sweep.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlflow.yaml"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    config = write(tmp_path, "tracking_uri: sqlite:///store/db.sqlite\nartifact_root: arts\nexperiment: e1\n")
    monkeypatch.chdir("/")
    settings = load_tracking(config, environ={})
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/store/db.sqlite"
    assert not (tmp_path / "store").exists()  # reading settings creates nothing; a sweep creates the store
    assert settings.artifact_root == tmp_path / "arts"
    assert settings.tuner_dir == tmp_path / "mlruns" / "keras_tuner"
    assert settings.experiment == "e1"
    assert settings.is_local


def test_environment_overrides_the_file(tmp_path):
    config = write(tmp_path, "tracking_uri: sqlite:///a.db\nexperiment: from-file\n")
    settings = load_tracking(
        config, environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_EXPERIMENT_NAME": "from-env"}
    )
    assert settings.tracking_uri == "http://127.0.0.1:5000"
    assert settings.experiment == "from-env"
    assert not settings.is_local


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_tracking(None, environ={})
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert settings.experiment == "cats-vs-dogs"
    assert settings.source == "defaults"


@pytest.mark.parametrize(
    "text, message",
    [
        ("tracking_uri: [unclosed\n", r"is not valid YAML \(line"),
        ("- a\n- b\n", "must be a mapping"),
        ("tracking_url: sqlite:///x.db\n", "unknown key.*tracking_url"),
        ("experiment: ''\n", "experiment must be a non-empty string"),
        ("experiment: 3\n", "experiment must be a non-empty string"),
    ],
)
def test_malformed_files_raise_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_tracking(write(tmp_path, text), environ={})


def test_named_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tracking(tmp_path / "nope.yaml", environ={})


def test_sqlite_uri_options_are_kept_and_not_taken_for_the_file(tmp_path):
    from sweep.config import sqlite_path

    config = write(tmp_path, "tracking_uri: sqlite:///store/db.sqlite?timeout=30\n")
    settings = load_tracking(config, environ={})
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/store/db.sqlite?timeout=30"
    assert sqlite_path(settings.tracking_uri) == tmp_path / "store" / "db.sqlite"
    assert sqlite_path("http://host:5000") is None
