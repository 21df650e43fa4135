"""Trials on several processes or machines, with Keras Tuner's own chief and workers.

The chief serves the oracle over gRPC (``KERASTUNER_TUNER_ID=chief``, ``KERASTUNER_ORACLE_IP``,
``KERASTUNER_ORACLE_PORT``) and owns the sweep's MLflow run; each worker asks it for trials, trains them and
logs each as a run nested under that sweep run. Two known faults of Keras Tuner's chief (issues #915, #990)
are guarded here:

* a worker that dies keeps its trial "ongoing" and its id registered, so the stock chief waits forever.
  ``sweep run --workers N`` restarts a dead worker under the same tuner id, which makes the oracle hand it the
  same trial again (its interrupted MLflow run is marked KILLED); on separate machines, restart the worker
  with the same ``--tuner-id``.
* with ``--trial-timeout``, the chief fails a trial that has been ongoing longer than that, so a worker lost
  for good cannot stall the sweep; once the search is over, the chief stops waiting for workers that vanished.
"""

from __future__ import annotations

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
    if not host or not port.isdigit():
        raise SweepError(f"--chief {address!r} is not HOST:PORT, e.g. 127.0.0.1:8000.")
    return host, int(port)


@dataclass
class Chief:
    """Serve the sweep's oracle on ``host:port`` until the search is over."""

    host: str
    port: int
    trial_timeout: float | None = None
    worker_grace: float = 30.0
    _first_seen: dict[str, float] = field(default_factory=dict)

    def configure_environment(self) -> None:
        os.environ.update(KERASTUNER_TUNER_ID="chief", KERASTUNER_ORACLE_IP=self.host,
                          KERASTUNER_ORACLE_PORT=str(self.port))

    def serve(self, oracle, report: Reporter, sweep_name: str) -> None:
        from concurrent import futures

        import grpc
        from keras_tuner.src import protos
        from keras_tuner.src.distribute.oracle_chief import OracleServicer

        clock = self._first_seen

        class Servicer(OracleServicer):
            """Keras Tuner's servicer, except that the oracle's "too many failures in a row" error, raised
            inside ``end_trial`` in a gRPC thread, stops the chief instead of crashing each worker."""

            failure: RuntimeError | None = None

            def CreateTrial(self, request, context):  # noqa: N802 (gRPC's name)
                response = super().CreateTrial(request, context)
                # A trial's timeout clock starts when a worker takes it, again when a restarted worker
                # takes it back.
                clock[response.trial.trial_id] = time.monotonic()
                return response

            def EndTrial(self, request, context):  # noqa: N802 (gRPC's name)
                try:
                    return super().EndTrial(request, context)
                except RuntimeError as exc:
                    self.failure = exc
                    return protos.get_service().EndTrialResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        servicer = Servicer(oracle)
        protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
        try:
            bound = server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError:  # grpcio raises where older releases returned 0
            bound = 0
        if not bound:
            raise SweepError(f"cannot listen on {self.host}:{self.port}; pick another --port or --host.")
        server.start()
        report(f"Chief serving the oracle on {self.host}:{self.port}; start workers with "
               f"`sweep worker --chief {self.host}:{self.port} --sweep {sweep_name}`")
        stopped_since = None
        try:
            while True:
                time.sleep(1)
                if servicer.failure is not None:
                    raise servicer.failure  # run_sweep turns it into one clear error
                self._expire(oracle, report)
                with _oracle_lock(oracle):
                    ongoing = len(oracle.ongoing_trials)
                    workers = len(oracle.tuner_ids)
                if servicer.stop_triggered and ongoing == 0:
                    stopped_since = stopped_since or time.monotonic()
                    # Workers deregister when told to stop; one that died never will.
                    if workers == 0 or time.monotonic() - stopped_since > self.worker_grace:
                        break
        finally:
            server.stop(grace=2)

    def _expire(self, oracle, report: Reporter) -> None:
        if not self.trial_timeout:
            return
        from keras_tuner.src.engine import trial as trial_module

        now = time.monotonic()
        with _oracle_lock(oracle):
            ongoing = list(oracle.ongoing_trials.items())
        for tuner_id, trial in ongoing:
            started = self._first_seen.setdefault(trial.trial_id, now)
            if now - started > self.trial_timeout:
                trial.status = trial_module.TrialStatus.FAILED
                trial.message = f"worker {tuner_id} gave no result within {self.trial_timeout:.0f}s"
                oracle.end_trial(trial)
                report(f"Trial {trial.trial_id} of worker {tuner_id} timed out; marked FAILED.")


class _oracle_lock:
    """Hold the oracle's own lock (Keras Tuner's ``synchronized``) while reading its state."""

    def __init__(self, oracle) -> None:
        from keras_tuner.src.engine import oracle as oracle_module

        self.lock = oracle_module.LOCKS[oracle]

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc) -> None:
        self.lock.release()


def worker_environment(host: str, port: int, tuner_id: str) -> None:
    os.environ.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=str(port))


