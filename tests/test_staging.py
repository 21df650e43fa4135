"""The transfer family's staged search: the head first, then fine-tuning spent on the best frozen heads."""

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


def test_the_first_half_searches_the_head_then_each_trial_fine_tunes_a_leading_head(tmp_path):
    spec = SweepSpec(family="transfer", trials=20, seed=7, fine_tune_leaders=True)
    losses = {}

    def score(values, number):  # a made-up landscape: the lower the learning rate, the better the head
        losses[number] = values["learning_rate"] * (0.5 if values["fine_tune_from"] != "none" else 1.0)
        return losses[number]

    trials = run_oracle(tmp_path, spec, score)
    space = kt.HyperParameters()
    HyperTransfer().declare(space)
    assert trials[0] == default_values(space)  # trial 1: the study's model
    explore, refine = trials[:10], trials[10:]
    assert all(t["fine_tune_from"] == "none" and "fine_tune_epochs" not in t for t in explore)
    assert all(t["fine_tune_from"] in CUTS for t in refine)
    assert all(2 <= t["fine_tune_epochs"] <= 6 and 0.01 <= t["fine_tune_lr_factor"] <= 0.3 for t in refine)
    # Every refinement takes the head (all but the fine-tuning settings) of one of the three best frozen heads.
    leaders = sorted(explore, key=lambda t: t["learning_rate"])[:3]
    strip = lambda t: {k: v for k, v in t.items() if not k.startswith("fine_tune")}  # noqa: E731
    assert [strip(t) for t in refine[:3]] == [strip(t) for t in leaders]
    assert all(strip(t) in [strip(t) for t in leaders] for t in refine)
    assert len({tuple(sorted(t.items())) for t in trials}) == 20  # no trial repeats another


def test_the_plan_is_the_same_for_the_same_seed_and_moves_with_it(tmp_path):
    spec = SweepSpec(family="transfer", trials=8, seed=3, fine_tune_leaders=True)
    assert run_oracle(tmp_path / "a", spec) == run_oracle(tmp_path / "b", spec)
    assert run_oracle(tmp_path / "c", spec) != run_oracle(tmp_path / "d", SweepSpec(family="transfer", trials=8,
                                                                                    seed=4, fine_tune_leaders=True))


@pytest.mark.parametrize("fixed", [{"fine_tune_epochs": 6}, {"fine_tune_lr_factor": 0.05}])
def test_a_fixed_fine_tuning_setting_holds_in_the_refinements(tmp_path, fixed):
    spec = SweepSpec(family="transfer", trials=6, seed=1, fixed=tuple(fixed.items()), fine_tune_leaders=True)
    refine = run_oracle(tmp_path, spec)[3:]
    name, value = next(iter(fixed.items()))
    assert refine and all(t[name] == value and t["fine_tune_from"] in CUTS for t in refine)


def test_where_the_search_stays_joint():
    def plan(family="transfer", trials=20, tuner="random", fixed=(), leaders=True):
        return LeaderStaging.for_sweep(SweepSpec(family=family, trials=trials, tuner=tuner, fixed=fixed,
                                                 fine_tune_leaders=leaders, seed=5, weights="none"))

    assert plan() == LeaderStaging("fine_tune_from", "none", 10, seed=5)
    assert plan(tuner="bayesian").explore == 10
    assert plan(leaders=False) is None  # --fine-tune-any: every trial draws fine_tune_from with its head
    assert plan(tuner="hyperband") is None
    assert plan(fixed=(("fine_tune_from", "conv_1"),)) is None
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
            run(4, 0.01, **head, fine_tune_from="conv_1", fine_tune_epochs=4, fine_tune_lr_factor=0.1)]
    tuned = {**head, "fine_tune_from": "block_16", "fine_tune_epochs": 2, "fine_tune_lr_factor": 0.05}
    switch = HyperTransfer.stage_switch
    assert leader_of(runs, tuned, space, switch) == 3  # finished, frozen, the same head, the better of two
    assert leader_of(runs, tuned, space, switch, "val_accuracy", "max") is None  # no such metric logged
    assert leader_of(runs, {**tuned, "dropout": 0.3}, space, switch) is None  # drawn jointly: its own seed
    assert leader_of(runs, {**head, "fine_tune_from": "none"}, space, switch) is None  # a frozen trial


def test_fine_tune_any_draws_fine_tuning_with_the_head_in_every_trial(tmp_path):
    trials = run_oracle(tmp_path, SweepSpec(family="transfer", trials=12, seed=7, fine_tune_leaders=False))
    assert trials[0]["fine_tune_from"] == "none"  # the study's model
    assert any(t["fine_tune_from"] != "none" for t in trials[1:6])  # not only in a second half
    assert any(t["fine_tune_from"] == "none" for t in trials[1:])
    assert all("fine_tune_epochs" in t for t in trials if t["fine_tune_from"] != "none")
