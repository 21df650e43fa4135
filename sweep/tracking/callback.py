"""The Keras callback that logs a trial's epochs into its run (as MLflow's own: it never starts a run)."""

from __future__ import annotations

import time

import keras
from mlflow.entities import Metric

from sweep.errors import first_line
from sweep.tracking.runs import EPOCH_METRICS, RunLogger, with_retries


class EpochMetricsLogger(keras.callbacks.Callback):
    """Logs loss, accuracy, val_loss and val_accuracy per epoch (step = epoch number, from 1) into a run.

    Epochs are sent at most every ``interval`` seconds (and at the end of training), several in one request:
    a long trial's curve still grows live, and a trial on cached features, whose twenty epochs take a second,
    costs one request instead of twenty. As MLflow's own Keras callback, it never stops training: a store
    that hiccups is retried a few times (tenacity, with backoff), then those epochs are skipped with one
    warning and training goes on (``failed_epochs``).
    """

    def __init__(self, run: RunLogger, interval: float = 2.0) -> None:
        super().__init__()
        self.run, self.interval = run, interval
        self.failed_epochs: list[int] = []
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._last = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._pending.append((epoch + 1, {name: float(logs[name]) for name in EPOCH_METRICS
                                          if logs and name in logs}))
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        pending, self._pending, self._last = self._pending, [], time.monotonic()
        if not pending:
            return
        timestamp = int(time.time() * 1000)
        metrics = [Metric(name, value, timestamp, step) for step, values in pending for name, value in values.items()]
        try:
            with_retries(self.run.client.log_batch, self.run.run_id, metrics=metrics)
        except Exception as exc:  # the store is down: the trial's result matters more than a few epochs' curve
            steps = [step for step, _ in pending]
            self.failed_epochs.extend(steps)
            which = f"epoch {steps[0]}'s" if len(steps) == 1 else f"epochs {steps[0]}-{steps[-1]}'s"
            self.run.report(f"Warning: could not log {which} metrics to MLflow run {self.run.run_id} "
                            f"({first_line(exc, 200)}); training goes on.")
