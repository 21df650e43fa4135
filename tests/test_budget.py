"""--time-budget: no trial starts that could not finish in time; a trial running at the end stops as pruned."""

from __future__ import annotations

import time

import pytest
from keras_tuner.engine.trial import TrialStatus

from sweep.cli import main
from tests.conftest import runs_in
from tests.helpers import make_oracle, tiny_args


def test_no_trial_starts_that_would_not_finish_before_the_deadline(tmp_path):
    oracle = make_oracle(tmp_path, epochs=20, prune=False)
    oracle.deadline = time.time() + 1000
    oracle.epoch_seconds = [40.0, 60.0, 50.0]  # a whole trial: 20 x 50 s, the median epoch
    assert oracle.create_trial("tuner0").status == TrialStatus.STOPPED and oracle.out_of_time
    oracle.out_of_time, oracle.deadline = False, time.time() + 1100
    assert oracle.create_trial("tuner0").status == TrialStatus.RUNNING and not oracle.out_of_time


def test_a_trial_running_at_the_deadline_stops_there_as_a_pruned_one(tmp_path):
    oracle = make_oracle(tmp_path, epochs=20, prune=False)
    oracle.deadline = time.time() + 3600
    trial = oracle.create_trial("tuner0")
    report = lambda epoch: oracle.update_trial(trial.trial_id, {"epoch_val_loss": 0.5}, step=epoch)  # noqa: E731
    assert report(1).status == TrialStatus.RUNNING and report(2).status == TrialStatus.RUNNING
    assert len(oracle.epoch_seconds) == 1  # the first epoch (model building included) is not timed
    oracle.deadline = time.time() - 1
    assert report(3).status == TrialStatus.STOPPED  # trial 1 too: the budget is the user's
    assert oracle.pruned == {trial.trial_id: 3}
    assert oracle.seconds_left() == 0.0


def test_a_fine_tuning_stage_running_at_the_deadline_stops_there_too(tmp_path):
    """A fine-tuning trial's epochs after the head's (the costly ones) are stopped at the deadline like any other;
    only its very last epoch is not judged, and only head epochs feed the budget's per-epoch estimate."""
    from search_spaces.transfer import HyperTransfer
    from sweep.spec import SweepSpec
    from sweep.tuning import build_oracle

    fixed = (("fine_tune_from", "block_16"), ("fine_tune_epochs", 3))
    oracle = build_oracle(SweepSpec(family="transfer", trials=3, epochs=20, seed=1, fixed=fixed, weights="none"))
    oracle._set_project_dir(str(tmp_path), "budget")
    space = oracle.get_space()
    HyperTransfer().declare(space)
    oracle.update_space(space)
    oracle.deadline = time.time() + 3600

    def run(stop_at: int | None) -> list[str]:
        """One trial's answers to its epoch reports (24: 20 of the head, 4 of fine-tuning); the deadline passes
        before epoch ``stop_at``."""
        trial = oracle.create_trial("tuner0")
        answers = []
        for epoch in range(1, 25):
            if epoch == stop_at:
                oracle.deadline = time.time() - 1
            answers.append(oracle.update_trial(trial.trial_id, {"epoch_val_loss": 0.5}, step=epoch).status)
            if answers[-1] == TrialStatus.STOPPED:
                break
        oracle.update_trial(trial.trial_id, {"val_loss": 0.5, "val_accuracy": 0.5})
        trial.status = TrialStatus.COMPLETED
        oracle.end_trial(trial)
        oracle.deadline = time.time() + 3600
        return answers

    assert run(stop_at=None) == [TrialStatus.RUNNING] * 24
    assert len(oracle.epoch_seconds) == 19  # head epochs 2-20; the fine-tuning epochs are not timed
    assert run(stop_at=22)[-1] == TrialStatus.STOPPED
    stopped = max(oracle.pruned, key=int)
    assert oracle.pruned[stopped] == 22  # stopped in its fine-tuning stage, as a pruned trial
    assert run(stop_at=24) == [TrialStatus.RUNNING] * 24  # its last epoch: the trial finishes


@pytest.mark.parametrize("text", ["soon", "10x", "0m", "-5"])
def test_a_bad_budget_is_refused_with_the_forms_it_takes(runner, text):
    result = runner.invoke(main, ["run", "--family", "scratch", "--time-budget", text])
    assert result.exit_code == 2
    assert "--time-budget" in result.output and ("45m, 1h30m, 90s" in result.output or "more than zero" in
                                                  result.output)


@pytest.mark.slow
def test_a_sweep_ends_at_its_budget_and_resume_goes_on(tiny_data, tracking_env, runner):
    args = ["run", "--family", "scratch", "--trials", "30", "-q", *tiny_args(tiny_data), "--epochs", "3",
            "--no-prune"]
    result = runner.invoke(main, [*args, "--time-budget", "15s", "--sweep", "budgeted"])
    assert result.exit_code == 0, result.output
    assert "within 0m1" in result.output and "budget " in result.output and " left" in result.output
    assert "time budget reached after " in result.output
    assert "sweep run --family scratch --resume --sweep budgeted" in result.output
    parent = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.tags["stopped"] == "time_budget"
    first = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    assert 1 <= len(first) < 30 and all(r.info.status == "FINISHED" for r in first)

    resumed = runner.invoke(main, ["run", "--family", "scratch", "--resume", "--sweep", "budgeted",
                                   "--time-budget", "10s", "-q"])
    assert resumed.exit_code == 0, resumed.output
    after = [r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags]
    assert len(first) < len(after) < 30  # the resumed sweep ran more trials, again within its budget
    numbers = sorted(int(r.data.tags["trial_number"]) for r in after)
    assert numbers == list(range(1, len(after) + 1))
