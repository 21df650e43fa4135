"""Sweeps: one family's sweep under a parent MLflow run, a study of several, and resuming one.

All checks that can fail on user input (data layout, weights, tracking store) run before the first MLflow
run is created, so bad input leaves nothing half-written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import keras

from search_spaces import registry
from search_spaces.base import HyperFamily
from search_spaces.space import default_values, describe
from sweep import plots, precision, pruning, tracking
from sweep.config import TrackingSettings
from sweep.data import Splits, check_layout, download_dataset, load_splits
from sweep.errors import SweepError
from sweep.results import TrialRecord, best_record, format_duration, record_from_run, trials_csv
from sweep.spec import DEFAULT_OBJECTIVE, OBJECTIVES, SweepSpec
from sweep.tuning import ConsecutiveFailures, SweepTuner, build_oracle, verify_best_kept
from sweep.weights import image_size_line, resolve_weights

Reporter = Callable[[str], None]
# The ``stopped`` tag of a sweep that ended at its --time-budget: finished, and resumable.
TIME_BUDGET = "time_budget"


@dataclass
class Prepared:
    """Everything a sweep needs that is checked or loaded once: data, weights file, experiment.

    The experiment is looked up (and made, when new) on first use, not in ``prepare``: inputs that fail later
    checks (a weights file that does not load, say) leave no empty experiment behind."""

    splits: Splits
    weights_path: str | None
    store: tracking.Store
    _experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.store.open_experiment()
        return self._experiment_id


def prepare(spec: SweepSpec, tracking_settings: TrackingSettings, report: Reporter = print,
            need_weights: bool | None = None) -> Prepared:
    """Check the family, data, weights and the tracking store, and that every image decodes (the splits decode
    them when they are used). ``need_weights``: resolve ``--weights`` (default: when the family ``uses_weights``).

    Raises:
        SweepError: a family that cannot be imported; bad data, weights or tracking settings.
    """
    if need_weights is None:
        need_weights = registry.family_class(spec.family).uses_weights  # imports it: a bad --family fails first
    data_dir = spec.data_dir if spec.data_dir is not None else download_dataset()
    check_layout(data_dir)  # fail in a second, before decoding thousands of images
    weights_path = resolve_weights(spec.weights, spec.image_size) if need_weights else None
    tracking.check_store(tracking_settings)  # nothing is written until the data has passed its checks
    line = image_size_line(weights_path, spec.image_size) if need_weights else None
    if line:
        report(line)
    report(f"Loading images from {data_dir} ...")
    splits = load_splits(data_dir, spec.image_size, spec.batch_size, spec.seed,
                         source=spec.to_params()["data"])
    if splits.skipped:
        shown = "\n  ".join(splits.skipped[:20]) + ("\n  ..." if len(splits.skipped) > 20 else "")
        report(f"Warning: skipped {len(splits.skipped)} unreadable file(s) (also listed in data.json):\n  {shown}")
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in splits.counts().items())
    report(f"Classes {', '.join(splits.class_names)}; images: {counts}; "
           f"baseline (always '{splits.class_names[splits.majority_class]}') {splits.baseline_accuracy:.1%}")
    return Prepared(splits, weights_path, tracking.Store(tracking_settings))


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
        """The best finished trial by the sweep's objective (None when none finished)."""
        return best_record(self.records, self.objective)

    @property
    def trials(self) -> list[TrialRecord]:
        """Every trial that finished, in the order they ended, with its hyperparameters and scores."""
        return list(self.records)


def run_sweep(
    spec: SweepSpec,
    prepared: Prepared,
    tracking_settings: TrackingSettings,
    report: Reporter = print,
    verbose: int = 0,
    resume_run=None,
    name: str | None = None,
    chief=None,
    tags: dict[str, str] | None = None,
    deadline: float | None = None,
) -> SweepResult:
    """Run one family's sweep under a parent MLflow run and log its summary there.

    Args:
        spec: the sweep.
        prepared: the splits, weights file and experiment (``prepare``); shared by the families of a study
            that run at one image size.
        tracking_settings: where Keras Tuner keeps its project folder and the transfer family its cache.
        report: receives one progress line per finished trial.
        verbose: Keras' progress output per epoch (0 none, 1 bar, 2 one line).
        resume_run: the MLflow run of an interrupted sweep to continue (see ``find_resumable``).
        name: the sweep's name (default: family, tuner and the time).
        chief: serve the oracle to worker processes instead of running trials here
            (``sweep.distributed.Chief``).
        tags: extra tags for the sweep's run.
        deadline: the time (``time.time()``) by which the sweep ends (``--time-budget``): no trial starts that
            would not finish by then, and a trial still running then stops as a pruned one.

    Raises:
        SweepError: bad settings, or too many trials failed in a row.
    """
    if resume_run is not None:
        name = resume_run.data.tags["sweep"]
        if not (tracking_settings.tuner_dir / name / "oracle.json").is_file():
            raise SweepError(f"sweep {name} cannot be resumed: its Keras Tuner folder "
                             f"{tracking_settings.tuner_dir / name} is gone.")
    else:
        name = name or default_name(spec)
    if chief is not None:  # Keras Tuner's distributed mode: this process serves the oracle, until the sweep ends
        with chief.environment():
            return _run_sweep(spec, prepared, report, verbose, resume_run, name, chief, tags,
                              deadline)
    return _run_sweep(spec, prepared, report, verbose, resume_run, name, chief, tags, deadline)


