"""A family's search space as data: its defaults, ``--hp`` values checked against it, and a description for
``sweep families`` and each sweep's ``search_space.json``. ``family`` is anything ``registry.load`` takes."""

from __future__ import annotations

from typing import Any

import keras_tuner as kt

from search_spaces import registry


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


def fix_hyperparameters(family: str | type, assignments: dict[str, str]) -> dict[str, Any]:
    """Check ``NAME=VALUE`` texts against the family's search space and return the typed values.

    Raises:
        ValueError: an unknown name, or a value outside its hyperparameter's choices, range or step.
    """
    hp = registry.space(family)
    space = {item.name: item for item in hp.space}
    fixed: dict[str, Any] = {}
    for name, text in assignments.items():
        if name not in space:
            raise ValueError(f"{registry.display_name(family)} has no hyperparameter {name!r}; it has {', '.join(space)}.")
        item, config = space[name], space[name].get_config()
        if isinstance(item, kt.engine.hyperparameters.Boolean):
            if text.lower() not in ("true", "false"):
                raise ValueError(f"{name} takes True or False, not {text!r}.")
            fixed[name] = text.lower() == "true"
        elif isinstance(item, kt.engine.hyperparameters.Choice):
            match = [v for v in config["values"] if str(v) == text]
            if not match:
                raise ValueError(f"{name} takes one of {', '.join(map(str, config['values']))}, not {text!r}.")
            fixed[name] = match[0]
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{name} takes a number, not {text!r}.") from None
            low, high, step = config["min_value"], config["max_value"], config.get("step")
            if not low - 1e-9 <= value <= high + 1e-9:
                raise ValueError(f"{name} takes a value in [{low}, {high}], not {text!r}.")
            if step:
                steps = round((value - low) / step)
                if abs(low + steps * step - value) > 1e-9:
                    raise ValueError(f"{name} takes multiples of {step} from {low}, not {text!r}.")
                value = low + steps * step  # the value Keras Tuner itself would give
            fixed[name] = int(value) if isinstance(item, kt.engine.hyperparameters.Int) else value
    return fixed


def fixed_space(family: str | type, fixed: dict[str, Any]) -> kt.HyperParameters:
    """Keras Tuner hyperparameters holding ``fixed`` (checked by ``fix_hyperparameters``) at their values, each
    declared under the same conditions as in the family's space (a fine-tuning setting exists only when
    ``fine_tune_from`` is a cut), so that the family's own declaration finds the fixed one instead of adding
    a second, drawn one."""
    space = registry.space(family)
    parents = {c.name for item in space.space if item.name in fixed for c in item.conditions}
    hp = kt.HyperParameters()
    for item in space.space:  # in the family's order: a parent before what it conditions
        if item.name in fixed:
            scopes = [hp.conditional_scope(c.name, list(c.values)) for c in item.conditions]
            for scope in scopes:
                scope.__enter__()
            try:
                hp.Fixed(item.name, fixed[item.name])
            finally:
                for scope in reversed(scopes):
                    scope.__exit__(None, None, None)
        elif item.name in parents:  # drawn as usual, declared so the fixed one can be conditioned on it
            hp.merge([item])
    return hp


def describe(family: str | type) -> list[dict[str, Any]]:
    """Each hyperparameter of a family: name, type, range or choices, default, and ``when`` it is active
    (a conditional one, e.g. the fine-tuning settings; empty when always). Builds no model."""
    hp = registry.space(family)
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
        when = "; ".join(f"when {c.name} is {' or '.join(map(str, c.values))}" for c in item.conditions)
        rows.append({"name": item.name, "type": type(item).__name__, "domain": domain, "default": item.default,
                     "when": when})
    return rows
