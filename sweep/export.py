"""Take a result away: find the best trial, export and register its model."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sweep import tracking
from sweep.config import TrackingSettings
from sweep.data import load_manifest
from sweep.errors import SweepError, first_line
from sweep.formats import (
    DEFAULT_FORMATS,
    FORMAT_FILE,
    FORMATS,
    REPRESENTATIVE_IMAGES,
    Verification,
    check_available,
    float32_copy,
)
from sweep.formats import record as format_record
from sweep.formats import table as format_table
from sweep.formats import verify as verify_format
from sweep.formats import write as write_format
from sweep.results import (
    RANKINGS,
    TrialRecord,
    best_run,
    format_value,
    interval_text,
    objective_of,
    record_from_run,
)
from sweep.spec import DEFAULT_OBJECTIVE, SweepSpec

MODEL_ARTIFACT = tracking.MODEL_ARTIFACT
CHAMPION = "champion"  # the registry alias `sweep best --export` moves to the version it registers


@dataclass
class BestTrial:
    """The best finished trial of an experiment, with what identifies and reproduces it."""

    record: TrialRecord
    sweep: str
    sweep_run_id: str
    baseline_accuracy: float
    params: dict[str, str]
    has_model: bool
    metric: str = DEFAULT_OBJECTIVE  # what it is best by
    store: tracking.Store | None = field(default=None, repr=False, compare=False)  # where it was found; export
    # reads its files from there and registers into it

    @property
    def client(self):
        """The MLflow client of the store the trial was found in."""
        if self.store is None:
            raise SweepError("this trial was not found in a tracking store (use sweep.api.find_best); it cannot be "
                             "exported.")
        return self.store.client

    def describe(self) -> str:
        r = self.record
        hps = ", ".join(f"{k}={format_value(v)}" for k, v in r.hyperparameters.items())
        return (f"family {r.family}, sweep {self.sweep}, trial {r.number}\n"
                f"  hyperparameters: {hps}\n"
                f"  val accuracy {r.val_accuracy:.2%} (loss {r.val_loss:.4f}), "
                f"test accuracy {r.test_accuracy:.2%}{interval_text(r)}, baseline {self.baseline_accuracy:.2%}\n"
                f"  MLflow run {r.run_id} (sweep run {self.sweep_run_id})")


def find_best(settings: TrackingSettings, family: str | None = None, metric: str | None = None,
              with_model: bool = False) -> BestTrial:
    """The finished trial with the best ``metric`` (lowest loss, highest accuracy; the earliest on a tie) across
    all sweeps.

    ``metric`` None means the objective the sweeps were run with (``objective_of``). With ``with_model``, only
    trials that kept their trained model count (what ``--export`` needs).

    Raises:
        SweepError: unknown metric, or no finished trial in the experiment (or family).
    """
    if metric is not None and metric not in RANKINGS:
        raise SweepError(f"unknown metric {metric!r}; choose one of {', '.join(RANKINGS)}.")
    store = tracking.Store(settings)
    experiment_id = store.experiment_id()
    client = store.client
    runs = tracking.finished_trials(client, experiment_id, family)
    where = f" of family {family}" if family else ""
    if not runs:
        raise SweepError(f"experiment {settings.experiment!r} has no finished trial{where}; run `sweep run` first.")
    metric = metric or objective_of(runs)
    if with_model:
        runs = [r for r in runs if r.data.tags.get("model_kept") == "true"]
        if not runs:
            raise SweepError(f"no finished trial{where} in experiment {settings.experiment!r} kept its model "
                             "(a trial keeps it when it improves on its sweep's best); run a sweep, then export.")
    best = best_run(runs, metric)
    parent = client.get_run(best.data.tags[tracking.PARENT_RUN_TAG])
    return BestTrial(
        record=record_from_run(best),
        sweep=parent.info.run_name,
        sweep_run_id=parent.info.run_id,
        baseline_accuracy=float(best.data.metrics.get("baseline_accuracy", float("nan"))),
        params={**parent.data.params, **best.data.params},
        has_model=tracking.has_artifact(client, best.info.run_id, MODEL_ARTIFACT),
        metric=metric,
        store=store,
    )


def _sweep_data(best: BestTrial, tmp: Path) -> tuple[list[str], Path]:
    """The sweep's class names and the data folder it read (its ``data.json``)."""
    data = json.loads(tracking.download(best.client, best.sweep_run_id, "data.json", tmp).read_text())
    return list(data["class_names"]), Path(data["source"])


