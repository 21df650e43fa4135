"""Which hyperparameters mattered: Optuna's fANOVA importance evaluator, fed with a family's finished trials.

The trials come from MLflow (their params and final score); the distributions from the family's own Keras Tuner
search space. Trials are compared at one budget: their final scores when enough of them ran every epoch (not a
pruned trial, nor Hyperband's, whose scores are from fewer epochs); otherwise, as in a pruned sweep where most
trials stop at the first rung, every trial's value at the deepest epoch all of them reached. Only
hyperparameters every such trial has are used (a conditional one, such as the fine-tuning settings, is left
out). The trials of every sweep of the family in the experiment are pooled.
"""

from __future__ import annotations

from typing import Any, Callable

import keras_tuner as kt
import optuna

from search_spaces import registry
from sweep.pruning import study_direction  # which also quiets Optuna's per-trial log lines
from sweep.results import PRUNED_TAG, RANKINGS

# Below this many full trials an importance says nothing.
MIN_TRIALS = 5


def distributions(family: str) -> dict[str, optuna.distributions.BaseDistribution]:
    """The family's search space as Optuna distributions (Fixed hyperparameters have none); ``family`` as
    ``registry.load`` takes it."""
    hp = registry.space(family)
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
    number = min(max(number, distribution.low), distribution.high)  # older sweeps logged 4 significant digits
    return int(round(number)) if isinstance(distribution, optuna.distributions.IntDistribution) else number


def param_importances(runs: list, family: str, metric: str, history: Callable[[str], list] | None = None,
                      reference: str | None = None) -> tuple[dict[str, float], int | None]:
    """Each hyperparameter's share of the variance of ``metric`` over the family's trials among ``runs`` (fANOVA,
    summing to 1), most important first, and the epoch it was compared at (None: the final scores).

    The full trials' final scores are used when there are ``MIN_TRIALS`` of them. Otherwise, with ``history``
    (a run id -> the metric's per-epoch MLflow history), every random or Bayesian trial's value at the deepest
    epoch that all of them reached. Empty when neither gives ``MIN_TRIALS`` trials. ``family`` is the name the
    trials are tagged with, ``reference`` what the family is loaded by (default: the name).
    """
    space = distributions(reference or family)
    mine = [run for run in runs if run.data.tags.get("family") == family and metric in run.data.metrics
            and run.data.params.get("tuner") != "hyperband"]  # Hyperband's trials ran different epochs
    full = [(run, float(run.data.metrics[metric])) for run in mine if PRUNED_TAG not in run.data.tags]
    shares = _fanova(full, space, metric)
    if shares or history is None or len(mine) < MIN_TRIALS:
        return shares, None
    curves = [(run, {m.step: m.value for m in history(run.info.run_id)}) for run in mine]
    epoch = min((max(curve) for _, curve in curves if curve), default=0)
    at_epoch = [(run, float(curve[epoch])) for run, curve in curves if epoch in curve]
    shares = _fanova(at_epoch, space, metric) if epoch else {}
    return shares, (epoch if shares else None)


def _fanova(scored: list, space: dict[str, optuna.distributions.BaseDistribution], metric: str) -> dict[str, float]:
    """fANOVA over (run, value) pairs; empty with fewer than ``MIN_TRIALS`` of them."""
    if len(scored) < MIN_TRIALS:
        return {}
    trials = []
    for run, value in scored:
        params = {}
        for name, distribution in space.items():
            if name in run.data.params:
                found = _value(distribution, run.data.params[name])
                if found is not None:
                    params[name] = found
        trials.append(optuna.trial.create_trial(params=params, value=value,
                                                distributions={n: space[n] for n in params}))
    study = optuna.create_study(direction=study_direction(RANKINGS[metric]))
    study.add_trials(trials)
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError):  # e.g. no hyperparameter varied across the trials
        return {}
    return dict(found)
