"""Distributed trials on Keras Tuner's chief and workers (loopback only), stopping them, and concurrent sweeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import runs_in
from tests.helpers import run_states, store_rows

SWEEP_BIN = str(Path(sys.executable).with_name("sweep"))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

pytestmark = pytest.mark.slow


def tiny(data_dir, trials, epochs):
    return ["--family", "scratch", "--trials", str(trials), "--epochs", str(epochs), "--data-dir", str(data_dir),
            "--batch-size", "4", "--image-size", "32", "-q"]


def finished_trials(tracking_env):
    children = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    return children, [c for c in children if c.info.status == "FINISHED"]


def running_trials(db: Path) -> list[tuple[str, str]]:
    """(run id, tuner id) of every trial run still RUNNING, read straight from the SQLite store."""
    return store_rows(db, "select r.run_uuid, coalesce(t.value, '') from runs r join tags p on p.run_uuid = "
                          "r.run_uuid and p.key = 'mlflow.parentRunId' left join tags t on t.run_uuid = r.run_uuid "
                          "and t.key = 'tuner_id' where r.status = 'RUNNING'")


def logged_epochs(db: Path, run_id: str) -> int:
    rows = store_rows(db, "select count(*) from metrics where run_uuid = ? and key = 'loss'", (run_id,))
    return rows[0][0] if rows else 0


def wait_for_running_trial(db: Path, procs, tuner_id: str, timeout: float = 300) -> str:
    """The run id of a trial of ``tuner_id`` once it is training (its first epoch logged); fails if a process
    ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[:2]} ended early:\n{proc.stdout.read()[-3000:]}"
        for run_id, owner in running_trials(db):
            if owner == tuner_id and logged_epochs(db, run_id) >= 1:
                return run_id
        time.sleep(0.2)
    pytest.fail(f"no trial of {tuner_id} started within {timeout:.0f}s")


