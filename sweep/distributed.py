"""Trials on several processes or machines, with Keras Tuner's own chief and workers.

The chief serves the oracle over gRPC (``KERASTUNER_TUNER_ID=chief``, ``KERASTUNER_ORACLE_IP``,
``KERASTUNER_ORACLE_PORT``) with one thread, as Keras Tuner's own chief does, so oracle calls never overlap;
it owns the sweep's MLflow run. Each worker reads the sweep's spec from that run, asks the chief for trials,
trains them and logs each as a run nested under the sweep's. Two known faults of Keras Tuner's chief
(issues #915, #990) are guarded here:

* a worker that dies keeps its trial "ongoing" and its id registered, so the stock chief waits forever.
  ``sweep run --workers N`` restarts a dead worker under the same tuner id, which makes the oracle hand it the
  same trial again (its interrupted MLflow run is marked KILLED); on separate machines, restart the worker
  with the same ``--tuner-id``.
* with ``--trial-timeout``, the chief fails a trial whose worker sent no heartbeat (one per epoch) for that
  long, so a worker lost for good cannot stall the sweep while a slow one that reports is left alone; once the
  search is over, the chief stops waiting for workers that vanished.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sweep.errors import SweepError

Reporter = Callable[[str], None]
TUNER_ENV = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SweepError(f"--chief {address!r} is not HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8000.")
    return host, int(port)


@dataclass
class LocalWorkers:
    """``sweep run --workers N``: worker processes on this machine, restarted under the same tuner id when
    they die (the oracle then hands each its trial again)."""

    count: int
    tracking_args: list[str]
    max_restarts: int = 3
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    def start(self, address: str, sweep_name: str, report: Reporter) -> None:
        self.command = [str(Path(sys.executable).with_name("sweep")), "worker", "--chief", address,
                        "--sweep", sweep_name, *self.tracking_args]
        for i in range(self.count):
            self._spawn(f"worker{i}")
        report(f"Started {self.count} worker(s) for sweep {sweep_name}.")

    def _spawn(self, tuner_id: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in TUNER_ENV}
        self.procs[tuner_id] = subprocess.Popen([*self.command, "--tuner-id", tuner_id], env=env)
        self.restarts.setdefault(tuner_id, 0)

    def check(self, report: Reporter) -> bool:
        """Restart workers that died; returns whether any worker is still there."""
        for tuner_id, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            self.procs.pop(tuner_id)
            if code == 0:  # the chief had no trial left for it
                continue
            if self.restarts[tuner_id] >= self.max_restarts:
                report(f"Worker {tuner_id} died {self.restarts[tuner_id] + 1} times (exit {code}); not restarting.")
                continue
            self.restarts[tuner_id] += 1
            report(f"Worker {tuner_id} died (exit {code}); restarting it to run its trial again.")
            self._spawn(tuner_id)
        return bool(self.procs)

    def stop(self, grace: float = 30.0) -> None:
        """Pass the stop on to the workers (SIGTERM: a worker that already has it from the terminal's Ctrl-C
        or the scheduler's process-group signal takes it once), so they close their MLflow runs; kill those
        that hang."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()


def exposure_warning(host: str) -> str | None:
    """The warning for a chief bound to every network interface; None for one address."""
    if host.strip("[]") not in ("0.0.0.0", "::", ""):
        return None
    return ("Warning: the chief listens on every network interface, and Keras Tuner's gRPC has no authentication: "
            "anyone who reaches this port can take trials and report results. Use an SSH tunnel or a private "
            "network's address (docs/distributed.md).")


@dataclass
class Chief:
    """Serve the sweep's oracle on ``host:port`` until the search is over (optionally with local workers)."""

    host: str
    port: int
    trial_timeout: float | None = None
    trial_retries: int = 1  # runs again of an expired trial's values (sweep.oracles.SweepOracle)
    worker_grace: float = 30.0
    status_every: float = 30.0  # seconds between the lines that say what a waiting chief waits for
    workers: LocalWorkers | None = None

    def configure_environment(self) -> None:
        os.environ.update(KERASTUNER_TUNER_ID="chief", KERASTUNER_ORACLE_IP=self.host,
                          KERASTUNER_ORACLE_PORT=str(self.port))

    @contextlib.contextmanager
    def environment(self):
        """Keras Tuner's chief variables for the sweep only: a later sweep in the same process (the Python API, a
        test) must not find itself the chief of a sweep that is over, and wait for workers for ever."""
        names = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")
        saved = {name: os.environ.get(name) for name in names}
        self.configure_environment()
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def check_address(self) -> None:
        """Refuse an address the chief could not listen on, before the sweep's run or folders exist.

        Raises:
            SweepError: the port is taken, or the host is not this machine's.
        """
        family = socket.AF_INET6 if ":" in self.host.strip("[]") else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((self.host.strip("[]"), self.port))
            except OSError as exc:
                reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise SweepError(f"cannot listen on {self.host}:{self.port} ({reason}); pick another --port, or a "
                                 "--host address of this machine.") from None

    def serve(self, oracle, report: Reporter, sweep_name: str) -> None:
        """Serve until the oracle stops handing out trials and every worker has left (or vanished).

        Raises:
            SweepError: the address cannot be bound.
            ConsecutiveFailures: too many trials failed in a row (the oracle keeps it; raised here).
        """
        from sweep import compat

        address = f"{self.host}:{self.port}"
        server, search_over = compat.serve_oracle(oracle, address)  # one thread: oracle calls never overlap
        if server is None:
            raise SweepError(f"cannot listen on {address}; pick another --port or --host.")
        report(f"Chief serving the oracle on {address}; start workers with "
               f"`sweep worker --chief {address} --sweep {sweep_name}`")
        warning = exposure_warning(self.host)
        if warning:
            report(warning)
        if self.workers is not None:
            self.workers.start(address, sweep_name, report)
        stopped_since = None
        said = started = time.monotonic()
        try:
            while True:
                time.sleep(1)
                if time.monotonic() - said >= self.status_every and not search_over():
                    line = self.waiting_line(oracle, address, sweep_name, time.monotonic() - started)
                    if line:
                        report(line)
                    said = time.monotonic()
                if oracle.failure is not None:
                    raise oracle.failure  # run_sweep turns it into one clear error
                if self.trial_timeout:
                    for tuner_id, trial_id, again in oracle.expire_silent_trials(self.trial_timeout):
                        then = ("its hyperparameters run again as a new trial" if again else
                                "not run again (its retries are used up)")
                        report(f"Trial {int(trial_id) + 1} of worker {tuner_id} sent no heartbeat for "
                               f"{self.trial_timeout:.0f}s; marked FAILED, {then}.")
                ongoing, registered = oracle.activity()
                if self.workers is not None and not self.workers.check(report) and not search_over():
                    raise SweepError("every worker died; see their output above. Fix the cause, then continue "
                                     f"with `sweep run --family FAMILY --resume --sweep {sweep_name}`.")
                if search_over() and ongoing == 0:
                    stopped_since = stopped_since or time.monotonic()
                    # Workers deregister when told to stop; one that died never will.
                    if registered == 0 or time.monotonic() - stopped_since > self.worker_grace:
                        break
        finally:
            if self.workers is not None:
                self.workers.stop()
            server.stop(grace=2)


    def waiting_line(self, oracle, address: str, sweep_name: str, waited: float) -> str | None:
        """What the chief is waiting for, when something is amiss: no worker yet, or a trial whose worker has
        been silent for ``status_every`` seconds or more; None while every trial reports."""
        ongoing, registered = oracle.activity()
        if registered == 0:
            return (f"Chief waiting: no worker has joined in {waited:.0f}s; start one with "
                    f"`sweep worker --chief {address} --sweep {sweep_name}`.")
        silent = [item for item in oracle.silences() if item[2] >= self.status_every]
        if not silent:
            return None
        tuner_id, trial_id, seconds = silent[0]
        more = f" (and {len(silent) - 1} more)" if len(silent) > 1 else ""
        then = (f"--trial-timeout fails it after {self.trial_timeout:.0f}s" if self.trial_timeout else
                "without --trial-timeout the chief waits for it; restart a dead worker with the same --tuner-id")
        return (f"Chief waiting: worker {tuner_id} sent no heartbeat for {seconds:.0f}s (trial {int(trial_id) + 1})"
                f"{more}; {then}.")


def worker_environment(host: str, port: int, tuner_id: str) -> None:
    os.environ.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=str(port))


