"""Writing runs: a parent run per sweep and a nested run per trial, each written by id through a client.

The callers own each run's lifetime (``with open_run(...)``), so an exception marks the run FAILED and Ctrl-C
marks it KILLED. Nothing here uses MLflow's implicit active run or its process-wide tracking URI.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    import keras

    from sweep.tracking.callback import EpochMetricsLogger

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")  # what a trial logs per epoch
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's documented system tag for nested runs
MODEL_ARTIFACT = "model/model.keras"  # the trained end-to-end model, kept for trials that improved their sweep
RETRY_ATTEMPTS = 3
Reporter = Callable[[str], None]

# Set when the process was asked to stop (Ctrl-C, SIGTERM). TensorFlow can turn the KeyboardInterrupt raised
# in its C++ call stack into a RuntimeError; with this set, that error is an interruption too.
STOP_REQUESTED = threading.Event()


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` ends work because the process was told to stop, not because the work failed."""
    return isinstance(exc, KeyboardInterrupt) or STOP_REQUESTED.is_set()


class RunLogger:
    """Writes into one MLflow run, named by id, through a client: never MLflow's implicit active run."""

    def __init__(self, client: MlflowClient, run_id: str, report: Reporter = print) -> None:
        self.client, self.run_id, self.report = client, run_id, report

    def log_params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_json(self, data: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def log_file(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_keras_model(self, model: keras.Model, artifact_path: str) -> None:
        """Save ``model`` as a ``.keras`` file under ``artifact_path`` (folder/name.keras)."""
        folder, name = artifact_path.rsplit("/", 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            model.save(path)
            self.log_file(path, folder)

    def epoch_logger(self) -> EpochMetricsLogger:
        from sweep.tracking.callback import EpochMetricsLogger

        return EpochMetricsLogger(self)


@contextmanager
def open_run(client: MlflowClient, experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str],
             parent_run_id: str | None = None, resume_run_id: str | None = None,
             report: Reporter = print) -> Iterator[RunLogger]:
    """A run for a sweep (or a trial, under ``parent_run_id``), re-opened when ``resume_run_id`` is given.

    The caller owns its lifetime: the run ends FINISHED when the block ends, KILLED when the process is
    interrupted (Ctrl-C, SIGTERM) and FAILED on any other exception, which propagates.
    """
    if resume_run_id is not None:
        client.update_run(resume_run_id, status="RUNNING")
        run_id = resume_run_id
    else:
        if parent_run_id is not None:
            tags = {**tags, PARENT_RUN_TAG: parent_run_id}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    logger = RunLogger(client, run_id, report)
    status = "FAILED"
    try:
        if resume_run_id is None and params:
            logger.log_params(params)
        yield logger
        status = "FINISHED"
    except BaseException as exc:
        if interrupted(exc):
            status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status=status)


def log_report_run(client: MlflowClient, experiment_id: str, name: str, files: list[Path],
                   metrics: dict[str, float], tags: dict[str, str]) -> str:
    """A standalone run (not a sweep) that carries a report's files and headline numbers; returns its id."""
    with open_run(client, experiment_id, name, {}, tags) as run:
        for path in files:
            run.log_file(path)
        if metrics:
            run.log_metrics(metrics)
        return run.run_id


def mark_killed(client: MlflowClient, run_id: str, reason: str) -> None:
    """Close a run that a dead process left RUNNING."""
    client.set_tag(run_id, "error", reason)
    client.set_terminated(run_id, status="KILLED")


def clear_tag(client: MlflowClient, run_id: str, key: str) -> None:
    """Remove a tag from a run (one that no longer holds, e.g. a resumed sweep's "stopped")."""
    with_retries(client.delete_tag, run_id, key)


def with_retries(call, *args, **kwargs):
    """``call(*args, **kwargs)``, tried again (with backoff) when a store hiccups; the last error propagates."""
    from tenacity import Retrying, stop_after_attempt, wait_exponential

    for attempt in Retrying(stop=stop_after_attempt(RETRY_ATTEMPTS), wait=wait_exponential(multiplier=0.2, max=2),
                            reraise=True):
        with attempt:
            return call(*args, **kwargs)
