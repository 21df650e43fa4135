"""`sweep report` and `sweep data`: the study's table against the baseline, and the data overview."""

from __future__ import annotations


import pytest

from sweep.cli import main
from sweep.results import accuracy_interval
from tests.conftest import runs_in
from tests.helpers import store_client, sweep_args


@pytest.mark.slow
def test_report_compares_two_families_with_the_baseline(swept, runner, tiny_data):
    assert runner.invoke(main, sweep_args(tiny_data, "preprocessed")).exit_code == 0
    out = swept / "report"
    result = runner.invoke(main, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "| scratch | 32x32 | 2 (0) |" in text and "| preprocessed | 32x32 | 2 (0) |" in text and "| baseline |" in text
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for family in ("scratch", "preprocessed"):
        children = [r for r in runs_in(swept) if r.data.tags.get("family") == family and "trial_id" in r.data.tags]
        best = min(children, key=lambda r: (r.data.metrics["val_loss"], r.info.start_time))
        gain = (best.data.metrics["test_accuracy"] - best.data.metrics["baseline_accuracy"]) * 100
        gap = (best.data.metrics["accuracy"] - best.data.metrics["val_accuracy"]) * 100
        test, n = best.data.metrics["test_accuracy"], int(best.data.metrics["test_images"])
        low, high = accuracy_interval(test, n)
        assert 0.0 <= low <= test <= high <= 1.0 and n == 4
        assert f"{test:.1%} (95% CI {low:.1%}-{high:.1%}, 4 images) | {gain:+.1f} | {gap:+.1f} |" in text
    assert "Wilson score interval over the test images (one image of 4 is 25.00 points)" in text
    report_runs = [r for r in runs_in(swept) if r.data.tags.get("kind") == "report"]
    assert len(report_runs) == 1
    artifacts = {a.path for a in store_client().list_artifacts(report_runs[0].info.run_id)}
    assert artifacts == {"report.md", "report.png"}


def test_data_overview(tiny_data, tracking_env, runner):
    out = tracking_env / "data"
    result = runner.invoke(main, ["data", "--data-dir", str(tiny_data), "--batch-size", "4", "--image-size", "32",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train       cats 16  dogs 16" in result.output
    assert "baseline: always 'cats'" in result.output
    assert {p.name for p in out.iterdir()} == {"data.json", "samples.png", "augmentation.png"}
    run = next(r for r in runs_in(tracking_env) if r.data.tags.get("kind") == "data")
    assert run.data.metrics["train_cats"] == 16
    assert {a.path for a in store_client().list_artifacts(run.info.run_id)} == {"data.json", "samples.png",
                                                                                  "augmentation.png"}
