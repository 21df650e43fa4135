"""A team's tracking server for real: PostgreSQL from Debian's package on 127.0.0.1 with its own data folder,
`mlflow server --app-name basic-auth` on it, and a two-worker sweep logging as a user with a password.

Checks: every trial logged once under one parent, the registry export, a wrong password and a user without
EDIT stopped at the door, and the password nowhere in what the sweep wrote (params, tags, artifacts, its
output, its files).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import free_port, stop, wait_http

pytestmark = pytest.mark.slow

SWEEP_BIN = str(Path(sys.executable).with_name("sweep"))
MLFLOW_BIN = str(Path(sys.executable).with_name("mlflow"))
ADMIN_PASSWORD = "admin-pass-for-tests-42"
SWEEPER, SWEEPER_PASSWORD = "sweeper", "s3cret-sweeper-pass-x9"
VIEWER, VIEWER_PASSWORD = "viewer", "viewer-pass-for-tests-7"
DB_PASSWORD = "db-pass-for-tests-11"


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with databases mlflow and mlflow_auth (user mlflow, a password)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[team]'")
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own system user runs it
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    root.chmod(0o755)
    port = free_port()
    (root / "pw").write_text(DB_PASSWORD)
    if as_postgres:
        shutil.chown(root / "pw", "postgres")
    run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "mlflow", f"--pwfile={root / 'pw'}",
        "--auth=scram-sha-256")
    run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
        f"-h 127.0.0.1 -p {port} -k {root}", "start")
    try:
        import psycopg

        with psycopg.connect(f"postgresql://mlflow:{DB_PASSWORD}@127.0.0.1:{port}/postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")
            db.execute("CREATE DATABASE mlflow_auth")
        yield f"postgresql+psycopg://mlflow:{DB_PASSWORD}@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """`mlflow server` with basic auth on PostgreSQL; users sweeper (logs sweeps) and viewer (READ, the default)."""
    pytest.importorskip("flask_wtf", reason="MLflow's auth app is not installed: pip install -e '.[team]'")
    home = tmp_path_factory.mktemp("team-server")
    (home / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {postgres}/mlflow_auth\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(home / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key-0123"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    server = subprocess.Popen(
        [MLFLOW_BIN, "server", "--app-name", "basic-auth", "--backend-store-uri", f"{postgres}/mlflow",
         "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", timeout=120, proc=server)
        for user, password in ((SWEEPER, SWEEPER_PASSWORD), (VIEWER, VIEWER_PASSWORD)):
            made = requests.post(f"{uri}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                                 auth=("admin", ADMIN_PASSWORD), timeout=30)
            assert made.status_code == 200, made.text
        yield uri, home / "artifacts"
    finally:
        stop(server)


def sweep(args, cwd, uri, user=SWEEPER, password=SWEEPER_PASSWORD, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "team",
           "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password, "HOME": str(cwd)}
    return subprocess.run([SWEEP_BIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def client_as(uri: str, user: str, password: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=uri)


def test_a_two_worker_sweep_on_postgresql_behind_basic_auth(team_server, tiny_data, tmp_path, monkeypatch):
    uri, artifacts = team_server
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    result = sweep(["run", "--family", "scratch", "--trials", "4", "--epochs", "2", "--data-dir", str(tiny_data),
                    "--batch-size", "4", "--image-size", "32", "--workers", "2", "--sweep", "team-1", "-q"], work, uri)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Started 2 worker(s) for sweep team-1." in result.stdout

    client = client_as(uri, SWEEPER, SWEEPER_PASSWORD, monkeypatch)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [1, 2, 3, 4]  # each trial once
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["tuner_id"] for c in children} <= {"worker0", "worker1"}

    exported = sweep(["best", "--export", str(work / "export"), "--format", "keras"], work, uri)
    assert exported.returncode == 0, (exported.stdout + exported.stderr)[-4000:]
    version = client.get_model_version_by_alias("sweep-best", "champion")
    assert version.run_id == parents[0].data.tags["best_run_id"]
    assert "registered as models:/sweep-best@champion" in exported.stdout and version.version == "1"
    assert (work / "export" / "model.keras").is_file()
    # a user with the default READ may read what the team logged
    listed = sweep(["best"], work, uri, user=VIEWER, password=VIEWER_PASSWORD)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert parents[0].data.tags["best_run_id"] in listed.stdout or "best trial" in listed.stdout

    # the passwords are nowhere in what the sweep wrote: params, tags, artifacts, its output and its files
    secrets = (SWEEPER_PASSWORD, ADMIN_PASSWORD, DB_PASSWORD)
    for run in runs:
        written = " ".join([*run.data.params.values(), *run.data.tags.values(), *run.data.params, *run.data.tags])
        assert not any(secret in written for secret in secrets), run.info.run_id
    files = [p for p in [*artifacts.rglob("*"), *work.rglob("*")] if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in secrets), path
    assert not any(secret in output + exported.stdout + exported.stderr for secret in secrets)
    assert time.monotonic() - started < 400


def test_a_wrong_password_and_a_reader_stop_at_the_door(team_server, tiny_data, tmp_path, monkeypatch):
    uri, _ = team_server
    client = client_as(uri, "admin", ADMIN_PASSWORD, monkeypatch)
    experiment = client.get_experiment_by_name("team") or client.get_experiment(client.create_experiment("team"))
    before = len(client.search_runs([experiment.experiment_id], max_results=1000))
    args = ["run", "--family", "scratch", "--trials", "1", "--epochs", "1", "--data-dir", str(tiny_data),
            "--image-size", "32"]

    start = time.monotonic()
    wrong = sweep(args, tmp_path, uri, password="not-the-password")
    assert wrong.returncode == 1 and time.monotonic() - start < 60
    assert [line for line in (wrong.stdout + wrong.stderr).splitlines() if line.startswith("Error:")] == [
        f"Error: the MLflow tracking server at {uri} rejected the login of user 'sweeper' (HTTP 401); check "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)."]
    assert "Traceback" not in wrong.stdout + wrong.stderr and "not-the-password" not in wrong.stdout + wrong.stderr

    reader = sweep(args, tmp_path, uri, user=VIEWER, password=VIEWER_PASSWORD)
    assert reader.returncode == 1
    assert (f"lets user 'viewer' only READ experiment 'team', and a sweep logs runs in it; ask the server's admin "
            f"to grant EDIT (the auth app's grant_user_permission('viewer', 'experiment', "
            f"'{experiment.experiment_id}', 'EDIT'))") in reader.stderr
    assert "Traceback" not in reader.stdout + reader.stderr
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == before  # nothing half-made
