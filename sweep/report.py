"""The study's story for an experiment: the baseline, then each family's best trial against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from search_spaces import registry
from sweep import plots, tracking
from sweep.config import TrackingSettings
from sweep.errors import FamilyError, SweepError
from sweep.importance import param_importances
from sweep.results import (PRUNED_TAG, TrialRecord, best_run, format_duration, format_value, interval_text,
                           objective_of, record_from_run)
from sweep.spec import DEFAULT_OBJECTIVE
from sweep.staging import stage_names


@dataclass
class FamilyRow:
    """One family's best trial (by ``metric``, final validation loss by default) against the baseline."""

    family: str
    best: TrialRecord
    baseline: float
    trials: int
    train_accuracy: float
    metric: str = DEFAULT_OBJECTIVE
    image_size: str = ""  # the best trial's sweep's, e.g. "224x224"
    frozen: TrialRecord | None = None  # transfer with fine-tuning trials: the best trial without,
    fine_tuned: TrialRecord | None = None  # and the best with
    fine_tuned_head: int | None = None  # the frozen trial whose model it fine-tuned (the staged search)
    pruned: int = 0  # of ``trials``, how many stopped early (sweep/pruning.py)
    wall_seconds: float = 0.0  # the family's sweeps, start to end, summed
    importances: dict[str, float] = field(default_factory=dict)  # hyperparameter -> fANOVA share, largest first
    importance_epoch: int | None = None  # the epoch every trial was compared at; None: the full trials' final scores
    study_range: tuple[float, float] | None = None  # a published validation accuracy the family declares
    stage_settings: tuple[str, ...] = ()  # its later stage's switch and settings (for the fine-tuning section)

    @property
    def fine_tuning_verdict(self) -> str:
        """Whether the best fine-tuned trial beat the best frozen-base one, on validation loss and accuracy."""
        if self.frozen is None or self.fine_tuned is None:
            return ""
        loss = self.fine_tuned.val_loss < self.frozen.val_loss
        accuracy = self.fine_tuned.val_accuracy > self.frozen.val_accuracy
        if loss and accuracy:
            verdict = "Fine-tuning beat the frozen base on validation loss and accuracy."
        elif loss or accuracy:
            verdict = (f"Fine-tuning beat the frozen base on validation {'loss' if loss else 'accuracy'} only, not on "
                       f"{'accuracy' if loss else 'loss'}.")
        else:
            verdict = "Fine-tuning did not beat the frozen base on validation loss or accuracy."
        return f"{verdict}{images_apart(self.fine_tuned, self.frozen)}"

    @property
    def gain_points(self) -> float:
        """Test accuracy over the baseline, in percentage points."""
        return (self.best.test_accuracy - self.baseline) * 100

    @property
    def gap_points(self) -> float:
        """Overfitting gap: final training minus validation accuracy, in percentage points."""
        return (self.train_accuracy - self.best.val_accuracy) * 100


def images_apart(tuned: TrialRecord, frozen: TrialRecord) -> str:
    """How many validation images the two trials' accuracies are apart, so a reader can tell a real gain from
    one image of luck ("" when the runs do not say how many images they were scored on)."""
    n = tuned.val_images
    if not n or frozen.val_images != n:
        return ""
    right = [round(record.val_accuracy * n) for record in (tuned, frozen)]
    return (f" Of {n} validation images, the fine-tuned trial got {right[0]} right and the frozen one {right[1]} "
            f"(one image is {100 / n:.2f} points).")


