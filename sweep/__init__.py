"""sweep: hyperparameter sweeps and experiment tracking for image classification.

The Python API (``docs/python-api.md``): ``SweepSpec``, ``run_sweep``, ``find_best``, ``export_best``,
``predict``; the command line is a thin layer over them. Names load on first use, so ``import sweep`` (and
``sweep --help``) stays quick: TensorFlow and MLflow load with the first call that needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "SweepSpec": "sweep.spec",
    "SweepResult": "sweep.study",
    "TrialRecord": "sweep.results",
    "BestTrial": "sweep.export",
    "Prediction": "sweep.prediction",
    "Export": "sweep.api",
    "Verification": "sweep.formats",
    "run_sweep": "sweep.api",
    "find_best": "sweep.api",
    "export_best": "sweep.api",
    "predict": "sweep.api",
    "tracking_settings": "sweep.api",
    "FORMATS": "sweep.formats",
    "DEFAULT_FORMATS": "sweep.formats",
    "SweepError": "sweep.errors",
    "ConfigError": "sweep.errors",
    "DataError": "sweep.errors",
    "WeightsError": "sweep.errors",
    "FamilyError": "sweep.errors",
    # for your own family (docs/your-own-family.md): the interface the trial loop asks of one, and a trial's result
    "HyperFamily": "search_spaces.base",
    "Fitted": "search_spaces.base",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sweep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
