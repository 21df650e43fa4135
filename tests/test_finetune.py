"""Fine-tuning the transfer family's top on cached activations: the same model as end to end, and a frozen bottom."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest
from mlflow import MlflowClient

from search_spaces import make_hypermodel
from search_spaces.features import FeatureExtractor, preprocess
from search_spaces.finetune import CUTS, top_layers, trainable_names, view_logits
from search_spaces.transfer import own_base
from sweep.cli import main
from sweep.data import load_splits
from tests.conftest import runs_in
from tests.test_tuning import tiny_args

SIZE = (64, 64)  # MobileNetV2's top sees 2x2 maps: max and average pooling differ


def fine_tune_hp(cut: str, test_time_flip: bool = False, pooling: str = "global_max") -> kt.HyperParameters:
    hp = kt.HyperParameters()
    hp.Fixed("fine_tune_from", cut)
    hp.Fixed("fine_tune_epochs", 2)
    hp.Fixed("fine_tune_lr_factor", 0.3)
    hp.Fixed("test_time_flip", test_time_flip)
    hp.Fixed("pooling", pooling)
    hp.Fixed("learning_rate", 0.01)
    return hp


@pytest.fixture(scope="module")
def splits(tiny_data):
    return load_splits(tiny_data, SIZE, 4, 3)


def weights_by_layer(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


@pytest.mark.slow
@pytest.mark.parametrize("cut,test_time_flip,pooling", [("conv_1", False, "global_max"),
                                                        ("block_16", True, "global_avg")])
def test_fine_tuning_on_cached_activations_is_the_end_to_end_model(splits, shared_weights, cut, test_time_flip,
                                                                   pooling):
    # ImageNet weights: a randomly initialised base saturates its last ReLU6, and nothing above the cut would learn
    family = make_hypermodel("transfer", image_size=SIZE, weights=str(shared_weights))
    family.prepare(splits, None, lambda message: None)
    shared = weights_by_layer(family.build_base())
    hp = fine_tune_hp(cut, test_time_flip, pooling)
    model = family.build(hp)
    assert own_base(model) is not family.build_base()  # a fine-tuning trial has its own copy of the base
    result = family.fit(hp, model, data=splits, batch_size=4, epochs=2, seed=3)

    # both stages on one epoch axis, the boundary recorded
    assert result.stages == {"fine_tune": 3}
    assert all(len(result.history[name]) == 4 for name in ("loss", "accuracy", "val_loss", "val_accuracy"))
    assert result.scored_on == "cached_features"

    # the layers below the cut are unchanged; every layer above it trained; the shared base never changed
    tuned = weights_by_layer(own_base(model))
    above = set(trainable_names(family.build_base(), cut))
    top = [layer for layer in top_layers(family.build_base(), cut).layers[1:] if layer.weights]
    assert above == {layer.name for layer in top if not isinstance(layer, keras.layers.BatchNormalization)}
    assert above and len(above) < len(top)  # BatchNormalization stays frozen, in inference mode
    for name, weights in shared.items():
        same = all(np.array_equal(a, b) for a, b in zip(weights, tuned[name]))
        assert same == (name not in above), name
    assert all(all(np.array_equal(a, b) for a, b in zip(w, weights_by_layer(family.build_base())[n]))
               for n, w in shared.items())

    # the same weights give the same logits on cached activations as the end-to-end model on raw images
    trainer = family._trainers[next(k for k in family._trainers if k[0] == cut)]
    images = splits.validation.images
    end_to_end = np.asarray(result.model.predict(images, verbose=0))
    exact = FeatureExtractor(family.build_base(), backend="tensorflow", cuts={cut: CUTS[cut]})
    flips = [images, images[:, :, ::-1]][:2 if test_time_flip else 1]
    float32_activations = [exact.outputs(preprocess(x))[1][cut] for x in flips]
    np.testing.assert_allclose(view_logits(trainer.model, float32_activations), end_to_end, atol=1e-4, rtol=1e-4)
    cached = [family.features.validation.cuts[cut], family.features.mirrored_validation.cuts[cut]]
    assert cached[0].dtype == np.float16
    scale = np.abs(end_to_end).max()
    np.testing.assert_allclose(view_logits(trainer.model, cached[:len(flips)]), end_to_end, atol=2e-3 * scale)
    # and the trial's score is the fine-tuned model's, from those cached activations
    raw = family.evaluate_raw(result, splits, 4)
    assert raw["raw_val_loss"] == pytest.approx(result.val_loss, abs=2e-3)
    assert raw["raw_test_accuracy"] == pytest.approx(result.test_accuracy, abs=1 / len(splits.test) + 1e-9)


@pytest.mark.slow
def test_a_trial_that_fine_tunes_starts_from_the_imagenet_top_whatever_ran_before(splits, shared_weights):
    """One top model is reused by every trial of a process: a trial's result must not depend on earlier ones."""
    family = make_hypermodel("transfer", image_size=SIZE, weights=str(shared_weights))
    family.prepare(splits, None, lambda message: None)
    hp = fine_tune_hp("conv_1")

    def run(seed):
        keras.utils.set_random_seed(seed)
        return family.fit(hp, family.build(hp), data=splits, batch_size=4, epochs=1, seed=seed)

    first = run(5)
    run(6)  # another trial trains the same top model in between
    again = run(5)
    assert again.history == first.history
    assert again.test_loss == first.test_loss


