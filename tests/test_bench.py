"""``sweep bench``: a plain Keras Tuner trial and ours, side by side, with a projected plain sweep."""

from __future__ import annotations

import re

import pytest

from sweep.cli import main
from tests.conftest import runs_in


@pytest.mark.slow
def test_bench_prints_the_side_by_side_table(tiny_data, tracking_env, runner, shared_weights):
    result = runner.invoke(main, ["bench", "--family", "transfer", "--trials", "2", "--epochs", "2", "--data-dir",
                                  str(tiny_data), "--batch-size", "4", "--image-size", "96", "-q",
                                  "--weights", str(shared_weights)])
    assert result.exit_code == 0, result.output
    out = result.output
    for row in ("plain trial 1 (raw images)", "our trial 1 (same hyperparameters)", "our feature cache (cold)",
                "our whole 2-trial sweep", "plain 2-trial sweep (projected 2 x"):
        assert row in out, row
    plain = re.search(r"plain trial 1 \(raw images\)\s+(\d+)m(\d+)s\s+([\d.]+)%\s+([\d.]+)%", out)
    assert plain, out
    assert 0 <= float(plain.group(3)) <= 100 and 0 <= float(plain.group(4)) <= 100
    assert re.search(r"per-trial speed-up: [\d.]+x; whole sweep: [\d.]+x", out)
    # our sweep is logged like any other, tagged as a bench run, in the bench experiment
    runs = runs_in(tracking_env, experiment="sweep-bench")
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 2
    assert {r.data.tags.get("bench") for r in runs if "mlflow.parentRunId" not in r.data.tags} == {"true"}
    # the cold cache lived in a temporary folder, not in the configured one
    assert not (tracking_env / "mlruns" / "feature_cache").exists()
