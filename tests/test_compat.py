"""The private Keras Tuner internals in sweep/compat.py still exist, in the releases they were checked with.

This test fails on an upgrade on purpose: re-check each use listed in sweep/compat.py, then update
CHECKED_WITH.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest

from sweep import compat


def test_the_private_internals_are_checked_against_the_installed_releases():
    for package, checked in compat.CHECKED_WITH.items():
        assert version(package.replace("_", "-")) == checked, (
            f"{package} {version(package.replace('_', '-'))} is installed but sweep/compat.py was checked "
            f"against {checked}: re-check each private use it lists, then update CHECKED_WITH.")


def test_each_private_internal_is_there_and_does_its_job():
    from keras_tuner.src import config

    compat.quiet_failed_trials()
    assert config.DEBUG is False
    from sweep.distributed import free_port
    from sweep.spec import SweepSpec
    from sweep.tuning import build_oracle

    oracle = build_oracle(SweepSpec(family="scratch", trials=1))
    for name in ("trials", "ongoing_trials", "tuner_ids"):
        assert isinstance(getattr(oracle, name), (dict, set)), name
    server, search_over = compat.serve_oracle(oracle, f"127.0.0.1:{free_port()}")
    try:
        assert search_over() is False
    finally:
        server.stop(grace=0)


def test_keras_tuner_still_raises_a_runtime_error_after_too_many_failures_in_a_row(tmp_path):
    import keras_tuner as kt

    from sweep.spec import SweepSpec
    from sweep.tuning import ConsecutiveFailures, build_oracle

    oracle = build_oracle(SweepSpec(family="scratch", trials=5))
    oracle._set_project_dir(str(tmp_path), "failures")
    hp = kt.HyperParameters()
    hp.Float("dropout", 0.0, 0.5)
    oracle.update_space(hp)
    for i in range(3):
        trial = oracle.create_trial(f"t{i}")
        trial.status = "FAILED"
        oracle.end_trial(trial)
    assert isinstance(oracle.failure, ConsecutiveFailures)
    assert str(oracle.failure) == "Number of consecutive failures exceeded the limit of 3."


def test_no_other_module_reaches_into_private_internals():
    from pathlib import Path

    root = Path(compat.__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for folder in ("sweep", "search_spaces") for p in (root / folder).glob("*.py")
                 if p.name != "compat.py" and ("keras_tuner.src" in p.read_text() or "keras.src" in p.read_text()
                                               or "._compute_affine_matrix" in p.read_text())]
    assert offenders == []


def test_a_workers_call_to_a_vanished_chief_gives_up_after_the_bound(monkeypatch):
    import time

    import grpc
    from keras_tuner.src.distribute import oracle_client

    from sweep.distributed import free_port
    from sweep.spec import SweepSpec
    from sweep.tuning import build_oracle

    monkeypatch.setattr(oracle_client, "TIMEOUT", oracle_client.TIMEOUT)  # restored after the test
    for name, value in (("KERASTUNER_ORACLE_IP", "127.0.0.1"), ("KERASTUNER_ORACLE_PORT", str(free_port())),
                        ("KERASTUNER_TUNER_ID", "worker0")):
        monkeypatch.setenv(name, value)
    client = oracle_client.OracleClient(build_oracle(SweepSpec(family="scratch", trials=1)))
    compat.bound_chief_calls(1.5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        client.create_trial("worker0")  # nobody serves the port
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1.0 < time.monotonic() - started < 10
