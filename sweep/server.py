"""The door to a tracking store: a tracking URI's form, and a quick check of a tracking server before a command
uses it.

MLflow's own client retries a failing request for minutes (seven retries with back-off, 120 s timeouts) and
then raises the server's plain-text answer as an exception; the check here asks the server a few cheap questions
with no retries and a short timeout, so an unreachable server, a login it refuses, a user it does not let in,
or an MLflow major version that is not ours each come back within seconds as one ``Error:`` line that names the
server and what to set, before any run exists. It goes through MLflow's own request code and credentials
(``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, ``~/.mlflow/credentials``, ``MLFLOW_TRACKING_TOKEN``,
the TLS variables), exactly as the sweep's later requests will.
"""

from __future__ import annotations

import difflib
from urllib.parse import urlsplit, urlunsplit

from sweep.errors import ConfigError

PROBE_TIMEOUT = 5  # seconds for each of the check's requests; none is retried
# The schemes MLflow stores answer to (databases take SQLAlchemy's "+driver" suffix, as postgresql+psycopg).
SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc", "uc")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
CREDENTIAL_VARIABLES = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
WHERE = "MLFLOW_TRACKING_URI or tracking_uri in mlflow.yaml"


def check_uri(uri: str) -> None:
    """Refuse a tracking URI MLflow has no store for (a typo'd scheme), and a server URI that carries a password.

    A local path without a scheme is MLflow's old file store, which MLflow 3 refuses with its own message.

    Raises:
        ConfigError: naming the URI and the fix.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if not scheme or len(scheme) == 1:  # a path, or a Windows drive letter
        return
    base = scheme.split("+", 1)[0]
    if base not in SCHEMES or ("+" in scheme and base not in DATABASE_SCHEMES):
        close = difflib.get_close_matches(base, SCHEMES, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}://? " if close else ""
        raise ConfigError(
            f"tracking URI {redact(uri)} has an unknown scheme {scheme!r}; {hint}use http:// or https:// for a "
            f"tracking server, or sqlite:///path for a local store ({WHERE})."
        )
    if base == "sqlite" and parts.netloc:
        raise ConfigError(
            f"tracking URI {redact(uri)} names a host ({parts.netloc!r}); a SQLite store is sqlite:///relative/path "
            f"or sqlite:////absolute/path, three slashes before the path ({WHERE})."
        )
    if base in ("http", "https") and parts.password is not None:
        raise ConfigError(
            f"tracking URI {redact(uri)} carries a password, which would be printed and logged with it; take "
            f"the user and password out of {WHERE} and set {CREDENTIAL_VARIABLES} instead."
        )


def redact(uri: str) -> str:
    """``uri`` with any ``user:password@`` replaced by ``***@``: safe to print."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_server(uri: str, experiment: str | None = None, write: bool = False) -> None:
    """Ask a tracking server, within seconds, whether this sweep can use it; nothing for a local store.

    In turn: it answers (``/health``); it lets this login in and runs our MLflow major version (``/version``,
    which MLflow's auth app guards); and, for a named ``experiment`` that exists, that this user may read it
    and, with ``write``, log runs in it.

    Raises:
        ConfigError: one line naming the server, what it said, and what to set.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme.split("+", 1)[0] in DATABASE_SCHEMES:
        _check_database(uri)
        return
    if scheme not in ("http", "https"):
        return
    import mlflow
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    server = f"the MLflow tracking server at {redact(uri)}"

    def get(endpoint: str, **params):
        from mlflow.utils.rest_utils import http_request

        return http_request(creds, endpoint, "GET", max_retries=0, timeout=PROBE_TIMEOUT, raise_on_status=False,
                            params=params or None)

    try:
        health = get("/health")
    except Exception as exc:  # noqa: BLE001 - requests' and urllib3's errors: refused, DNS, TLS, timeout
        raise ConfigError(f"cannot reach {server} ({_reason(exc)}); start the server, or fix {WHERE}.") from None
    if health.status_code != 200 or health.text.strip() != "OK":
        raise ConfigError(f"{redact(uri)} answered /health with HTTP {health.status_code}, not as an MLflow "
                          f"tracking server; check the URI's host, port and path ({WHERE}).")

    version = get("/version")
    if version.status_code == 401:
        if creds.username or creds.token:
            who = f"user {creds.username!r}" if creds.username else "MLFLOW_TRACKING_TOKEN"
            raise ConfigError(f"{server} rejected the login of {who} (HTTP 401); check {CREDENTIAL_VARIABLES}.")
        raise ConfigError(f"{server} asks for a login (HTTP 401); set {CREDENTIAL_VARIABLES}.")
    if version.status_code == 403 and "Host header" in version.text:
        host = urlsplit(uri).netloc.rsplit("@", 1)[-1]
        raise ConfigError(f"{server} refuses the host name {host} (HTTP 403, its --allowed-hosts); start it with "
                          f"--allowed-hosts '{host}', or use a name it allows.")
    if version.status_code != 200:
        raise ConfigError(f"{server} answered /version with HTTP {version.status_code} "
                          f"({version.text.strip()[:120]!r}); check {CREDENTIAL_VARIABLES} and the URI.")
    theirs = version.text.strip()
    if theirs.split(".", 1)[0] != mlflow.__version__.split(".", 1)[0]:
        raise ConfigError(f"{server} runs MLflow {theirs}, and this sweep MLflow {mlflow.__version__}; their "
                          "major versions must match: install the server's here "
                          f"(pip install 'mlflow=={theirs}') or upgrade the server.")
    if experiment is not None:
        _check_experiment(get, server, creds.username, experiment, write)


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _check_database(uri: str) -> None:
    """A database store's server answers on its port within seconds (SQLAlchemy would retry for minutes)."""
    import socket

    parts = urlsplit(uri)
    host = parts.hostname or "localhost"
    try:
        port = parts.port or DATABASE_PORTS[parts.scheme.split("+", 1)[0].lower()]
    except ValueError:
        raise ConfigError(f"tracking URI {redact(uri)} has a port that is not a number; fix {WHERE}.") from None
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the database at {host}:{port} ({_reason(exc)}); start it, or fix "
                          f"{WHERE}.") from None


