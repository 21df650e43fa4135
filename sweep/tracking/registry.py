"""The model registry: an export logged as a model of its trial's run, registered as a version of a named
model, and the alias pointed at that version; all through the client it is given (MLflow's public
``MlflowClient`` calls for logged models, never its implicit active run)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.tracking.runs import RunLogger

MODEL_NAME = "registered_model"  # the logged model's name in its run


def register_model(client: MlflowClient, run_id: str, files: Path, classes: list[str], name: str, alias: str,
                   metrics: dict[str, float] | None = None) -> int:
    """Register the export folder ``files`` as a new version of ``name`` and point ``alias`` at it.

    The model is saved in MLflow's pyfunc flavour (``sweep.pyfunc_model.ImageClassifier``: encoded images in,
    class names out; the export's files are its ``formats`` artifacts) and logged as an MLflow logged model of
    the trial's run ``run_id`` (``metrics`` go on that run); the registered version points at it. MLflow's
    aliases replace its deprecated stages.

    Returns:
        The new version's number.
    """
    import keras
    import mlflow
    import tensorflow as tf

    from sweep.pyfunc_model import ImageClassifier, signature

    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        tags={"mlflow.source.type": "sweep"}, model_type="pyfunc")
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        description = mlflow.models.Model(artifact_path=logged.artifact_location, run_id=run_id,
                                          model_id=logged.model_id, model_uuid=logged.model_id)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / MODEL_NAME
            mlflow.pyfunc.save_model(str(folder), python_model=ImageClassifier(), artifacts={"formats": str(files)},
                                     signature=signature(classes), mlflow_model=description,
                                     pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                                                       f"mlflow=={mlflow.__version__}"])
            client.log_model_artifacts(logged.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    if metrics:
        RunLogger(client, run_id).log_metrics(metrics)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # the logged model's storage location as the source, with its run: given ``models:/<id>``, MLflow's SQL
    # registry looks the model up through the process-wide tracking URI, not this client's store
    version = int(client.create_model_version(name, logged.artifact_location, run_id=run_id,
                                              model_id=logged.model_id).version)
    client.set_registered_model_alias(name, alias, version)
    return version