def output_within(proc, timeout: float) -> str:
    """The process's output once it has ended; fails with what it wrote so far when it is still running."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        pytest.fail(f"{proc.args[:2]} still running {timeout:.0f}s after SIGTERM:\n{(exc.output or '')[-3000:]}")


def stop_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_chief_and_two_workers_finish_a_six_trial_sweep(tiny_data, tracking_env):
    result = subprocess.run([SWEEP_BIN, "run", *tiny(tiny_data, 6, 2), "--workers", "2", "--sweep", "team"],
                            check=False, cwd=tracking_env, env=ENV, capture_output=True, text=True,
                            timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # `sweep run` itself is the chief: it serves the oracle and starts the workers
    assert "Chief serving the oracle on 127.0.0.1:" in result.stdout
    assert "Started 2 worker(s) for sweep team." in result.stdout
    assert "Worker worker0 joined sweep team" in result.stdout and "Worker worker1 joined sweep team" in result.stdout
    runs = runs_in(tracking_env)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children, finished = finished_trials(tracking_env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["sweep"] == "team"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert len(children) == len(finished) == 6  # one finished run per trial, none lost or duplicated
    assert sorted(int(c.data.tags["trial_number"]) for c in finished) == [1, 2, 3, 4, 5, 6]
    assert {c.data.tags["tuner_id"] for c in finished} <= {"worker0", "worker1"}
    assert parents[0].data.metrics["trials_finished"] == 6
    best = min(finished, key=lambda r: (r.data.metrics["val_loss"], int(r.data.tags["trial_number"])))
    assert parents[0].data.tags["best_run_id"] == best.info.run_id
    assert f"scratch: best trial {best.data.tags['trial_number']} (by val_loss)" in result.stdout


def _pid_of(tuner_id: str) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmdline and b"--tuner-id" in cmdline and tuner_id.encode() in cmdline:
            return int(proc.name)
    return None


def test_a_worker_killed_mid_trial_is_restarted_and_its_trial_run_again(tiny_data, tracking_env):
    launcher = subprocess.Popen([SWEEP_BIN, "run", *tiny(tiny_data, 4, 8), "--workers", "2"], cwd=tracking_env,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = tracking_env / "mlruns" / "mlflow.db"
    try:
        deadline = time.monotonic() + 300
        killed = False
        while time.monotonic() < deadline and not killed:
            assert launcher.poll() is None, launcher.stdout.read()[-3000:]
            pid = _pid_of("worker0")
            if pid and any(owner == "worker0" for _, owner in running_trials(db)):
                time.sleep(0.5)
                os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        assert killed, "worker0 never started a trial"
        output, _ = launcher.communicate(timeout=400)
    finally:
        stop_all([launcher])
    assert launcher.returncode == 0, output[-3000:]
    assert "Worker worker0 died (exit -9); restarting it to run its trial again." in output
    children, finished = finished_trials(tracking_env)
    assert sorted(int(c.data.tags["trial_number"]) for c in finished) == [1, 2, 3, 4]
    killed_runs = [c for c in children if c.info.status == "KILLED"]
    assert len(killed_runs) == 1 and killed_runs[0].data.tags["tuner_id"] == "worker0"
    # SIGKILL leaves the run RUNNING; the restarted worker closed it before taking its trial back
    assert killed_runs[0].data.tags["error"] == "worker worker0 died; the chief hands its trial out again"
    assert f"Marked run {killed_runs[0].info.run_name} of the dead worker worker0 as KILLED." in output
    assert killed_runs[0].data.tags["trial_id"] in {c.data.tags["trial_id"] for c in finished}
    assert len(children) == 5
    assert {status for status, _ in run_states(db)} == {"FINISHED", "KILLED"}


def test_sigterm_ends_the_workers_trial_run_and_the_chiefs_sweep_run_killed(tiny_data, tracking_env):
    """`kill PID` (SIGTERM) is Ctrl-C: a worker stopped mid-trial and then its chief leave no run RUNNING."""
    from sweep.distributed import free_port

    address = f"127.0.0.1:{free_port()}"
    chief = subprocess.Popen([SWEEP_BIN, "chief", *tiny(tiny_data, 3, 400), "--sweep", "stopped", "--port",
                              address.rsplit(":", 1)[1]], cwd=tracking_env, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    worker = subprocess.Popen([SWEEP_BIN, "worker", "--chief", address, "--sweep", "stopped", "--tuner-id", "w0"],
                              cwd=tracking_env, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = tracking_env / "mlruns" / "mlflow.db"
    try:
        trial_run = wait_for_running_trial(db, [chief, worker], "w0")  # mid-trial: hundreds of epochs to go
        worker.send_signal(signal.SIGTERM)
        worker_output = output_within(worker, 60)
        assert worker.returncode == 1, worker_output[-3000:]
        assert "Aborted!" in worker_output and "Traceback" not in worker_output
        # the worker closed its trial's run itself (no one else could have: nothing restarted it)
        assert running_trials(db) == []
        assert chief.poll() is None  # the chief waits for the trial's worker to come back
        chief.send_signal(signal.SIGTERM)
        chief_output = output_within(chief, 60)
        assert chief.returncode == 1, chief_output[-3000:]
    finally:
        stop_all([worker, chief])
    runs = runs_in(tracking_env)
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "KILLED" and parent.data.tags["sweep"] == "stopped"
    trial = next(r for r in runs if r.info.run_id == trial_run)
    assert trial.info.status == "KILLED" and trial.data.tags["tuner_id"] == "w0"
    assert "error" not in trial.data.tags  # ended by the worker's own SIGTERM handling, not marked later
    assert [r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags] == ["KILLED"]


def test_sigterm_to_a_sweep_with_local_workers_leaves_no_run_running(tiny_data, tracking_env):
    """SIGTERM to the process group of `sweep run --workers 1` (what a job scheduler sends) stops the chief and its
    worker; every run they opened ends KILLED."""
    # 400 tiny epochs (~20 s): the first trial is still training when the signal comes, however busy the machine
    proc = subprocess.Popen([SWEEP_BIN, "run", *tiny(tiny_data, 3, 400), "--workers", "1"], cwd=tracking_env,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    db = tracking_env / "mlruns" / "mlflow.db"
    try:
        trial_run = wait_for_running_trial(db, [proc], "worker0")
        os.killpg(proc.pid, signal.SIGTERM)
        output = output_within(proc, 90)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a worker that outlived its chief, if any
        except ProcessLookupError:
            pass
        stop_all([proc])
    assert proc.returncode == 1, output[-3000:]
    assert "Worker worker0 died" not in output  # a stopped sweep does not restart its workers
    runs = runs_in(tracking_env)
    assert {r.info.run_id: r.info.status for r in runs if r.info.status == "RUNNING"} == {}, output[-3000:]
    statuses = sorted((r.data.tags.get("trial_number", "sweep"), r.info.status) for r in runs)
    assert statuses == [("1", "KILLED"), ("sweep", "KILLED")], output[-3000:]
    trial = next(r for r in runs if r.info.run_id == trial_run)
    assert "error" not in trial.data.tags


def test_two_sweeps_at_once_on_one_sqlite_store_lose_no_run(tiny_data, tracking_env):
    procs = [subprocess.Popen([SWEEP_BIN, "run", *tiny(tiny_data, 2, 2)], cwd=tracking_env, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    runs = runs_in(tracking_env)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len(runs) == 6
    assert {r.info.status for r in runs} == {"FINISHED"}
    for parent in parents:
        assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 2


def test_chief_fails_the_trial_of_a_silent_worker_and_keeps_a_slow_one(tmp_path, monkeypatch):
    """The guard against Keras Tuner #915/#990 over gRPC: the chief fails the trial of a worker that stopped
    sending heartbeats, leaves a worker that heartbeats past the timeout alone, ignores the silent worker's late
    result, and returns once the search is over."""
    import keras_tuner as kt
    from keras_tuner.src.distribute.oracle_client import OracleClient

    from search_spaces import make_hypermodel
    from sweep.distributed import Chief, free_port
    from sweep.spec import SweepSpec
    from sweep.tuning import build_oracle

    timeout = 2.0
    oracle = build_oracle(SweepSpec(family="scratch", trials=2, epochs=1))
    oracle._set_project_dir(str(tmp_path), "silent")
    hp = kt.HyperParameters()
    make_hypermodel("scratch").declare(hp)
    oracle.update_space(hp)
    port = free_port()
    for name, value in (("KERASTUNER_ORACLE_IP", "127.0.0.1"), ("KERASTUNER_ORACLE_PORT", str(port)),
                        ("KERASTUNER_TUNER_ID", "worker0")):
        monkeypatch.setenv(name, value)
    chief = Chief("127.0.0.1", port, trial_timeout=timeout, worker_grace=10)
    lines: list[str] = []
    errors: list[BaseException] = []

    def serve():
        try:
            chief.serve(oracle, lines.append, "silent")
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    from keras_tuner.src.distribute import oracle_client

    from sweep import compat

    monkeypatch.setattr(oracle_client, "TIMEOUT", oracle_client.TIMEOUT)  # restored after the test
    compat.bound_chief_calls(30)  # a call the chief never answers fails the test instead of hanging it an hour
    client = OracleClient(oracle)  # what a worker's tuner talks to
    silent = client.create_trial("worker0")
    slow = client.create_trial("worker1")
    assert (silent.trial_id, slow.trial_id) == ("0", "1")
    expired = (f"Trial 1 of worker worker0 sent no heartbeat for {timeout:.0f}s; marked FAILED, its hyperparameters "
               "run again as a new trial.")
    started = time.monotonic()
    step = 0
    while expired not in lines or time.monotonic() - started < 3 * timeout:  # worker1: one epoch each 0.5 s
        assert time.monotonic() - started < 30, lines
        step += 1
        assert client.update_trial(slow.trial_id, {}, step=step).status == "RUNNING"
        time.sleep(0.5)
    client.update_trial(slow.trial_id, {"val_loss": 0.5, "val_accuracy": 0.75}, step=step)
    slow.status = "COMPLETED"
    client.end_trial(slow)

    # worker0 was only slow: its heartbeat now is answered FAILED, and its result counts for nothing
    assert client.update_trial(silent.trial_id, {}, step=1).status == "FAILED"
    assert client.update_trial(silent.trial_id, {"val_loss": 0.1, "val_accuracy": 1.0}, step=1).status == "FAILED"
    silent.status = "COMPLETED"
    client.end_trial(silent)
    # the lost trial's values (trial 1: the study's model) run again as trial 3, so the sweep still runs two
    again = client.create_trial("worker1")
    assert again.trial_id == "2" and again.status == "RUNNING"
    assert again.hyperparameters.values == silent.hyperparameters.values
    client.update_trial(again.trial_id, {"val_loss": 0.4, "val_accuracy": 0.8}, step=1)
    again.status = "COMPLETED"
    client.end_trial(again)
    assert [client.create_trial(w).status for w in ("worker0", "worker1")] == ["STOPPED", "STOPPED"]
    assert list(oracle.get_state()["retry_counts"].values()) == [1] and oracle.max_trials == 3
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []  # the search is over and both workers left

    assert lines[0] == (f"Chief serving the oracle on 127.0.0.1:{port}; start workers with "
                        f"`sweep worker --chief 127.0.0.1:{port} --sweep silent`")
    assert lines.count(expired) == 1 and len(lines) == 2
    assert (oracle.trials["0"].status, oracle.trials["0"].score) == ("FAILED", None)
    assert (oracle.trials["1"].status, oracle.trials["1"].score) == ("COMPLETED", 0.5)
    assert (oracle.trials["2"].status, oracle.trials["2"].score) == ("COMPLETED", 0.4)
    assert oracle.end_order == ["0", "1", "2"]


def test_a_worker_whose_chief_vanishes_says_so_and_closes_its_trial_run(tiny_data, tracking_env, runner):
    """SIGKILL to the chief mid-trial: the worker gives up after --chief-timeout (twice: the heartbeat, then the
    failed trial's report), exits 1 with one line, and leaves no trial run RUNNING; the resume command it
    prints then finishes the sweep with every trial counted once."""
    from sweep.distributed import free_port

    address = f"127.0.0.1:{free_port()}"
    chief = subprocess.Popen([SWEEP_BIN, "chief", *tiny(tiny_data, 3, 40), "--sweep", "lost", "--port",
                              address.rsplit(":", 1)[1]], cwd=tracking_env, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    for line in chief.stdout:  # the worker's short --chief-timeout also bounds its first wait for the chief
        if line.startswith("Chief serving the oracle"):
            break
    worker = subprocess.Popen([SWEEP_BIN, "worker", "--chief", address, "--sweep", "lost", "--tuner-id", "w0",
                               "--chief-timeout", "4"], cwd=tracking_env, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    db = tracking_env / "mlruns" / "mlflow.db"
    try:
        wait_for_running_trial(db, [chief, worker], "w0")
        chief.kill()
        chief.wait(timeout=30)
        started = time.monotonic()
        output = output_within(worker, 60)
        assert time.monotonic() - started < 30
    finally:
        stop_all([worker, chief])
    assert worker.returncode == 1, output[-3000:]
    assert (f"Error: lost the chief at {address} (no answer for 4s; its trial runs here are closed). If the chief is "
            "gone, continue the sweep with `sweep run --family scratch --resume --sweep lost`; if it comes back, "
            "restart this worker with --tuner-id w0.") in output
    assert "FAILED: lost its connection to the chief (" in output  # one line, no gRPC dump
    assert "debug_error_string" not in output
    assert "Traceback" not in output
    assert running_trials(db) == []

    # only the killed chief's own sweep run was left RUNNING (SIGKILL runs no handler): --resume closes it,
    # re-runs the interrupted trial and finishes the sweep
    from sweep.cli import main

    resumed = runner.invoke(main, ["run", "--family", "scratch", "--resume", "--sweep", "lost", "-q"])
    assert resumed.exit_code == 0, resumed.output
    runs = runs_in(tracking_env)
    assert "RUNNING" not in {r.info.status for r in runs}
    _, finished = finished_trials(tracking_env)
    assert sorted(int(c.data.tags["trial_number"]) for c in finished) == [1, 2, 3]