def export_best(best: BestTrial, out_dir: Path, registered_model: str, verify: bool = True,
                report=print, formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, Any]:
    """Write the best trial's model in ``formats`` and its records to ``out_dir``, then register the model.

    Written: each format's file (``model.keras``, ``saved_model/``, ``model.tflite``, ``model_int8.tflite``,
    ``model.onnx``: raw 0-255 RGB in, logits out; preprocessing and base included, augmentation removed),
    ``formats.json``, ``hyperparameters.json``, ``metrics.json``, ``classes.json``, ``accuracy.png``. With
    ``verify``, the model is re-evaluated on the sweep's test images and every format is run there in its own
    runtime and checked against the Keras model. The folder appears whole or not at all. Only then is the model
    registered as a new version of ``registered_model`` with the alias ``champion`` (the format files and
    ``formats.json`` as the version's ``formats/`` artifacts, the figures as the trial run's metrics), and
    ``registered_model.json`` added.

    Returns:
        ``{"metrics": ..., "registry": ..., "formats": [Verification, ...]}`` (no verifications without ``verify``).

    Raises:
        SweepError: ``out_dir`` exists and is not empty, the trial kept no model, (``verify``) a test image the
            sweep listed is missing or changed, a format cannot be written, or a format misses its check (then
            nothing is written).
    """
    out_dir = Path(out_dir)
    formats = tuple(formats)
    check_available(formats)
    if out_dir.exists() and not out_dir.is_dir():
        raise SweepError(f"export folder {out_dir} is a file; pick a new folder.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SweepError(f"export folder {out_dir} already exists and is not empty; pick a new folder.")
    if not best.has_model:
        raise SweepError(
            f"trial {best.record.number} of sweep {best.sweep} kept no model: models are kept for the trials that "
            "improved their sweep's objective."
        )
    made = [p for p in reversed(out_dir.absolute().parents) if not p.exists()]  # removed again on failure
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot create the export folder's parent {out_dir.parent}: {exc.strerror}; "
                         "pick another path.") from None
    try:
        model, metrics, checks = _write(best, out_dir, verify, report, formats)
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        registry = _register(out_dir, best, registered_model, formats, checks)
    except KeyboardInterrupt:  # stopped while registering: no folder without its registry record stays behind
        shutil.rmtree(out_dir, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return {"metrics": metrics, "registry": registry, "formats": checks}


def _write(best: BestTrial, out_dir: Path, verify: bool, report, formats: Sequence[str]):
    """Stage the export beside ``out_dir`` and rename it into place; returns the model, its metrics and each
    format's verification."""
    import keras

    spec = SweepSpec.from_params(best.params)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp = Path(tmp)
        staging = tmp / "export"
        staging.mkdir()
        keras_file = tracking.download(best.client, best.record.run_id, MODEL_ARTIFACT, tmp / "logged")
        shutil.copy(tracking.download(best.client, best.record.run_id, "accuracy.png", tmp), staging / "accuracy.png")
        classes, source = _sweep_data(best, tmp)
        trained = keras.models.load_model(keras_file)
        model = float32_copy(trained)  # what deploys everywhere; a float32 model is itself
        if model is not trained:
            keras_file = None
            policy = trained.dtype_policy.name if trained.dtype_policy.name != "float32" else "mixed precision"
            report(f"The trial trained in {policy}; its model is exported in float32 (the same weights).")
        metrics = {"val_accuracy": best.record.val_accuracy, "val_loss": best.record.val_loss,
                   "test_accuracy": best.record.test_accuracy,
                   "test_loss": best.record.test_loss, "baseline_accuracy": best.baseline_accuracy}
        test = None
        if verify:
            manifest = tracking.download(best.client, best.sweep_run_id, "test_files.txt", tmp).read_text()
            test = load_manifest(manifest, classes, spec.image_size)
            metrics.update(_reevaluate(model, best, test, spec.batch_size, report))
        checks = _write_formats(model, keras_file, staging, formats, test, source, classes, spec, report)
        (staging / FORMAT_FILE).write_text(json.dumps(
            format_record(checks, len(test) if test else 0, verify, formats), indent=2) + "\n")
        (staging / "hyperparameters.json").write_text(json.dumps(best.record.hyperparameters, indent=2) + "\n")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "classes.json").write_text(json.dumps(classes) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    return model, metrics, checks


def _write_formats(model, keras_file: Path | None, staging: Path, formats: Sequence[str], test, source: Path,
                   classes: list[str], spec: SweepSpec, report) -> list[Verification]:
    """Write each format into ``staging`` and (with the ``test`` split) verify it in its runtime.

    Raises:
        SweepError: a format could not be written, or (all verified first) one missed its check: one line with
            its figures; the caller discards the staging folder, so nothing of the export is left.
    """
    images = test.images if test is not None else None
    keras_classes = model.predict(images, batch_size=32, verbose=0).argmax(axis=1) if test is not None else None
    checks = []
    for name in formats:
        dest = staging / FORMATS[name].filename
        started = time.monotonic()
        try:
            write_format(name, model, keras_file, dest,
                         lambda: _representative_images(source, classes, spec.image_size, report))
        except SweepError:
            raise
        except Exception as exc:  # a converter that fails on this model: say which format, keep nothing
            raise SweepError(f"could not write --format {name} ({first_line(exc, 200)}); nothing was "
                             "exported. Leave it out of --format.") from None
        line = f"  {name}: written in {time.monotonic() - started:.0f}s"
        if test is not None:
            checks.append(verify_format(name, dest, images, test.labels, keras_classes))
            line += f", checked in {FORMATS[name].runtime}"
        report(line)
    if test is not None:
        report(format_table(checks, len(test)))
        failed = [c for c in checks if not c.passed]
        if failed:
            kept = [c.format for c in checks if c.passed]
            raise SweepError(
                f"--format {failed[0].format} missed its check on the sweep's {len(test)} test images: "
                f"{failed[0].problem}; nothing was exported."
                + (f" Export the others with --format {','.join(kept)}." if kept else ""))
    return checks


def _representative_images(source: Path, classes: list[str], image_size: tuple[int, int], report) -> np.ndarray:
    """Training images (never test images) that int8 quantisation calibrates its ranges on: a seeded draw of
    ``REPRESENTATIVE_IMAGES`` from the ``train/`` folder of ``source``, the data the sweep read, decoded as the
    sweep decoded them.

    Raises:
        SweepError: the sweep's training images are no longer where it read them.
    """
    from sweep.data import decode_images, list_images

    files, _ = list_images(source / "train", tuple(classes)) if (source / "train").is_dir() else ([], [])
    if not files:
        raise SweepError(f"--format litert_int8 calibrates on the sweep's training images, and {source / 'train'} "
                         "holds none now; put the data back where the sweep read it, or leave litert_int8 out of "
                         "--format.")
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(files), size=min(REPRESENTATIVE_IMAGES, len(files)), replace=False))
    report(f"  litert_int8: calibrating on {len(chosen)} training images from {source / 'train'}")
    return decode_images([files[i] for i in chosen], image_size)