def _run_sweep(spec: SweepSpec, prepared: Prepared, report: Reporter,
               verbose: int, resume_run, name: str, chief, tags: dict[str, str] | None,
               deadline: float | None) -> SweepResult:
    splits = prepared.splits
    # Built before any MLflow run exists: a model that cannot be built (bad weights file) leaves no run behind.
    try:
        tuner, setup_seconds = build_tuner(spec, splits, prepared.store, prepared.weights_path, name,
                                           overwrite=resume_run is None, report=report, verbose=verbose,
                                           trains_here=chief is None, deadline=deadline,
                                           trial_retries=chief.trial_retries if chief is not None else 1)
    except KeyboardInterrupt:  # while computing cached features: only whole cache files are ever kept
        again = (f"Resume with: sweep run --family {spec.family} --resume --sweep {name}" if resume_run is not None
                 else f"Start it again with: sweep run --family {spec.family} and the same options")
        report(f"[{spec.family_name}] stopped before its first trial; no run was logged and no partial feature cache "
               f"is kept. {again}.")
        raise
    tuner.experiment_id = prepared.experiment_id
    if resume_run is not None:
        _adopt_finished_trials(tuner, resume_run.info.run_id, report)
    params = {**spec.to_params(), "num_classes": len(splits.class_names), "tuner_dir": tuner.project_dir}
    policy = tuner.hypermodel.dtype_policy
    run_tags = {"family": spec.family_name, "sweep": name, "kind": "sweep", "dtype_policy": policy, **(tags or {})}
    goal = "lowest" if OBJECTIVES[spec.objective] == "min" else "highest"
    rungs = pruning.rungs(spec.epochs, tuner.oracle.first_rung) if getattr(tuner.oracle, "pruning", False) else []
    report(
        f"[{spec.family_name}] {'resuming ' if resume_run else ''}sweep {name}: {spec.trials} trial(s) x "
        f"{spec.epochs} epoch(s), {spec.tuner} search for the {goal} {spec.objective}"
        f"{', pruning at epochs ' + ', '.join(map(str, rungs)) if rungs else ''}"
        f"{', in ' + policy if policy != 'float32' else ''}"
        f"{', within ' + format_duration(deadline - time.time()) if deadline else ''}; baseline "
        f"{splits.baseline_accuracy:.1%} on {len(splits.test)} test images"
    )
    resume_id = resume_run.info.run_id if resume_run is not None else None
    try:
        with tracking.open_run(tuner.client, prepared.experiment_id, name, params, run_tags, resume_run_id=resume_id,
                               report=report) as run:
            tuner.parent_run_id = run.run_id
            result = SweepResult(spec.family_name, run.run_id, tuner.records, splits.baseline_accuracy, setup_seconds,
                                 spec.objective)
            run.log_json(splits.summary(), "data.json")
            run.log_text(splits.test_manifest(), "test_files.txt")
            run.log_json({"family": spec.family_name, "reference": spec.family, "hyperparameters": describe(spec.family),
                          "defaults": default_values(tuner.oracle.hyperparameters)}, "search_space.json")
            try:
                if chief is None:
                    tuner.search(verbose=0)
                else:
                    tuner.save()
                    chief.serve(tuner.oracle, report, name)
                    _adopt_finished_trials(tuner, run.run_id, report)
                if tuner.oracle.out_of_time:
                    run.set_tags({"stopped": TIME_BUDGET})
                    done = len(tuner.oracle.trials)
                    report(f"[{spec.family_name}] time budget reached after {done} of {spec.trials} trials; continue with: "
                           f"sweep run --family {spec.family} --resume --sweep {name} [--time-budget ...]")
                elif resume_run is not None and resume_run.data.tags.get("stopped") == TIME_BUDGET:
                    tracking.clear_tag(run.client, run.run_id, "stopped")  # all its trials ran this time
                verify_best_kept(spec, tuner.family, splits, tuner.client, prepared.experiment_id, run.run_id, report,
                                 tuner.last_kept)
            except ConsecutiveFailures as exc:
                run.set_tags({"stopped": "consecutive_failures"})
                raise SweepError(
                    f"{spec.family_name}: {tuner.oracle.max_consecutive_failed_trials} trials failed in a row, so the "
                    f"sweep stopped. Last error: {exc}. Each failed trial's MLflow run holds its error."
                ) from None
            _log_summary(run, result)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the runs are closed KILLED by now; say how to go on
        report(f"[{spec.family_name}] stopped; its open runs are marked KILLED. Resume with: "
               f"sweep run --family {spec.family} --resume --sweep {name}")
        raise
    return result


