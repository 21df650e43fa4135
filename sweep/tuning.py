"""The Keras Tuner side of a sweep: oracles that start from the study's defaults, and the trial loop.

Every trial trains on the in-memory splits, logs one MLflow run nested under the sweep's run (per-epoch
curves, test accuracy, baseline, ``accuracy.png``), and reports a progress line through ``report``.
This module knows nothing of click.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import keras_tuner as kt
import numpy as np
from keras_tuner.src import config as _kt_config

from search_spaces import HyperFamily, default_values
from sweep import plots, tracking
from sweep.config import SweepSettings
from sweep.data import Splits
from sweep.errors import SweepError
from sweep.features import FeatureCache, FeatureExtractor, PooledFeatures, PoolSpec, TrainPool, digest
from sweep.head import ViewSampler, fit_head
from sweep.results import DEFAULT_OBJECTIVE, OBJECTIVES, TrialRecord, accuracy_interval, best_record, format_value

# Keras Tuner prints every failed trial's traceback while DEBUG is on (its default); our one line per
# failed trial names the error and the trial's MLflow run keeps it.
_kt_config.DEBUG = False

Reporter = Callable[[str], None]


class DefaultsFirst:
    """Oracle mixin: the first set of values any oracle draws is the search space's defaults.

    A family's defaults are the study's model, so trial 1 of every sweep reproduces the study and shows
    whether the search beat it. Random, Bayesian (initial points) and Hyperband (new brackets) all draw
    through ``_random_values``.
    """

    def _random_values(self):
        values = default_values(self.hyperparameters)
        if values and not self._defaults_tried(values):
            return values
        return super()._random_values()

    def _defaults_tried(self, values: dict[str, Any]) -> bool:
        """Whether a trial already ran the defaults. A trial from before a hyperparameter was added (a sweep
        resumed under a newer search space) counts with that hyperparameter at its default."""
        return self._duplicate(values) or any(
            all(trial.hyperparameters.values.get(name, value) == value for name, value in values.items())
            for trial in self.trials.values()
        )


class DefaultsFirstRandomSearch(DefaultsFirst, kt.oracles.RandomSearchOracle):
    pass


class DefaultsFirstBayesian(DefaultsFirst, kt.oracles.BayesianOptimizationOracle):
    pass


class DefaultsFirstHyperband(DefaultsFirst, kt.oracles.HyperbandOracle):
    pass


def build_oracle(tuner: str, trials: int, epochs: int, seed: int, objective: str = DEFAULT_OBJECTIVE) -> kt.Oracle:
    """The oracle for ``--tuner``, scoring trials by ``objective``; Hyperband's trial count is capped at
    ``trials`` as well."""
    score = kt.Objective(objective, direction=OBJECTIVES[objective])
    if tuner == "random":
        oracle = DefaultsFirstRandomSearch(objective=score, max_trials=trials, seed=seed)
    elif tuner == "bayesian":
        oracle = DefaultsFirstBayesian(objective=score, max_trials=trials, seed=seed)
    elif tuner == "hyperband":
        oracle = DefaultsFirstHyperband(objective=score, max_epochs=epochs, seed=seed)
        oracle.max_trials = trials
    else:
        raise SweepError(f"unknown tuner {tuner!r}; choose random, bayesian or hyperband.")
    oracle.verbose = 0  # our one line per trial replaces Keras Tuner's tables, in workers too
    return oracle


def _check_finite(logger: tracking.EpochMetricsLogger) -> None:
    """A loss that turned NaN or infinite fails the trial (Keras stopped it with TerminateOnNaN)."""
    for epoch, loss in enumerate(logger.history.get("loss", []), start=logger.first_epoch or 1):
        if not math.isfinite(loss):
            raise kt.errors.FailedTrialError(f"loss became {loss} at epoch {epoch}; the trial diverged")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class SweepTuner(kt.Tuner):
    """A Keras Tuner whose trials train on in-memory splits and log to MLflow.

    Each trial returns its final model's ``val_loss`` and ``val_accuracy`` and the oracle reads the sweep's
    objective among them, so the model the oracle scores is the model whose test accuracy is logged (Keras
    Tuner's default would score the best epoch while the logged model is the last one).
    """

    def __init__(self, *, splits: Splits, settings: SweepSettings, report: Reporter,
                 features: TransferFeatures | None = None, **kwargs: Any) -> None:
        self.splits = splits
        self.features = features
        self.settings = settings
        self.report = report
        self.records: list[TrialRecord] = []
        self.started = time.monotonic()
        self.experiment_id = ""
        self.parent_run_id = ""  # set once the sweep's MLflow run exists
        super().__init__(**kwargs)

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        # Keras Tuner stores the whole traceback as the message and prints it; our line already said what
        # failed and the trial's MLflow run holds the error, so keep its last line only.
        if trial.message:
            trial.message = trial.message.strip().splitlines()[-1]
        super().on_trial_end(trial)

    def adopt(self, records: list[TrialRecord]) -> None:
        """Resume: take the trials MLflow already holds as finished."""
        self.records[:] = sorted(records, key=lambda r: r.number)

    def _build_hypermodel(self, hp: kt.HyperParameters) -> keras.Model:
        model = super()._build_hypermodel(hp)
        if "tuner/trial_id" in hp.values:  # Hyperband: continue from the earlier trial's weights
            model.load_weights(self._get_checkpoint_fname(hp.values["tuner/trial_id"]))
        return model

    def trial_params(self, values: dict[str, Any], epochs: int) -> dict[str, Any]:
        s = self.settings
        params = {name: format_value(value) for name, value in values.items()}
        params.update(
            family=s.family, tuner=s.tuner, objective=s.objective, epochs=epochs, batch_size=s.batch_size,
            image_size=f"{s.image_size[0]}x{s.image_size[1]}", seed=s.seed,
        )
        if s.family == "transfer":
            params["weights"] = str(s.weights)
        return params

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        hp = trial.hyperparameters
        values = dict(hp.values)
        done = next((r for r in self.records if r.trial_id == trial.trial_id), None)
        if done is not None:  # killed after MLflow finished the trial but before Keras Tuner saved it
            self.report(f"[{self.settings.family}] trial {done.number} was already finished; not run again")
            return done.scores
        epochs = int(values.get("tuner/epochs", self.settings.epochs))
        initial_epoch = int(values.get("tuner/initial_epoch", 0))
        # Keras Tuner numbers trials from 0 in creation order, across workers and resumes alike.
        number = int(trial.trial_id) + 1
        splits, s = self.splits, self.settings
        keras.utils.set_random_seed(s.seed + number - 1)
        tags = {"family": s.family, "trial_id": trial.trial_id, "trial_number": str(number),
                "tuner_id": self.tuner_id,
                "training": "cached_features" if self.features else "raw_images"}
        started = time.monotonic()
        with tracking.trial_run(self.experiment_id, self.parent_run_id, f"{s.family}-trial-{number}",
                                self.trial_params(values, epochs), tags) as run_id:
            try:
                logger = tracking.EpochMetricsLogger(run_id)
                model = self._try_build(hp)
                # What the trial is scored, logged and exported as (the same model, or its flip-averaged form).
                final = self.hypermodel.inference_model(model, values)
                if self.features is None:
                    model.fit(
                        splits.train.images, splits.train.labels,
                        batch_size=s.batch_size, epochs=epochs, initial_epoch=initial_epoch, shuffle=True,
                        callbacks=[Validation(final, splits, s.batch_size), logger,
                                   keras.callbacks.TerminateOnNaN()], verbose=s.verbose,
                    )
                else:
                    self._fit_head(hp, model, epochs, initial_epoch, logger, seed=s.seed + number - 1)
                _check_finite(logger)
                if self.features is None:
                    val_loss, val_accuracy = logger.history["val_loss"][-1], logger.history["val_accuracy"][-1]
                else:
                    # The trained head now sits on the real base: score that end-to-end model on raw images.
                    val_loss, val_accuracy = final.evaluate(splits.validation.images, splits.validation.labels,
                                                            batch_size=s.batch_size, verbose=0)
                test_loss, test_accuracy = final.evaluate(
                    splits.test.images, splits.test.labels, batch_size=s.batch_size, verbose=0
                )
                record = TrialRecord(
                    family=s.family, trial_id=trial.trial_id, number=number, hyperparameters=values,
                    history=logger.history, first_epoch=logger.first_epoch or 1,
                    val_accuracy=float(val_accuracy), val_loss=float(val_loss),
                    test_accuracy=float(test_accuracy), test_loss=float(test_loss),
                    test_images=len(splits.test), seconds=time.monotonic() - started, run_id=run_id,
                )
                low, high = accuracy_interval(record.test_accuracy, record.test_images)
                tracking.log_result(
                    {"test_accuracy": record.test_accuracy, "test_loss": record.test_loss,
                     "test_accuracy_ci_low": low, "test_accuracy_ci_high": high, "test_images": record.test_images,
                     "baseline_accuracy": splits.baseline_accuracy, "train_seconds": record.seconds}
                )
                tracking.log_figure(plots.plot_accuracy(record, splits.baseline_accuracy), "accuracy.png")
                self._keep_model(trial, record, model, final)
            except Exception as exc:
                tracking.log_result({}, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
                self.report(f"[{s.family}] trial {number} FAILED: {type(exc).__name__}: {exc}")
                raise
        self.records.append(record)
        self.report(self.progress_line(record))
        return record.scores

    def _keep_model(self, trial: kt.engine.trial.Trial, record: TrialRecord, model: keras.Model,
                    final: keras.Model) -> None:
        """Keep what later steps need, and no more.

        The trained end-to-end model as scored (``final``) is logged (``model/model.keras``) only when the
        trial improves on the sweep's best objective, so ``sweep best --export`` always finds the very model
        whose test accuracy was logged. Hyperband also needs every trial's training weights (``model``) to
        continue it in a later round.
        """
        if best_record([*self.records, record], self.settings.objective) is record:
            tracking.log_keras_model(final, tracking.MODEL_ARTIFACT)
            tracking.log_result({}, {"model_kept": "true"})
        if self.settings.tuner == "hyperband":
            model.save_weights(self._get_checkpoint_fname(trial.trial_id))

    def _fit_head(self, hp: kt.HyperParameters, model: keras.Model, epochs: int, initial_epoch: int,
                  logger: tracking.EpochMetricsLogger, seed: int) -> None:
        """Train only the head on cached features, then copy its weights into ``model``'s head."""
        values = dict(hp.values)
        head = self.hypermodel.build_head(hp, self.features.pool.features.max.shape[-1])
        head.get_layer("logits").set_weights(model.get_layer("logits").get_weights())  # Hyperband: continue
        sampler = ViewSampler(self.features.pool, self.splits.train.labels, values["pooling"],
                              values["flip_mode"], values["rotation_factor"], self.settings.batch_size, seed)
        views = [self.features.validation]
        if values.get("test_time_flip"):
            views.append(self.features.mirrored_validation)
        fit_head(head, sampler, views, self.splits.validation.labels, values["pooling"],
                 epochs, initial_epoch, [logger, keras.callbacks.TerminateOnNaN()], self.settings.verbose)
        model.get_layer("logits").set_weights(head.get_layer("logits").get_weights())

    def progress_line(self, record: TrialRecord) -> str:
        s = self.settings
        best = best_record(self.records, s.objective)
        elapsed = time.monotonic() - self.started
        done = len(self.records)
        left = max(s.trials - done, 0)
        eta = f"~{_duration(elapsed / done * left)} left" if left else "done"
        hps = " ".join(f"{k}={format_value(v)}" for k, v in record.hyperparameters.items())
        return (
            f"[{s.family}] trial {record.number}/{s.trials} ({_duration(record.seconds)}): {hps} | "
            f"val {record.val_accuracy:.1%} (loss {record.val_loss:.3f}) test {record.test_accuracy:.1%} | "
            f"best trial {best.number} (val {best.val_accuracy:.1%}, loss {best.val_loss:.3f}) | "
            f"elapsed {_duration(elapsed)}, {eta}"
        )


class Validation(keras.callbacks.Callback):
    """Scores ``model`` (a trial's model as it will be judged) on the validation split after every epoch.

    It fills the epoch's ``val_loss`` and ``val_accuracy`` for the callbacks after it, so the logged curve
    ends at the very value the tuner scores, flip-averaged for a ``test_time_flip`` trial.
    """

    def __init__(self, model: keras.Model, splits: Splits, batch_size: int) -> None:
        super().__init__()
        self.scored = model
        self.x, self.y = splits.validation.images, splits.validation.labels
        self.batch_size = batch_size

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        loss, accuracy = self.scored.evaluate(self.x, self.y, batch_size=self.batch_size, verbose=0)
        if logs is not None:
            logs.update(val_loss=loss, val_accuracy=accuracy)


@dataclass
class TransferFeatures:
    """What a cached transfer trial trains on: the training view pool, and clean validation features of
    the images and of their mirrors (for ``test_time_flip`` trials)."""

    pool: TrainPool
    validation: PooledFeatures
    mirrored_validation: PooledFeatures


def prepare_features(hypermodel: HyperFamily, splits: Splits, weights_path: str | None,
                     cache_dir: Path | None, report: Reporter) -> TransferFeatures:
    """Load or compute the transfer family's cached features (disk cache only for a weights file)."""
    weights_id = digest(Path(weights_path)) if weights_path else None
    cache = FeatureCache(cache_dir if weights_id else None, lambda: FeatureExtractor(hypermodel.build_base()),
                         weights_id or "random-init", report=report)
    pool = cache.pool(splits.train.images, PoolSpec())
    validation = cache.clean(splits.validation.images, "validation")
    mirrored = cache.clean(np.ascontiguousarray(splits.validation.images[:, :, ::-1]), "mirrored validation")
    return TransferFeatures(pool, validation, mirrored)