def build_report(settings: TrackingSettings, metric: str | None = None) -> list[FamilyRow]:
    """Each family's best finished trial in the experiment, in the study's order, by ``metric`` (None: the
    objective the sweeps ran with, see ``objective_of``).

    Raises:
        SweepError: the experiment has no finished trial.
    """
    store = tracking.Store(settings)
    experiment_id = store.experiment_id()
    client = store.client
    runs = tracking.finished_trials(client, experiment_id)
    if not runs:
        raise SweepError(f"experiment {settings.experiment!r} has no finished trial; run `sweep run` first.")
    metric = metric or objective_of(runs)
    rows = []
    sweeps = tracking.sweep_runs(client, experiment_id)
    tagged = {r.data.tags.get("family", "?") for r in runs}
    study = registry.study_families()
    order = [f for f in study if f in tagged] + sorted(tagged - set(study))  # the study's first, in its order
    for family in order:
        mine = [r for r in runs if r.data.tags.get("family") == family]
        if not mine:
            continue
        best = best_run(mine, metric)
        row = FamilyRow(family, record_from_run(best), float(best.data.metrics.get("baseline_accuracy", 0)),
                        len(mine), float(best.data.metrics.get("accuracy", float("nan"))), metric,
                        best.data.params.get("image_size", ""))
        row.pruned = sum(PRUNED_TAG in r.data.tags for r in mine)
        row.wall_seconds = sum((r.info.end_time - r.info.start_time) / 1000 for r in sweeps
                               if r.data.tags.get("family") == family and r.info.end_time)
        reference = best.data.params.get("family", family)
        try:
            cls = registry.family_class(reference)
        except FamilyError:  # a family whose module is not importable here: its figures, without what it declares
            rows.append(row)
            continue
        row.study_range = cls.study_range
        row.importances, row.importance_epoch = param_importances(
            mine, family, metric, history=lambda run_id: client.get_metric_history(run_id, metric), reference=reference)
        if cls.stage_switch is None:
            rows.append(row)
            continue
        switch, off = cls.stage_switch
        row.stage_settings = tuple(sorted(stage_names(registry.space(reference), switch), key=lambda n: n != switch))
        tuned = [r for r in mine if r.data.params.get(switch, str(off)) != str(off)]
        frozen = [r for r in mine if r.data.params.get(switch, str(off)) == str(off)]
        if tuned and frozen:
            best_tuned = best_run(tuned, metric)
            row.frozen, row.fine_tuned = record_from_run(best_run(frozen, metric)), record_from_run(best_tuned)
            leader = best_tuned.data.tags.get("refines_trial")  # the frozen trial whose model it fine-tuned
            row.fine_tuned_head = int(leader) if leader else None
        rows.append(row)
    return rows


