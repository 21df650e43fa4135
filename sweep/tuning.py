"""The Keras Tuner side of a sweep: the one trial loop (its oracles: ``sweep.oracles``).

A trial is: build the model from ``hp`` -> the family's ``fit`` (Keras Tuner's ``HyperModel.fit`` hook) ->
one score -> log -> keep or drop the model. Nothing here knows a family's hyperparameters or how it trains.
This module knows nothing of click.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import keras
import keras_tuner as kt
from keras_tuner.engine.trial import TrialStatus

from search_spaces import Fitted, HyperFamily, hyperparameters
from sweep import compat, plots, staging, tracking
from sweep.errors import SweepError, first_line
from sweep.oracles import ConsecutiveFailures, build_oracle, epoch_metric  # noqa: F401 (re-exported)
from sweep.results import (PRUNED_TAG, TrialRecord, accuracy_interval, best_record, best_run, format_duration,
                           format_value, param_text)
from sweep.spec import OBJECTIVES, SweepSpec
from sweep.staging import LeaderStaging

compat.quiet_failed_trials()  # our one line per failed trial names the error; its MLflow run keeps it

Reporter = Callable[[str], None]
# The raw-image check of a kept cached trial: its loss may differ by float rounding (the cache batches the
# base differently), its accuracy by an image whose two logits are within that rounding of each other.
RAW_LOSS_TOLERANCE = 1e-3
# The splits the end-of-sweep check runs end to end on raw images (``verify_best_kept``).
RAW_CHECK_SPLITS = ("test",)


class Heartbeat(keras.callbacks.Callback):
    """Tells the oracle after every epoch that the trial is alive, with the epoch's score (for pruning); stops
    a trial the oracle has expired (failed) or pruned (``pruned_at``: the epoch it stopped after)."""

    def __init__(self, oracle: kt.Oracle, trial_id: str, objective: str = "val_loss") -> None:
        super().__init__()
        self.oracle, self.trial_id, self.objective = oracle, trial_id, objective
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        score = (logs or {}).get(self.objective)
        if self.beat(epoch + 1, {} if score is None else {epoch_metric(self.objective): float(score)}):
            self.pruned_at = epoch + 1
            self.model.stop_training = True

    def beat(self, step: int = 0, metrics: dict | None = None) -> bool:
        """Report; True when the oracle stopped the trial early (pruned). Raises FailedTrialError when the
        oracle has failed the trial for silence."""
        trial = self.oracle.update_trial(self.trial_id, metrics or {}, step=step)
        if trial.status == TrialStatus.FAILED:
            raise kt.errors.FailedTrialError("the chief failed this trial: no heartbeat within --trial-timeout")
        return trial.status == TrialStatus.STOPPED


def _check_finite(history: dict[str, list[float]], first_epoch: int) -> None:
    """A loss that turned NaN or infinite fails the trial (Keras stopped it with TerminateOnNaN)."""
    for epoch, loss in enumerate(history.get("loss", []), start=first_epoch):
        if not math.isfinite(loss):
            raise kt.errors.FailedTrialError(f"loss became {loss} at epoch {epoch}; the trial diverged")


def failure_line(exc: BaseException, limit: int = 300) -> str:
    """One line for a failed trial: the error's type and the first line of its message (gRPC's errors, for
    one, span several lines of debug text)."""
    code = getattr(exc, "code", None)
    if callable(code) and type(exc).__module__.startswith("grpc"):
        try:
            return f"lost its connection to the chief ({code().name})"
        except Exception:  # noqa: BLE001 - a gRPC error without a status
            pass
    return first_line(exc)[:limit]


def process_memory() -> dict[str, float]:
    """This process's resident memory now (``rss_mib``, where ``/proc`` tells it) and its peak so far
    (``peak_rss_mib``), in MiB: logged with every trial, so growth from trial to trial shows in the sweep's
    runs. Empty where the OS tells neither."""
    figures = {}
    try:
        with open("/proc/self/statm") as statm:
            figures["rss_mib"] = round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
        peak = round(peak / (2**20 if os.uname().sysname == "Darwin" else 2**10), 1)
        # the kernel updates its high-water mark lazily: the resident memory just read may be above it
        figures["peak_rss_mib"] = max(peak, figures.get("rss_mib", 0.0))
    except ImportError:  # Windows
        pass
    return figures


def _check_agreement(fitted: Fitted, raw: dict[str, float], images: dict[str, int]) -> None:
    """The cached score and the end-to-end model's on raw images must be one number, up to float rounding
    (for each split in ``raw``)."""
    for split, loss, accuracy in (("val", fitted.val_loss, fitted.val_accuracy),
                                  ("test", fitted.test_loss, fitted.test_accuracy)):
        if f"raw_{split}_loss" not in raw:
            continue
        loss_gap = abs(raw[f"raw_{split}_loss"] - loss)
        images_apart = abs(raw[f"raw_{split}_accuracy"] - accuracy) * images[split]
        if loss_gap > RAW_LOSS_TOLERANCE * max(1.0, abs(loss)) or images_apart > 1.01:
            raise kt.errors.FailedTrialError(
                f"the end-to-end model on raw {split} images scored loss {raw[f'raw_{split}_loss']:.6f}, accuracy "
                f"{raw[f'raw_{split}_accuracy']:.4%}, but the cached features scored loss {loss:.6f}, accuracy "
                f"{accuracy:.4%}: the feature cache does not match the model (delete the cache folder and rerun)"
            )


def verify_best_kept(spec: SweepSpec, family: HyperFamily, data: Any, client, experiment_id: str, parent_run_id: str,
                     report: Reporter, in_memory: tuple[str, keras.Model] | None = None) -> None:
    """Check the sweep's best kept model end to end, when it was scored on cached features: evaluate it on the
    raw test images, log those figures (``raw_test_*``) and ``raw_check`` to its trial's run, and require them
    to equal its cached score.

    The test split is checked, not the validation split too: both splits' cached features are rows of one
    array, computed by one pass over the validation folder, so a cache that does not match the model shows in
    either; the test split is the smaller (192 images at the default cut, against 808) and its figure is the
    one a user reads as the model's accuracy. At 224 this takes 3-5 s instead of 12-22 s.

    It reads the model and its score back from MLflow, so it works the same after a local search, for a
    chief whose workers trained the trials, and after ``--resume``; a model already checked is not checked
    again. ``in_memory``: (run id, model) of a model this process kept, used instead of its saved copy when it
    is the one to check.

    Raises:
        SweepError: the figures differ: the feature cache does not match the model.
    """
    kept = [r for r in tracking.child_runs(client, experiment_id, parent_run_id)
            if r.info.status == "FINISHED" and r.data.tags.get("model_kept") == "true"]
    if not kept:
        return
    run = best_run(kept, spec.objective)
    if run.data.tags.get("training") != "cached_features" or run.data.tags.get("raw_check") == "passed":
        return
    started = time.monotonic()
    metrics = run.data.metrics
    if in_memory is not None and in_memory[0] == run.info.run_id:
        model = in_memory[1]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = keras.models.load_model(tracking.download(client, run.info.run_id, tracking.MODEL_ARTIFACT,
                                                              Path(tmp)))
    scored = Fitted(model, {}, metrics["val_loss"], metrics["val_accuracy"], metrics["test_loss"],
                    metrics["test_accuracy"], "cached_features")
    raw = family.evaluate_raw(scored, data, spec.batch_size, splits=RAW_CHECK_SPLITS)
    if raw is None:
        return
    logger = tracking.RunLogger(client, run.info.run_id, report)
    logger.log_metrics(raw)
    number = run.data.tags.get("trial_number", "?")
    try:
        _check_agreement(scored, raw, {"val": len(data.validation), "test": len(data.test)})
    except kt.errors.FailedTrialError as exc:
        logger.set_tags({"raw_check": "failed", "error": str(exc)[:5000]})
        raise SweepError(f"{spec.family_name} trial {number}: {exc}") from None
    logger.set_tags({"raw_check": "passed"})
    report(f"[{spec.family_name}] trial {number}'s kept model on the {len(data.test)} raw test images: "
           f"{raw['raw_test_accuracy']:.1%} (loss {raw['raw_test_loss']:.4f}), its cached score, checked end to "
           f"end ({time.monotonic() - started:.0f}s)")


@contextlib.contextmanager
def frozen_heap():
    """While a search runs, what was alive before it (the libraries, the data, a notebook's own objects) sits in
    the garbage collector's permanent generation (``gc.freeze``), so each trial's collection walks only what
    trials made. With TensorFlow, Keras and MLflow loaded, a full collection walks about half a million objects:
    0.25-0.35 s a trial, more than a small trial's training. Unfrozen when the search ends, however it ends; a
    heap the caller froze is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class SweepTuner(kt.Tuner):
    """A Keras Tuner whose trials train through the family's ``fit`` and log to MLflow.

    Each trial returns its final model's ``val_loss`` and ``val_accuracy`` (one computation, the one the
    per-epoch curve ends on) and the oracle scores the sweep's objective among them.
    """

    def __init__(self, *, spec: SweepSpec, data: Any, report: Reporter, store: tracking.Store, verbose: int = 0,
                 experiment_id: str = "", **kwargs: Any) -> None:
        self.spec, self.data, self.report, self.verbose = spec, data, report, verbose
        self.records: list[TrialRecord] = []
        self.started = time.monotonic()
        self.experiment_id = experiment_id
        self.parent_run_id = ""  # set once the sweep's MLflow run exists
        self.last_kept: tuple[str, keras.Model] | None = None  # (run id, model) of the last model kept here
        self.store = store
        super().__init__(**kwargs)

    @property
    def client(self):
        """The store's MLflow client (made on first use, once the model has been built)."""
        return self.store.client

    @property
    def family(self) -> HyperFamily:
        return self.hypermodel

    def search(self, *fit_args: Any, **fit_kwargs: Any) -> None:
        with frozen_heap():
            super().search(*fit_args, **fit_kwargs)

    def on_trial_end(self, trial) -> None:
        # Keras Tuner stores the whole traceback as the message; our line already said what failed and the
        # trial's MLflow run holds the error, so keep its last line only.
        if trial.message:
            trial.message = trial.message.strip().splitlines()[-1]
        super().on_trial_end(trial)
        failure = getattr(self.oracle, "failure", None)  # a worker's oracle is the chief's, over gRPC
        if failure is not None:
            raise failure

    def adopt(self, records: list[TrialRecord]) -> None:
        """Resume: take the trials MLflow already holds as finished."""
        self.records[:] = sorted(records, key=lambda r: r.number)

    def checkpoint(self, trial_id: str) -> str:
        """Where a trial's trained weights go when a later Hyperband round continues it."""
        return os.path.join(self.get_trial_dir(trial_id), "checkpoint.weights.h5")

    def run_trial(self, trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        hp = trial.hyperparameters
        done = next((r for r in self.records if r.trial_id == trial.trial_id), None)
        if done is not None:  # killed after MLflow finished the trial but before Keras Tuner saved it
            self.report(f"[{self.spec.family_name}] trial {done.number} was already finished; not run again")
            return done.scores
        values = hyperparameters(hp.values)
        spec = self.spec
        epochs = int(hp.values.get("tuner/epochs", spec.epochs))
        initial_epoch = int(hp.values.get("tuner/initial_epoch", 0))
        number = int(trial.trial_id) + 1  # Keras Tuner numbers trials from 0, across workers and resumes alike
        leader = self.leader_of(hp)
        seed = spec.seed + (leader or number) - 1  # a refinement reproduces its leader's first stage
        self.family.new_session()
        keras.utils.set_random_seed(seed)
        params = {**spec.to_params(), **{name: param_text(value) for name, value in values.items()}}
        tags = {"family": spec.family_name, "trial_id": trial.trial_id, "trial_number": str(number),
                "tuner_id": self.tuner_id, "dtype_policy": self.family.dtype_policy,
                **({"refines_trial": str(leader)} if leader else {})}
        started = time.monotonic()
        with tracking.open_run(self.client, self.experiment_id, f"{spec.family_name}-trial-{number}", params, tags,
                               parent_run_id=self.parent_run_id, report=self.report) as run:
            try:
                heartbeat = Heartbeat(self.oracle, trial.trial_id, spec.objective)
                epoch_logger = run.epoch_logger()
                model = self.family.build(hp)
                if "tuner/trial_id" in hp.values:  # Hyperband: continue from the earlier round's weights
                    model.load_weights(self.checkpoint(hp.values["tuner/trial_id"]))
                fitted = self.family.fit(
                    hp, model, data=self.data, batch_size=spec.batch_size, epochs=epochs,
                    initial_epoch=initial_epoch, verbose=self.verbose, seed=seed,
                    callbacks=[epoch_logger, heartbeat, keras.callbacks.TerminateOnNaN()],
                )
                _check_finite(fitted.history, initial_epoch + 1)
                for step in epoch_logger.failed_epochs:  # the store was down then: the curve must end on the score
                    run.log_metrics({name: series[step - initial_epoch - 1]
                                     for name, series in fitted.history.items() if series}, step=step)
                record = TrialRecord(
                    family=spec.family_name, trial_id=trial.trial_id, number=number, hyperparameters=values,
                    history=fitted.history, first_epoch=initial_epoch + 1,
                    val_accuracy=fitted.val_accuracy, val_loss=fitted.val_loss,
                    test_accuracy=fitted.test_accuracy, test_loss=fitted.test_loss,
                    test_images=len(self.data.test), val_images=len(self.data.validation),
                    seconds=time.monotonic() - started, run_id=run.run_id,
                    stages=dict(fitted.stages), pruned_at=heartbeat.pruned_at,
                )
                low, high = accuracy_interval(record.test_accuracy, record.test_images)
                run.log_metrics({"test_accuracy": record.test_accuracy, "test_loss": record.test_loss,
                                 "test_accuracy_ci_low": low, "test_accuracy_ci_high": high,
                                 "test_images": record.test_images, "validation_images": record.val_images,
                                 "baseline_accuracy": self.data.baseline_accuracy, "train_seconds": record.seconds,
                                 **process_memory()})
                run.set_tags({"training": fitted.scored_on,  # and where each later stage began, e.g. fine_tune_first_epoch
                              **{f"{stage}_first_epoch": str(epoch) for stage, epoch in fitted.stages.items()},
                              **({PRUNED_TAG: str(record.pruned_at)} if record.pruned_at else {})})
                run.log_figure(plots.plot_accuracy(record, self.data.baseline_accuracy), "accuracy.png")
                self._keep(trial.trial_id, record, model, fitted, run)
                heartbeat.beat()  # a trial the chief failed meanwhile is not finished here either
            except Exception as exc:
                if tracking.interrupted(exc):  # stopped, not failed: Keras Tuner must not go on to the next trial
                    raise KeyboardInterrupt from exc
                run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
                self.report(f"[{spec.family_name}] trial {number} FAILED: {failure_line(exc)}")
                raise
        self.records.append(record)
        self.report(self.progress_line(record))
        return record.scores

    def leader_of(self, hp: kt.HyperParameters) -> int | None:
        """The trial whose first stage this one refines (sweep/staging.py), read from the sweep's MLflow runs
        so that workers and ``--resume`` find it too; None for most trials."""
        s = self.spec
        plan = LeaderStaging.for_sweep(s)
        if (plan is None or plan.mode != "leaders" or hp.values.get(plan.switch, plan.off) == plan.off
                or not self.parent_run_id):
            return None
        runs = tracking.child_runs(self.client, self.experiment_id, self.parent_run_id)
        return staging.leader_of(runs, hyperparameters(hp.values), hp, (plan.switch, plan.off), s.objective,
                                 OBJECTIVES[s.objective])

    def _keep(self, trial_id: str, record: TrialRecord, model: keras.Model, fitted: Fitted,
              run: tracking.RunLogger) -> None:
        """Keep what later steps need, and no more.

        A trial that improves on the sweep's best objective so far keeps its judged model
        (``model/model.keras``), so ``sweep best --export`` finds the very model whose scores were logged. A
        model scored on cached features is checked end to end on the raw images when the sweep ends
        (``verify_best_kept``), once, for the sweep's best: a raw pass costs as much as many cached trials.
        Hyperband also needs every trial's training weights to continue it in a later round.
        """
        if record.pruned_at is None and self._improves(record):
            run.log_keras_model(fitted.model, tracking.MODEL_ARTIFACT)
            run.set_tags({"model_kept": "true"})
            self.last_kept = (run.run_id, fitted.model)  # the end-of-sweep check need not load it back
        if self.spec.tuner == "hyperband":
            model.save_weights(self.checkpoint(trial_id))

    def _improves(self, record: TrialRecord) -> bool:
        """Whether the trial beats every finished trial of the sweep (the oracle's, so with several workers
        the whole sweep's, not only this worker's); the earlier trial wins a tie."""
        value = getattr(record, self.spec.objective)
        done = [t for t in self.oracle.get_best_trials(1) if t.status == TrialStatus.COMPLETED and t.score is not None]
        if not done:
            return True
        return value < done[0].score if OBJECTIVES[self.spec.objective] == "min" else value > done[0].score

    def progress_line(self, record: TrialRecord) -> str:
        s = self.spec
        best = best_record(self.records, s.objective)
        elapsed = time.monotonic() - self.started
        done = len(self.records)
        left = max(s.trials - done, 0)
        eta = f"~{format_duration(elapsed / done * left)} left" if left else "done"
        budget = getattr(self.oracle, "seconds_left", lambda: None)()  # a worker's oracle is the chief's
        hps = " ".join(f"{k}={format_value(v)}" for k, v in record.hyperparameters.items())
        return (
            f"[{s.family_name}] trial {record.number}/{s.trials} ({format_duration(record.seconds)}): {hps} | "
            f"val {record.val_accuracy:.1%} (loss {record.val_loss:.3f}) test {record.test_accuracy:.1%}"
            f"{f' (pruned after epoch {record.pruned_at})' if record.pruned_at else ''} | "
            f"best trial {best.number} (val {best.val_accuracy:.1%}, loss {best.val_loss:.3f}) | "
            f"elapsed {format_duration(elapsed)}, {eta}"
            f"{f', budget {format_duration(budget)} left' if budget is not None else ''}"
        )
