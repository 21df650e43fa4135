"""One ``SweepSpec``: everything that defines a sweep, listed once.

``to_params`` writes it into the sweep's MLflow run (and every trial's), ``from_params`` reads it back, so the
local run, ``--resume``, the chief and its workers, ``bench`` and ``export`` all build from the same record.
How a run is shown (progress lines, Keras verbosity) is not part of a sweep and stays out of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sweep.errors import ConfigError
from sweep.precision import PRECISIONS

# What a sweep can optimise (the final model's figure on the validation split) and which way is better.
OBJECTIVES = {"val_loss": "min", "val_accuracy": "max"}
DEFAULT_OBJECTIVE = "val_loss"
TUNERS = ("random", "bayesian", "hyperband")
FINE_TUNE_PLANS = ("late", "leaders", "any")  # sweep/staging.py
DATASET_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"


def _size_to_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _size_from_text(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.split("x"))
    return height, width


def _data_to_text(data_dir: Path | None) -> str:
    return DATASET_URL if data_dir is None else str(data_dir)


def _data_from_text(text: str) -> Path | None:
    return None if text == DATASET_URL else Path(text)


def _bool_from_text(text: str) -> bool:
    return text == "True"


def _fixed_to_text(fixed: tuple[tuple[str, Any], ...]) -> str:
    return json.dumps(dict(fixed), sort_keys=True)


def _fixed_from_text(text: str) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(json.loads(text).items()))


def _param(key: str | None = None, encode=str, decode=str, since: bool = False, legacy: Any = None,
           renamed: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``since``: a setting added after sweeps were already logged; a run without it had the default, or
    ``legacy`` where that differs (what such a sweep did). ``renamed``: (the param an older version logged
    instead, its logged values -> this setting's)."""
    return {"param": key, "encode": encode, "decode": decode, "since": since, "legacy": legacy, "renamed": renamed}


