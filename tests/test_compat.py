"""The private Keras Tuner internals in sweep/compat.py still exist, in the releases they were checked with.

This test fails on an upgrade on purpose: re-check each use listed in sweep/compat.py, then update
CHECKED_WITH.
"""

from __future__ import annotations

from importlib.metadata import version

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
    servicer = compat.oracle_servicer_class()
    assert {"CreateTrial", "UpdateTrial", "EndTrial", "GetSpace", "UpdateSpace"} <= set(dir(servicer))
    add_servicer, end_trial_response = compat.grpc_service()
    assert callable(add_servicer) and type(end_trial_response()).__name__ == "EndTrialResponse"


def test_no_other_module_reaches_into_private_internals():
    from pathlib import Path

    root = Path(compat.__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for folder in ("sweep", "search_spaces") for p in (root / folder).glob("*.py")
                 if p.name != "compat.py" and ("keras_tuner.src" in p.read_text() or "keras.src" in p.read_text()
                                               or "._compute_affine_matrix" in p.read_text())]
    assert offenders == []
