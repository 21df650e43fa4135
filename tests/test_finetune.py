"""Fine-tuning the transfer family's top on cached activations: the same model as end to end, and a frozen bottom."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

from search_spaces import make_hypermodel
from feature_cache.features import FeatureExtractor, preprocess
from feature_cache.finetune import CUTS, top_layers, trainable_names, view_logits
from feature_cache.trainer import own_base
from sweep.cli import main
from sweep.data import load_splits
from tests.conftest import runs_in
from tests.helpers import store_client, tiny_args

SIZE = (64, 64)  # MobileNetV2's top sees 2x2 maps: max and average pooling differ


def fine_tune_hp(cut: str, test_time_flip: bool = False, pooling: str = "global_max") -> kt.HyperParameters:
    hp = kt.HyperParameters()
    hp.Fixed("fine_tune_from", cut)
    if cut != "none":
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
@pytest.mark.parametrize("cut,test_time_flip,pooling", [("block_16", False, "global_max"),
                                                        ("block_16", True, "global_avg")])
def test_fine_tuning_on_cached_activations_is_the_end_to_end_model(splits, shared_weights, cut, test_time_flip,
                                                                   pooling):
    # ImageNet weights: a randomly initialised base saturates its last ReLU6, and nothing above the cut would learn
    family = make_hypermodel("transfer", image_size=SIZE, weights=str(shared_weights))
    family.prepare(splits, None, lambda message: None)
    shared = weights_by_layer(family.build_base())
    hp = fine_tune_hp(cut, test_time_flip, pooling)
    model = family.build(hp)
    result = family.fit(hp, model, data=splits, batch_size=4, epochs=2, seed=3)
    assert own_base(result.model) is not family.build_base()  # the fine-tuned model has its own copy of the base

    # both stages on one epoch axis, the boundary recorded
    assert result.stages == {"fine_tune": 3}
    assert all(len(result.history[name]) == 4 for name in ("loss", "accuracy", "val_loss", "val_accuracy"))
    assert result.scored_on == "cached_features"

    # the layers below the cut are unchanged; every layer above it trained; the shared base never changed
    tuned = weights_by_layer(own_base(result.model))
    above = set(trainable_names(family.build_base(), cut))
    top = [layer for layer in top_layers(family.build_base(), cut).layers[1:] if layer.weights]
    assert above == {layer.name for layer in top if not isinstance(layer, keras.layers.BatchNormalization)}
    assert above and len(above) < len(top)  # BatchNormalization stays frozen, in inference mode
    for name, weights in shared.items():
        same = all(np.array_equal(a, b) for a, b in zip(weights, tuned[name]))
        assert same == (name not in above), name
    assert all(all(np.array_equal(a, b) for a, b in zip(w, weights_by_layer(family.build_base())[n]))
               for n, w in shared.items())

    # the learning rate decayed from learning_rate x fine_tune_lr_factor to zero over the stage
    trainer = family._trainers[next(k for k in family._trainers if k[0] == cut)]
    assert float(trainer.schedule(0)) == pytest.approx(0.01 * 0.3)
    assert float(trainer.model.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)

    # the same weights give the same logits on cached activations as the end-to-end model on raw images
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
    hp = fine_tune_hp("block_16")

    def run(seed):
        keras.utils.set_random_seed(seed)
        return family.fit(hp, family.build(hp), data=splits, batch_size=4, epochs=1, seed=seed)

    first = run(5)
    run(6)  # another trial trains the same top model in between
    again = run(5)
    assert again.history == first.history
    assert again.test_loss == first.test_loss


@pytest.mark.slow
def test_a_fine_tuning_trials_head_stage_is_the_frozen_trials_with_the_same_seed(splits, shared_weights):
    """The staged search fine-tunes the very model that led (sweep/staging.py): with the leader's seed, the
    head stage of a fine-tuning trial must reproduce the frozen trial, epoch for epoch."""
    family = make_hypermodel("transfer", image_size=SIZE, weights=str(shared_weights))
    family.prepare(splits, None, lambda message: None)

    def run(hp, seed=5):
        family.new_session()
        keras.utils.set_random_seed(seed)
        return family.fit(hp, family.build(hp), data=splits, batch_size=4, epochs=2, seed=seed)

    leader = run(fine_tune_hp("none"))
    tuned = run(fine_tune_hp("block_16"))
    assert len(tuned.history["val_loss"]) == 4
    for name, series in leader.history.items():
        assert tuned.history[name][:2] == series, name
    assert run(fine_tune_hp("block_16"), seed=6).history["val_loss"][:2] != leader.history["val_loss"]


@pytest.mark.slow
def test_fine_tuning_without_the_cache_trains_the_top_end_to_end(splits, shared_weights):
    family = make_hypermodel("transfer", image_size=SIZE, weights=str(shared_weights))
    hp = fine_tune_hp("block_16")
    model = family.build(hp)
    before = weights_by_layer(own_base(model))
    result = family.fit(hp, model, data=splits, batch_size=4, epochs=1, seed=0)
    assert result.scored_on == "raw_images" and result.stages == {"fine_tune": 2}
    assert len(result.history["val_loss"]) == 3
    assert own_base(model) is family.build_base() and own_base(result.model) is not own_base(model)
    after = weights_by_layer(own_base(result.model))
    above = set(trainable_names(family.build_base(), "block_16"))
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
    client = store_client()
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

    exported = runner.invoke(main, ["best", "--export", str(tracking_env / "out"), "--format", "keras"])
    assert exported.exit_code == 0, exported.output
    model = keras.models.load_model(tracking_env / "out" / "model.keras")
    splits = load_splits(tiny_data, (96, 96), 4, 3)
    logits = model.predict(splits.validation.images, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == splits.validation.labels))
    assert accuracy == pytest.approx(run.data.metrics["val_accuracy"], abs=1 / len(splits.validation) + 1e-9)


@pytest.mark.slow
def test_fine_tune_leaders_fine_tunes_the_leading_frozen_model_and_the_report_names_it(tiny_data, tracking_env, runner,
                                                                                   shared_weights):
    """Three trials: the study's model first (frozen), then two fine-tuning trials on its head (sweep/staging.py)."""
    args = ["run", "--family", "transfer", "--trials", "3", "-q", "--weights", str(shared_weights),
            "--fine-tune", "leaders", "--hp", "fine_tune_epochs=2", *tiny_args(tiny_data, image_size="96")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    trials = sorted((r for r in runs_in(tracking_env) if "mlflow.parentRunId" in r.data.tags),
                    key=lambda r: int(r.data.tags["trial_number"]))
    assert [r.data.tags["trial_number"] for r in trials] == ["1", "2", "3"]
    head = lambda run: {k: v for k, v in run.data.params.items() if not k.startswith("fine_tune")}  # noqa: E731
    assert trials[0].data.params["fine_tune_from"] == "none"
    epochs = int(trials[0].data.params["epochs"])
    client = store_client()
    curve = lambda run: [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"),  # noqa: E731
                                                 key=lambda m: m.step)]
    for tuned in trials[1:]:
        assert tuned.data.params["fine_tune_from"] in CUTS and head(tuned) == head(trials[0])
        assert tuned.data.tags["refines_trial"] == "1"
        assert tuned.data.tags["fine_tune_first_epoch"] == str(epochs + 1)
        assert curve(tuned)[:epochs] == curve(trials[0])  # its head stage is trial 1's model, epoch for epoch
        assert len(curve(tuned)) == epochs + 2
    report = runner.invoke(main, ["report", "--out", str(tracking_env / "report")])
    assert report.exit_code == 0, report.output
    text = (tracking_env / "report" / "report.md").read_text()
    assert "| best frozen-base trial | 1 | no |" in text and "on trial 1's model |" in text


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
                           val_accuracy=accuracy, test_accuracy=0.975, test_images=192, val_images=800,
                           run_id=f"run{number}")

    frozen = record(13, 0.04, 0.98)
    tuned = record(4, tuned_loss, tuned_accuracy, fine_tune_from="block_16", fine_tune_epochs=2, fine_tune_lr_factor=0.1)
    best = tuned if tuned_loss < 0.04 else frozen
    row = FamilyRow("transfer", best, 0.474, 20, 0.99, frozen=frozen, fine_tuned=tuned,
                    stage_settings=("fine_tune_from", "fine_tune_epochs", "fine_tune_lr_factor"))
    right = round(tuned_accuracy * 800)
    images = (f" Of 800 validation images, the fine-tuned trial got {right} right and the frozen one 784 (one image is "
              "0.12 points).")
    assert row.fine_tuning_verdict == verdict + images
    text = to_markdown([row], "exp")
    assert "## Fine-tuning (transfer)" in text and verdict in text
    assert "| best frozen-base trial | 13 | no | 98.0% | 0.040 |" in text
    assert (f"| best fine-tuned trial | 4 | fine_tune_from block_16, fine_tune_epochs 2, fine_tune_lr_factor 0.1 | "
            f"{tuned_accuracy:.1%} |") in text
    # runs logged before the validation size was recorded: the verdict alone
    frozen.val_images = 0
    assert FamilyRow("transfer", best, 0.474, 20, 0.99, frozen=frozen, fine_tuned=tuned).fine_tuning_verdict == verdict
    assert FamilyRow("transfer", frozen, 0.474, 20, 0.99).fine_tuning_verdict == ""  # no fine-tuning trial: no section
    assert "Fine-tuning" not in to_markdown([FamilyRow("transfer", frozen, 0.474, 20, 0.99)], "exp")
