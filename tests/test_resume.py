"""Faults: a sweep killed with SIGKILL resumes without losing or duplicating runs; diverging trials fail."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sweep.cli import main
from tests.conftest import runs_in

SWEEP_BIN = str(Path(sys.executable).with_name("sweep"))


def run_states(db: Path) -> list[tuple[str, str]]:
    """(status, parent id or '') of every run, read straight from the SQLite store."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute(
                "select r.status, coalesce(t.value, '') from runs r left join tags t "
                "on t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId'").fetchall()
    except sqlite3.Error:
        return []


def test_sigkill_mid_trial_then_resume(tiny_data, tracking_env, runner):
    args = ["run", "--family", "scratch", "--trials", "4", "--epochs", "6", "--data-dir", str(tiny_data),
            "--batch-size", "4", "--image-size", "32", "--seed", "5", "-q"]
    proc = subprocess.Popen([SWEEP_BIN, *args], cwd=tracking_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    db = tracking_env / "mlruns" / "mlflow.db"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # kill once two trials finished and the third is training
            children = [status for status, parent in run_states(db) if parent]
            if children.count("FINISHED") == 2 and "RUNNING" in children:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the sweep never reached its third trial")
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r.info.run_id: r.info.status for r in runs_in(tracking_env)}
    assert sorted(before.values()) == ["FINISHED", "FINISHED", "RUNNING", "RUNNING"]  # parent + trial 3 stuck

    result = runner.invoke(main, ["run", "--family", "scratch", "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert "Marked interrupted run scratch-trial-3" in result.output
    assert "Kept 2 finished trial(s)" in result.output

    runs = runs_in(tracking_env)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    killed = [c for c in children if c.info.status == "KILLED"]
    assert len(finished) == 4 and len(killed) == 1
    # the two trials finished before the kill were kept as they were
    for run_id, status in before.items():
        if status == "FINISHED":
            assert next(r for r in runs if r.info.run_id == run_id).info.status == "FINISHED"
    # one finished run per Keras Tuner trial, none duplicated; the killed trial was run again
    assert len({c.data.tags["trial_id"] for c in finished}) == 4
    assert killed[0].data.tags["trial_id"] in {c.data.tags["trial_id"] for c in finished}
    assert sorted(int(c.data.tags["trial_number"]) for c in finished) == [1, 2, 3, 4]
    assert killed[0].data.tags["trial_number"] == "3"
    tuner_dir = Path(parents[0].data.params["tuner_dir"])
    trials = [json.loads(p.read_text()) for p in tuner_dir.glob("trial_*/trial.json")]
    assert sorted(t["status"] for t in trials) == ["COMPLETED"] * 4
    assert {t["trial_id"] for t in trials} == {c.data.tags["trial_id"] for c in finished}
    assert parents[0].data.metrics["trials_finished"] == 4

    again = runner.invoke(main, ["run", "--family", "scratch", "--resume", "-q"])
    assert again.exit_code == 1
    assert "no unfinished scratch sweep in experiment 'test-exp' to resume" in again.output
    name = parents[0].data.tags["sweep"]
    named = runner.invoke(main, ["run", "--family", "scratch", "--resume", "--sweep", name, "-q"])
    assert named.exit_code == 1
    assert f"sweep '{name}' already finished all its trials" in named.output


def test_diverging_trials_fail_and_the_sweep_stops_with_a_message(tiny_data, tracking_env, runner, monkeypatch):
    import keras_tuner as kt

    from search_spaces.conv import HyperScratch

    original = HyperScratch.declare

    def explosive(self, hp):  # a learning rate no optimiser survives: every trial's loss turns NaN
        values = original(self, hp)
        values["learning_rate"] = 1e12
        return values

    monkeypatch.setattr(HyperScratch, "declare", explosive)
    result = runner.invoke(main, ["run", "--family", "scratch", "--trials", "5", "--epochs", "2", "--data-dir",
                                  str(tiny_data), "--batch-size", "4", "--image-size", "32", "-q"])
    assert result.exit_code == 1, result.output
    assert "3 trials failed in a row, so the sweep stopped" in result.output
    assert "Traceback" not in result.output
    children = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3
    assert {c.info.status for c in children} == {"FAILED"}
    assert all("diverged" in c.data.tags["error"] for c in children)
    assert kt is not None
    parent = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED" and parent.data.tags["stopped"] == "consecutive_failures"
    resumed = runner.invoke(main, ["run", "--family", "scratch", "--resume", "-q"])
    assert resumed.exit_code == 1
    assert "stopped because trials failed in a row" in resumed.output and "Traceback" not in resumed.output


def test_resume_keeps_the_objective_a_sweep_was_started_with():
    from types import SimpleNamespace

    from sweep.config import SweepSettings
    from sweep.study import settings_from_run

    params = {"family": "scratch", "trials": "5", "tuner": "random", "epochs": "2", "seed": "3", "batch_size": "4",
              "image_size": "32x32", "data": "/data/cats"}
    base = SweepSettings(family="scratch")  # what `--resume` was typed with: the default objective, val_loss
    assert base.objective == "val_loss"
    older = settings_from_run(SimpleNamespace(data=SimpleNamespace(params=params)), base)
    assert older.objective == "val_accuracy"  # sweeps from before --objective scored validation accuracy
    newer = settings_from_run(SimpleNamespace(data=SimpleNamespace(params={**params, "objective": "val_loss"})),
                              replace(base, objective="val_accuracy"))
    assert newer.objective == "val_loss" and (newer.trials, newer.epochs, newer.seed) == (5, 2, 3)
