"""Keras Tuner search spaces, one hypermodel per model family, and the ``FAMILIES`` registry."""

from __future__ import annotations

from typing import Any

import keras_tuner as kt

from search_spaces.base import Fitted, HyperFamily
from search_spaces.conv import HyperAugmented, HyperPreprocessed, HyperScratch
from search_spaces.transfer import HyperTransfer

FAMILIES: dict[str, type[HyperFamily]] = {
    cls.name: cls for cls in (HyperScratch, HyperAugmented, HyperPreprocessed, HyperTransfer)
}


def make_hypermodel(
    family: str, num_classes: int = 2, image_size: tuple[int, int] = (160, 160), weights: str | None = None
) -> HyperFamily:
    """Instantiate a family's hypermodel; ``weights`` (a local path or None) only applies to ``transfer``."""
    cls = FAMILIES[family]
    if cls is HyperTransfer:
        return cls(num_classes=num_classes, image_size=image_size, weights=weights)
    return cls(num_classes=num_classes, image_size=image_size)


def default_values(hp: kt.HyperParameters) -> dict[str, Any]:
    """The default value of every active hyperparameter in ``hp``'s space."""
    defaults = kt.HyperParameters()
    for item in hp.space:
        defaults.merge([item])
    return hyperparameters(defaults.values)


def hyperparameters(values: dict[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameter values without Keras Tuner's own ``tuner/*`` bookkeeping (Hyperband's
    epochs, bracket and round), which are not choices of the model."""
    return {name: value for name, value in values.items() if not name.startswith("tuner/")}


def describe(family: str) -> list[dict[str, Any]]:
    """Each hyperparameter of a family: name, type, range or choices, default. Builds no model."""
    hp = kt.HyperParameters()
    FAMILIES[family]().declare(hp)
    rows = []
    for item in hp.space:
        config = item.get_config()
        if isinstance(item, kt.engine.hyperparameters.Choice):
            domain = "{" + ", ".join(map(str, config["values"])) + "}"
        elif isinstance(item, kt.engine.hyperparameters.Boolean):
            domain = "{False, True}"
        elif isinstance(item, kt.engine.hyperparameters.Fixed):
            domain = "{" + str(config["value"]) + "}"
        else:
            domain = f"[{config['min_value']}, {config['max_value']}]"
            if config.get("step"):
                domain += f" step {config['step']}"
            if config.get("sampling") not in (None, "linear"):
                domain += f" ({config['sampling']})"
        rows.append({"name": item.name, "type": type(item).__name__, "domain": domain, "default": item.default})
    return rows


__all__ = ["FAMILIES", "Fitted", "HyperFamily", "default_values", "describe", "hyperparameters", "make_hypermodel"]
