"""The transfer family's staged search: the head first, then a bounded share of fine-tuning trials."""

from __future__ import annotations

import keras_tuner as kt
import pytest

from search_spaces import default_values, hyperparameters
from feature_cache.finetune import CUTS
from search_spaces.transfer import HyperTransfer
from sweep.spec import SweepSpec
from sweep.staging import LeaderStaging
from sweep.tuning import build_oracle

HEAD = ("dropout", "learning_rate", "test_time_flip", "pooling")


def run_oracle(tmp_path, spec: SweepSpec, score=lambda values, number: 1.0 / (number + 1)) -> list[dict]:
    """Drive the sweep's oracle as the tuner does, without training: declare the space, then create and end
    ``spec.trials`` trials, each scored ``score(values, number)`` (val_loss)."""
    oracle = build_oracle(spec)
    oracle._set_project_dir(str(tmp_path), "staging")
    space = oracle.get_space()
    HyperTransfer().declare(space)
    oracle.update_space(space)
    trials = []
    for number in range(spec.trials):
        trial = oracle.create_trial("tuner0")
        values = hyperparameters(trial.hyperparameters.values)
        trials.append(values)
        oracle.update_trial(trial.trial_id, {"val_loss": score(values, number)})
        trial.status = kt.engine.trial.TrialStatus.COMPLETED
        oracle.end_trial(trial)
    return trials


def two_phases(trials: list[dict], explore: int) -> tuple[list[dict], list[dict]]:
    """The trials split where the plan turns fine-tuning on, checked: trial 1 is the study's model, the first
    ``explore`` trials are frozen (no fine-tuning settings drawn), every later one fine-tunes within the space."""
    space = kt.HyperParameters()
    HyperTransfer().declare(space)
    assert trials[0] == default_values(space)  # trial 1: the study's model
    first, later = trials[:explore], trials[explore:]
    assert all(t["fine_tune_from"] == "none" and "fine_tune_epochs" not in t for t in first)
    assert all(t["fine_tune_from"] in CUTS for t in later)
    assert all(1 <= t["fine_tune_epochs"] <= 3 and 0.01 <= t["fine_tune_lr_factor"] <= 0.3 for t in later)
    return first, later


def test_the_first_half_searches_the_head_then_each_trial_fine_tunes_a_leading_head(tmp_path):
    spec = SweepSpec(family="transfer", trials=20, seed=7, fine_tune="leaders")
    losses = {}

    def score(values, number):  # a made-up landscape: the lower the learning rate, the better the head
        losses[number] = values["learning_rate"] * (0.5 if values["fine_tune_from"] != "none" else 1.0)
        return losses[number]

    trials = run_oracle(tmp_path, spec, score)
    explore, refine = two_phases(trials, 10)
    # Every refinement takes the head (all but the fine-tuning settings) of one of the three best frozen heads.
    leaders = sorted(explore, key=lambda t: t["learning_rate"])[:3]
    strip = lambda t: {k: v for k, v in t.items() if not k.startswith("fine_tune")}  # noqa: E731
    assert [strip(t) for t in refine[:3]] == [strip(t) for t in leaders]
    assert all(strip(t) in [strip(t) for t in leaders] for t in refine)
    assert len({tuple(sorted(t.items())) for t in trials}) == 20  # no trial repeats another


def test_the_plan_is_the_same_for_the_same_seed_and_moves_with_it(tmp_path):
    spec = SweepSpec(family="transfer", trials=8, seed=3, fine_tune="leaders")
    assert run_oracle(tmp_path / "a", spec) == run_oracle(tmp_path / "b", spec)
    assert run_oracle(tmp_path / "c", spec) != run_oracle(tmp_path / "d", SweepSpec(family="transfer", trials=8,
                                                                                    seed=4, fine_tune="leaders"))


@pytest.mark.parametrize("fixed", [{"fine_tune_epochs": 3}, {"fine_tune_lr_factor": 0.05}])
def test_a_fixed_fine_tuning_setting_holds_in_the_refinements(tmp_path, fixed):
    spec = SweepSpec(family="transfer", trials=6, seed=1, fixed=tuple(fixed.items()), fine_tune="leaders")
    refine = run_oracle(tmp_path, spec)[3:]
    name, value = next(iter(fixed.items()))
    assert refine and all(t[name] == value and t["fine_tune_from"] in CUTS for t in refine)


