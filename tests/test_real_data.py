"""A sweep on a sample of the real cats_and_dogs_filtered images with the real ImageNet weights."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from sweep.cli import main
from tests.conftest import REAL_DATA, copy_sample, runs_in

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_sample(tmp_path_factory):
    if not (REAL_DATA / "train").is_dir():
        pytest.skip(f"{REAL_DATA} is not available")
    return copy_sample(REAL_DATA, tmp_path_factory.mktemp("real"), {"train": 100, "validation": 80})


def test_transfer_sweep_on_real_images_beats_the_baseline(real_sample, tracking_env, runner, shared_weights):
    result = runner.invoke(main, ["run", "--family", "transfer", "--trials", "2", "--epochs", "5",
                                  "--data-dir", str(real_sample), "-q", "--seed", "0", "--weights", str(shared_weights)])
    assert result.exit_code == 0, result.output
    # the 224 checkpoint runs at its own size unless --image-size says otherwise, and says so
    assert f"Image size 224x224: {shared_weights.name} is MobileNetV2's 224x224 checkpoint" in result.output
    runs = runs_in(tracking_env)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {int(r.data.tags["trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == [1, 2]
    baseline = parent.data.metrics["baseline_accuracy"]
    # 160 validation images in batches of 32: the test split is the first of 5 batches, 32 images
    assert baseline in {i / 32 for i in range(33)}
    default = children[1]
    assert default.data.params["image_size"] == "224x224" and parent.data.params["image_size"] == "224x224"
    assert default.data.params["pooling"] == "global_max" and default.data.params["rotation_factor"] == "0.2"
    # ImageNet features separate cats from dogs after a few epochs on 200 images
    val = MlflowClient().get_metric_history(default.info.run_id, "val_accuracy")
    assert [m.step for m in val] == [1, 2, 3, 4, 5]
    assert val[-1].value >= 0.85
    assert default.data.metrics["test_accuracy"] >= 0.8
    assert default.data.metrics["test_accuracy"] > baseline + 0.25
