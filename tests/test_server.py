"""The door to a tracking server: a typo'd URI, an unreachable or silent server, a refused login, a user without
rights, another MLflow major version: each is one clear ``Error:`` line within seconds, and nothing is written.

A small HTTP server in a thread plays the tracking server, answering as MLflow's basic-auth app does (plain-text
401 and 403); tests/test_team_server.py runs the real one on PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest

from sweep.cli import main
from sweep.config import load_tracking
from sweep.errors import ConfigError
from sweep.server import check_server, check_uri, redact
from tests.helpers import free_port

USER, PASSWORD = "ana", "correct horse battery"


class FakeServer:
    """Answers like an MLflow server with the basic-auth app: ``users`` maps a user to (password, is_admin),
    ``permission`` is what every non-admin user holds on the one experiment, ``version`` its MLflow version."""

    def __init__(self, version: str = mlflow.__version__, users=None, permission: str = "EDIT",
                 health: tuple[int, str] = (200, "OK"), allowed_host: str | None = None) -> None:
        self.version, self.permission, self.health, self.allowed_host = version, permission, health, allowed_host
        self.users = {USER: (PASSWORD, False)} if users is None else users
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status: int, body, kind: str = "text/plain") -> None:
                data = (json.dumps(body) if kind == "application/json" else body).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def user(self) -> str | None:
                header = self.headers.get("Authorization", "")
                if not header.startswith("Basic "):
                    return None
                name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                known = fake.users.get(name)
                return name if known and known[0] == password else None

            def do_POST(self):
                fake.requests.append(("POST", self.path))
                self.answer(500, "a check must not write")

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/health":
                    return self.answer(*fake.health)
                if fake.allowed_host and self.headers.get("Host") != fake.allowed_host:
                    return self.answer(403, "Invalid Host header - possible DNS rebinding attack detected")
                if fake.users and self.user() is None:
                    return self.answer(401, "You are not authenticated. Please see https://www.mlflow.org/docs/"
                                            "latest/auth/index.html#authenticating-to-mlflow on how to authenticate.")
                name = self.user()
                admin = bool(name and fake.users[name][1])
                if url.path == "/version":
                    return self.answer(200, fake.version)
                if url.path == "/api/2.0/mlflow/experiments/get-by-name":
                    if query["experiment_name"] != "team":
                        return self.answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}, "application/json")
                    if not admin and fake.permission in ("NO_PERMISSIONS", "DENY"):
                        return self.answer(403, "Permission denied")
                    return self.answer(200, {"experiment": {"experiment_id": "7", "name": "team"}},
                                       "application/json")
                if url.path == "/api/2.0/mlflow/users/current":
                    return self.answer(200, {"user": {"id": 1, "username": name, "is_admin": admin},
                                             "is_basic_auth": True}, "application/json")
                if url.path == "/api/3.0/mlflow/users/permissions/get":
                    assert (query["resource_type"], query["resource_id"]) == ("experiment", "7")
                    return self.answer(200, {"allowed": fake.permission != "READ", "permission": fake.permission},
                                       "application/json")
                return self.answer(404, "not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fake_server():
    servers = []

    def start(**kwargs) -> FakeServer:
        servers.append(FakeServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture()
def login(monkeypatch, tmp_path):
    """Credentials the MLflow way; no ~/.mlflow/credentials of the machine's user leaks in."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def set_login(user: str | None, password: str | None) -> None:
        for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return set_login


def refusal(uri: str, experiment: str | None = "team", write: bool = True) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        check_server(uri, experiment, write=write)
    return str(caught.value), time.monotonic() - start


def test_a_server_that_lets_the_user_in_passes_without_writing(fake_server, login):
    server = fake_server()
    login(USER, PASSWORD)
    check_server(server.uri, "team", write=True)
    check_server(server.uri, "a-new-experiment", write=True)  # a new experiment: the user may create it
    assert server.requests and all(method == "GET" for method, _ in server.requests)


