"""Faults and resuming: a sweep killed with SIGKILL resumes without losing or duplicating runs, a named sweep is
resumed by name with its own settings, diverging trials fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from sweep.cli import main
from tests.conftest import SWEEP_BIN, runs_in, signal_on_line
from tests.helpers import run_states, store_client





@pytest.mark.slow
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


@pytest.mark.slow
def test_diverging_trials_fail_and_the_sweep_stops_with_a_message(tiny_data, tracking_env, runner, monkeypatch):
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
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith("Error: scratch: 3 trials failed in a row, so the sweep stopped. Last error: ")
    assert "the trial diverged" in errors[0]
    children = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3
    assert {c.info.status for c in children} == {"FAILED"}
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [1, 2, 3]
    assert all(c.data.tags["error"].startswith("FailedTrialError: loss became ")
               and c.data.tags["error"].endswith("; the trial diverged") for c in children)
    parent = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED" and parent.data.tags["stopped"] == "consecutive_failures"
    resumed = runner.invoke(main, ["run", "--family", "scratch", "--resume", "-q"])
    assert resumed.exit_code == 1
    assert "stopped because trials failed in a row" in resumed.output and "Traceback" not in resumed.output


@pytest.mark.slow
def test_sweep_names_a_new_sweep_and_resume_continues_that_one_with_its_own_settings(tiny_data, tracking_env, runner,
                                                                                     monkeypatch):
    """`--sweep NAME` starts a new sweep of that name and refuses a taken one; `--resume --sweep NAME` continues
    that sweep (not the newest unfinished one) with the settings it was started with, not those typed."""
    from search_spaces.base import HyperFamily

    fit = HyperFamily.fit
    fits = {"done": 0, "interrupt_at": 2}

    def interruptible(self, *args, **kwargs):  # Ctrl-C during the Nth trial's training
        fits["done"] += 1
        if fits["done"] == fits["interrupt_at"]:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(HyperFamily, "fit", interruptible)
    data = ["--data-dir", str(tiny_data), "--batch-size", "4", "--image-size", "32", "-q"]
    mine = runner.invoke(main, ["run", "--family", "scratch", "--sweep", "mine", "--trials", "3", "--epochs", "1",
                                "--seed", "7", "--objective", "val_accuracy", *data])
    assert mine.exit_code == 1 and "Aborted!" in mine.output, mine.output  # in its trial 2
    fits["interrupt_at"] = fits["done"] + 1
    other = runner.invoke(main, ["run", "--family", "scratch", "--sweep", "other", "--trials", "2", "--epochs", "1",
                                 *data])
    assert other.exit_code == 1 and "Aborted!" in other.output, other.output  # in its trial 1: the newest sweep

    def sweep_runs(name):
        runs = runs_in(tracking_env)
        parent = next(r for r in runs if r.data.tags.get("sweep") == name)
        return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]

    parent, children = sweep_runs("mine")
    assert parent.info.run_name == "mine" and parent.info.status == "KILLED"
    assert sorted((int(c.data.tags["trial_number"]), c.info.status) for c in children) == [(1, "FINISHED"),
                                                                                             (2, "KILLED")]
    before = len(runs_in(tracking_env))

    taken = runner.invoke(main, ["run", "--family", "scratch", "--sweep", "mine", "--trials", "1", *data])
    assert taken.exit_code == 1
    assert taken.output.splitlines() == [
        ("Error: experiment 'test-exp' already has a sweep named 'mine'; continue it with `sweep run --family "
         "scratch --resume --sweep mine`, or pick another name.")]
    assert len(runs_in(tracking_env)) == before

    fits["interrupt_at"] = 0
    resumed = runner.invoke(main, ["run", "--family", "scratch", "--resume", "--sweep", "mine", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert ("Resuming sweep mine (MLflow run " + parent.info.run_id + ") with its own settings: 3 trials x 1 epochs, "
            "random, objective val_accuracy, seed 7") in resumed.output
    assert "Kept 1 finished trial(s)" in resumed.output

    parent, children = sweep_runs("mine")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 3
    assert (parent.data.params["objective"], parent.data.params["trials"], parent.data.params["seed"]) == \
        ("val_accuracy", "3", "7")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(int(c.data.tags["trial_number"]) for c in finished) == [1, 2, 3]
    assert all(c.data.params["objective"] == "val_accuracy" and c.data.params["epochs"] == "1" for c in finished)
    best = max(finished, key=lambda r: (r.data.metrics["val_accuracy"], -int(r.data.tags["trial_number"])))
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert f"scratch: best trial {best.data.tags['trial_number']} (by val_accuracy)" in resumed.output
    other_parent, other_children = sweep_runs("other")  # untouched
    assert other_parent.info.status == "KILLED"
    assert [c.info.status for c in other_children] == ["KILLED"]


@pytest.mark.slow
def test_an_interrupted_cached_transfer_sweep_resumes_warm_with_one_score_per_trial(tiny_data, tracking_env, runner,
                                                                                   monkeypatch):
    """Ctrl-C in trial 2 of a cached transfer sweep: the runs end KILLED; --resume loads the features from disk,
    keeps trial 1, runs trials 2 and 3, and every trial's Keras Tuner score is its last logged val_loss."""

    from sweep.tuning import SweepTuner
    from tests.conftest import SHARED_WEIGHTS

    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"{SHARED_WEIGHTS} is not available")
    args = ["run", "--family", "transfer", "--trials", "3", "--epochs", "2", "--data-dir", str(tiny_data),
            "--batch-size", "4", "--image-size", "32", "--seed", "5", "--weights", str(SHARED_WEIGHTS), "-q"]
    run_trial = SweepTuner.run_trial

    def interrupted_in_trial_2(self, trial, *a, **kw):
        if trial.trial_id == "1":
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM, through the CLI's handler) raises
        return run_trial(self, trial, *a, **kw)

    monkeypatch.setattr(SweepTuner, "run_trial", interrupted_in_trial_2)
    first = runner.invoke(main, args)
    assert first.exit_code == 1 and "Computing MobileNetV2 features" in first.output
    runs = runs_in(tracking_env)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags] == ["FINISHED"]

    monkeypatch.setattr(SweepTuner, "run_trial", run_trial)
    resumed = runner.invoke(main, ["run", "--family", "transfer", "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert "Computing" not in resumed.output  # the cache on disk, not a second forward pass over the images
    assert "Kept 1 finished trial(s)" in resumed.output
    client = store_client()
    children = {r.data.tags["trial_number"]: r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == ["1", "2", "3"]
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    assert {r.data.tags["training"] for r in children.values()} == {"cached_features"}
    project = tracking_env / "mlruns" / "keras_tuner" / parent.data.tags["sweep"]
    for number, child in children.items():
        trial = json.loads((project / f"trial_{int(number) - 1}" / "trial.json").read_text())
        assert trial["status"] == "COMPLETED"
        assert trial["score"] == client.get_metric_history(child.info.run_id, "val_loss")[-1].value
    parent = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 3


@pytest.mark.slow
def test_ctrl_c_between_trials_then_resume_then_sigterm_during_export(tiny_data, tracking_env, runner):
    """Ctrl-C just after trial 1 ends: every run KILLED or FINISHED, the exact resume command printed, and that
    command finishes the sweep with each trial counted once; SIGTERM during `sweep best --export` leaves no
    folder, whole or half-made."""
    args = ["run", "--family", "scratch", "--trials", "3", "--epochs", "4", "--data-dir", str(tiny_data),
            "--batch-size", "4", "--image-size", "32", "--seed", "5", "--sweep", "faults"]
    code, output, _ = signal_on_line(args, tracking_env, "[scratch] trial 1/3", signal.SIGINT)
    assert code != 0 and "Traceback" not in output, output[-3000:]
    statuses = sorted(r.info.status for r in runs_in(tracking_env))
    assert "RUNNING" not in statuses and statuses.count("FINISHED") == 1, statuses  # trial 1 only
    resume = "sweep run --family scratch --resume --sweep faults"
    assert resume in output, output[-3000:]

    result = runner.invoke(main, resume.split()[1:] + ["-q"])
    assert result.exit_code == 0, result.output
    runs = runs_in(tracking_env)
    finished = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["trial_number"]) for r in finished) == [1, 2, 3]  # each counted once
    assert "RUNNING" not in {r.info.status for r in runs}

    # SIGTERM once the best trial is chosen and the export is being written
    code, _, _ = signal_on_line(["best", "--export", "out"], tracking_env, "Best trial", signal.SIGTERM)
    assert code != 0
    assert not (tracking_env / "out").exists() and not list(tracking_env.glob(".out.*"))


@pytest.mark.slow
def test_sigterm_while_caching_features_leaves_no_partial_cache_and_a_rerun_completes(tiny_data, tracking_env,
                                                                                     runner):
    """SIGTERM as the transfer family computes its MobileNetV2 features: the process ends within seconds with the
    resume command and no traceback; no half-written cache file is left (a rerun could not tell it from a whole
    one), no run stays RUNNING, and running the same command again completes with every trial counted once."""
    from tests.conftest import SHARED_WEIGHTS

    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"{SHARED_WEIGHTS} is not available")
    args = ["run", "--family", "transfer", "--trials", "2", "--epochs", "2", "--data-dir", str(tiny_data),
            "--batch-size", "4", "--image-size", "96", "--seed", "5", "--weights", str(SHARED_WEIGHTS),
            "--sweep", "caching"]
    code, output, stopped_in = signal_on_line(args, tracking_env, "Computing MobileNetV2 features", signal.SIGTERM)
    assert code != 0 and "Traceback" not in output, output[-3000:]
    assert stopped_in < 30, stopped_in
    assert "[transfer] stopped before its first trial; no run was logged" in output, output[-3000:]
    cache = tracking_env / "mlruns" / "feature_cache"
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    for path in cache.rglob("*.npy"):  # what is there is whole: it loads with the shape its header promises
        assert np.load(path, mmap_mode="r")[-1] is not None
    assert "RUNNING" not in {status for status, _ in run_states(tracking_env / "mlruns" / "mlflow.db")}

    assert run_states(tracking_env / "mlruns" / "mlflow.db") == []
    result = runner.invoke(main, [*args, "-q"])  # the same command again
    assert result.exit_code == 0, result.output
    runs = runs_in(tracking_env)
    finished = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["trial_number"]) for r in finished) == [1, 2]
    assert "RUNNING" not in {r.info.status for r in runs}
