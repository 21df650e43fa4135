"""The ``sweep`` command line: parse and validate, call one library function, print a clean error.

TensorFlow and MLflow are imported inside the commands so ``sweep --help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from sweep.cli_common import (
    CONFIG,
    EXPERIMENT,
    FAMILY_NAMES,
    fail,
    keras_verbosity,
    parse_image_size,
    quiet_tensorflow,
    tracking_settings_for,
)
from sweep.cli_results import COMMANDS
from sweep.config import TUNERS, SweepSettings, load_tracking
from sweep.errors import SweepError
from sweep.results import DEFAULT_OBJECTIVE, OBJECTIVES, interval_text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweep")
def main() -> None:
    """Hyperparameter sweeps of image classifiers with Keras Tuner, every trial tracked in MLflow."""


SWEEP_OPTIONS = [
    click.option("--trials", default=10, show_default=True, type=click.IntRange(min=1),
                 help="Trials per family; trial 1 is always the study's model (the family's defaults)."),
    click.option("--tuner", default="random", show_default=True, type=click.Choice(TUNERS), help="Search strategy."),
    click.option("--objective", default=DEFAULT_OBJECTIVE, show_default=True, type=click.Choice(list(OBJECTIVES)),
                 help="What the tuner optimises and 'best' means: the final model's validation loss (lowest) or "
                      "accuracy (highest)."),
    click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1),
                 help="Epochs per trial (Hyperband's maximum)."),
    click.option("--seed", default=42, show_default=True, type=int,
                 help="Seeds Python, NumPy, Keras, the tuner and the test split."),
    click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder with train/ and validation/, one subfolder per class. Default: the study's download."),
    click.option("--weights", default="imagenet", show_default=True,
                 help="transfer only: 'imagenet' (Keras cache or download), a local MobileNetV2 .h5, or 'none'."),
    click.option("--experiment", default=None, help="MLflow experiment name (default: from mlflow.yaml)."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Tracking settings file (default: ./mlflow.yaml)."),
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1)),
    click.option("--image-size", default="160", show_default=True, callback=parse_image_size,
                 help="Input size, e.g. 160 or 160x160."),
    click.option("--no-cache", is_flag=True,
                 help="transfer only: train every trial on raw images through the full model (the study's way, "
                      "much slower) instead of on cached base features."),
    click.option("-q", "--quiet", is_flag=True, help="No per-epoch Keras progress; one line per trial only."),
]


def sweep_options(command):
    for option in reversed(SWEEP_OPTIONS):
        command = option(command)
    return command


def _sweep_settings(families, o: dict) -> tuple[list[SweepSettings], object]:
    tracking_settings = load_tracking(o["config_path"])
    if o["experiment"]:
        tracking_settings = replace(tracking_settings, experiment=o["experiment"])
    settings = [
        SweepSettings(family=f, trials=o["trials"], tuner=o["tuner"], objective=o["objective"], epochs=o["epochs"],
                      seed=o["seed"], batch_size=o["batch_size"], image_size=o["image_size"], data_dir=o["data_dir"],
                      weights=o["weights"], verbose=keras_verbosity(o["quiet"]), feature_cache=not o["no_cache"])
        for f in families
    ]
    return settings, tracking_settings


def _as_args(o: dict) -> list[str]:
    """The sweep options back as command-line arguments, for the chief process of --workers."""
    args = ["--trials", str(o["trials"]), "--tuner", o["tuner"], "--objective", o["objective"],
            "--epochs", str(o["epochs"]), "--seed", str(o["seed"]), "--weights", o["weights"],
            "--batch-size", str(o["batch_size"]),
            "--image-size", f"{o['image_size'][0]}x{o['image_size'][1]}"]
    for key, flag in (("data_dir", "--data-dir"), ("experiment", "--experiment"), ("config_path", "--config")):
        if o[key] is not None:
            args += [flag, str(Path(o[key]).resolve()) if key != "experiment" else o[key]]
    return args + (["--no-cache"] if o["no_cache"] else []) + (["-q"] if o["quiet"] else [])


def _print_results(results, tracking_settings) -> None:
    click.echo("")
    for result in results:
        best = result.best
        if best is None:
            click.echo(f"{result.family}: no trial finished (MLflow run {result.run_id})")
            continue
        click.echo(
            f"{result.family}: best trial {best.number} (by {result.objective}) val {best.val_accuracy:.1%} "
            f"(loss {best.val_loss:.3f}) "
            f"test {best.test_accuracy:.1%}{interval_text(best)} vs baseline {result.baseline_accuracy:.1%} "
            f"(MLflow run {result.run_id})"
        )
    click.echo(f"Runs are in {tracking_settings.tracking_uri}, experiment {tracking_settings.experiment!r}. "
               "Compare them with: sweep ui")


@main.command()
@click.option("--family", required=True, type=click.Choice([*FAMILY_NAMES, "all"]),
              help="Model family to sweep; 'all' runs the four in turn (the whole study).")
@sweep_options
@click.option("--resume", is_flag=True,
              help="Continue the newest unfinished sweep of --family with its own settings: finished trials are "
                   "kept, the interrupted one runs again.")
@click.option("--sweep", "sweep_name", default=None, help="With --resume: the sweep to continue, by name.")
@click.option("--workers", default=0, type=click.IntRange(min=0),
              help="Run trials in N worker processes on this machine, under a Keras Tuner chief.")
def run(family, resume, sweep_name, workers, **options) -> None:
    """Run a sweep and log every trial to MLflow.

    Example: sweep run --family transfer --trials 20
    """
    quiet_tensorflow()
    if workers:
        if family == "all" or resume:
            fail(SweepError("--workers runs one family's new sweep; drop --resume and pick a family."))
        from datetime import datetime

        from sweep import tracking
        from sweep.distributed import launch_local

        try:  # create the store once here, so the chief and the workers do not race to create its tables
            tracking.use_experiment(_sweep_settings([family], options)[1])
        except SweepError as exc:
            fail(exc)
        name = sweep_name or f"{family}-{options['tuner']}-{datetime.now():%Y%m%d-%H%M%S}"
        sys.exit(launch_local(["--family", family, *_as_args(options)], workers, name, click.echo))
    try:
        families = list(FAMILY_NAMES) if family == "all" else [family]
        settings, tracking_settings = _sweep_settings(families, options)
        from sweep.study import run_study

        results = run_study(settings, tracking_settings, report=click.echo, resume=resume, sweep_name=sweep_name)
    except SweepError as exc:
        fail(exc)
    _print_results(results, tracking_settings)


@main.command()
@click.option("--family", required=True, type=click.Choice(FAMILY_NAMES))
@sweep_options
@click.option("--sweep", "sweep_name", default=None, help="The sweep's name (default: family, tuner, time).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve the oracle on; 0.0.0.0 to accept workers from other machines.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--trial-timeout", default=None, type=click.FloatRange(min=1),
              help="Seconds after which a trial whose worker went silent is marked FAILED.")
def chief(family, sweep_name, host, port, trial_timeout, **options) -> None:
    """Serve a sweep's oracle to `sweep worker` processes (Keras Tuner's distributed mode)."""
    quiet_tensorflow()
    try:
        settings, tracking_settings = _sweep_settings([family], options)
        from sweep.distributed import Chief
        from sweep.study import prepare, run_sweep

        prepared = prepare(settings[0], tracking_settings, family == "transfer", click.echo)
        result = run_sweep(settings[0], prepared.splits, tracking_settings, prepared.experiment_id,
                           prepared.weights_path, click.echo, name=sweep_name,
                           chief=Chief(host, port, trial_timeout))
    except SweepError as exc:
        fail(exc)
    _print_results([result], tracking_settings)


@main.command()
@click.option("--chief", "chief_address", required=True, help="The chief's HOST:PORT.")
@click.option("--sweep", "sweep_name", required=True, help="The sweep's name, as the chief printed it.")
@click.option("--tuner-id", default=None,
              help="This worker's id (default: worker-HOST-PID); restart a dead worker with the same id.")
@EXPERIMENT
@CONFIG
def worker(chief_address, sweep_name, tuner_id, experiment, config_path) -> None:
    """Run trials for a chief until its search is over; each trial is logged under the chief's sweep run."""
    quiet_tensorflow()
    import socket

    try:
        from sweep.distributed import run_worker

        tuner_id = tuner_id or f"worker-{socket.gethostname()}-{os.getpid()}"
        done = run_worker(tracking_settings_for(config_path, experiment), chief_address, sweep_name, tuner_id, click.echo)
    except SweepError as exc:
        fail(exc)
    click.echo(f"Worker {tuner_id} finished: {done} trial(s) run here.")


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
@click.option("--image-size", default="160", show_default=True, callback=parse_image_size)
@click.option("--warm", is_flag=True, help="Use the configured feature cache (default: a cold, temporary one).")
@click.option("-q", "--quiet", is_flag=True)
def bench(family, trials, plain_trials, epochs, seed, data_dir, weights, experiment, config_path, batch_size,
          image_size, warm, quiet) -> None:
    """Time the same trial the plain way and ours, and a whole sweep our way; print a table."""
    quiet_tensorflow()
    try:
        tracking_settings = replace(load_tracking(config_path), experiment=experiment)
        settings = SweepSettings(family=family, trials=trials, epochs=epochs, seed=seed, batch_size=batch_size,
                                 image_size=image_size, data_dir=data_dir, weights=weights,
                                 verbose=keras_verbosity(quiet))
        from sweep.bench import format_table, run_bench
        from sweep.study import prepare

        prepared = prepare(settings, tracking_settings, family == "transfer", report=click.echo)
        result = run_bench(settings, prepared.splits, tracking_settings, prepared.experiment_id,
                           prepared.weights_path, plain_trials, cold=not warm, report=click.echo)
    except SweepError as exc:
        fail(exc)
    click.echo("")
    click.echo(format_table(result))


@main.command()
def families() -> None:
    """List each model family and its hyperparameters (type, range or choices, default)."""
    quiet_tensorflow()
    from search_spaces import FAMILIES, describe

    for name, cls in FAMILIES.items():
        click.echo(f"{name}: {cls.description}")
        for row in describe(name):
            click.echo(f"  {row['name']:<16} {row['type']:<7} {row['domain']:<58} default {row['default']}")
        click.echo("")


for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
