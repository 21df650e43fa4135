"""``sweep bench``: a plain Keras Tuner trial and ours, side by side, with a projected plain sweep."""

from __future__ import annotations

import re

import pytest

from sweep.cli import main
from tests.conftest import runs_in


@pytest.mark.slow
def test_bench_prints_the_side_by_side_table_and_holds_the_hyperparameters_it_is_given(tiny_data, tracking_env, runner,
                                                                                       shared_weights):
    result = runner.invoke(main, ["bench", "--family", "transfer", "--trials", "2", "--epochs", "2", "--data-dir",
                                  str(tiny_data), "--batch-size", "4", "--image-size", "96", "-q",
                                  "--weights", str(shared_weights), "--hp", "flip_mode=none",
                                  "--hp", "rotation_factor=0.1"])
    assert result.exit_code == 0, result.output
    out = result.output
    for row in ("plain Keras Tuner trial 1 (raw images)", "our trial 1 (same hyperparameters)",
                "our other trials (min-median-max of 1)", "our 2-trial sweep, cold cache", "our 2-trial sweep, warm cache",
                "of which feature cache (cold cache)", "plain 2-trial sweep (projected 2 x"):
        assert row in out, row
    plain = re.search(r"plain Keras Tuner trial 1 \(raw images\)\s+([\d.]+s|\d+m\d+s)\s+([\d.]+) GiB\s+([\d.]+)%\s+([\d.]+)%",
                      out)
    assert plain, out
    assert 0 <= float(plain.group(3)) <= 100 and 0 <= float(plain.group(4)) <= 100
    cold = re.search(r"our 2-trial sweep, cold cache\s+\S+\s+([\d.]+) GiB", out)
    assert cold and 0.3 < float(cold.group(1)) < 8, out  # the child process's own peak, not this one's
    assert re.search(r"per-trial speed-up \(plain trial 1 / our trial 1\): \d+x; whole sweep: cold cache \d+x, "
                     r"warm cache \d+x", out)
    assert "oneDNN" not in out and "cudart_stub" not in out  # the children start as quietly as the CLI
    # the warm sweep read what the cold one computed, and both are logged like any sweep, tagged as bench runs
    assert out.count("Computing MobileNetV2 features of 32 training images") == 1
    runs = runs_in(tracking_env, experiment="sweep-bench")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    assert {r.data.tags.get("bench") for r in runs if "mlflow.parentRunId" not in r.data.tags} == {"true"}
    # each of our trials, cold or warm, held the hyperparameters given
    assert {(r.data.params["flip_mode"], r.data.params["rotation_factor"]) for r in children} == {("none", "0.1")}
    # the cold cache lived in a temporary folder, not in the configured one
    assert not (tracking_env / "mlruns" / "feature_cache").exists()