def _check_experiment(get, server: str, username: str | None, experiment: str, write: bool) -> None:
    found = get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)
    if found.status_code == 404:  # a new experiment: any user who may log in may create it
        return
    who = f"user {username!r}" if username else "this login"
    if found.status_code == 403:
        raise ConfigError(f"{server} does not let {who} read experiment {experiment!r} (HTTP 403); ask its admin "
                          "to grant you EDIT on it, or pick another experiment with --experiment.")
    if found.status_code != 200 or not write or not username:
        return  # other answers: MLflow's own requests will say
    current = get("/api/2.0/mlflow/users/current")
    if current.status_code != 200 or current.json().get("user", {}).get("is_admin"):
        return  # no auth app, or an admin: nothing to check
    experiment_id = found.json()["experiment"]["experiment_id"]
    granted = get("/api/3.0/mlflow/users/permissions/get", username=username, resource_type="experiment",
                  resource_id=experiment_id)
    if granted.status_code == 200 and granted.json().get("permission") not in ("EDIT", "MANAGE"):
        permission = granted.json().get("permission", "none")
        raise ConfigError(
            f"{server} lets {who} only {permission} experiment {experiment!r}, and a sweep logs runs in it; ask "
            f"the server's admin to grant EDIT (the auth app's grant_user_permission({username!r}, 'experiment', "
            f"'{experiment_id}', 'EDIT')), or pick another experiment with --experiment."
        )


def _reason(exc: Exception) -> str:
    """The root of a connection failure, in a few words."""
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"), ("timed out", f"no answer in {PROBE_TIMEOUT} s"),
                           ("Name or service not known", "unknown host name"),
                           ("nodename nor servname", "unknown host name"),
                           ("Temporary failure in name resolution", "unknown host name"),
                           ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted: set "
                            "MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle"),
                           ("SSLError", "TLS failed")):
        if needle in text:
            return reason
    return text.splitlines()[0][:160] if text else type(exc).__name__