def _register(out_dir: Path, best: BestTrial, registered_model: str, formats: Sequence[str],
              checks: list[Verification]) -> dict[str, Any]:
    """Register the exported model (a new version, alias ``champion``) in MLflow's pyfunc flavour, the export's
    files as its ``formats`` artifacts and the formats' figures on the trial's run, and add
    ``registered_model.json``."""
    metrics = {k: v for check in checks for k, v in check.metrics().items()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / "formats"
            files.mkdir()
            for name in formats:
                source = out_dir / FORMATS[name].filename
                (shutil.copytree if source.is_dir() else shutil.copy)(source, files / source.name)
            for record in (FORMAT_FILE, "classes.json", "metrics.json", "hyperparameters.json"):
                shutil.copy(out_dir / record, files / record)  # what `sweep serve models:/...` answers with
            classes = json.loads((out_dir / "classes.json").read_text())
            version = tracking.register_model(best.client, best.record.run_id, files, classes, registered_model,
                                              CHAMPION, metrics=metrics)
    except Exception as exc:  # the export folder is complete; say what did not happen
        raise SweepError(f"exported to {out_dir}, but registering the model in MLflow failed "
                         f"({first_line(exc, 200)}); the folder "
                         "is usable as it is.") from None
    registry = {"name": registered_model, "version": version, "alias": CHAMPION,
                "uri": f"models:/{registered_model}@{CHAMPION}", "version_uri": f"models:/{registered_model}/{version}",
                "run_id": best.record.run_id, "formats": list(formats)}
    (out_dir / "registered_model.json").write_text(json.dumps(registry, indent=2) + "\n")
    return registry


def _reevaluate(model, best: BestTrial, test, batch_size: int, report) -> dict[str, float]:
    """Score the exported model on the very test images the sweep listed (``test_files.txt``)."""
    loss, accuracy = model.evaluate(test.images, test.labels, batch_size=batch_size, verbose=0)
    report(f"Re-evaluated on the sweep's {len(test)} test images (test_files.txt): {accuracy:.4%} "
           f"(logged {best.record.test_accuracy:.4%})")
    return {"reevaluated_test_accuracy": float(accuracy), "reevaluated_test_loss": float(loss)}
