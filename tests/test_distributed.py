"""Distributed trials on Keras Tuner's chief and workers (loopback only), and concurrent sweeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import runs_in
from tests.test_resume import run_states

SWEEP_BIN = str(Path(sys.executable).with_name("sweep"))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

pytestmark = pytest.mark.slow


def tiny(data_dir, trials, epochs):
    return ["--family", "scratch", "--trials", str(trials), "--epochs", str(epochs), "--data-dir", str(data_dir),
            "--batch-size", "4", "--image-size", "32", "-q"]


def finished_trials(tracking_env):
    children = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    return children, [c for c in children if c.info.status == "FINISHED"]


def test_chief_and_two_workers_finish_a_six_trial_sweep(tiny_data, tracking_env):
    result = subprocess.run([SWEEP_BIN, "run", *tiny(tiny_data, 6, 2), "--workers", "2"], cwd=tracking_env, env=ENV,
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Started a chief on 127.0.0.1:" in result.stdout
    runs = runs_in(tracking_env)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children, finished = finished_trials(tracking_env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert len(children) == len(finished) == 6  # one finished run per trial, none lost or duplicated
    assert sorted(int(c.data.tags["trial_number"]) for c in finished) == [1, 2, 3, 4, 5, 6]
    assert {c.data.tags["tuner_id"] for c in finished} <= {"worker0", "worker1"}
    assert parents[0].data.metrics["trials_finished"] == 6
    assert "scratch: best trial" in result.stdout


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
            if any(status == "RUNNING" and parent for status, parent in run_states(db)):
                pid = _pid_of("worker0")
                running = [r for r in runs_in(tracking_env) if r.info.status == "RUNNING"
                           and r.data.tags.get("tuner_id") == "worker0"]
                if pid and running:
                    time.sleep(0.5)
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.2)
        assert killed, "worker0 never started a trial"
        output, _ = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert "Worker worker0 died" in output and "restarting it" in output
    children, finished = finished_trials(tracking_env)
    assert sorted(int(c.data.tags["trial_number"]) for c in finished) == [1, 2, 3, 4]
    killed_runs = [c for c in children if c.info.status == "KILLED"]
    assert len(killed_runs) == 1 and killed_runs[0].data.tags["tuner_id"] == "worker0"
    assert killed_runs[0].data.tags["trial_id"] in {c.data.tags["trial_id"] for c in finished}


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


def test_chief_fails_a_trial_whose_worker_went_silent(tmp_path):
    """The guard against Keras Tuner #915/#990: a dead worker's ongoing trial does not stall the chief."""
    import keras_tuner as kt

    from search_spaces import make_hypermodel
    from sweep.distributed import Chief
    from sweep.tuning import build_oracle

    oracle = build_oracle("random", trials=3, epochs=1, seed=0)
    oracle._set_project_dir(str(tmp_path), "silent")
    hp = kt.HyperParameters()
    make_hypermodel("scratch").declare(hp)
    oracle.update_space(hp)
    trial = oracle.create_trial("worker0")
    assert oracle.ongoing_trials == {"worker0": trial}
    chief = Chief("127.0.0.1", 0, trial_timeout=0.2)
    lines: list[str] = []
    chief._expire(oracle, lines.append)  # first sight of the trial starts its clock
    assert oracle.ongoing_trials
    time.sleep(0.3)
    chief._expire(oracle, lines.append)
    assert not oracle.ongoing_trials
    assert oracle.trials[trial.trial_id].status == "FAILED"
    assert "worker worker0 gave no result" in oracle.trials[trial.trial_id].message
    assert lines == [f"Trial {trial.trial_id} of worker worker0 timed out; marked FAILED."]
