"""Which hyperparameters mattered: Optuna's fANOVA on a family's full trials, from their MLflow runs."""

from __future__ import annotations

import random
from types import SimpleNamespace

from sweep.importance import MIN_TRIALS, distributions, param_importances


def run(params: dict, loss: float, pruned: bool = False, family: str = "scratch", curve: list | None = None):
    """A trial's MLflow run as the report reads it; ``curve``: its per-epoch val_loss (MLflow's history)."""
    tags = {"family": family, **({"pruned_at_epoch": "2"} if pruned else {})}
    history = [SimpleNamespace(step=step, value=value) for step, value in enumerate(curve or [loss], start=1)]
    return SimpleNamespace(data=SimpleNamespace(params={k: str(v) for k, v in params.items()}, tags=tags,
                                                metrics={"val_loss": loss}),
                           info=SimpleNamespace(run_id=str(id(history)), history=history))


def history_of(runs: list):
    by_id = {r.info.run_id: r.info.history for r in runs}
    return lambda run_id: by_id[run_id]


def trials(n: int, seed: int = 0) -> list:
    """The loss follows the learning rate; the other hyperparameters are drawn but do not matter."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lr = 10 ** rng.uniform(-4, -2)
        params = {"learning_rate": f"{lr:.4g}", "dropout": rng.choice([0.0, 0.25, 0.5]),
                  "test_time_flip": rng.choice([True, False]), "conv1_filters": rng.choice([16, 32, 64]),
                  "conv2_filters": 32, "conv3_filters": 64, "pooling": rng.choice(["flatten", "global_max"])}
        out.append(run(params, 0.4 + 100 * abs(lr - 1e-3) + rng.uniform(0, 0.001)))
    return out


def test_the_hyperparameter_that_drives_the_score_comes_first():
    found, epoch = param_importances(trials(30), "scratch", "val_loss")
    assert epoch is None  # the full trials' final scores
    assert list(found)[0] == "learning_rate" and found["learning_rate"] > 0.6
    assert abs(sum(found.values()) - 1) < 1e-6
    assert set(found) <= set(distributions("scratch"))


def test_pruned_trials_other_families_and_too_few_trials_are_left_out():
    runs = trials(MIN_TRIALS - 1) + [run({"learning_rate": "0.001"}, 0.1, pruned=True) for _ in range(5)]
    runs += [run({"learning_rate": "0.001"}, 0.1, family="augmented") for _ in range(5)]
    assert param_importances(runs, "scratch", "val_loss") == ({}, None)


def test_a_pruned_sweep_is_compared_at_the_deepest_epoch_every_trial_reached():
    """Two full trials and many pruned ones (a pruned sweep): every trial's value at epoch 2 (all reached it;
    some went on to 6), where the learning rate drives the loss; the final scores would say nothing."""
    rng = random.Random(1)
    runs = []
    for i in range(20):
        lr = 10 ** rng.uniform(-4, -2)
        at_two = 0.4 + 100 * abs(lr - 1e-3) + rng.uniform(0, 0.001)
        epochs = 20 if i < 2 else (6 if i % 3 == 0 else 2)
        curve = [at_two + 0.3] + [at_two] + [rng.uniform(0.1, 2.0) for _ in range(epochs - 2)]  # later: noise
        params = {"learning_rate": f"{lr:.4g}", "dropout": rng.choice([0.0, 0.25, 0.5]),
                  "conv1_filters": rng.choice([16, 32, 64])}
        runs.append(run(params, curve[-1], pruned=epochs < 20, curve=curve))
    assert param_importances(runs, "scratch", "val_loss") == ({}, None)  # no history: two full trials say nothing
    found, epoch = param_importances(runs, "scratch", "val_loss", history=history_of(runs))
    assert epoch == 2
    assert list(found)[0] == "learning_rate" and found["learning_rate"] > 0.6


def test_the_search_space_becomes_optuna_distributions():
    space = distributions("transfer")
    assert space["learning_rate"].log and space["learning_rate"].low == 1e-4
    assert space["pooling"].choices == ("global_max", "global_avg")
    assert (space["fine_tune_epochs"].low, space["fine_tune_epochs"].high, space["fine_tune_epochs"].step) == (1, 3, 1)