@pytest.mark.slow
def test_fine_tuning_without_the_cache_trains_the_top_end_to_end(splits, shared_weights):
    family = make_hypermodel("transfer", image_size=SIZE, weights=str(shared_weights))
    hp = fine_tune_hp("conv_1")
    model = family.build(hp)
    before = weights_by_layer(own_base(model))
    result = family.fit(hp, model, data=splits, batch_size=4, epochs=1, seed=0)
    assert result.scored_on == "raw_images" and result.stages == {"fine_tune": 2}
    assert len(result.history["val_loss"]) == 3
    after = weights_by_layer(own_base(model))
    above = set(trainable_names(family.build_base(), "conv_1"))
    for name, weights in before.items():
        assert all(np.array_equal(a, b) for a, b in zip(weights, after[name])) == (name not in above), name


@pytest.mark.slow
def test_a_fine_tuning_sweep_logs_both_stages_and_keeps_the_fine_tuned_model(tiny_data, tracking_env, runner,
                                                                              shared_weights):
    args = ["run", "--family", "transfer", "--trials", "1", "-q", "--epochs", "2", "--weights", str(shared_weights),
            "--hp", "fine_tune_from=block_16", "--hp", "fine_tune_epochs=2",
            *tiny_args(tiny_data, image_size="96")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    child = next(r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags)
    client = MlflowClient()
    assert child.data.params["fine_tune_from"] == "block_16" and child.data.params["fine_tune_epochs"] == "2"
    assert child.data.tags["fine_tune_first_epoch"] == "3"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2, 3, 4]
    last = client.get_metric_history(child.info.run_id, "val_loss")[-1].value
    assert child.data.metrics["val_loss"] == last
    run = client.get_run(child.info.run_id)
    assert run.data.tags["raw_check"] == "passed"  # the kept fine-tuned model, end to end on raw images
    # only the fixed cut's activations were cached, next to the pooled features
    cache = tracking_env / "mlruns" / "feature_cache"
    assert sorted(p.name.split("-", 1)[1] for p in cache.glob("*.npy")) == ["block_16.npy", "block_16.npy"]

    exported = runner.invoke(main, ["best", "--export", str(tracking_env / "out")])
    assert exported.exit_code == 0, exported.output
    model = keras.models.load_model(tracking_env / "out" / "model.keras")
    splits = load_splits(tiny_data, (96, 96), 4, 3)
    logits = model.predict(splits.validation.images, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == splits.validation.labels))
    assert accuracy == pytest.approx(run.data.metrics["val_accuracy"], abs=1 / len(splits.validation) + 1e-9)


@pytest.mark.parametrize("tuned_loss,tuned_accuracy,verdict", [
    (0.02, 0.99, "Fine-tuning beat the frozen base on validation loss and accuracy."),
    (0.02, 0.98, "Fine-tuning beat the frozen base on validation loss only, not on accuracy."),
    (0.05, 0.97, "Fine-tuning did not beat the frozen base on validation loss or accuracy."),
])
def test_the_report_says_whether_fine_tuning_beat_the_frozen_best(tuned_loss, tuned_accuracy, verdict):
    from sweep.report import FamilyRow, to_markdown
    from sweep.results import TrialRecord

    def record(number, loss, accuracy, **hp):
        return TrialRecord("transfer", str(number - 1), number, {"fine_tune_from": "none", **hp}, val_loss=loss,
                           val_accuracy=accuracy, test_accuracy=0.975, test_images=192, run_id=f"run{number}")

    frozen = record(13, 0.04, 0.98)
    tuned = record(4, tuned_loss, tuned_accuracy, fine_tune_from="block_16", fine_tune_epochs=4, fine_tune_lr_factor=0.1)
    best = tuned if tuned_loss < 0.04 else frozen
    row = FamilyRow("transfer", best, 0.474, 20, 0.99, frozen=frozen, fine_tuned=tuned)
    assert row.fine_tuning_verdict == verdict
    text = to_markdown([row], "exp")
    assert "## Fine-tuning (transfer)" in text and verdict in text
    assert "| best frozen-base trial | 13 | no | 98.0% | 0.040 |" in text
    assert f"| best fine-tuned trial | 4 | from block_16, 4 epochs, learning rate x 0.1 | {tuned_accuracy:.1%} |" in text
    assert FamilyRow("transfer", frozen, 0.474, 20, 0.99).fine_tuning_verdict == ""  # no fine-tuning trial: no section
    assert "Fine-tuning" not in to_markdown([FamilyRow("transfer", frozen, 0.474, 20, 0.99)], "exp")
