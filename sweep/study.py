"""Sweeps: one family's sweep under a parent MLflow run, a study of several, and resuming one.

All checks that can fail on user input (data layout, weights, tracking store) run before the first MLflow
run is created, so bad input leaves nothing half-written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

import keras

from search_spaces import (
    FAMILIES,
    HyperFamily,
    checkpoint_size_warning,
    default_values,
    describe,
    make_hypermodel,
    resolve_weights,
)
from sweep import plots, tracking
from sweep.config import SweepSettings, TrackingSettings
from sweep.data import DATASET_URL, Splits, check_layout, download_dataset, load_splits
from sweep.errors import SweepError
from sweep.features import PoolSpec
from sweep.results import (
    DEFAULT_OBJECTIVE,
    LEGACY_OBJECTIVE,
    OBJECTIVES,
    TrialRecord,
    best_record,
    record_from_run,
    trials_csv,
)
from sweep.tuning import SweepTuner, build_oracle, prepare_features

Reporter = Callable[[str], None]


@dataclass
class Prepared:
    """Everything a sweep needs that is checked or loaded once: data, weights file, experiment."""

    splits: Splits
    weights_path: str | None
    experiment_id: str


def prepare(first: SweepSettings, tracking_settings: TrackingSettings, need_weights: bool,
            report: Reporter = print) -> Prepared:
    """Check data, weights and the tracking store, then decode the images once.

    Raises:
        SweepError: bad data, weights or tracking settings.
    """
    data_dir = first.data_dir if first.data_dir is not None else download_dataset()
    check_layout(data_dir)  # fail in a second, before decoding thousands of images
    weights_path = resolve_weights(first.weights, first.image_size) if need_weights else None
    experiment_id = tracking.use_experiment(tracking_settings)
    warning = checkpoint_size_warning(weights_path, first.image_size)
    if warning:
        report(warning)
    report(f"Loading images from {data_dir} ...")
    # absolute, so resume, workers and export find the folder from any working directory
    source = str(Path(first.data_dir).resolve()) if first.data_dir is not None else DATASET_URL
    splits = load_splits(data_dir, first.image_size, first.batch_size, first.seed, source=source)
    if splits.skipped:
        shown = "\n  ".join(splits.skipped[:20]) + ("\n  ..." if len(splits.skipped) > 20 else "")
        report(f"Warning: skipped {len(splits.skipped)} unreadable file(s) (also listed in data.json):\n  {shown}")
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in splits.counts().items())
    report(f"Classes {', '.join(splits.class_names)}; images: {counts}; "
           f"baseline (always '{splits.class_names[splits.majority_class]}') {splits.baseline_accuracy:.1%}")
    return Prepared(splits, weights_path, experiment_id)


@dataclass
class SweepResult:
    """What a finished sweep produced."""

    family: str
    run_id: str
    records: list[TrialRecord] = field(default_factory=list)
    baseline_accuracy: float = 0.0
    setup_seconds: float = 0.0  # feature cache load or build, before the first trial
    objective: str = DEFAULT_OBJECTIVE

    @property
    def best(self) -> TrialRecord | None:
        return best_record(self.records, self.objective)


def run_sweep(
    settings: SweepSettings,
    splits: Splits,
    tracking_settings: TrackingSettings,
    experiment_id: str,
    weights_path: str | None = None,
    report: Reporter = print,
    resume_run=None,
    name: str | None = None,
    chief=None,
) -> SweepResult:
    """Run one family's sweep under a parent MLflow run and log its summary there.

    Args:
        settings: the sweep as asked for (family, trials, tuner, epochs, seed, ...).
        splits: the decoded data; shared by every trial (and every family of a study).
        tracking_settings: where Keras Tuner keeps its project folder.
        experiment_id: the MLflow experiment (see ``tracking.use_experiment``).
        weights_path: a local MobileNetV2 weights file or None (transfer only; see ``resolve_weights``).
        report: receives one progress line per finished trial.
        resume_run: the MLflow run of an interrupted sweep to continue (see ``find_resumable``).
        name: the sweep's name (default: family, tuner and the time).
        chief: serve the oracle to worker processes instead of running trials here
            (``sweep.distributed.Chief``).

    Raises:
        SweepError: bad settings, or too many trials failed in a row.
    """
    if resume_run is not None:
        name = resume_run.data.tags["sweep"]
        if not (tracking_settings.tuner_dir / name / "oracle.json").is_file():
            raise SweepError(f"sweep {name} cannot be resumed: its Keras Tuner folder "
                             f"{tracking_settings.tuner_dir / name} is gone.")
    else:
        name = name or f"{settings.family}-{settings.tuner}-{datetime.now():%Y%m%d-%H%M%S}"
    if chief is not None:  # Keras Tuner's distributed mode: this process serves the oracle
        chief.configure_environment()
    # Built before any MLflow run exists: a model that cannot be built (bad weights file) leaves no run behind.
    tuner, features, setup_seconds = build_tuner(settings, splits, tracking_settings, weights_path, name,
                                                 overwrite=resume_run is None, report=report,
                                                 trains_here=chief is None)
    tuner.experiment_id = experiment_id
    if resume_run is not None:
        _adopt_finished_trials(tuner, experiment_id, resume_run.info.run_id, report)
    params = {
        "family": settings.family, "tuner": settings.tuner, "objective": settings.objective,
        "trials": settings.trials, "epochs": settings.epochs, "seed": settings.seed, "batch_size": settings.batch_size,
        "image_size": f"{settings.image_size[0]}x{settings.image_size[1]}", "data": splits.source,
        "num_classes": len(splits.class_names), "tuner_dir": tuner.project_dir,
    }
    if settings.family == "transfer":
        params["weights"] = str(settings.weights)
        params["feature_cache"] = settings.feature_cache
        if settings.feature_cache:
            params["pool_views_per_image"] = PoolSpec().views_per_image
    tags = {"family": settings.family, "sweep": name, "kind": "sweep", **settings.extra_tags}
    goal = "lowest" if OBJECTIVES[settings.objective] == "min" else "highest"
    report(
        f"[{settings.family}] {'resuming ' if resume_run else ''}sweep {name}: {settings.trials} trial(s) x "
        f"{settings.epochs} epoch(s), {settings.tuner} search for the {goal} {settings.objective}; baseline "
        f"{splits.baseline_accuracy:.1%} on {len(splits.test)} test images"
    )
    resume_id = resume_run.info.run_id if resume_run is not None else None
    with tracking.sweep_run(experiment_id, name, params, tags, resume_run_id=resume_id) as run_id:
        tuner.parent_run_id = run_id
        result = SweepResult(settings.family, run_id, tuner.records, splits.baseline_accuracy, setup_seconds,
                             settings.objective)
        tracking.log_json(splits.summary(), "data.json")
        tracking.log_text("\n".join(splits.test.files) + "\n", "test_files.txt")
        tracking.log_json({"family": settings.family, "hyperparameters": describe(settings.family),
                           "defaults": default_values(tuner.oracle.hyperparameters)}, "search_space.json")
        try:
            if chief is None:
                tuner.search(verbose=0)
            else:
                tuner.save()
                chief.serve(tuner.oracle, report, name)
                _adopt_finished_trials(tuner, experiment_id, run_id, report)
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            tracking.log_result({}, {"stopped": "consecutive_failures"})
            raise SweepError(
                f"{settings.family}: {tuner.oracle.max_consecutive_failed_trials} trials failed in a row, so the "
                f"sweep stopped. Last error: {last}. Each failed trial's MLflow run holds its error."
            ) from None
        _log_summary(result, settings)
    return result


def build_tuner(settings: SweepSettings, splits: Splits, tracking_settings: TrackingSettings,
                weights_path: str | None, name: str, overwrite: bool, report: Reporter, trains_here: bool = True):
    """The family's hypermodel, its cached features (transfer, when this process trains) and the tuner.

    Returns:
        (tuner, features or None, seconds spent loading or computing features)
    """
    if settings.family not in FAMILIES:
        raise SweepError(f"unknown family {settings.family!r}; choose one of {', '.join(FAMILIES)}.")
    keras.utils.set_random_seed(settings.seed)
    hypermodel: HyperFamily = make_hypermodel(
        settings.family, num_classes=len(splits.class_names), image_size=splits.image_size, weights=weights_path
    )
    features, started = None, time.monotonic()
    if settings.family == "transfer" and settings.feature_cache and trains_here:
        features = prepare_features(hypermodel, splits, weights_path, tracking_settings.cache_dir, report)
    setup_seconds = time.monotonic() - started
    tuner = SweepTuner(
        splits=splits, settings=settings, report=report, features=features,
        oracle=build_oracle(settings.tuner, settings.trials, settings.epochs, settings.seed, settings.objective),
        hypermodel=hypermodel, directory=str(tracking_settings.tuner_dir), project_name=name, overwrite=overwrite,
    )
    return tuner, features, setup_seconds


def _adopt_finished_trials(tuner, experiment_id: str, parent_run_id: str, report: Reporter) -> None:
    """Resume: close the runs a dead process left RUNNING, and hand finished trials to the tuner."""
    children = tracking.child_runs(experiment_id, parent_run_id)
    for run in children:
        if run.info.status == "RUNNING":
            tracking.mark_killed(run.info.run_id, "interrupted; the trial is run again on resume")
            report(f"Marked interrupted run {run.info.run_name} ({run.info.run_id}) as KILLED.")
    finished = []
    for run in children:
        if run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics:
            history = {name: tracking.metric_history(run.info.run_id, name)
                       for name in ("accuracy", "val_accuracy", "loss", "val_loss")}
            finished.append(record_from_run(run, history))
    tuner.adopt(finished)
    report(f"Kept {len(finished)} finished trial(s); {len(children) - len(finished)} other run(s) stay as they were.")


def _log_summary(result: SweepResult, settings: SweepSettings) -> None:

    metrics = {"baseline_accuracy": result.baseline_accuracy, "trials_finished": float(len(result.records))}
    tags = {}
    best = result.best
    if best is not None:
        metrics.update(best_val_accuracy=best.val_accuracy, best_val_loss=best.val_loss,
                       best_test_accuracy=best.test_accuracy)
        tags = {"best_trial": str(best.number), "best_run_id": best.run_id}
        tracking.log_json({k: v for k, v in best.hyperparameters.items()}, "best_hyperparameters.json")
    tracking.log_result(metrics, tags)
    tracking.log_text(trials_csv(result.records), "trials.csv")
    title = f"{settings.family}: validation accuracy of {len(result.records)} trial(s)"
    tracking.log_figure(plots.plot_trials(result.records, result.baseline_accuracy, title), "trials.png")


def find_resumable(settings: SweepSettings, tracking_settings: TrackingSettings, name: str | None):
    """The sweep run to resume and the settings it was started with.

    Raises:
        SweepError: no such sweep, or it already finished all its trials.
    """
    experiment_id = tracking.experiment_id_of(tracking_settings)
    run = tracking.find_sweep(experiment_id, settings.family, name)
    if run is None:
        what = f"sweep {name!r} of family {settings.family}" if name else f"unfinished {settings.family} sweep"
        raise SweepError(f"no {what} in experiment {tracking_settings.experiment!r} to resume; "
                         "start one without --resume.")
    if run.info.status == "FINISHED":
        raise SweepError(f"sweep {name!r} already finished all its trials; start a new sweep instead.")
    if run.data.tags.get("stopped") == "consecutive_failures":
        raise SweepError(f"sweep {run.data.tags['sweep']!r} stopped because trials failed in a row (see their "
                         "runs' error tags); resuming would repeat that. Fix the cause and start a new sweep.")
    return run, settings_from_run(run, settings)


def settings_from_run(run, base: SweepSettings) -> SweepSettings:
    """The settings a sweep was started with, read back from its MLflow run's params."""
    p = run.data.params
    height, width = (int(v) for v in p["image_size"].split("x"))
    return replace(
        base, family=p["family"], trials=int(p["trials"]), tuner=p["tuner"], epochs=int(p["epochs"]),
        objective=p.get("objective", LEGACY_OBJECTIVE),
        seed=int(p["seed"]), batch_size=int(p["batch_size"]), image_size=(height, width),
        data_dir=None if p["data"] == DATASET_URL else Path(p["data"]),
        weights=p.get("weights", base.weights),
        feature_cache=p.get("feature_cache", "True") == "True",
    )