def default_name(spec: SweepSpec) -> str:
    """A new sweep's name when ``--sweep`` gives none: family, tuner and the time."""
    return f"{spec.family_name}-{spec.tuner}-{datetime.now():%Y%m%d-%H%M%S}"


def build_tuner(spec: SweepSpec, splits: Splits, store: tracking.Store, weights_path: str | None,
                name: str, overwrite: bool, report: Reporter, verbose: int = 0, trains_here: bool = True,
                deadline: float | None = None, trial_retries: int = 1):
    """The family's hypermodel, prepared to train here (its cached features, when the spec caches), and the
    tuner around it.

    Returns:
        (tuner, seconds spent loading or computing cached features)
    """
    hypermodel: HyperFamily = registry.make(
        spec.family, num_classes=len(splits.class_names), image_size=splits.image_size, weights=weights_path
    )
    registry.check(hypermodel)  # before the seed: its draws do not shift the trials'
    keras.utils.set_random_seed(spec.seed)
    if hypermodel.mixed_precision:
        hypermodel.dtype_policy = precision.resolve(spec.precision)
    started = time.monotonic()
    if spec.feature_cache and trains_here:
        hypermodel.prepare(splits, store.settings.cache_dir, report, fixed=dict(spec.fixed))
    setup_seconds = time.monotonic() - started
    tuner = SweepTuner(
        spec=spec, data=splits, report=report, verbose=verbose, oracle=build_oracle(spec, deadline=deadline), hypermodel=hypermodel,
        directory=str(store.settings.tuner_dir), project_name=name, overwrite=overwrite, store=store,
    )
    return tuner, setup_seconds


def _adopt_finished_trials(tuner, parent_run_id: str, report: Reporter) -> None:
    """Resume: close the runs a dead process left RUNNING, and hand finished trials to the tuner."""
    client = tuner.client
    children = tracking.child_runs(client, tuner.experiment_id, parent_run_id)
    for run in children:
        if run.info.status == "RUNNING":
            tracking.mark_killed(client, run.info.run_id, "interrupted; the trial is run again on resume")
            report(f"Marked interrupted run {run.info.run_name} ({run.info.run_id}) as KILLED.")
    finished = []
    for run in children:
        if run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics:
            history = {name: tracking.metric_history(client, run.info.run_id, name) for name in tracking.EPOCH_METRICS}
            finished.append(record_from_run(run, history))
    tuner.adopt(finished)
    report(f"Kept {len(finished)} finished trial(s); {len(children) - len(finished)} other run(s) stay as they were.")


def _log_summary(run: tracking.RunLogger, result: SweepResult) -> None:
    metrics = {"baseline_accuracy": result.baseline_accuracy, "trials_finished": float(len(result.records))}
    best = result.best
    if best is not None:
        metrics.update(best_val_accuracy=best.val_accuracy, best_val_loss=best.val_loss,
                       best_test_accuracy=best.test_accuracy)
        run.set_tags({"best_trial": str(best.number), "best_run_id": best.run_id})
        run.log_json(best.hyperparameters, "best_hyperparameters.json")
    run.log_metrics(metrics)
    run.log_text(trials_csv(result.records), "trials.csv")
    title = f"{result.family}: validation accuracy of {len(result.records)} trial(s)"
    run.log_figure(plots.plot_trials(result.records, result.baseline_accuracy, title), "trials.png")


