"""Which hyperparameters mattered: Optuna's fANOVA on a family's full trials, from their MLflow runs."""

from __future__ import annotations

import random
from types import SimpleNamespace

from sweep.importance import MIN_TRIALS, distributions, param_importances


def run(params: dict, loss: float, pruned: bool = False, family: str = "scratch"):
    tags = {"family": family, **({"pruned_at_epoch": "2"} if pruned else {})}
    return SimpleNamespace(data=SimpleNamespace(params={k: str(v) for k, v in params.items()}, tags=tags,
                                                metrics={"val_loss": loss}))


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
    found = param_importances(trials(30), "scratch", "val_loss")
    assert list(found)[0] == "learning_rate" and found["learning_rate"] > 0.6
    assert abs(sum(found.values()) - 1) < 1e-6
    assert set(found) <= set(distributions("scratch"))


def test_pruned_trials_other_families_and_too_few_trials_are_left_out():
    runs = trials(MIN_TRIALS - 1) + [run({"learning_rate": "0.001"}, 0.1, pruned=True) for _ in range(5)]
    runs += [run({"learning_rate": "0.001"}, 0.1, family="augmented") for _ in range(5)]
    assert param_importances(runs, "scratch", "val_loss") == {}


def test_the_search_space_becomes_optuna_distributions():
    space = distributions("transfer")
    assert space["learning_rate"].log and space["learning_rate"].low == 1e-4
    assert space["pooling"].choices == ("global_max", "global_avg")
    assert space["fine_tune_epochs"].step == 2
