"""Which hyperparameters mattered: Optuna's fANOVA importance evaluator, fed with a family's finished trials.

The trials come from MLflow (their params and final score); the distributions from the family's own Keras Tuner
search space. Only trials that ran every epoch are used (not a pruned trial, nor Hyperband's, whose scores are
from fewer epochs), and only hyperparameters every such trial has (a conditional one, such as the fine-tuning
settings, is left out). The trials of every sweep of the family in the experiment are pooled.
"""

from __future__ import annotations

from typing import Any

import keras_tuner as kt
import optuna

from search_spaces import FAMILIES
from sweep.pruning import study_direction  # which also quiets Optuna's per-trial log lines
from sweep.results import PRUNED_TAG, RANKINGS

# Below this many full trials an importance says nothing.
MIN_TRIALS = 5


def distributions(family: str) -> dict[str, optuna.distributions.BaseDistribution]:
    """The family's search space as Optuna distributions (Fixed hyperparameters have none)."""
    hp = kt.HyperParameters()
    FAMILIES[family]().declare(hp)
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for item in hp.space:
        config = item.get_config()
        if isinstance(item, kt.engine.hyperparameters.Boolean):
            found[item.name] = optuna.distributions.CategoricalDistribution([False, True])
        elif isinstance(item, kt.engine.hyperparameters.Choice):
            found[item.name] = optuna.distributions.CategoricalDistribution(list(config["values"]))
        elif isinstance(item, kt.engine.hyperparameters.Int):
            found[item.name] = optuna.distributions.IntDistribution(
                config["min_value"], config["max_value"], step=config.get("step") or 1)
        elif isinstance(item, kt.engine.hyperparameters.Float):
            found[item.name] = optuna.distributions.FloatDistribution(
                config["min_value"], config["max_value"], log=config.get("sampling") == "log")
    return found


def _value(distribution: optuna.distributions.BaseDistribution, text: str) -> Any:
    """A logged param (text) as the distribution's value, or None when it is not one of them."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return next((choice for choice in distribution.choices if str(choice) == text), None)
    number = float(text)
    number = min(max(number, distribution.low), distribution.high)  # logged with 4 significant digits
    return int(round(number)) if isinstance(distribution, optuna.distributions.IntDistribution) else number


def param_importances(runs: list, family: str, metric: str) -> dict[str, float]:
    """Each hyperparameter's share of the variance of ``metric`` over the family's full trials among ``runs``
    (fANOVA, summing to 1), most important first; empty with fewer than ``MIN_TRIALS`` such trials."""
    space = distributions(family)
    trials = []
    for run in runs:
        if (run.data.tags.get("family") != family or PRUNED_TAG in run.data.tags or metric not in run.data.metrics
                or run.data.params.get("tuner") == "hyperband"):  # Hyperband's trials ran different epochs
            continue
        params = {}
        for name, distribution in space.items():
            if name in run.data.params:
                value = _value(distribution, run.data.params[name])
                if value is not None:
                    params[name] = value
        trials.append(optuna.trial.create_trial(params=params, value=float(run.data.metrics[metric]),
                                                distributions={n: space[n] for n in params}))
    if len(trials) < MIN_TRIALS:
        return {}
    study = optuna.create_study(direction=study_direction(RANKINGS[metric]))
    study.add_trials(trials)
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError):  # e.g. no hyperparameter varied across the trials
        return {}
    return dict(found)