def run_study(settings: list[SweepSettings], tracking_settings: TrackingSettings, report: Reporter = print,
              resume: bool = False, sweep_name: str | None = None):
    """Run each family's sweep in turn on one decoded copy of the data.

    Args:
        settings: one entry per family, sharing data options (data dir, image size, batch size, seed).
        tracking_settings: the MLflow store and experiment.
        report: receives progress lines.

    Returns:
        A list of ``SweepResult``, one per family.

    Raises:
        SweepError: bad data, weights or tracking settings, or a sweep that stopped on failures.
    """
    if not settings:
        raise SweepError("no family to sweep.")
    resume_run = None
    if resume or sweep_name:
        if len(settings) != 1:
            raise SweepError("--resume takes one family, not 'all'; resume each family's sweep in turn.")
        resume_run, resumed = find_resumable(settings[0], tracking_settings, sweep_name)
        settings = [resumed]
        report(f"Resuming sweep {resume_run.data.tags['sweep']} (MLflow run {resume_run.info.run_id}) with its "
               f"own settings: {resumed.trials} trials x {resumed.epochs} epochs, {resumed.tuner}, objective "
               f"{resumed.objective}, seed {resumed.seed}")
    prepared = prepare(settings[0], tracking_settings, any(s.family == "transfer" for s in settings), report)
    return [run_sweep(s, prepared.splits, tracking_settings, prepared.experiment_id, prepared.weights_path, report,
                      resume_run) for s in settings]
