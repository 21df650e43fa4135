"""The private Keras Tuner internals `sweep` still uses, in one place.

Each is here because Keras Tuner has no public way to do the job; ``tests/test_compat.py`` pins the releases
they were checked against and fails on an upgrade, so whoever upgrades re-checks each use below.

* ``keras_tuner.src.config.DEBUG``: Keras Tuner prints every failed trial's traceback while it is on (its
  default); `sweep` prints one line per failed trial and keeps the error in the trial's MLflow run.
* ``keras_tuner.src.distribute.oracle_chief.OracleServicer`` and ``keras_tuner.src.protos``: the chief's gRPC
  service. Keras Tuner's public ``start_server`` blocks forever with no hook to fail stale trials, stop on
  failures or notice a finished search, so the chief serves the same servicer itself.
"""

from __future__ import annotations

CHECKED_WITH = {"keras_tuner": "1.4.8"}


def quiet_failed_trials() -> None:
    """Keep Keras Tuner from printing each failed trial's traceback."""
    from keras_tuner.src import config

    config.DEBUG = False


def oracle_servicer_class():
    """Keras Tuner's gRPC servicer class for a chief's oracle."""
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    return OracleServicer


def grpc_service():
    """(``add_OracleServicer_to_server``, ``EndTrialResponse``) from Keras Tuner's generated protos."""
    from keras_tuner.src import protos

    return protos.get_service_grpc().add_OracleServicer_to_server, protos.get_service().EndTrialResponse