@dataclass(frozen=True)
class SweepSpec:
    """One sweep of one family. Every field is an MLflow param of the sweep's run and of each trial's run."""

    # The family: a registered name (``sweep families``), ``package.module:Class``, ``path/to/file.py:Class``
    # (kept with its absolute path), or the class itself (kept as the reference it can be imported by again).
    family: str = field(metadata=_param())
    trials: int = field(default=10, metadata=_param(decode=int))
    tuner: str = field(default="random", metadata=_param())
    objective: str = field(default=DEFAULT_OBJECTIVE, metadata=_param())
    epochs: int = field(default=20, metadata=_param(decode=int))
    seed: int = field(default=42, metadata=_param(decode=int))
    batch_size: int = field(default=32, metadata=_param(decode=int))
    # None: the checkpoint's own size for a transfer sweep whose weights file names it, else the study's 160
    # (``sweep.weights.default_image_size``); always a size once the spec exists.
    image_size: tuple[int, int] | None = field(default=None, metadata=_param(encode=_size_to_text,
                                                                             decode=_size_from_text))
    data_dir: Path | None = field(default=None, metadata=_param("data", _data_to_text, _data_from_text))
    weights: str = field(default="imagenet", metadata=_param())
    feature_cache: bool = field(default=True, metadata=_param(decode=_bool_from_text))
    # Hyperparameters held at one value (``--hp NAME=VALUE``); the search draws the others.
    fixed: tuple[tuple[str, Any], ...] = field(default=(), metadata=_param("fixed_hyperparameters", _fixed_to_text,
                                                                         _fixed_from_text, since=True))
    # Stop hopeless trials at successive halving's rungs (sweep/pruning.py), in families that allow it (the
    # from-scratch ones) and under random or Bayesian search; sweeps logged before it existed did not.
    prune: bool = field(default=True, metadata=_param(decode=_bool_from_text, since=True, legacy=False))
    # The number format of a from-scratch trial (sweep/precision.py): auto is mixed bfloat16 where the hardware
    # computes it natively; sweeps logged before it existed computed in float32.
    precision: str = field(default="auto", metadata=_param(since=True, legacy="float32"))
    # A family with a costly later stage (transfer's fine-tuning): which trials take it (sweep/staging.py): "late"
    # (the last 30 %, drawn afresh), "leaders" (the later half, each refining a best frozen model) or "any"
    # (drawn with the rest in every trial). Sweeps logged with the older boolean ``fine_tune_leaders`` ran
    # "leaders" (True) or "any" (False); sweeps logged before either drew it jointly.
    fine_tune: str = field(default="late", metadata=_param(since=True, legacy="any", renamed=(
        "fine_tune_leaders", {"True": "leaders", "False": "any"})))

    def __post_init__(self) -> None:
        from search_spaces import registry

        object.__setattr__(self, "family", registry.normalize(self.family))
        # Absolute paths, so resume, workers and export find the files from any working directory.
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        if str(self.weights).lower() in ("imagenet", "none"):
            object.__setattr__(self, "weights", str(self.weights).lower())
        else:
            object.__setattr__(self, "weights", str(Path(self.weights).expanduser().resolve()))
        if self.image_size is None:
            from sweep.weights import default_image_size

            object.__setattr__(self, "image_size", default_image_size(self.family, self.weights))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        fixed = dict(self.fixed)
        if fixed:
            from search_spaces.space import fix_hyperparameters

            try:
                fixed = fix_hyperparameters(self.family, {k: str(v) for k, v in fixed.items()})
            except ValueError as exc:
                raise ConfigError(f"--hp: {exc}") from None
        object.__setattr__(self, "fixed", tuple(sorted(fixed.items())))
        if self.trials < 1:
            raise ConfigError(f"trials must be at least 1, got {self.trials}.")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}.")
        if self.tuner not in TUNERS:
            raise ConfigError(f"unknown tuner {self.tuner!r}; choose one of {', '.join(TUNERS)}.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")
        if self.fine_tune not in FINE_TUNE_PLANS:
            raise ConfigError(f"unknown fine-tuning plan {self.fine_tune!r}; choose one of {', '.join(FINE_TUNE_PLANS)}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        if min(self.image_size) < 32:
            raise ConfigError(f"image size must be at least 32x32, got {self.image_size}.")

    @property
    def family_name(self) -> str:
        """The family's short name, as progress lines, tags and the report show it (``registry.display_name``)."""
        from search_spaces import registry

        return registry.display_name(self.family)

    def to_params(self) -> dict[str, str]:
        """The spec as MLflow params (strings)."""
        return {_key(f): f.metadata["encode"](getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> SweepSpec:
        """The spec a run was logged with; other params (hyperparameters, facts about the data) are ignored.

        Raises:
            ConfigError: the run holds no spec (not a sweep's or trial's run).
        """
        missing = [_key(f) for f in fields(cls) if _key(f) not in params and not f.metadata["since"]]
        if missing:
            raise ConfigError(f"the run has no sweep settings ({', '.join(missing)} missing); it is not a sweep "
                              "or trial run of `sweep`.")
        given = {f.name: f.metadata["decode"](params[_key(f)]) for f in fields(cls) if _key(f) in params}
        legacy = {f.name: f.metadata["legacy"] for f in fields(cls)
                  if _key(f) not in params and f.metadata["legacy"] is not None}
        for f in fields(cls):
            old = f.metadata["renamed"]
            if old is not None and _key(f) not in params and params.get(old[0]) in old[1]:
                legacy[f.name] = old[1][params[old[0]]]
        return cls(**given, **legacy)

    @classmethod
    def from_options(cls, family: str, options: dict[str, Any]) -> SweepSpec:
        """The spec from command-line options named as its fields; other options are ignored."""
        return cls(family=family, **{f.name: options[f.name] for f in fields(cls)
                                     if f.name != "family" and f.name in options})

    @classmethod
    def param_names(cls) -> frozenset[str]:
        """The MLflow param keys the spec writes: every other param of a trial run is a hyperparameter."""
        return frozenset(_key(f) for f in fields(cls))


def spec_defaults() -> dict[str, Any]:
    """Each setting's default, for the command-line options that set it."""
    return {f.name: f.default for f in fields(SweepSpec) if f.name != "family"}


def _key(f) -> str:
    return f.metadata["param"] or f.name