def test_a_missing_or_wrong_password_names_the_server_and_the_variables(fake_server, login):
    server = fake_server()
    login(None, None)
    message, seconds = refusal(server.uri)
    assert message == (f"the MLflow tracking server at {server.uri} asks for a login (HTTP 401); set "
                       "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN).")
    login(USER, "wrong password")
    message, seconds = refusal(server.uri)
    assert message.startswith(f"the MLflow tracking server at {server.uri} rejected the login of user 'ana' "
                              "(HTTP 401); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    assert "wrong password" not in message and seconds < 5


@pytest.mark.parametrize("permission, words", [
    ("NO_PERMISSIONS", "does not let user 'ana' read experiment 'team' (HTTP 403)"),
    ("READ", "lets user 'ana' only READ experiment 'team', and a sweep logs runs in it"),
])
def test_a_user_without_rights_on_the_experiment_is_told_what_to_ask_for(fake_server, login, permission, words):
    server = fake_server(permission=permission)
    login(USER, PASSWORD)
    message, _ = refusal(server.uri)
    assert words in message and "EDIT" in message
    if permission == "READ":
        check_server(server.uri, "team", write=False)  # reading (best, report) is allowed
        assert "grant_user_permission('ana', 'experiment', '7', 'EDIT')" in message


def test_an_admin_is_not_asked_for_grants(fake_server, login):
    server = fake_server(users={"root": ("admin password 1", True)}, permission="READ")
    login("root", "admin password 1")
    check_server(server.uri, "team", write=True)
    assert not any("permissions/get" in path for _, path in server.requests)


def test_another_mlflow_major_version_is_refused(fake_server, login):
    server = fake_server(version="2.22.1")
    login(USER, PASSWORD)
    message, _ = refusal(server.uri)
    assert f"runs MLflow 2.22.1, and this sweep MLflow {mlflow.__version__}" in message
    assert "pip install 'mlflow==2.22.1'" in message
    check_server(fake_server(version=mlflow.__version__.split(".")[0] + ".99.0").uri, "team")  # a minor: fine


def test_a_server_that_refuses_the_host_name_says_allowed_hosts(fake_server, login):
    server = fake_server(allowed_host="tracking.example:5000")
    login(USER, PASSWORD)
    message, _ = refusal(server.uri)
    host = server.uri.split("//")[1]
    assert f"refuses the host name {host} (HTTP 403, its --allowed-hosts); start it with --allowed-hosts" in message


def test_something_else_on_the_port_is_not_taken_for_a_tracking_server(fake_server, login):
    server = fake_server(health=(404, "<html>nginx</html>"))
    message, _ = refusal(server.uri)
    assert message.startswith(f"{server.uri} answered /health with HTTP 404, not as an MLflow tracking server")


def test_an_unreachable_server_is_refused_at_once(login):
    uri = f"http://127.0.0.1:{free_port()}"
    message, seconds = refusal(uri)
    assert message == (f"cannot reach the MLflow tracking server at {uri} (connection refused); start the "
                       "server, or fix MLFLOW_TRACKING_URI or tracking_uri in mlflow.yaml.")
    assert seconds < 3  # MLflow's own client would retry for minutes


@pytest.mark.slow  # waits out the 5 s probe
def test_a_server_that_never_answers_is_refused_after_the_probe_timeout(login):
    with socket.socket() as silent:  # the kernel accepts the connection; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        message, seconds = refusal(uri)
    assert "(no answer in 5 s)" in message and 4 < seconds < 15


@pytest.mark.parametrize("uri, words", [
    ("htp://tracking:5000", "unknown scheme 'htp'; did you mean http://?"),
    ("sqllite:///mlruns/mlflow.db", "unknown scheme 'sqllite'; did you mean sqlite://?"),
    ("http+psycopg://tracking:5000", "unknown scheme 'http+psycopg'"),
])
def test_a_typo_in_the_uris_scheme_is_refused_with_the_schemes_that_work(uri, words):
    with pytest.raises(ConfigError) as caught:
        check_uri(uri)
    assert words in str(caught.value) and "http:// or https://" in str(caught.value)
    for good in ("http://h:5000", "https://h", "sqlite:///x.db", "postgresql+psycopg://u:p@db/mlflow",
                 "databricks", "/abs/path", "C:\\mlruns"):
        check_uri(good)


def test_a_password_in_the_uri_is_refused_and_never_printed():
    with pytest.raises(ConfigError) as caught:
        load_tracking(environ={"MLFLOW_TRACKING_URI": "https://ana:s3cret-pass@tracking.example:443"})
    assert "s3cret-pass" not in str(caught.value) and "https://***@tracking.example:443" in str(caught.value)
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in str(caught.value)
    assert redact("postgresql://mlflow:pw@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact("http://h:5000") == "http://h:5000"


@pytest.mark.parametrize("command", [["run", "--family", "scratch", "--trials", "1"], ["best"], ["report"]])
def test_commands_stop_at_the_door_with_one_line_and_write_nothing(fake_server, login, runner, tmp_path,
                                                                     monkeypatch, tiny_data, command):
    server = fake_server()
    login(USER, "wrong password")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    extra = ["--data-dir", str(tiny_data), "--image-size", "32", "--epochs", "1"] if command[0] == "run" else []
    result = runner.invoke(main, [*command, *extra])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == (f"Error: the MLflow tracking server at {server.uri} rejected the login of user 'ana' "
                         "(HTTP 401); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                         "MLFLOW_TRACKING_TOKEN).")
    assert "Traceback" not in result.output and "wrong password" not in result.output
    assert not any(method == "POST" for method, _ in server.requests)  # no run, no experiment


def test_a_chief_on_every_interface_is_warned_about_and_one_address_is_not():
    from sweep.distributed import exposure_warning

    for host in ("0.0.0.0", "[::]", "::"):
        assert "has no authentication" in exposure_warning(host) and "SSH tunnel" in exposure_warning(host)
    for host in ("127.0.0.1", "10.0.0.5", "[::1]", "chief.internal"):
        assert exposure_warning(host) is None


@pytest.mark.slow  # waits out --chief-timeout
@pytest.mark.no_store
def test_a_worker_without_a_chief_says_so_and_writes_nothing(tracking_env, runner):
    from tests.conftest import runs_in

    port = free_port()
    start = time.monotonic()
    result = runner.invoke(main, ["worker", "--chief", f"127.0.0.1:{port}", "--sweep", "nope", "--chief-timeout",
                                  "3"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot reach the chief at 127.0.0.1:{port} within 3s; is `sweep chief` running there (or the SSH "
        "tunnel to it open)? --chief-timeout waits longer.")
    assert 2 < time.monotonic() - start < 15
    assert not (tracking_env / "mlruns").exists() and runs_in(tracking_env) == []


@pytest.mark.slow  # waits out two timeouts
def test_waiting_for_a_chief_or_a_sweep_says_so_every_few_seconds():
    from sweep.distributed import wait_for_chief, wait_for_sweep

    lines: list[str] = []
    with pytest.raises(Exception) as caught:
        wait_for_chief(f"127.0.0.1:{free_port()}", timeout=2.5, report=lines.append, every=1)
    assert "within 2s" in str(caught.value) or "within 3s" in str(caught.value)
    assert len(lines) >= 1 and lines[0].startswith("Waiting for the chief at 127.0.0.1:")
    lines.clear()
    with pytest.raises(Exception) as caught:
        wait_for_sweep(lambda: None, "team-1", timeout=2.5, report=lines.append, every=1)
    assert str(caught.value).startswith("no sweep named 'team-1' in this MLflow store and experiment after 2s")
    assert lines and lines[0].startswith("Waiting for sweep 'team-1' to appear in MLflow (")


@pytest.mark.no_store
def test_a_chief_on_a_taken_port_stops_before_writing_anything(tracking_env, runner, tiny_data):
    from tests.conftest import runs_in

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = runner.invoke(main, ["chief", "--family", "scratch", "--trials", "1", "--data-dir", str(tiny_data),
                                      "--image-size", "32", "--port", str(port)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port} (the port is in use); pick another --port, or a --host address "
        "of this machine.")
    assert not (tracking_env / "mlruns").exists() and runs_in(tracking_env) == []


def run_cli(runner, args):
    result = runner.invoke(main, args)
    return result.exit_code, result.output.strip().splitlines()[-1] if result.output.strip() else ""


@pytest.mark.no_store
def test_more_doors_each_get_one_line_and_leave_no_store(tracking_env, runner, tiny_data, monkeypatch):
    """Found by trying bad inputs as a new user would (docs/faults.md)."""
    data = ["--data-dir", str(tiny_data), "--image-size", "32", "--trials", "1", "--epochs", "1"]
    code, line = run_cli(runner, ["run", "--family", "scratch", "--weights", "/nowhere.h5", "--no-cache", *data])
    assert code == 2 and line == ("Error: --weights and --no-cache only apply to a family that loads pretrained "
                                  "weights (see `sweep families`); drop them for --family scratch.")
    code, line = run_cli(runner, ["worker", "--chief", "127.0.0.1:99999", "--sweep", "s"])
    assert code == 1 and "with a port from 1 to 65535" in line

    (tracking_env / "blocker").write_text("")
    (tracking_env / "mlflow.yaml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\ntuner_dir: blocker/kt\n")
    code, line = run_cli(runner, ["run", "--family", "scratch", *data])
    assert code == 1 and line == (f"Error: cannot create tuner_dir in mlflow.yaml {tracking_env}/blocker/kt: "
                                  f"{tracking_env}/blocker is a file; pick another path, or fix the permissions.")
    assert not (tracking_env / "mlruns").exists()

    (tracking_env / "mlflow.yaml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    (tracking_env / "mlruns").mkdir()
    (tracking_env / "mlruns" / "mlflow.db").write_text("not a database")
    for command in (["run", "--family", "scratch", *data], ["best"]):
        code, line = run_cli(runner, command)
        assert code == 1 and line == (f"Error: the MLflow store {tracking_env}/mlruns/mlflow.db is not a SQLite "
                                      "database; move it away, or point tracking_uri in mlflow.yaml (or "
                                      "MLFLOW_TRACKING_URI) at your store."), command

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite://mlflow.db")
    code, line = run_cli(runner, ["best"])
    assert code == 1 and "names a host ('mlflow.db'); a SQLite store is sqlite:///relative/path" in line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql+psycopg://u@127.0.0.1:{free_port()}/mlflow")
    started = time.monotonic()
    code, line = run_cli(runner, ["best"])
    assert code == 1 and line.startswith("Error: cannot reach the database at 127.0.0.1:") and "connection refused" in line
    assert time.monotonic() - started < 5
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    (tracking_env / "mlflow.yaml").unlink()
    (tracking_env / "mlflow.yaml").mkdir()
    code, line = run_cli(runner, ["best"])
    assert code == 1 and line == ("Error: config file mlflow.yaml is a folder, not a file; move it away or name the "
                                  "file with --config.")