def test_where_the_search_stays_joint():
    def plan(family="transfer", trials=20, tuner="random", fixed=(), fine_tune="late"):
        return LeaderStaging.for_sweep(SweepSpec(family=family, trials=trials, tuner=tuner, fixed=fixed,
                                                 fine_tune=fine_tune, seed=5, weights="none"))

    assert plan() == LeaderStaging("fine_tune_from", "none", 10, seed=5, mode="late")  # the last half fine-tune
    assert plan(trials=10).explore == 5 and plan(trials=3).explore == 1 and plan(trials=2).explore == 1
    assert plan(fine_tune="leaders") == LeaderStaging("fine_tune_from", "none", 10, seed=5, mode="leaders")
    assert plan(tuner="bayesian").explore == 10
    assert plan(fine_tune="any") is None  # --fine-tune any: every trial draws fine_tune_from with its head
    assert plan(tuner="hyperband") is None
    assert plan(fixed=(("fine_tune_from", "block_16"),)) is None
    assert plan(trials=1) is None
    assert plan(family="scratch") is None


def test_a_fixed_cut_draws_every_trial_jointly(tmp_path):
    trials = run_oracle(tmp_path, SweepSpec(family="transfer", trials=5, seed=2, fixed=(("fine_tune_from", "block_16"),)))
    assert all(t["fine_tune_from"] == "block_16" and "fine_tune_epochs" in t for t in trials)


def test_a_refinement_finds_the_frozen_trial_it_refines_among_the_sweeps_runs():
    from types import SimpleNamespace

    from sweep.staging import leader_of

    space = kt.HyperParameters()
    HyperTransfer().declare(space)

    def run(number, loss=0.03, status="FINISHED", **params):
        return SimpleNamespace(info=SimpleNamespace(status=status),
                               data=SimpleNamespace(params={k: str(v) for k, v in params.items()},
                                                    tags={"trial_number": str(number)}, metrics={"val_loss": loss}))

    head = {"dropout": 0.25, "learning_rate": 0.0003628, "pooling": "global_max"}
    runs = [run(1, dropout=0.2, learning_rate=0.001, pooling="global_max", fine_tune_from="none"),
            run(2, 0.01, status="FAILED", **head, fine_tune_from="none"),
            run(6, 0.04, **head, fine_tune_from="none"),  # the same head drawn twice (say, --hp fixed the rest)
            run(3, 0.02, **head, fine_tune_from="none"),
            run(4, 0.01, **head, fine_tune_from="block_16", fine_tune_epochs=3, fine_tune_lr_factor=0.1)]
    tuned = {**head, "fine_tune_from": "block_16", "fine_tune_epochs": 2, "fine_tune_lr_factor": 0.05}
    switch = HyperTransfer.stage_switch
    assert leader_of(runs, tuned, space, switch) == 3  # finished, frozen, the same head, the better of two
    assert leader_of(runs, tuned, space, switch, "val_accuracy", "max") is None  # no such metric logged
    assert leader_of(runs, {**tuned, "dropout": 0.3}, space, switch) is None  # drawn jointly: its own seed
    assert leader_of(runs, {**head, "fine_tune_from": "none"}, space, switch) is None  # a frozen trial


def test_fine_tune_any_draws_fine_tuning_with_the_head_in_every_trial(tmp_path):
    trials = run_oracle(tmp_path, SweepSpec(family="transfer", trials=12, seed=7, fine_tune="any"))
    assert trials[0]["fine_tune_from"] == "none"  # the study's model
    assert any(t["fine_tune_from"] != "none" for t in trials[1:6])  # not only in a second half
    assert any(t["fine_tune_from"] == "none" for t in trials[1:])
    assert all("fine_tune_epochs" in t for t in trials if t["fine_tune_from"] != "none")


