"""The ``sweep`` command line: parse and validate, call one library function, print a clean error.

TensorFlow and MLflow are imported inside the commands so ``sweep --help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from sweep.config import TUNERS, SweepSettings, load_tracking
from sweep.errors import SweepError

FAMILY_NAMES = ("scratch", "augmented", "preprocessed", "transfer")


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _keras_verbosity(quiet: bool) -> int:
    """0 when quiet, Keras' live progress bar on a terminal, one line per epoch in a log file."""
    if quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


def _fail(exc: SweepError) -> None:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(1)


def _parse_image_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 32:
        raise click.BadParameter(f"{value!r} is not a size like 160 or 160x160 (at least 32).")
    return parts[0], parts[1]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweep")
def main() -> None:
    """Hyperparameter sweeps of image classifiers with Keras Tuner, every trial tracked in MLflow."""


@main.command()
@click.option("--family", required=True, type=click.Choice([*FAMILY_NAMES, "all"]),
              help="Model family to sweep; 'all' runs the four in turn (the whole study).")
@click.option("--trials", default=10, show_default=True, type=click.IntRange(min=1),
              help="Trials per family; trial 1 is always the study's model (the family's defaults).")
@click.option("--tuner", default="random", show_default=True, type=click.Choice(TUNERS), help="Search strategy.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1),
              help="Epochs per trial (Hyperband's maximum).")
@click.option("--seed", default=42, show_default=True, type=int,
              help="Seeds Python, NumPy, Keras, the tuner and the test split.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with train/ and validation/, one subfolder per class. Default: download the study's data.")
@click.option("--weights", default="imagenet", show_default=True,
              help="transfer only: 'imagenet' (Keras cache or download), a local MobileNetV2 .h5, or 'none'.")
@click.option("--experiment", default=None, help="MLflow experiment name (default: from mlflow.yaml).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Tracking settings file (default: ./mlflow.yaml).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default="160", show_default=True, callback=_parse_image_size,
              help="Input size, e.g. 160 or 160x160.")
@click.option("--no-cache", is_flag=True,
              help="transfer only: train every trial on raw images through the full model (the study's way, "
                   "much slower) instead of on cached base features.")
@click.option("-q", "--quiet", is_flag=True, help="No per-epoch Keras progress; one line per trial only.")
def run(family, trials, tuner, epochs, seed, data_dir, weights, experiment, config_path, batch_size, image_size,
        no_cache, quiet) -> None:
    """Run a sweep and log every trial to MLflow.

    Example: sweep run --family transfer --trials 20
    """
    _quiet_tensorflow()
    try:
        tracking_settings = load_tracking(config_path)
        if experiment:
            tracking_settings = replace(tracking_settings, experiment=experiment)
        families = list(FAMILY_NAMES) if family == "all" else [family]
        settings = [
            SweepSettings(family=f, trials=trials, tuner=tuner, epochs=epochs, seed=seed, batch_size=batch_size,
                          image_size=image_size, data_dir=data_dir, weights=weights, verbose=_keras_verbosity(quiet),
                          feature_cache=not no_cache)
            for f in families
        ]
        from sweep.study import run_study

        results = run_study(settings, tracking_settings, report=click.echo)
    except SweepError as exc:
        _fail(exc)
    click.echo("")
    for result in results:
        best = result.best
        if best is None:
            click.echo(f"{result.family}: no trial finished (MLflow run {result.run_id})")
            continue
        click.echo(
            f"{result.family}: best trial {best.number} val {best.val_accuracy:.1%} test {best.test_accuracy:.1%} "
            f"vs baseline {result.baseline_accuracy:.1%} (MLflow run {result.run_id})"
        )
    click.echo(f"Runs are in {tracking_settings.tracking_uri}, experiment {tracking_settings.experiment!r}. "
               "Compare them with: mlflow ui --backend-store-uri " + tracking_settings.tracking_uri)


@main.command()
@click.option("--family", default="transfer", show_default=True, type=click.Choice(FAMILY_NAMES))
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1),
              help="Trials of the whole sweep timed our way.")
@click.option("--plain-trials", default=1, show_default=True, type=click.IntRange(min=1),
              help="Trials run the plain way (raw images, stock Keras Tuner); trial 1 is the defaults.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--weights", default="imagenet", show_default=True)
@click.option("--experiment", default="sweep-bench", show_default=True, help="MLflow experiment for our sweep.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default="160", show_default=True, callback=_parse_image_size)
@click.option("--warm", is_flag=True, help="Use the configured feature cache (default: a cold, temporary one).")
@click.option("-q", "--quiet", is_flag=True)
def bench(family, trials, plain_trials, epochs, seed, data_dir, weights, experiment, config_path, batch_size,
          image_size, warm, quiet) -> None:
    """Time the same trial the plain way and ours, and a whole sweep our way; print a table."""
    _quiet_tensorflow()
    try:
        tracking_settings = replace(load_tracking(config_path), experiment=experiment)
        settings = SweepSettings(family=family, trials=trials, epochs=epochs, seed=seed, batch_size=batch_size,
                                 image_size=image_size, data_dir=data_dir, weights=weights,
                                 verbose=_keras_verbosity(quiet))
        from sweep.bench import format_table, run_bench
        from sweep.study import prepare

        prepared = prepare(settings, tracking_settings, family == "transfer", report=click.echo)
        result = run_bench(settings, prepared.splits, tracking_settings, prepared.experiment_id,
                           prepared.weights_path, plain_trials, cold=not warm, report=click.echo)
    except SweepError as exc:
        _fail(exc)
    click.echo("")
    click.echo(format_table(result))


@main.command()
def families() -> None:
    """List each model family and its hyperparameters (type, range or choices, default)."""
    _quiet_tensorflow()
    from search_spaces import FAMILIES, describe

    for name, cls in FAMILIES.items():
        click.echo(f"{name}: {cls.description}")
        for row in describe(name):
            click.echo(f"  {row['name']:<16} {row['type']:<7} {row['domain']:<58} default {row['default']}")
        click.echo("")


if __name__ == "__main__":  # pragma: no cover
    main()
