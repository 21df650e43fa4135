"""The registered model's MLflow pyfunc flavour: encoded images in, class names and probabilities out.

`sweep best --export` registers each version as this ``PythonModel``, with the export's files as its
artifacts (``formats/``: the model in each format, ``classes.json``, the records), so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ``mlflow models serve -m models:/NAME@champion
--env-manager local`` answer a photo, not a pixel array:

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG>"], ...]}}
    -> {"predictions": [{"class": "cats", "probability": 0.99, "p_cats": 0.99, "p_dogs": 0.01}, ...]}

The image is decoded and resized as training decodes it (``sweep.data.decode_bytes``), and the model runs in
the fastest runtime its export holds (``sweep.serving.pick_format``). Loading it needs ``sweep`` installed
where it runs (``--env-manager local`` in the project's environment).
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np

INPUT_COLUMN = "image"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from sweep.formats import classes_for, load
        from sweep.serving import pick_format

        folder = Path(context.artifacts["formats"])
        self.format, path = pick_format(folder, None)
        self.runtime = load(self.format, path)
        self.classes = classes_for(path, self.runtime.num_classes)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from sweep.data import decode_bytes

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({INPUT_COLUMN: model_input})
        if INPUT_COLUMN not in frame.columns:
            raise ValueError(f"send the images base64-encoded in a column named {INPUT_COLUMN!r}; got columns "
                             f"{list(frame.columns)}")
        images = np.stack([decode_bytes(_bytes(value), self.runtime.input_size) for value in frame[INPUT_COLUMN]])
        logits = self.runtime(images)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        best = p.argmax(axis=1)
        columns = {"class": [self.classes[i] for i in best], "probability": p[np.arange(len(p)), best]}
        columns.update({f"p_{name}": p[:, i] for i, name in enumerate(self.classes)})
        return pd.DataFrame(columns)


def _bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return base64.b64decode(str(value), validate=False)


def signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "class"), ColSpec("double", "probability"),
               *(ColSpec("double", f"p_{name}") for name in classes)]
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=Schema(outputs))