def test_late_the_first_half_searches_the_head_and_the_rest_fine_tune_heads_of_their_own(tmp_path):
    spec = SweepSpec(family="transfer", trials=20, seed=7)  # the default plan: late
    trials = run_oracle(tmp_path, spec, lambda values, number: values["learning_rate"])
    explore, late = two_phases(trials, 10)
    # the late trials draw their heads afresh: not the frozen leaders' (measured: the fine-tuned picks came
    # from heads the frozen ranking did not put first)
    strip = lambda t: {k: v for k, v in t.items() if not k.startswith("fine_tune")}  # noqa: E731
    assert sum(strip(t) in [strip(e) for e in explore] for t in late) == 0
    assert len({t["learning_rate"] for t in late}) == 10
    assert run_oracle(tmp_path / "again", spec, lambda values, number: values["learning_rate"]) == trials


def test_late_a_fixed_fine_tuning_setting_holds(tmp_path):
    spec = SweepSpec(family="transfer", trials=6, seed=1, fixed=(("fine_tune_lr_factor", 0.05),))
    late = run_oracle(tmp_path, spec)[3:]
    assert late and all(t["fine_tune_lr_factor"] == 0.05 and t["fine_tune_from"] in CUTS for t in late)


def gate_oracle(tmp_path, fine_tune="late"):
    spec = SweepSpec(family="transfer", trials=20, seed=7, fine_tune=fine_tune)
    oracle = build_oracle(spec)
    oracle._set_project_dir(str(tmp_path), "gate")
    space = oracle.get_space()
    HyperTransfer().declare(space)
    oracle.update_space(space)
    return oracle


def head_report(oracle, score: float, fine_tunes: bool) -> str:
    """A trial whose head ends (epoch 20) at ``score``: whether the oracle lets it go on ("RUNNING") or stops
    it before its fine-tuning stage ("STOPPED")."""
    trial = oracle.create_trial("tuner0")
    values = trial.hyperparameters.values
    values["fine_tune_from"] = "block_16" if fine_tunes else "none"
    values["fine_tune_epochs"] = 2
    for epoch in range(1, 21):
        status = oracle.update_trial(trial.trial_id, {"epoch_val_loss": score + (20 - epoch) * 0.01}, step=epoch).status
    oracle.update_trial(trial.trial_id, {"val_loss": score})  # the trial ends, pruned or not
    trial.status = kt.engine.trial.TrialStatus.COMPLETED
    oracle.end_trial(trial)
    return status


def test_the_stage_gate_lets_only_a_head_in_the_best_third_so_far_fine_tune(tmp_path):
    oracle = gate_oracle(tmp_path)
    for score in (0.03, 0.04, 0.05, 0.06, 0.07, 0.08):  # six heads on record (any trial's: frozen ones too)
        assert head_report(oracle, score, fine_tunes=False) == "RUNNING"
    assert head_report(oracle, 0.035, fine_tunes=True) == "RUNNING"  # beaten by one of six: in the best third
    assert head_report(oracle, 0.045, fine_tunes=True) == "STOPPED"  # beaten by three of seven
    assert head_report(oracle, 0.02, fine_tunes=True) == "RUNNING"  # the best head yet
    stopped = [t for t, epoch in oracle.pruned.items()]
    assert len(stopped) == 1 and oracle.pruned[stopped[0]] == 20  # stopped after its head, before fine-tuning
    assert oracle.get_state()["head_scores"][stopped[0]] == pytest.approx(0.045)


def test_the_stage_gate_judges_nothing_before_three_heads_nor_outside_the_late_plan(tmp_path):
    oracle = gate_oracle(tmp_path / "early")
    for score in (0.5, 0.01, 0.02):  # the worst head first: too few heads to compare it with yet
        assert head_report(oracle, score, fine_tunes=True) == "RUNNING"
    assert head_report(oracle, 0.5, fine_tunes=True) == "STOPPED"  # the same head, now beaten by two of three
    leaders = gate_oracle(tmp_path / "leaders", fine_tune="leaders")  # refinements are a controlled comparison
    for score in (0.01, 0.02, 0.03, 0.9):
        assert head_report(leaders, score, fine_tunes=True) == "RUNNING"
