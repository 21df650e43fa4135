"""Successive halving for random and Bayesian search: which trials stop, where, and what the oracle keeps."""

from __future__ import annotations

import pytest
from keras_tuner.engine.trial import TrialStatus

from search_spaces.conv import HyperScratch
from sweep.oracles import build_oracle, epoch_metric
from sweep.spec import SweepSpec
from tests.helpers import make_oracle, store_client


def run(oracle, curve: list[float]) -> tuple[str, int]:
    """One trial reporting ``curve`` (val_loss per epoch) as the trial loop does; returns (id, epochs run)."""
    trial = oracle.create_trial("tuner0")
    epochs = 0
    for epoch, value in enumerate(curve, start=1):
        epochs = epoch
        if oracle.update_trial(trial.trial_id, {epoch_metric("val_loss"): value}, step=epoch).status == \
                TrialStatus.STOPPED:
            break
    oracle.update_trial(trial.trial_id, {"val_loss": curve[epochs - 1], "val_accuracy": 0.5})
    trial.status = TrialStatus.COMPLETED
    oracle.end_trial(trial)
    oracle.save()  # as the tuner does after each trial
    return trial.trial_id, epochs


def flat(value: float) -> list[float]:
    return [value] * 20


def test_a_trial_stops_at_the_first_rung_it_misses_and_trial_1_always_runs_in_full(tmp_path):
    oracle = make_oracle(tmp_path)
    first = run(oracle, flat(0.9))  # trial 1: the study's model, never stopped, however it scores
    assert first[1] == 20
    assert run(oracle, flat(1.5))[1] == 1  # worse than trial 1 at epoch 1: stopped there
    better = run(oracle, [0.85] * 5 + [0.5] * 15)  # the best at epochs 1, 3 and 9: runs on
    assert better[1] == 20
    assert run(oracle, [0.8] * 5 + [0.95] * 15)[1] == 9  # the best at epochs 1 and 3, misses epoch 9
    # Ranked among the trials that ran every epoch only: stopped at epoch 1 with a loss of 0.82, below trial 1's
    # final 0.9, ...
    assert run(oracle, flat(0.82))[1] == 1
    assert oracle.pruned == {"01": 1, "03": 9, "04": 1}
    best = oracle.get_best_trials(10)
    assert [t.trial_id for t in best] == [better[0], first[0]]  # ... a pruned trial is never "best"


def test_the_pruning_record_survives_a_restart(tmp_path):
    oracle = make_oracle(tmp_path)
    run(oracle, flat(0.9))
    run(oracle, flat(1.5))
    again = make_oracle(tmp_path)
    again.reload()
    assert again.pruned == {"01": 1}
    assert [t.trial_id for t in again.get_best_trials(5)] == ["00"]
    # the rung record too: a third trial worse than trial 1 at epoch 1 is stopped there
    assert run(again, flat(1.2))[1] == 1
    assert len(again.pruner().study.trials) == 3


@pytest.mark.parametrize("spec", [{"prune": False}, {"tuner": "hyperband"}, {"epochs": 1}])
def test_pruning_is_off_without_prune_under_hyperband_or_with_too_few_epochs(tmp_path, spec):
    assert make_oracle(tmp_path, **spec).pruning is False


def test_the_transfer_family_is_never_pruned():
    assert build_oracle(SweepSpec(family="transfer", trials=4, weights="none")).pruning is False
    assert build_oracle(SweepSpec(family="augmented", trials=4)).pruning is True


def test_a_sweep_logged_before_pruning_existed_resumes_without_it():
    params = SweepSpec(family="scratch").to_params()
    del params["prune"]
    assert SweepSpec.from_params(params).prune is False
    assert SweepSpec.from_params(SweepSpec(family="scratch").to_params()).prune is True


@pytest.mark.slow
def test_a_pruned_trial_is_a_finished_trial_with_fewer_epochs(tiny_data, tracking_env, runner):

    from sweep.cli import main
    from tests.conftest import runs_in
    from tests.helpers import tiny_args

    args = ["run", "--family", "scratch", "--trials", "6", "-q", *tiny_args(tiny_data), "--epochs", "6"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    trials = sorted((r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags),
                    key=lambda r: int(r.data.tags["trial_number"]))
    assert [r.info.status for r in trials] == ["FINISHED"] * 6
    client = store_client()
    steps = {int(r.data.tags["trial_number"]): len(client.get_metric_history(r.info.run_id, "val_loss"))
             for r in trials}
    pruned = {int(r.data.tags["trial_number"]): int(r.data.tags["pruned_at_epoch"])
              for r in trials if "pruned_at_epoch" in r.data.tags}
    assert pruned and 1 not in pruned and steps[1] == 6  # trial 1, the study's model, ran in full
    assert all(epoch in (1, 3) and steps[number] == epoch for number, epoch in pruned.items())  # rungs: 1 and 3
    assert all(steps[n] == 6 for n in steps if n not in pruned)
    for number in pruned:
        assert f"trial {number}/6 (" in result.output
    assert sum(result.output.count(f"(pruned after epoch {epoch})") for epoch in (1, 3)) == len(pruned)
    best = runner.invoke(main, ["best"])
    assert best.exit_code == 0, best.output
    best_number = int(best.output.split(", trial ")[1].split()[0])
    assert best_number not in pruned
    assert list((tracking_env / "mlruns" / "keras_tuner").rglob("pruning.journal"))


def test_the_rungs_of_a_20_epoch_sweep():
    from sweep.pruning import rungs

    assert rungs(20) == [1, 3, 9] and rungs(6) == [1, 3] and rungs(2) == [1] and rungs(1) == []


def test_a_trial_handed_out_again_starts_its_record_over(tmp_path):
    """A restarted worker asks for its trial again (the same tuner id): the trial runs from epoch 1, unpruned."""
    oracle = make_oracle(tmp_path)
    run(oracle, flat(0.9))
    trial = oracle.create_trial("tuner1")
    report = lambda epoch, value: oracle.update_trial(trial.trial_id, {epoch_metric("val_loss"): value},  # noqa
                                                      step=epoch).status
    assert report(1, 1.5) == TrialStatus.STOPPED
    again = oracle.create_trial("tuner1")  # the worker died and came back before ending the trial
    assert again.trial_id == trial.trial_id and trial.trial_id not in oracle.pruned
    assert [report(1, 0.5), report(2, 0.5), report(3, 0.5)] == [TrialStatus.RUNNING] * 3  # judged afresh: passes


def test_the_last_epoch_is_never_judged(tmp_path):
    oracle = make_oracle(tmp_path, epochs=3)  # rung 3 falls on the last epoch: a trial that got there ran in full
    run(oracle, [0.9] * 3)
    assert run(oracle, [0.8] * 2 + [5.0])[1] == 3
    assert oracle.pruned == {}


def test_a_family_that_starts_slowly_is_first_judged_at_its_own_first_rung(tmp_path, monkeypatch):
    monkeypatch.setattr(HyperScratch, "first_rung", 3)  # as a family declares it
    oracle = make_oracle(tmp_path)
    assert oracle.first_rung == 3
    run(oracle, flat(0.5))
    assert run(oracle, flat(0.9))[1] == 3  # a worse trial still runs to epoch 3 (with the default: stopped at 1)
    monkeypatch.undo()
    default = make_oracle(tmp_path / "default")
    run(default, flat(0.5))
    assert run(default, flat(0.9))[1] == 1  # the default first rung
