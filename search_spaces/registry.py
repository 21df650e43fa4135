"""Where a sweep's family comes from, and the one check that it fits the data.

A family is named by a reference, the text ``--family`` takes and a sweep records (its ``family`` param):

* a short name registered under the ``sweep.families`` entry-point group: the study's four, which this
  package registers, and any installed package's (``[options.entry_points] sweep.families = wide = pkg.mod:WideNet``);
* ``package.module:Class``, an importable module's class;
* ``path/to/file.py:Class``, a class in a file (recorded with its absolute path, so workers, ``--resume`` and
  export find it from any folder).

Listing the registered families reads package metadata only: nothing is imported, so ``sweep families`` is
instant. A family's class is imported when a sweep first needs it, once per process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweep.errors import FamilyError, first_line

if TYPE_CHECKING:
    from search_spaces.base import HyperFamily

GROUP = "sweep.families"
DISTRIBUTION = "sweep"  # the package whose own families `--family all` sweeps (the study)
FORMS = "a registered name (`sweep families`), package.module:Class, or path/to/file.py:Class"


@dataclass(frozen=True)
class Registered:
    """One family registered under the entry-point group."""

    name: str
    target: str  # module:Class
    package: str  # the installed distribution that registered it

    @property
    def builtin(self) -> bool:
        return self.package == DISTRIBUTION


def registered() -> list[Registered]:
    """Every registered family, this package's first, by name (the first of two packages registering one name
    wins)."""
    found: dict[str, Registered] = {}
    for point in entry_points(group=GROUP):
        package = point.dist.name if point.dist is not None else "?"
        found.setdefault(point.name, Registered(point.name, point.value, package))
    return sorted(found.values(), key=lambda r: not r.builtin)  # stable: each package keeps its own order


def study_families() -> list[str]:
    """The study's families (``--family all``): this package's registered families that declare which of the
    study's models they are (``study_model``), in the study's order. Imports them.

    Raises:
        FamilyError: the package's metadata is missing (it runs from a source folder without being installed).
    """
    models = {r.name: getattr(load(r.name), "study_model", None) for r in registered() if r.builtin}
    names = sorted((name for name, model in models.items() if model is not None), key=lambda name: models[name])
    if not names:
        raise FamilyError("no built-in family is registered: sweep runs without its package metadata; install it "
                          "with `pip install -e .` in its folder.")
    return names


def _is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def normalize(family: str | type) -> str:
    """The reference a sweep records for ``family`` (a reference, or the class itself): a registered name as
    it is, a file with its absolute path.

    Raises:
        FamilyError: a class that a later process could not import again (one typed into an interactive session).
    """
    if isinstance(family, type):
        return _reference_of(family)
    text = str(family).strip()
    if ":" not in text:
        return text
    module, _, attr = text.rpartition(":")
    if _is_file(module):
        return f"{Path(module).expanduser().resolve()}:{attr}"
    return text


_REFERENCES: dict[type, str] = {}  # classes imported from a reference -> that reference


def _reference_of(cls: type) -> str:
    if cls in _REFERENCES:
        return _REFERENCES[cls]
    target = f"{cls.__module__}:{cls.__qualname__}"
    for entry in registered():
        if entry.target == target:
            return entry.name
    if cls.__module__ != "__main__":
        return target
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        raise FamilyError(f"family {cls.__qualname__} was defined in an interactive session, where workers, "
                          "--resume and export cannot import it again; put it in a .py file and pass the class "
                          "imported from there (or path/to/file.py:Class).")
    return f"{Path(main_file).resolve()}:{cls.__qualname__}"


def family_class(family: str | type) -> type[HyperFamily]:
    """The class whose attributes say what the family can do (``HyperFamily``'s capabilities): the family's own
    where it subclasses ``HyperFamily``, else ``PlainFamily``, the defaults a plain ``HyperModel`` gets.

    Raises:
        FamilyError: the family cannot be loaded.
    """
    from search_spaces.base import HyperFamily

    cls = load(normalize(family))
    return cls if issubclass(cls, HyperFamily) else _plain_class(cls)


@lru_cache(maxsize=None)
def _plain_class(cls: type) -> type:
    """``PlainFamily`` with what a plain ``HyperModel`` class declares of ``PLAIN_CAPABILITIES``."""
    from search_spaces.plain import PLAIN_CAPABILITIES, PlainFamily

    declared = {name: getattr(cls, name) for name in PLAIN_CAPABILITIES if hasattr(cls, name)}
    return type(f"Plain{cls.__name__}", (PlainFamily,), declared) if declared else PlainFamily


def display_name(family: str | type) -> str:
    """How progress lines, tags and the report name a family: a registered name as it is, else the class's
    ``name`` attribute where it declares one, else the class's name."""
    reference = normalize(family)
    if ":" not in reference:
        return reference
    cls = load(reference)
    declared = cls.__dict__.get("name")
    return declared if isinstance(declared, str) and declared else cls.__name__


@lru_cache(maxsize=None)
def load(reference: str) -> type:
    """The family's class (a Keras Tuner ``HyperModel`` subclass), imported once per process.

    Raises:
        FamilyError: no such registered name, module, file or class; the module raised while importing; the
            object is not a ``HyperModel`` class.
    """
    reference = normalize(reference)
    if ":" not in reference:
        entry = next((r for r in registered() if r.name == reference), None)
        if entry is None:
            names = ", ".join(r.name for r in registered()) or "none"
            raise FamilyError(f"unknown family {reference!r} (registered: {names}); give {FORMS}.")
        module_name, _, attr = entry.target.partition(":")
        module = _import_module(module_name, f"family {reference!r} ({entry.target}, registered by {entry.package})")
    else:
        module_name, _, attr = reference.rpartition(":")
        if not module_name or not attr:
            raise FamilyError(f"--family {reference!r}: give {FORMS}.")
        if _is_file(module_name):
            module = _import_file(Path(module_name), reference)
        else:
            module = _import_module(module_name, f"--family {reference}")
    cls: Any = module
    for part in attr.split("."):
        if not hasattr(cls, part):
            defined = sorted(n for n, v in vars(module).items() if isinstance(v, type) and _is_hypermodel(v)
                             and v.__module__ == module.__name__)
            hint = f"; it defines {', '.join(defined)}" if defined else "; it defines no HyperModel class"
            raise FamilyError(f"--family {reference}: {module_name} has no {attr!r}{hint}.")
        cls = getattr(cls, part)
    if not isinstance(cls, type) or not _is_hypermodel(cls):
        raise FamilyError(f"--family {reference}: {attr} is a {type(cls).__name__}, not a Keras Tuner HyperModel "
                          "class; subclass keras_tuner.HyperModel and build the model in build(hp).")
    _REFERENCES.setdefault(cls, reference)
    return cls


def _is_hypermodel(cls: type) -> bool:
    import keras_tuner as kt

    return issubclass(cls, kt.HyperModel)


def where(exc: BaseException) -> str:
    """`` (file:line)`` of the innermost frame of the user's code an exception came from (not an installed
    library's, nor the import machinery's)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    own = [f for f in frames if "-packages" not in f.filename and "/search_spaces/" not in f.filename]
    frames = own or frames
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _import_module(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise FamilyError(f"{what}: no module named {exc.name!r}; install its package, run from the folder "
                              "that holds it (or add that folder to PYTHONPATH), or give path/to/file.py:Class."
                              ) from None
        raise FamilyError(f"{what}: importing {name} failed: {first_line(exc)}{where(exc)}; install what it "
                          "imports.") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise FamilyError(f"{what}: importing {name} raised {first_line(exc)}{where(exc)}; fix the module.") from None


def _import_file(path: Path, reference: str):
    if not path.is_file():
        raise FamilyError(f"--family {reference}: {path} is not a file; give path/to/file.py:Class.")
    if path.suffix != ".py":
        raise FamilyError(f"--family {reference}: {path} is not a Python file (.py).")
    # One module name per file, stable across processes, so a worker's copy is the same module.
    name = f"sweep_family_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:  # the file may import modules beside it, as a script would
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file raised while importing
        del sys.modules[name]
        raise FamilyError(f"--family {reference}: importing {path.name} raised {first_line(exc)}{where(exc)}; "
                          "fix the file.") from None
    return module


def make(family: str | type, num_classes: int = 2, image_size: tuple[int, int] = (160, 160),
         weights: str | None = None) -> HyperFamily:
    """The family's hypermodel for data of ``num_classes`` classes at ``image_size``.

    A ``HyperFamily`` subclass is constructed with those of ``num_classes``, ``image_size`` and (for a family
    that ``uses_weights``) ``weights`` its constructor takes; any other Keras Tuner ``HyperModel`` with those of
    ``num_classes``/``classes`` and ``image_size``/``input_shape`` it takes, and is wrapped in a
    ``PlainFamily``, which gives it the loop's defaults.

    Raises:
        FamilyError: the class cannot be found, or its constructor raised.
    """
    from search_spaces.base import HyperFamily

    reference = normalize(family)
    cls = load(reference)
    name = display_name(reference)
    size = tuple(int(v) for v in image_size)
    offered = {"num_classes": num_classes, "classes": num_classes, "image_size": size, "input_shape": (*size, 3)}
    if issubclass(cls, HyperFamily) and cls.uses_weights:
        offered["weights"] = weights
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}
    if issubclass(cls, HyperFamily):  # its own constructor takes num_classes and image_size
        offered = {k: v for k, v in offered.items() if k not in ("classes", "input_shape")}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in offered.items() if k in parameters or (takes_any and k in ("num_classes", "image_size"))}
    try:
        instance = cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        given = ", ".join(kwargs) or "no arguments"
        raise FamilyError(f"family {name}: {cls.__name__}({given}) raised {first_line(exc)}{where(exc)}; sweep "
                          "constructs a family with no arguments, or with whichever of num_classes (or classes) and "
                          "image_size (or input_shape) its constructor takes.") from None
    if isinstance(instance, HyperFamily):
        instance.num_classes, instance.image_size = num_classes, size
        if not isinstance(cls.__dict__.get("name"), str):
            instance.name = name
        return instance
    return _plain_class(cls)(instance, name, num_classes, size)


def space(family: str | type):
    """The family's search space (a ``keras_tuner.HyperParameters`` holding every hyperparameter it declares,
    at its default), without training anything. A family that declares its space apart from building
    (``HyperFamily.declare``) builds nothing; any other builds its model once, as Keras Tuner itself does to
    learn a space.

    Raises:
        FamilyError: the family cannot be loaded, or its build raised.
    """
    import copy

    return copy.deepcopy(_space(normalize(family)))


@lru_cache(maxsize=None)
def _space(reference: str):
    return make(reference).declared_space()


def check(family: HyperFamily) -> None:
    """Build the family's model at its defaults and check that it fits the data: one input of the sweep's
    image size (RGB), one output of one value per class. Run before anything is written.

    Raises:
        FamilyError: its build raised, or the model does not take the sweep's images or give one output per class.
    """
    import keras
    import keras_tuner as kt
    import numpy as np

    from search_spaces.plain import build_error

    name, (height, width), classes = family.name, family.image_size, family.num_classes
    try:
        model = family.build(kt.HyperParameters())
    except FamilyError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's build
        raise build_error(name, exc) from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise FamilyError(f"family {name}: its model has {len(model.inputs)} input(s) and {len(model.outputs)} "
                          "output(s); sweep feeds one batch of images and scores one output of logits.")
    wanted = (height, width, 3)
    got = tuple(model.inputs[0].shape[1:])
    if len(got) != 3 or any(g is not None and g != w for g, w in zip(got, wanted)):
        shown = "x".join("?" if g is None else str(g) for g in got)
        raise FamilyError(f"family {name}: its model takes inputs of {shown}, but the sweep's images are "
                          f"{height}x{width}x3 (RGB); build the Input from the image_size sweep passes to the "
                          f"constructor, or run the sweep with --image-size to match.")
    if None in got:  # a shape only a forward pass can check (e.g. Flatten after a size-free input)
        try:
            outputs = model.predict_on_batch(np.zeros((1, *wanted), "float32"))
        except Exception as exc:  # noqa: BLE001
            raise FamilyError(f"family {name}: its model failed on a {height}x{width}x3 image: "
                              f"{first_line(exc)}; build it for the sweep's --image-size.") from None
        out = tuple(np.shape(outputs))
    else:
        out = tuple(model.outputs[0].shape)
    if len(out) != 2 or out[-1] != classes:
        raise FamilyError(f"family {name}: its model's output has shape {tuple(out[1:])}, but the data has "
                          f"{classes} classes; end it in Dense(num_classes) on logits (sweep passes num_classes to "
                          "the constructor).")
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax) or getattr(last, "activation", None) is keras.activations.softmax:
        raise FamilyError(f"family {name}: its model ends in a softmax, but sweep trains on logits and applies the "
                          "softmax itself when it predicts; drop the final activation.")
    keras.backend.clear_session(free_memory=False)