def wait_for_sweep(find, name: str, timeout: float = 30.0, report: Reporter = print, every: float = 10.0):
    """Poll ``find()`` until the sweep's MLflow run is there (the chief creates it before it serves, so a
    reachable chief's run should already be there), with a line every ``every`` seconds."""
    started = time.monotonic()
    said = started
    while True:
        run = find()
        if run is not None:
            return run
        now = time.monotonic()
        if now - started > timeout:
            raise SweepError(f"no sweep named {name!r} in this MLflow store and experiment after {timeout:.0f}s; "
                             "check --sweep against the worker command the chief printed, and that both use the "
                             "same MLFLOW_TRACKING_URI and --experiment.")
        if now - said >= every:
            report(f"Waiting for sweep {name!r} to appear in MLflow ({now - started:.0f}s of {timeout:.0f}s) ...")
            said = now
        time.sleep(1)


def wait_for_chief(address: str, timeout: float, report: Reporter = print, every: float = 10.0) -> None:
    """Wait until the chief at ``address`` accepts a connection, with a line every ``every`` seconds.

    Raises:
        SweepError: nothing answered within ``timeout`` seconds.
    """
    import grpc

    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        ready = grpc.channel_ready_future(channel)
        while True:
            left = timeout - (time.monotonic() - started)
            try:
                ready.result(timeout=max(0.0, min(every, left)))
                return
            except grpc.FutureTimeoutError:
                if time.monotonic() - started >= timeout:
                    ready.cancel()
                    raise SweepError(
                        f"cannot reach the chief at {address} within {timeout:.0f}s; is `sweep chief` running "
                        "there (or the SSH tunnel to it open)? --chief-timeout waits longer.") from None
                report(f"Waiting for the chief at {address} ({time.monotonic() - started:.0f}s of "
                       f"{timeout:.0f}s) ...")


