"""``sweep bench``: the same trial the study's way and ours, side by side, and a whole sweep our way.

The plain way is a stock Keras Tuner trial: ``kt.Tuner`` with its own ``run_trial`` (checkpointing, its
callbacks) and the family's model fitted on raw images every epoch. Our way is ``sweep run``'s trial loop
with everything it logs to MLflow; for the transfer family it trains the head on cached base features.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt

from search_spaces import make_hypermodel
from sweep.config import TrackingSettings
from sweep.data import Splits
from sweep.spec import SweepSpec
from sweep.study import Prepared, SweepResult, run_sweep
from sweep.tuning import build_oracle


class _EvaluatingHyperModel(kt.HyperModel):
    """Wraps a family: after the stock fit, scores the final model on the validation and test splits."""

    def __init__(self, family, splits: Splits, batch_size: int) -> None:
        super().__init__(name=family.name)
        self.family = family
        self.splits = splits
        self.batch_size = batch_size
        self.scores: list[dict[str, float]] = []

    def build(self, hp):
        return self.family.build(hp)

    def fit(self, hp, model, *args, **kwargs):
        started = time.monotonic()
        history = model.fit(*args, **kwargs)
        s = self.splits
        model = self.family.inference_model(model, hp.values)
        _, val = model.evaluate(s.validation.images, s.validation.labels, batch_size=self.batch_size, verbose=0)
        _, test = model.evaluate(s.test.images, s.test.labels, batch_size=self.batch_size, verbose=0)
        self.scores.append({"val_accuracy": float(val), "test_accuracy": float(test),
                            "seconds": time.monotonic() - started})
        return history


@dataclass
class BenchResult:
    family: str
    epochs: int
    plain: list[dict[str, float]]
    plain_seconds: float
    ours: SweepResult
    ours_seconds: float
    cache: str


def plain_trials(spec: SweepSpec, splits: Splits, weights_path: str | None, trials: int, directory: Path,
                 verbose: int = 0) -> tuple[list[dict[str, float]], float]:
    """Run ``trials`` stock Keras Tuner trials (the first is the family's defaults); returns scores and time."""
    keras.utils.set_random_seed(spec.seed)
    family = make_hypermodel(spec.family, len(splits.class_names), splits.image_size, weights_path)
    hypermodel = _EvaluatingHyperModel(family, splits, spec.batch_size)
    tuner = kt.Tuner(oracle=build_oracle(replace(spec, tuner="random", trials=trials)), hypermodel=hypermodel,
                     directory=str(directory), project_name="plain", overwrite=True)
    started = time.monotonic()
    tuner.search(splits.train.images, splits.train.labels, batch_size=spec.batch_size,
                 epochs=spec.epochs, shuffle=True, verbose=verbose,
                 validation_data=(splits.validation.images, splits.validation.labels))
    return hypermodel.scores, time.monotonic() - started


def run_bench(spec: SweepSpec, prepared: Prepared, tracking_settings: TrackingSettings, plain: int, cold: bool,
              report: Callable[[str], None] = print, verbose: int = 0) -> BenchResult:
    """Time ``plain`` stock trials, then the spec's sweep our way (cold cache if ``cold``)."""
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        report(f"[bench] plain Keras Tuner: {plain} trial(s) x {spec.epochs} epoch(s) on raw images ...")
        scores, plain_seconds = plain_trials(spec, prepared.splits, prepared.weights_path, plain, Path(tmp), verbose)
        if cold:
            tracking_settings = replace(tracking_settings, cache_dir=Path(tmp) / "feature_cache")
        report(f"[bench] ours: {spec.trials} trial(s), {'cold' if cold else 'configured'} feature cache ...")
        started = time.monotonic()
        ours = run_sweep(spec, prepared, tracking_settings, report, verbose, tags={"bench": "true"})
        ours_seconds = time.monotonic() - started
    return BenchResult(spec.family, spec.epochs, scores, plain_seconds, ours, ours_seconds,
                       "cold" if cold else "configured")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_table(result: BenchResult) -> str:
    """The side-by-side table ``sweep bench`` prints."""
    plain_trial = result.plain[0]
    ours_trial = result.ours.records[0] if result.ours.records else None
    per_plain = result.plain_seconds / max(len(result.plain), 1)
    n = len(result.ours.records)
    rows = [("", "wall time", "val acc", "test acc")]
    rows.append(("plain trial 1 (raw images)", _duration(plain_trial["seconds"]),
                 f"{plain_trial['val_accuracy']:.1%}", f"{plain_trial['test_accuracy']:.1%}"))
    if ours_trial is not None:
        rows.append(("our trial 1 (same hyperparameters)", _duration(ours_trial.seconds),
                     f"{ours_trial.val_accuracy:.1%}", f"{ours_trial.test_accuracy:.1%}"))
    rows.append((f"our feature cache ({result.cache})", _duration(result.ours.setup_seconds), "", ""))
    best = result.ours.best
    rows.append((f"our whole {n}-trial sweep", _duration(result.ours_seconds),
                 f"{best.val_accuracy:.1%}" if best else "", f"{best.test_accuracy:.1%}" if best else ""))
    rows.append((f"plain {n}-trial sweep (projected {n} x {_duration(per_plain)})", _duration(per_plain * n), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if ours_trial is not None:
        lines.append(f"per-trial speed-up: {plain_trial['seconds'] / max(ours_trial.seconds, 1e-9):.1f}x; "
                     f"whole sweep: {per_plain * n / max(result.ours_seconds, 1e-9):.1f}x "
                     f"(family {result.family}, {result.epochs} epochs a trial, baseline "
                     f"{result.ours.baseline_accuracy:.1%})")
    return "\n".join(lines)