def to_markdown(rows: list[FamilyRow], experiment: str) -> str:
    baselines = sorted({round(r.baseline, 6) for r in rows})
    lines = [f"# Study report: {experiment}", ""]
    lines.append("Baseline (always guess the training split's most frequent class), on the test split: "
                 + ", ".join(f"{b:.1%}" for b in baselines))
    lines += ["", "| family | image size | trials (pruned) | wall time | best trial | val accuracy | study's val "
              "accuracy | val loss | test accuracy | gain over baseline (pts) | overfitting gap (pts) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if len(baselines) == 1:
        lines.append(f"| baseline | | | | | | | | {baselines[0]:.1%} | 0.0 | |")
    for r in rows:
        study = f"{r.study_range[0]:.0%}-{r.study_range[1]:.0%}" if r.study_range else ""
        lines.append(f"| {r.family} | {r.image_size} | {r.trials} ({r.pruned}) | {format_duration(r.wall_seconds)} | "
                     f"{r.best.number} | {r.best.val_accuracy:.1%} | {study} | {r.best.val_loss:.3f} | "
                     f"{r.best.test_accuracy:.1%}{interval_text(r.best)} | {r.gain_points:+.1f} | {r.gap_points:+.1f} |")
    sizes = sorted({r.best.test_images for r in rows if r.best.test_images})
    one_image = f" (one image of {sizes[0]} is {100 / sizes[0]:.2f} points)" if len(sizes) == 1 else ""
    chosen_by = ", ".join(sorted({r.metric for r in rows}))
    lines += ["", f"Best trial per family by final {chosen_by}; overfitting gap = final training minus "
              "validation accuracy of that trial (flip-averaged validation for a test_time_flip trial); 95% CI: "
              f"Wilson score interval over the test images{one_image}. MLflow runs: "
              + ", ".join(f"{r.family} `{r.best.run_id}`" for r in rows), ""]
    important = [r for r in rows if r.importances]
    if important:
        lines += ["## Which hyperparameters mattered", "",
                  f"Share of the variance of {chosen_by} across each family's trials at one budget (fANOVA, Optuna's "
                  "importance evaluator; conditional hyperparameters left out), largest first. \"final\": the "
                  "final scores of the trials that ran every epoch; \"epoch N\": where too few did (a pruned "
                  "sweep), every trial's value at the deepest epoch all of them reached:", "",
                  "| family | compared at | importances |", "|---|---|---|"]
        for r in important:
            at = "final" if r.importance_epoch is None else f"epoch {r.importance_epoch}"
            lines.append(f"| {r.family} | {at} | "
                         + ", ".join(f"{name} {share:.2f}" for name, share in r.importances.items()) + " |")
        lines.append("")
    for r in (r for r in rows if r.fine_tuning_verdict):
        lines += [f"## Fine-tuning ({r.family})", "", "| | trial | fine-tuned | val accuracy | val loss | test accuracy |",
                  "|---|---:|---|---:|---:|---:|"]
        for label, record in (("best frozen-base trial", r.frozen), ("best fine-tuned trial", r.fine_tuned)):
            hp = record.hyperparameters
            how = (", ".join(f"{name} {format_value(hp[name])}" for name in r.stage_settings if name in hp)
                   if record is r.fine_tuned else "no")
            if record is r.fine_tuned and r.fine_tuned_head is not None:
                how += f", on trial {r.fine_tuned_head}'s model"
            lines.append(f"| {label} | {record.number} | {how} | {record.val_accuracy:.1%} | {record.val_loss:.3f} | "
                         f"{record.test_accuracy:.1%}{interval_text(record)} |")
        lines += ["", r.fine_tuning_verdict, ""]
    return "\n".join(lines)


def write_report(rows: list[FamilyRow], settings: TrackingSettings, out_dir: Path) -> tuple[list[Path], str]:
    """Save ``report.md`` and ``report.png`` to ``out_dir`` and log both in a "report" MLflow run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / "report.md"
    markdown.write_text(to_markdown(rows, settings.experiment))
    figure = out_dir / "report.png"
    plots.plot_report([(r.family, r.best.val_accuracy, r.best.test_accuracy) for r in rows],
                      rows[0].baseline, settings.experiment).savefig(figure)
    files = [markdown, figure]
    if any(r.importances for r in rows):
        files.append(out_dir / "importance.png")
        plots.plot_importances({r.family + ("" if r.importance_epoch is None else f" (at epoch {r.importance_epoch})"):
                                r.importances for r in rows if r.importances},
                               settings.experiment).savefig(files[-1])
    metrics = {f"{r.family}_best_test_accuracy": r.best.test_accuracy for r in rows}
    metrics["baseline_accuracy"] = rows[0].baseline
    store = tracking.Store(settings)
    experiment_id = store.experiment_id()  # before the client: a missing store is refused, not created
    run_id = tracking.log_report_run(store.client, experiment_id, "report", files, metrics, {"kind": "report"})
    return files, run_id


def write_data_overview(splits, settings: TrackingSettings, out_dir: Path, seed: int = 0) -> tuple[list[Path], str]:
    """Class counts, the baseline and the study's pictures, saved to ``out_dir`` and logged in a "data" run.

    Pictures: ``samples.png`` (a row of three images per class) and ``augmentation.png`` (RandomFlip and
    RandomRotation(0.2) draws on the first training image).
    """
    import json

    import keras
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "data.json"
    summary.write_text(json.dumps(splits.summary(), indent=2) + "\n")
    samples = out_dir / "samples.png"
    plots.plot_samples(splits.train.images, splits.train.labels, splits.class_names).savefig(samples)
    image = splits.train.images[0]
    keras.utils.set_random_seed(seed)
    flip = keras.layers.RandomFlip("horizontal_and_vertical")
    rotate = keras.layers.RandomRotation(0.2)
    flips = [np.asarray(flip(image[None], training=True))[0] for _ in range(4)]
    rotations = [np.asarray(rotate(image[None], training=True))[0] for _ in range(4)]
    augmentation = out_dir / "augmentation.png"
    plots.plot_augmentations(image, flips, rotations, 0.2).savefig(augmentation)
    metrics = {f"{split}_{name}": float(n) for split, counts in splits.counts().items() for name, n in counts.items()}
    metrics["baseline_accuracy"] = splits.baseline_accuracy
    files = [summary, samples, augmentation]
    store = tracking.Store(settings)
    experiment_id = store.open_experiment()
    run_id = tracking.log_report_run(store.client, experiment_id, "data", files, metrics, {"kind": "data"})
    return files, run_id
