"""Keras Tuner search spaces: one hypermodel per model family, and where families come from.

Each family declares its hyperparameters and builds its model, and nothing else (how the transfer family's
trials train fast is the ``feature_cache`` package's). ``registry`` finds a family by name (the
``sweep.families`` entry points), ``module:Class`` or ``file.py:Class``; ``space`` reads its search space.

Importing this package imports nothing heavy; the names below load TensorFlow when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Fitted": "search_spaces.base", "HyperFamily": "search_spaces.base", "PlainFamily": "search_spaces.plain",
    "default_values": "search_spaces.space", "describe": "search_spaces.space", "fixed_space": "search_spaces.space",
    "fix_hyperparameters": "search_spaces.space", "hyperparameters": "search_spaces.space",
    "make_hypermodel": "search_spaces.registry",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'search_spaces' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return getattr(module, "make" if name == "make_hypermodel" else name)


__all__ = sorted(_EXPORTS)
