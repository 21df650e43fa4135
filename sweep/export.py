"""Take a result away: find the best trial, export and register its model, predict with it."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sweep import tracking
from sweep.config import TrackingSettings
from sweep.data import decode_error, decode_image
from sweep.errors import SweepError
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
    experiment_id = tracking.experiment_id_of(settings)
    runs = tracking.finished_trials(experiment_id, family)
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
    parent = tracking.get_run(best.data.tags[tracking.PARENT_RUN_TAG])
    return BestTrial(
        record=record_from_run(best),
        sweep=parent.info.run_name,
        sweep_run_id=parent.info.run_id,
        baseline_accuracy=float(best.data.metrics.get("baseline_accuracy", float("nan"))),
        params={**parent.data.params, **best.data.params},
        has_model=tracking.has_artifact(best.info.run_id, MODEL_ARTIFACT),
        metric=metric,
    )


def _class_names(best: BestTrial, tmp: Path) -> list[str]:
    data = json.loads(tracking.download(best.sweep_run_id, "data.json", tmp).read_text())
    return list(data["class_names"])


def export_best(best: BestTrial, out_dir: Path, registered_model: str, verify: bool = True,
                report=print) -> dict[str, Any]:
    """Write the best trial's model and its records to ``out_dir``, then register the model.

    Written: ``model.keras`` (raw 0-255 RGB in, logits out; preprocessing and base included),
    ``hyperparameters.json``, ``metrics.json``, ``classes.json``, ``accuracy.png``; the folder appears whole or
    not at all. Only then is the model registered as a new version of ``registered_model`` with the alias
    ``champion``, and ``registered_model.json`` added.

    Raises:
        SweepError: ``out_dir`` exists and is not empty, the trial kept no model, or (``verify``) a test image
            the sweep listed is missing or changed.
    """
    out_dir = Path(out_dir)
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
        model, metrics = _write(best, out_dir, verify, report)
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        registry = _register(out_dir, best, model, registered_model)
    except KeyboardInterrupt:  # stopped while registering: no folder without its registry record stays behind
        shutil.rmtree(out_dir, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return {"metrics": metrics, "registry": registry}


def _write(best: BestTrial, out_dir: Path, verify: bool, report):
    """Stage the export beside ``out_dir`` and rename it into place; returns the model and its metrics."""
    import keras

    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp = Path(tmp)
        staging = tmp / "export"
        staging.mkdir()
        shutil.copy(tracking.download(best.record.run_id, MODEL_ARTIFACT, tmp), staging / "model.keras")
        shutil.copy(tracking.download(best.record.run_id, "accuracy.png", tmp), staging / "accuracy.png")
        classes = _class_names(best, tmp)
        model = keras.models.load_model(staging / "model.keras")
        metrics = {"val_accuracy": best.record.val_accuracy, "val_loss": best.record.val_loss,
                   "test_accuracy": best.record.test_accuracy,
                   "test_loss": best.record.test_loss, "baseline_accuracy": best.baseline_accuracy}
        if verify:
            manifest = tracking.download(best.sweep_run_id, "test_files.txt", tmp).read_text()
            metrics.update(_reevaluate(model, best, manifest, classes, report))
        (staging / "hyperparameters.json").write_text(json.dumps(best.record.hyperparameters, indent=2) + "\n")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "classes.json").write_text(json.dumps(classes) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    return model, metrics


def _register(out_dir: Path, best: BestTrial, model, registered_model: str) -> dict[str, Any]:
    """Register the exported model (a new version, alias ``champion``) and add ``registered_model.json``."""
    from mlflow.models import infer_signature

    sample = np.zeros((1, *model.input_shape[1:]), dtype="float32")
    signature = infer_signature(sample, model.predict(sample, verbose=0))
    try:
        version = tracking.register_keras_model(best.record.run_id, model, registered_model, signature, CHAMPION)
    except Exception as exc:  # the export folder is complete; say what did not happen
        raise SweepError(f"exported to {out_dir}, but registering the model in MLflow failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); the folder "
                         "is usable as it is.") from None
    registry = {"name": registered_model, "version": version, "alias": CHAMPION,
                "uri": f"models:/{registered_model}@{CHAMPION}", "version_uri": f"models:/{registered_model}/{version}",
                "run_id": best.record.run_id}
    (out_dir / "registered_model.json").write_text(json.dumps(registry, indent=2) + "\n")
    return registry


def _reevaluate(model, best: BestTrial, manifest: str, classes: list[str], report) -> dict[str, float]:
    """Score the exported model on the very test images the sweep listed (``test_files.txt``).

    Raises:
        SweepError: a listed file is missing or changed since the sweep.
    """
    from sweep.data import load_manifest

    spec = SweepSpec.from_params(best.params)
    test = load_manifest(manifest, classes, spec.image_size)
    loss, accuracy = model.evaluate(test.images, test.labels, batch_size=spec.batch_size, verbose=0)
    report(f"Re-evaluated on the sweep's {len(test)} test images (test_files.txt): {accuracy:.4%} "
           f"(logged {best.record.test_accuracy:.4%})")
    return {"reevaluated_test_accuracy": float(accuracy), "reevaluated_test_loss": float(loss)}


@dataclass
class Prediction:
    """One image's predicted class and probability, or why it could not be read."""

    path: Path
    label: str = ""
    probability: float = float("nan")
    error: str = ""


def load_model_and_classes(model_path: Path):
    """Load an export folder (``model.keras`` + ``classes.json``) or a ``.keras`` file.

    Raises:
        SweepError: nothing loadable at ``model_path``.
    """
    import keras

    model_path = Path(model_path)
    model_file = model_path / "model.keras" if model_path.is_dir() else model_path
    if not model_file.is_file() or model_file.suffix != ".keras":
        raise SweepError(f"{model_path} is neither an export folder (with model.keras) nor a .keras file.")
    try:
        model = keras.models.load_model(model_file)
    except Exception as exc:  # a damaged or foreign file: say which, not a traceback
        raise SweepError(f"cannot load model {model_file}: it is not a readable .keras file (damaged, or not a "
                         f"Keras model; Keras said {type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Pass an "
                         "export folder from `sweep best --export` or its model.keras.") from None
    classes_file = model_file.parent / "classes.json"
    n_classes = int(model.output_shape[-1])
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else [str(i) for i in range(n_classes)]
    return model, classes


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and every file under the folders named (sorted); missing paths are kept to be reported."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return files


def predict(model_path: Path, paths: list[Path], batch_size: int = 32) -> list[Prediction]:
    """Class and probability (softmax of the logits) for each image; unreadable files carry an error."""
    model, classes = load_model_and_classes(model_path)
    size = tuple(int(v) for v in model.input_shape[1:3])
    results, batch = [], []

    def flush() -> None:
        if not batch:
            return
        logits = model.predict(np.stack([image for _, image in batch]), verbose=0)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        for (prediction, _), p in zip(batch, probabilities):
            prediction.label, prediction.probability = classes[int(np.argmax(p))], float(np.max(p))
        batch.clear()

    for path in image_files(paths):
        prediction = Prediction(path)
        results.append(prediction)
        try:
            if not path.is_file():
                raise FileNotFoundError("no such file")
            batch.append((prediction, decode_image(str(path), size)))
        except Exception as exc:  # corrupt, truncated, or not an image at all
            prediction.error = f"not a readable image ({decode_error(exc)})"
        if len(batch) >= batch_size:
            flush()
    flush()
    return results
