"""What every ``sweep`` command shares: quiet TensorFlow, one-line errors, common options."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from sweep.config import folder_problem, load_tracking
from sweep.errors import SweepError
from sweep.spec import spec_defaults

DEFAULTS = spec_defaults()

FAMILY = click.option(
    "--family", required=True, metavar="FAMILY",
    help="The model family: a name from `sweep families`, your own as package.module:Class or "
         "path/to/file.py:Class (a Keras Tuner HyperModel), or 'all' for the study's families in turn.")


# What TensorFlow's C++ side writes to stderr while it loads, before its log level applies: no news to a user.
_IMPORT_NOISE = ("WARNING: All log messages before absl::InitializeLog() is called",
                 "oneDNN custom operations are on", "cudart_stub.cc", "Could not find cuda drivers")


def quiet_tensorflow() -> None:
    """Import TensorFlow now, without its start-up lines on stderr; anything else it writes is passed on.

    TF_CPP_MIN_LOG_LEVEL silences its later logging, but the lines written while its libraries load come
    before that setting applies, so stderr (the file descriptor, as C++ writes there) is caught for the import.
    A process that TensorFlow aborts during the import loses those lines; an import that raises shows them.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    from sweep.native_output import captured

    imported, err = False, None
    try:
        with captured((2,)) as err:
            import tensorflow  # noqa: F401

            imported = True
    finally:
        for line in (err.text if err is not None else "").splitlines():
            # a failed import shows all it wrote, the start-up lines included
            if line.strip() and (not imported or not any(noise in line for noise in _IMPORT_NOISE)):
                print(line, file=sys.stderr)


def keras_verbosity(quiet: bool) -> int:
    """0 when quiet, Keras' live progress bar on a terminal, one line per epoch in a log file."""
    if quiet:
        return 0
    return 1 if sys.stdout.isatty() else 2


class SweepGroup(click.Group):
    """The command group: a ``SweepError`` from any command becomes one ``Error: ...`` line and exit code 1
    (click's own ``ClickException``), in this one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SweepError as exc:
            raise click.ClickException(str(exc)) from None


def stop_on_sigterm() -> None:
    """Treat SIGTERM (kill, Docker, systemd, Kubernetes) as Ctrl-C, so open MLflow runs end KILLED, not
    RUNNING for ever; both also mark the process as stopping (``tracking.STOP_REQUESTED``).

    Once stopping, a further SIGTERM changes nothing (a supervisor passing the signal on to its workers, or a
    scheduler repeating it, must not interrupt the closing of the runs), and a second Ctrl-C exits at once."""
    import signal

    from sweep.tracking import STOP_REQUESTED

    def interrupt(signum, frame):
        if STOP_REQUESTED.is_set():
            if signum == signal.SIGINT:
                click.echo("Stopping at once; runs still open stay RUNNING.", err=True)
                os._exit(130)
            return
        STOP_REQUESTED.set()
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def parse_image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
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
    found = folder_problem(folder)
    if found is None:
        return
    probe, problem = found
    if problem == "file":
        raise SweepError(f"{option} {folder}: {probe} is a file, not a folder; pick another path.")
    if problem == "read-only":
        raise SweepError(f"{option} {folder}: cannot write in {probe}; pick another path.")
    raise SweepError(f"{option} {folder}: cannot reach {probe} {problem.removeprefix('unreachable ')}; "
                     "pick another path.")


def tracking_settings_for(config_path: Path | None, experiment: str | None):
    """``mlflow.yaml`` (or ``--config``) with ``--experiment`` applied."""
    settings = load_tracking(config_path)
    return replace(settings, experiment=experiment) if experiment else settings


def options(*decorators):
    """Several click options as one decorator, declared once and shared by the commands that take them."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


EXPERIMENT = click.option("--experiment", default=None, help="MLflow experiment (default: from mlflow.yaml).")
CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="Tracking settings file (default: ./mlflow.yaml).")
TRACKING_OPTIONS = options(EXPERIMENT, CONFIG)
DATA_OPTIONS = options(
    click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder with train/ and validation/, one subfolder per class. Default: the study's download."),
    click.option("--seed", default=DEFAULTS["seed"], show_default=True, type=int,
                 help="Seeds Python, NumPy, Keras, the tuner and the test split."),
    click.option("--batch-size", default=DEFAULTS["batch_size"], show_default=True, type=click.IntRange(min=1)),
    click.option("--image-size", default=None, callback=parse_image_size,
                 help="Input size, e.g. 160 or 160x160. Default: for transfer, the size the weights file's name "
                      "gives (224 for MobileNetV2's ..._224_no_top file), else the study's 160."),
)
def parse_fixed(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise click.BadParameter(f"{value!r} is not NAME=VALUE (e.g. flip_mode=none).")
        pairs.append((name.strip(), text.strip()))
    return tuple(pairs)


FIXED = click.option("--hp", "fixed", multiple=True, callback=parse_fixed, metavar="NAME=VALUE",
                     help="Hold a hyperparameter at one value (repeatable); the search draws the others. "
                          "See `sweep families` for names and ranges.")
WEIGHTS = click.option("--weights", default=DEFAULTS["weights"], show_default=True,
                       help="transfer only: 'imagenet' (Keras cache or download), a local MobileNetV2 .h5, or 'none'.")




def parse_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``45m``, ``1h30m``, ``90s`` or plain seconds, as seconds."""
    if value is None:
        return None
    import re

    text = value.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        text += "s"  # plain seconds
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or not match or not any(match.groups()):
        raise click.BadParameter(f"{value!r} is not a duration; write it as 45m, 1h30m, 90s or seconds.")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise click.BadParameter(f"{value!r}: the budget must be more than zero.")
    return total


TIME_BUDGET = click.option(
    "--time-budget", default=None, callback=parse_duration, metavar="DURATION",
    help="Wall time for the whole command (e.g. 45m, 1h30m): no trial starts that could not finish within it, "
         "a trial still running at the end stops as a pruned one; --resume continues. With --family all, each "
         "family gets an equal share of what is left when it starts.")
