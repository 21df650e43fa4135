"""Everything that talks to MLflow, one job a module:

- ``checks``: pre-flight checks that a sweep could write to the store, creating nothing;
- ``store``: ``Store``, the one client made from the settings, and the one lookup of the experiment;
- ``runs``: writing runs by id (``open_run``, ``RunLogger``), never through MLflow's implicit state;
- ``callback``: the Keras callback that logs a trial's epochs into its run;
- ``queries``: reading runs back (trials, sweeps, histories, artifacts);
- ``registry``: registering an export and moving its alias.

The names below are the package's public face; callers import them from ``sweep.tracking``. The callback (and
with it Keras and TensorFlow) is imported on first use, so the commands that only read results start in a second.
"""

from sweep.tracking.runs import EPOCH_METRICS
from sweep.tracking.checks import check_sqlite_file, check_store
from sweep.tracking.queries import (child_runs, download, filter_value, find_sweep, finished_trials, has_artifact,
                                    metric_history, sweep_runs)
from sweep.tracking.registry import register_model
from sweep.tracking.runs import (MODEL_ARTIFACT, PARENT_RUN_TAG, STOP_REQUESTED, RunLogger, clear_tag, interrupted,
                                 log_report_run, mark_killed, open_run, with_retries)
from sweep.tracking.store import Store

__all__ = ["EPOCH_METRICS", "EpochMetricsLogger", "check_sqlite_file", "check_store", "child_runs", "download",
           "filter_value", "find_sweep", "finished_trials", "has_artifact", "metric_history", "sweep_runs",
           "register_model", "MODEL_ARTIFACT", "PARENT_RUN_TAG", "STOP_REQUESTED", "RunLogger", "clear_tag",
           "interrupted", "log_report_run", "mark_killed", "open_run", "with_retries", "Store"]


def __getattr__(name: str):
    if name == "EpochMetricsLogger":
        from sweep.tracking.callback import EpochMetricsLogger

        return EpochMetricsLogger
    raise AttributeError(f"module 'sweep.tracking' has no attribute {name!r}")