def find_resumable(family: str, tracking_settings: TrackingSettings, name: str | None):
    """The sweep run to resume and the spec it was started with.

    Raises:
        SweepError: no such sweep, or it already finished all its trials.
    """
    store = tracking.Store(tracking_settings)
    experiment_id = store.experiment_id()  # before the client: a missing store is refused, not created
    run = tracking.find_sweep(store.client, experiment_id, family, name)
    if run is None:
        what = f"sweep {name!r} of family {family}" if name else f"unfinished {family} sweep"
        raise SweepError(f"no {what} in experiment {tracking_settings.experiment!r} to resume; "
                         "start one without --resume.")
    if run.info.status == "FINISHED" and run.data.tags.get("stopped") != TIME_BUDGET:
        raise SweepError(f"sweep {name!r} already finished all its trials; start a new sweep instead.")
    if run.data.tags.get("stopped") == "consecutive_failures":
        raise SweepError(f"sweep {run.data.tags['sweep']!r} stopped because trials failed in a row (see their "
                         "runs' error tags); resuming would repeat that. Fix the cause and start a new sweep.")
    return run, SweepSpec.from_params(run.data.params)


def check_new_name(tracking_settings: TrackingSettings, name: str, family: str) -> None:
    """Refuse a sweep name the experiment already holds: ``--sweep NAME`` names a new sweep, ``--resume``
    continues one.

    Raises:
        SweepError: the name is taken.
    """
    store = tracking.Store(tracking_settings)
    experiment_id = store.find_experiment()  # creates nothing
    if experiment_id is not None and tracking.find_sweep(store.client, experiment_id, None, name) is not None:
        raise SweepError(f"experiment {tracking_settings.experiment!r} already has a sweep named {name!r}; continue "
                         f"it with `sweep run --family {family} --resume --sweep {name}`, or pick another name.")


def run_study(specs: list[SweepSpec], tracking_settings: TrackingSettings, report: Reporter = print,
              verbose: int = 0, resume: bool = False, sweep_name: str | None = None,
              time_budget: float | None = None) -> list[SweepResult]:
    """Run each family's sweep in turn, on one copy of the data per image size.

    Args:
        specs: one per family, sharing data options (data dir, batch size, seed); the image size may differ
            (the transfer family's follows its weights file).
        tracking_settings: the MLflow store and experiment.
        report: receives progress lines.
        verbose: Keras' per-epoch output.
        resume: continue the newest unfinished sweep of the (one) family, or the one named ``sweep_name``,
            with its own spec.
        sweep_name: without ``resume``, the name of the new sweep.
        time_budget: seconds for the whole command; each family's sweep gets an equal share of what is left
            when it starts (a family that finishes early leaves its time to the next).

    Raises:
        SweepError: bad data, weights or tracking settings, or a sweep that stopped on failures.
    """
    ends = None if time_budget is None else time.time() + time_budget  # from the start: data loading counts
    if not specs:
        raise SweepError("no family to sweep.")
    if (resume or sweep_name) and len(specs) != 1:
        raise SweepError("--resume and --sweep take one family, not 'all'; run each family's sweep in turn.")
    resume_run = None
    if resume:
        resume_run, resumed = find_resumable(specs[0].family_name, tracking_settings, sweep_name)
        specs = [resumed]
        report(f"Resuming sweep {resume_run.data.tags['sweep']} (MLflow run {resume_run.info.run_id}) with its "
               f"own settings: {resumed.trials} trials x {resumed.epochs} epochs, {resumed.tuner}, objective "
               f"{resumed.objective}, seed {resumed.seed}")
    elif sweep_name:
        check_new_name(tracking_settings, sweep_name, specs[0].family)
    # Everything is checked before the first sweep starts: a bad weights file must not wait for three sweeps.
    by_size: dict[tuple[int, int], list[SweepSpec]] = {}
    for spec in specs:
        by_size.setdefault(spec.image_size, []).append(spec)
    prepared = {}
    for size, group in by_size.items():
        # one weights check for the group, by a family that loads weights (where one does)
        lead = next((g for g in group if registry.family_class(g.family).uses_weights), group[0])
        prepared[size] = prepare(lead, tracking_settings, report)
    results = []
    for done, s in enumerate(specs):
        deadline = None if ends is None else time.time() + (ends - time.time()) / (len(specs) - done)
        results.append(run_sweep(s, prepared[s.image_size], tracking_settings, report, verbose, resume_run,
                                 name=sweep_name, deadline=deadline))
    return results
