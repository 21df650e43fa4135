"""What every ``sweep`` command shares: quiet TensorFlow, one-line errors, common options."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from sweep.config import load_tracking
from sweep.errors import SweepError

FAMILY_NAMES = ("scratch", "augmented", "preprocessed", "transfer")


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def keras_verbosity(quiet: bool) -> int:
    """0 when quiet, Keras' live progress bar on a terminal, one line per epoch in a log file."""
    if quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


def fail(exc: SweepError) -> None:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(1)


def parse_image_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 32:
        raise click.BadParameter(f"{value!r} is not a size like 160 or 160x160 (at least 32).")
    return parts[0], parts[1]


def check_out_folder(folder: Path, option: str) -> None:
    """Refuse an output path that cannot become a folder (a file in the way, no write permission) before any
    work is done; nothing is created here.

    Raises:
        SweepError: naming the option, the path and what is in the way.
    """
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SweepError(f"{option} {folder}: {probe} is a file, not a folder; pick another path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SweepError(f"{option} {folder}: cannot write in {probe}; pick another path.")


def tracking_settings_for(config_path: Path | None, experiment: str | None):
    """``mlflow.yaml`` (or ``--config``) with ``--experiment`` applied."""
    settings = load_tracking(config_path)
    return replace(settings, experiment=experiment) if experiment else settings


EXPERIMENT = click.option("--experiment", default=None, help="MLflow experiment (default: from mlflow.yaml).")
CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="Tracking settings file (default: ./mlflow.yaml).")


