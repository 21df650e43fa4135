"""Plain records of finished trials, the best pick and the trials table."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from sweep.spec import DEFAULT_OBJECTIVE, OBJECTIVES, SweepSpec


@dataclass
class TrialRecord:
    """What one trial produced, free of Keras Tuner and MLflow objects."""

    family: str
    trial_id: str
    number: int
    hyperparameters: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)
    first_epoch: int = 1  # Hyperband continues a trial from a later epoch
    val_accuracy: float = float("nan")  # the final model's
    val_loss: float = float("nan")  # the final model's; the default objective
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    test_images: int = 0  # how many images test_accuracy was measured on
    val_images: int = 0  # how many images val_accuracy was measured on (0: a run logged before it was recorded)
    seconds: float = 0.0
    run_id: str = ""
    stages: dict[str, int] = field(default_factory=dict)  # a later training stage (fine_tune) -> its first epoch
    pruned_at: int | None = None  # the epoch a pruned trial stopped after (sweep/pruning.py); None: it ran in full

    @property
    def scores(self) -> dict[str, float]:
        """The final model's validation figures, as a trial reports them to Keras Tuner's oracle."""
        return {"val_loss": self.val_loss, "val_accuracy": self.val_accuracy}

    @property
    def accuracy(self) -> float:
        values = self.history.get("accuracy") or [float("nan")]
        return float(values[-1])


def accuracy_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy measured on ``n`` images (NaNs when ``n`` is 0).

    On a 192-image test split one image is 0.52 points, so two trials a point apart are not told apart by
    their test accuracy; the interval says how far the split's figure could be from the model's accuracy.
    """
    if n <= 0 or accuracy != accuracy:
        return float("nan"), float("nan")
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_text(record: TrialRecord) -> str:
    """`` (95% CI 93.4%-98.6%, 192 images)`` to follow the record's test accuracy; "" when it has none."""
    low, high = accuracy_interval(record.test_accuracy, record.test_images)
    if low != low:
        return ""
    return f" (95% CI {low:.1%}-{high:.1%}, {record.test_images} images)"


# The tag of a pruned trial's run: the epoch it stopped after.
PRUNED_TAG = "pruned_at_epoch"
# What `sweep best` and `sweep report` can rank logged trials by, and which way is better.
RANKINGS = {**OBJECTIVES, "test_accuracy": "max"}


def _sign(metric: str) -> float:
    """1 when lower ``metric`` is better, -1 when higher is: ``sign * value`` then sorts best first."""
    return 1.0 if RANKINGS[metric] == "min" else -1.0


def best_record(records: list[TrialRecord], objective: str = DEFAULT_OBJECTIVE) -> TrialRecord | None:
    """The trial with the best final ``objective`` (lowest validation loss by default); the earliest wins a tie.

    Validation loss is the default because, near the top, trials differ in validation accuracy by one or two
    images, so the most accurate trial on validation is often a lucky, overconfident one; the cross-entropy
    of the predicted probabilities tells such trials apart (see the README's "Choosing the best trial").
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    sign = _sign(objective)
    finished = [r for r in records if getattr(r, objective) == getattr(r, objective)]  # drop NaN
    finished = [r for r in finished if r.pruned_at is None] or finished  # a pruned trial is scored at fewer epochs
    return min(finished, key=lambda r: (sign * getattr(r, objective), r.number), default=None)


def best_run(runs: list[Any], metric: str = DEFAULT_OBJECTIVE) -> Any:
    """The MLflow run with the best final ``metric`` (see ``RANKINGS``) among the trials that ran every epoch
    (a pruned trial's figures are from fewer epochs); the earliest wins a tie, and runs without the metric (or
    with NaN) come last."""
    sign = _sign(metric)
    runs = [r for r in runs if PRUNED_TAG not in r.data.tags] or runs

    def key(run):
        value = run.data.metrics.get(metric, float("nan"))
        return (sign * value if value == value else float("inf"), run.info.start_time)  # NaN or missing: last

    return min(runs, key=key)


def param_text(value: Any) -> str:
    """A hyperparameter value as an MLflow param, exactly: a float as its shortest text that reads back as the
    same float, so ``--hp NAME=<the logged value>`` reruns the very trial."""
    return repr(value) if isinstance(value, float) else str(value)


def param_value(text: str) -> Any:
    """A logged hyperparameter param read back as the value it was: a bool, int or float where it reads as one,
    else the text."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def format_value(value: Any) -> str:
    """Short text for a hyperparameter value in progress lines and tables (floats to 4 significant digits);
    MLflow gets the exact value (``param_text``)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_duration(seconds: float) -> str:
    """1m05s, 1h02m."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def trials_csv(records: list[TrialRecord]) -> str:
    """All trials as CSV: identity, every hyperparameter, accuracies and time."""
    names: list[str] = []
    for record in records:
        names += [n for n in record.hyperparameters if n not in names]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "trial_id", "run_id", *names, "accuracy", "val_accuracy", "val_loss", "test_accuracy",
                     "seconds"])
    for r in records:
        writer.writerow(
            [r.number, r.trial_id, r.run_id, *(r.hyperparameters.get(n, "") for n in names),
             f"{r.accuracy:.4f}", f"{r.val_accuracy:.4f}", f"{r.val_loss:.4f}", f"{r.test_accuracy:.4f}",
             f"{r.seconds:.1f}"]
        )
    return out.getvalue()


def objective_of(runs: list[Any]) -> str:
    """The objective the trials were chosen by: their sweeps' own when they all share one, else the default."""
    used = {r.data.params["objective"] for r in runs}
    return used.pop() if len(used) == 1 else DEFAULT_OBJECTIVE


def record_from_run(run: Any, history: dict[str, list[float]] | None = None) -> TrialRecord:
    """A finished trial's MLflow run as a ``TrialRecord`` (latest metric values; histories if given)."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    hyperparameters = {k: param_value(v) for k, v in params.items() if k not in SweepSpec.param_names()}
    if history is None:
        history = {name: [metrics[name]] for name in ("accuracy", "val_accuracy", "loss", "val_loss") if name in metrics}
    return TrialRecord(
        family=tags.get("family", params.get("family", "?")),
        trial_id=tags.get("trial_id", ""),
        number=int(tags.get("trial_number", 0)),
        hyperparameters=hyperparameters,
        history=history,
        val_accuracy=float(metrics.get("val_accuracy", float("nan"))),
        val_loss=float(metrics.get("val_loss", float("nan"))),
        test_accuracy=float(metrics.get("test_accuracy", float("nan"))),
        test_loss=float(metrics.get("test_loss", float("nan"))),
        test_images=int(metrics.get("test_images", 0)),
        val_images=int(metrics.get("validation_images", 0)),
        seconds=float(metrics.get("train_seconds", 0.0)),
        run_id=run.info.run_id,
        stages={name[:-len("_first_epoch")]: int(value) for name, value in tags.items() if name.endswith("_first_epoch")},
        pruned_at=int(tags[PRUNED_TAG]) if PRUNED_TAG in tags else None,
    )
