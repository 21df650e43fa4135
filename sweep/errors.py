"""The one error hierarchy for what a user did wrong.

Anything raised as a ``SweepError`` is shown by the CLI as a single clear message with a non-zero exit;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class SweepError(Exception):
    """Base class: a problem with the user's input or environment, with a message saying how to fix it."""


class ConfigError(SweepError):
    """``mlflow.yaml`` or an environment override is malformed."""


class DataError(SweepError):
    """The dataset is missing, empty, or not laid out as ``train/`` and ``validation/`` class folders."""


class WeightsError(SweepError):
    """Pretrained weights could not be found, downloaded or loaded."""


class FamilyError(SweepError):
    """A ``--family`` that cannot be found, imported, built, or whose model does not fit the data."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception as one line: its type and the first line of its message (many span several lines), that
    line cut at ``limit`` characters. The one place this is written: every message that names a caught error
    calls it."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line[:limit] if limit is not None else line}"
