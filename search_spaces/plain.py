"""A user's own Keras Tuner ``HyperModel`` as a family: its ``build(hp)`` is the search space and the model, and
everything else the trial loop asks (``search_spaces.base.HyperFamily``) takes its default."""

from __future__ import annotations

import inspect
from typing import Any

import keras
import keras_tuner as kt

from search_spaces.base import Fitted, HyperFamily, Validation, fitted
from sweep.errors import FamilyError, first_line

# What a plain HyperModel class may declare as class attributes, as a HyperFamily would (the rest need its hooks).
PLAIN_CAPABILITIES = ("study_range", "prunable", "first_rung")
# Adam's learning rate where the family declares no ``learning_rate`` hyperparameter and compiles nothing itself.
DEFAULT_LEARNING_RATE = 1e-3


class PlainFamily(HyperFamily):
    """Wraps ``hypermodel`` (any ``keras_tuner.HyperModel``).

    * ``build(hp)`` is the user's; a model it did not compile is compiled as the study's are (Adam at the
      ``learning_rate`` hyperparameter where declared, else 1e-3; sparse categorical cross-entropy from logits).
      A model it compiled keeps its optimizer and loss; its metrics become accuracy, the figure sweep logs.
    * ``fit``: the study's training loop (augmentation layers run in the input pipeline; the kept model is the
      model without them), or the user's own ``fit(hp, model, *args, **kwargs)`` where the class overrides Keras
      Tuner's hook: it gets the training batches, ``epochs``, ``initial_epoch``, ``callbacks`` and ``verbose``
      as ``model.fit`` takes them, and must pass ``callbacks`` on (they score validation and log each epoch).
    * Not mixed precision (the user's layers choose their own dtypes), prunable, no later stage; the class may
      declare ``study_range``, ``prunable`` and ``first_rung`` as a ``HyperFamily`` does.
    """

    mixed_precision = False

    def __init__(self, hypermodel: kt.HyperModel, name: str, num_classes: int, image_size: tuple[int, int]) -> None:
        self.name = name
        super().__init__(num_classes=num_classes, image_size=image_size)
        self.hypermodel = hypermodel
        doc = inspect.getdoc(type(hypermodel)) or ""
        self.description = doc.strip().splitlines()[0] if doc.strip() else f"{type(hypermodel).__qualname__}"
        self.own_fit = type(hypermodel).fit is not kt.HyperModel.fit

    def declared_space(self) -> kt.HyperParameters:
        """The space Keras Tuner learns by building the model once with empty hyperparameters."""
        hp = kt.HyperParameters()
        try:
            self.hypermodel.build(hp)
        except Exception as exc:  # noqa: BLE001 - the user's build
            raise build_error(self.name, exc) from None
        finally:
            keras.backend.clear_session()
        return hp

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        model = self.hypermodel.build(hp)
        if not isinstance(model, keras.Model):
            raise FamilyError(f"family {self.name}: build(hp) returned a {type(model).__name__}, not a Keras model; "
                              "return the model (keras.Model or keras.Sequential).")
        if getattr(model, "optimizer", None) is None:
            self.compile(model, {"learning_rate": hp.values.get("learning_rate", DEFAULT_LEARNING_RATE)})
        else:
            model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
        return model

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *, data: Any, batch_size: int, epochs: int,
            initial_epoch: int = 0, callbacks: list | None = None, verbose: int = 0, seed: int = 0) -> Fitted:
        if not self.own_fit:
            return super().fit(hp, model, data=data, batch_size=batch_size, epochs=epochs,
                               initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose, seed=seed)
        final = self.inference_model(model, hp.values)
        history = keras.callbacks.History()
        self.hypermodel.fit(hp, model, data.train.batches(batch_size, shuffle_seed=seed), epochs=epochs,
                            initial_epoch=initial_epoch, verbose=verbose,
                            callbacks=[Validation(final, data.validation.batches(batch_size)), *(callbacks or []),
                                       history])
        if not history.history.get("val_loss"):
            raise FamilyError(f"family {self.name}: its fit(hp, model, ...) trained without sweep's callbacks; pass "
                              "the callbacks it is given on to model.fit (they score validation and log each epoch).")
        test_loss, test_accuracy = final.evaluate(data.test.batches(batch_size), verbose=0)
        return fitted(final, history.history, test_loss, test_accuracy, "raw_images")


def build_error(name: str, exc: BaseException) -> FamilyError:
    """The one line for a family whose ``build(hp)`` raised, with where in the user's code."""
    from search_spaces.registry import where

    return FamilyError(f"family {name}: build(hp) raised {first_line(exc)}{where(exc)}; fix the family's build, then "
                       "run again.")