def run_worker(tracking_settings, chief_address: str, sweep_name: str, tuner_id: str, report: Reporter,
               verbose: int = 0, chief_timeout: float = 60.0) -> int:
    """``sweep worker``: run the chief's trials until it has none left; returns how many this worker ran.

    The sweep's spec (family, data, epochs, ...) is read from its MLflow run, so a worker needs only the
    chief's address, the sweep's name and the tracking store.
    """
    from sweep import tracking
    from sweep.spec import SweepSpec
    from sweep.study import build_tuner, prepare

    host, port = parse_address(chief_address)
    wait_for_chief(f"{host}:{port}", chief_timeout, report)  # before anything is written
    store = tracking.Store(tracking_settings)
    experiment_id = store.open_experiment()
    client = store.client
    run = wait_for_sweep(lambda: tracking.find_sweep(client, experiment_id, None, sweep_name), sweep_name,
                         report=report)
    spec = SweepSpec.from_params(run.data.params)
    prepared = prepare(spec, tracking_settings, report)
    for child in tracking.child_runs(client, experiment_id, run.info.run_id):  # this worker's previous life
        if child.info.status == "RUNNING" and child.data.tags.get("tuner_id") == tuner_id:
            tracking.mark_killed(client, child.info.run_id, f"worker {tuner_id} died; the chief hands its trial out "
                                 "again")
            report(f"Marked run {child.info.run_name} of the dead worker {tuner_id} as KILLED.")
    worker_environment(host, port, tuner_id)
    # overwrite=False: the project folder is the chief's (a shared file system, or this machine).
    tuner, _ = build_tuner(spec, prepared.splits, store, prepared.weights_path, sweep_name,
                           overwrite=False, report=report, verbose=verbose)
    tuner.experiment_id, tuner.parent_run_id = experiment_id, run.info.run_id
    report(f"Worker {tuner_id} joined sweep {sweep_name} at {host}:{port}.")
    import grpc

    from sweep import compat

    compat.bound_chief_calls(chief_timeout)
    try:
        tuner.search(verbose=0)
    except grpc.RpcError as exc:  # the chief went away, or stopped answering
        if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise
        raise SweepError(f"lost the chief at {host}:{port} (no answer for {chief_timeout:.0f}s; its trial runs here "
                         f"are closed). If the chief is gone, continue the sweep with `sweep run --family "
                         f"{spec.family} --resume --sweep {sweep_name}`; if it comes back, restart this worker with "
                         f"--tuner-id {tuner_id}.") from None
    return len(tuner.records)
