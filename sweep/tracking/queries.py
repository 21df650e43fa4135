"""Reading runs back: the searches every command that reads results makes, each through the client it is
given. User-given names go into MLflow's filter strings only through ``filter_value``."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from sweep.errors import SweepError
from sweep.tracking.runs import PARENT_RUN_TAG

MAX_RUNS = 50000


def filter_value(text: str) -> str:
    """``text`` as a quoted value of an MLflow search filter. MLflow's filter grammar has no escape inside a
    quoted value, so a value holding a single quote is put in double quotes, and one holding both kinds of
    quote cannot be searched for (a user-given sweep or family name, say).

    Raises:
        SweepError: ``text`` holds both ``'`` and ``"``.
    """
    text = str(text)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise SweepError(f"the name {text!r} holds both kinds of quote, which MLflow's search cannot match; rename it "
                     "without one of them.")


def finished_trials(client: MlflowClient, experiment_id: str, family: str | None = None) -> list:
    """Every finished trial run (nested under a sweep) of an experiment, optionally of one family."""
    query = "attributes.status = 'FINISHED'"
    if family:
        query += f" and tags.family = {filter_value(family)}"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=MAX_RUNS)
    return [r for r in runs if PARENT_RUN_TAG in r.data.tags and "trial_id" in r.data.tags
            and "test_accuracy" in r.data.metrics]


def find_sweep(client: MlflowClient, experiment_id: str, family: str | None, name: str | None = None):
    """The sweep run named ``name``, else the newest unfinished sweep of ``family``; or None."""
    query = "tags.kind = 'sweep'" + (f" and tags.family = {filter_value(family)}" if family else "")
    if name:
        query += f" and tags.sweep = {filter_value(name)}"
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=100)
    if name:
        return runs[0] if runs else None
    # unfinished: still RUNNING, killed, failed, or ended at its --time-budget with trials left
    return next((r for r in runs if r.info.status != "FINISHED" or r.data.tags.get("stopped") == "time_budget"),
                None)


def sweep_runs(client: MlflowClient, experiment_id: str) -> list:
    """Every sweep's own run in the experiment (the parents of the trial runs)."""
    return client.search_runs([experiment_id], filter_string="tags.kind = 'sweep'", max_results=MAX_RUNS)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every run whose parent is ``parent_run_id``."""
    return client.search_runs([experiment_id], filter_string=f"tags.{PARENT_RUN_TAG} = {filter_value(parent_run_id)}",
                              max_results=MAX_RUNS)


def metric_history(client: MlflowClient, run_id: str, name: str) -> list[float]:
    """One metric's values of a run, in step order."""
    return [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


def download(client: MlflowClient, run_id: str, artifact_path: str, destination: Path) -> Path:
    """Download one artifact of a run into ``destination`` and return its local path."""
    return Path(client.download_artifacts(run_id, artifact_path, str(destination)))


def has_artifact(client: MlflowClient, run_id: str, artifact_path: str) -> bool:
    folder = artifact_path.rsplit("/", 1)[0] if "/" in artifact_path else ""
    return any(a.path == artifact_path for a in client.list_artifacts(run_id, folder or None))
