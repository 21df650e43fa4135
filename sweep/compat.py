"""The private Keras Tuner internals `sweep` still uses, in one place.

Each is here because Keras Tuner has no public way to do the job; ``tests/test_compat.py`` pins the releases
they were checked against and fails on an upgrade, so whoever upgrades re-checks each use below.

* ``keras_tuner.src.config.DEBUG``: Keras Tuner prints every failed trial's traceback while it is on (its
  default); `sweep` prints one line per failed trial and keeps the error in the trial's MLflow run.
* ``keras_tuner.src.distribute.oracle_chief.OracleServicer`` (and its ``stop_triggered`` flag) and
  ``keras_tuner.src.protos``: the chief's gRPC service. Keras Tuner's public ``start_server`` blocks forever
  with no hook to fail stale trials, stop on failures or notice a finished search, so the chief serves the same
  servicer itself.
* ``keras_tuner.src.distribute.oracle_client.TIMEOUT``: how long a worker's every call to the chief waits
  (an hour in Keras Tuner, which has no option for it); ``sweep worker --chief-timeout`` bounds it.
* ``Oracle._project_dir``: the folder the tuner gave the oracle (``_set_project_dir``), where the pruning
  journal is kept beside the oracle's own state (``sweep.oracles.SweepOracle.pruner``); the oracle is built
  before the tuner that names the folder.

Public but undocumented, and used by ``sweep.oracles.SweepOracle``: the oracle's ``trials``, ``ongoing_trials``
and ``tuner_ids`` attributes, and that ``Oracle.end_trial`` raises a RuntimeError when too many trials failed
in a row (``test_compat`` checks these too).
"""

from __future__ import annotations

CHECKED_WITH = {"keras_tuner": "1.4.8"}


def oracle_folder(oracle) -> str:
    """The oracle's project folder (its ``oracle.json`` is there), once a tuner has set it."""
    return oracle._project_dir


def quiet_failed_trials() -> None:
    """Keep Keras Tuner from printing each failed trial's traceback."""
    from keras_tuner.src import config

    config.DEBUG = False


def serve_oracle(oracle, address: str, threads: int = 1):
    """Start a gRPC server for ``oracle`` on ``address`` (Keras Tuner's own service).

    Returns:
        (server, a function that says whether the oracle has told a worker the search is over), or
        (None, None) when the address cannot be bound.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    servicer = OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older releases returned 0
        bound = 0
    if not bound:
        return None, None
    server.start()
    return server, lambda: servicer.stop_triggered


def bound_chief_calls(seconds: float) -> None:
    """Make a worker's every call to its chief give up after ``seconds`` (Keras Tuner waits an hour)."""
    from keras_tuner.src.distribute import oracle_client

    oracle_client.TIMEOUT = float(seconds)
