"""The Python API: what the command line does, as functions that return results.

```python
from sweep import SweepSpec, run_sweep, find_best, export_best, predict

result = run_sweep(SweepSpec(family="transfer", trials=5, data_dir="data/cats_and_dogs_filtered"))
best = find_best()
export = export_best(best, "best-model", formats=("keras", "litert"))
predictions = predict("best-model", ["photos/"])
```

The command line is a thin layer over these functions. They print progress lines unless ``progress=False`` (or
a callable that receives each line), raise :class:`SweepError` (or one of its subclasses) for anything the user
can fix, and never exit the process. Tracking settings come from ``mlflow.yaml`` in the working directory
unless ``config`` names another file; ``experiment`` overrides its experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, Union

from sweep.config import TrackingSettings, load_tracking
from sweep.errors import SweepError
from sweep.formats import DEFAULT_FORMATS, FORMATS, Verification
from sweep.spec import SweepSpec

if TYPE_CHECKING:  # these load TensorFlow and MLflow: imported by the calls that need them
    from sweep.export import BestTrial
    from sweep.prediction import Prediction
    from sweep.study import SweepResult

Progress = Union[bool, Callable[[str], None]]


def _reporter(progress: Progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    return print if progress else (lambda line: None)


def _verbosity(epoch_lines: bool | int) -> int:
    import sys

    if epoch_lines is True:
        return 1 if sys.stdout.isatty() else 2
    return int(epoch_lines)


def tracking_settings(config: str | Path | None = None, experiment: str | None = None) -> TrackingSettings:
    """The MLflow store, experiment and folders: ``config`` (default ``./mlflow.yaml``, then the environment's
    ``MLFLOW_TRACKING_URI``), with ``experiment`` in place of its experiment when given.

    Raises:
        ConfigError: the file is malformed.
    """
    settings = load_tracking(Path(config) if config is not None else None)
    return replace(settings, experiment=experiment) if experiment else settings


def run_sweep(spec: SweepSpec | Sequence[SweepSpec], *, config: str | Path | None = None,
              experiment: str | None = None, name: str | None = None, resume: bool = False,
              time_budget: float | None = None, progress: Progress = True,
              epoch_lines: bool | int = False) -> SweepResult | list[SweepResult]:
    """Run a sweep and log every trial to MLflow; return what it found.

    Args:
        spec: the sweep (``SweepSpec(family=..., trials=..., ...)``), or several (one per family: the study),
            run in turn on one copy of the data per image size.
        name: the new sweep's name (default: family, tuner and time); with ``resume``, the sweep to continue.
        resume: continue the newest unfinished sweep of the spec's family (or ``name``) with its own settings;
            the spec's other fields are then ignored.
        time_budget: seconds for the whole call: no trial starts that could not finish within it.
        progress: print progress lines (True), stay silent (False), or pass each line to a callable.
        epoch_lines: Keras' per-epoch lines too (True: a live bar on a terminal, a line an epoch elsewhere; or
            Keras' ``verbose`` value).

    Returns:
        A :class:`SweepResult` (``run_id``: the sweep's MLflow run; ``trials``: each finished trial's
        :class:`TrialRecord`; ``best``), or a list of them when ``spec`` was a list.

    Raises:
        SweepError: bad data, weights or tracking settings, or a sweep that stopped on failures.
    """
    from sweep.study import run_study

    specs = [spec] if isinstance(spec, SweepSpec) else list(spec)
    if not all(isinstance(s, SweepSpec) for s in specs):
        raise SweepError("run_sweep takes a SweepSpec or a list of them.")
    results = run_study(specs, tracking_settings(config, experiment), report=_reporter(progress),
                        verbose=_verbosity(epoch_lines), resume=resume, sweep_name=name, time_budget=time_budget)
    return results[0] if isinstance(spec, SweepSpec) else results


def find_best(*, family: str | None = None, metric: str | None = None, with_model: bool = False,
              config: str | Path | None = None, experiment: str | None = None) -> BestTrial:
    """The best finished trial across all sweeps of the experiment (or of one ``family``).

    Args:
        metric: ``val_loss`` (lowest), ``val_accuracy`` or ``test_accuracy`` (highest); default: what the sweeps
            optimised.
        with_model: only trials that kept their trained model (what :func:`export_best` needs).

    Raises:
        SweepError: no such store or experiment, an unknown metric, or no finished trial.
    """
    from sweep.export import find_best as find

    return find(tracking_settings(config, experiment), family, metric, with_model)


@dataclass
class Export:
    """What :func:`export_best` wrote and registered."""

    folder: Path
    formats: list[str]
    metrics: dict[str, float]  # the trial's val/test/baseline figures, and the re-evaluated test accuracy
    registry: dict  # name, version, alias, uri
    checks: list[Verification] = field(default_factory=list)  # each format's figures (none without verify)

    def path(self, format: str) -> Path:
        """The file or folder of one format."""
        if format not in self.formats:
            raise SweepError(f"format {format!r} was not exported; this export has {', '.join(self.formats)}.")
        return self.folder / FORMATS[format].filename


def export_best(best: BestTrial, folder: str | Path, *, formats: Sequence[str] | str = DEFAULT_FORMATS,
                verify: bool = True, registered_model: str | None = None, progress: Progress = True,
                config: str | Path | None = None, experiment: str | None = None) -> Export:
    """Write ``best``'s model to the new ``folder`` in each of ``formats`` (``"all"`` for the five), verify each
    in its own runtime on the sweep's test images, and register the model (alias ``champion``).

    Only trials that improved their sweep kept a model: ``find_best(with_model=True)`` finds the best of those.

    Returns:
        An :class:`Export`: the folder, the formats, the trial's figures, the registry entry, and each format's
        :class:`Verification` (accuracy, agreement with Keras, size, latency, images/s).

    Raises:
        SweepError: the folder is not new and empty, the trial kept no model, a converter or runtime is missing,
            a test image changed, or a format missed its check (then nothing is written).
    """
    from sweep.export import export_best as export
    from sweep.formats import parse_formats

    names = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    settings = tracking_settings(config, experiment)
    result = export(best, Path(folder), registered_model or settings.registered_model, verify=verify,
                    report=_reporter(progress), formats=names)
    return Export(Path(folder), list(names), result["metrics"], result["registry"], result["formats"])


def predict(model: str | Path, images: Sequence[str | Path] | str | Path, batch_size: int = 32) -> list[Prediction]:
    """Class and probability of each image (folders are walked) with an export folder or any of its model files
    (``.keras``, a SavedModel folder, ``.tflite``, ``.onnx``), run in that format's own runtime.

    Unreadable files are returned with ``error`` set rather than raised.

    Raises:
        SweepError: nothing loadable at ``model``, or its runtime is not installed.
    """
    from sweep.prediction import predict as run

    paths = [images] if isinstance(images, (str, Path)) else list(images)
    return run(Path(model), [Path(p) for p in paths], batch_size)