def _sweep_bin() -> str:
    return str(Path(sys.executable).with_name("sweep"))


def launch_local(run_args: list[str], workers: int, sweep_name: str, report: Reporter,
                 max_restarts: int = 3, poll: float = 1.0) -> int:
    """``sweep run --workers N``: a chief and N workers on this machine, restarting workers that die.

    Args:
        run_args: the ``sweep chief`` options (family, trials, data, tracking) as given to ``sweep run``.
        workers: how many worker processes.
        sweep_name: the sweep's name, shared by the chief and the workers.
        report: receives progress lines.

    Returns:
        The chief's exit code.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in TUNER_ENV}
    chief = subprocess.Popen([_sweep_bin(), "chief", *run_args, "--sweep", sweep_name, "--port", str(port)], env=env)
    procs: dict[str, subprocess.Popen] = {}
    restarts = {f"worker{i}": 0 for i in range(workers)}

    def start(tuner_id: str) -> None:
        procs[tuner_id] = subprocess.Popen(
            [_sweep_bin(), "worker", "--chief", f"127.0.0.1:{port}", "--sweep", sweep_name, "--tuner-id", tuner_id,
             *_tracking_args(run_args)], env=env)

    for tuner_id in restarts:
        start(tuner_id)
    report(f"Started a chief on 127.0.0.1:{port} and {workers} worker(s) for sweep {sweep_name}.")
    try:
        while chief.poll() is None:
            time.sleep(poll)
            for tuner_id, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                if code == 0:  # the chief had no trial left for it
                    procs.pop(tuner_id)
                    continue
                if restarts[tuner_id] >= max_restarts:
                    report(f"Worker {tuner_id} died {restarts[tuner_id] + 1} times (exit {code}); not restarting.")
                    procs.pop(tuner_id)
                    continue
                restarts[tuner_id] += 1
                report(f"Worker {tuner_id} died (exit {code}); restarting it to run its trial again.")
                start(tuner_id)
            if not procs and chief.poll() is None:
                time.sleep(5)  # the chief finishes on its own once the search is over
                if chief.poll() is None:
                    report("No worker left; stopping the chief (its sweep run ends as KILLED).")
                    _stop(chief)
    except KeyboardInterrupt:
        _stop(chief)
        raise
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return chief.wait()


def _stop(proc: subprocess.Popen) -> None:
    """Interrupt like Ctrl-C, so the process closes its MLflow runs; kill it if it does not end."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _tracking_args(run_args: list[str]) -> list[str]:
    """The options a worker needs to find the sweep: experiment and config."""
    picked = []
    for i, arg in enumerate(run_args):
        if arg in ("--experiment", "--config") and i + 1 < len(run_args):
            picked += [arg, run_args[i + 1]]
    return picked


def wait_for_sweep(find, name: str, timeout: float = 180.0, report: Reporter = print):
    """Poll ``find()`` until the chief has created the sweep's MLflow run."""
    deadline = time.monotonic() + timeout
    while True:
        run = find()
        if run is not None:
            return run
        if time.monotonic() > deadline:
            raise SweepError(f"no sweep named {name!r} appeared within {timeout:.0f}s; is the chief running "
                             "against the same MLflow store and experiment?")
        time.sleep(2)




def run_worker(tracking_settings, chief_address: str, sweep_name: str, tuner_id: str, report: Reporter) -> int:
    """``sweep worker``: run the chief's trials until it has none left; returns how many this worker ran.

    The sweep's settings (family, data, epochs, ...) are read from its MLflow run, so a worker needs only the
    chief's address, the sweep's name and the tracking store.
    """
    from sweep import tracking
    from sweep.config import SweepSettings
    from sweep.study import build_tuner, prepare, settings_from_run

    host, port = parse_address(chief_address)
    experiment_id = tracking.use_experiment(tracking_settings)
    run = wait_for_sweep(lambda: tracking.find_sweep(experiment_id, None, sweep_name), sweep_name, report=report)
    settings = settings_from_run(run, SweepSettings(family=run.data.params["family"], verbose=0))
    prepared = prepare(settings, tracking_settings, settings.family == "transfer", report)
    for child in tracking.child_runs(experiment_id, run.info.run_id):  # this worker's previous life
        if child.info.status == "RUNNING" and child.data.tags.get("tuner_id") == tuner_id:
            tracking.mark_killed(child.info.run_id, f"worker {tuner_id} died; its trial is run again")
            report(f"Marked run {child.info.run_name} of the dead worker {tuner_id} as KILLED.")
    worker_environment(host, port, tuner_id)
    # overwrite=False: the project folder is the chief's (a shared file system, or this machine).
    tuner, _, _ = build_tuner(settings, prepared.splits, tracking_settings, prepared.weights_path, sweep_name,
                              overwrite=False, report=report)
    tuner.experiment_id, tuner.parent_run_id = experiment_id, run.info.run_id
    report(f"Worker {tuner_id} joined sweep {sweep_name} at {host}:{port}.")
    tuner.search(verbose=0)
    return len(tuner.records)
