"""SweepSpec: validation, and one round trip through MLflow params that every path builds from."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_spaces import describe, registry

FAMILIES = registry.study_families()
from sweep.errors import ConfigError
from sweep.spec import DATASET_URL, SweepSpec


@pytest.mark.parametrize(
    "kwargs, message",
    [({"trials": 0}, "trials must be at least 1"), ({"epochs": 0}, "epochs"), ({"tuner": "grid"}, "unknown tuner"),
     ({"image_size": (16, 16)}, "at least 32x32"), ({"batch_size": 0}, "batch size must be at least 1"),
     ({"objective": "accuracy"}, "unknown objective .accuracy.; choose one of val_loss, val_accuracy")],
)
def test_a_spec_refuses_bad_settings_with_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SweepSpec(family="scratch", **kwargs)


def test_params_round_trip_every_field(tmp_path):
    weights = tmp_path / "base.h5"
    spec = SweepSpec(family="transfer", trials=7, tuner="hyperband", objective="val_accuracy", epochs=3, seed=9,
                     batch_size=8, image_size=(224, 200), data_dir=tmp_path / "data", weights=str(weights),
                     feature_cache=False, fixed=(("rotation_factor", "0.3"), ("flip_mode", "none")), prune=False,
                     precision="mixed_bfloat16", fine_tune="leaders")
    params = spec.to_params()
    assert params == {"family": "transfer", "trials": "7", "tuner": "hyperband", "objective": "val_accuracy",
                      "epochs": "3", "seed": "9", "batch_size": "8", "image_size": "224x200",
                      "data": str(tmp_path / "data"), "weights": str(weights), "feature_cache": "False",
                      "fixed_hyperparameters": '{"flip_mode": "none", "rotation_factor": 0.30000000000000004}',
                      "prune": "False", "precision": "mixed_bfloat16", "fine_tune": "leaders"}
    assert SweepSpec.from_params({**params, "dropout": "0.2", "num_classes": "2"}) == spec
    assert set(params) == SweepSpec.param_names()
    # a sweep logged before a setting existed had its default
    older = {k: v for k, v in params.items() if k != "fixed_hyperparameters"}
    assert SweepSpec.from_params(older).fixed == ()
    # ... or what such a sweep did: fine-tuning drawn jointly with the head
    before = {k: v for k, v in params.items() if k != "fine_tune"}
    assert SweepSpec.from_params(before).fine_tune == "any"
    # a sweep logged with the older boolean: True was the leaders plan, False drew the stage with the rest
    assert SweepSpec.from_params({**before, "fine_tune_leaders": "True"}).fine_tune == "leaders"
    assert SweepSpec.from_params({**before, "fine_tune_leaders": "False"}).fine_tune == "any"
    assert SweepSpec(family="transfer").fine_tune == "late"


@pytest.mark.parametrize("fixed, message", [
    ((("rotation", "0.1"),), "transfer has no hyperparameter 'rotation'; it has dropout, learning_rate"),
    ((("rotation_factor", "0.15"),), "rotation_factor takes multiples of 0.1 from 0.0, not '0.15'"),
    ((("rotation_factor", "0.9"),), r"rotation_factor takes a value in \[0.0, 0.3\]"),
    ((("flip_mode", "diagonal"),), "flip_mode takes one of horizontal_and_vertical, horizontal, vertical, none"),
    ((("test_time_flip", "yes"),), "test_time_flip takes True or False, not 'yes'"),
])
def test_fixed_hyperparameters_are_checked_against_the_search_space(fixed, message):
    with pytest.raises(ConfigError, match=message):
        SweepSpec(family="transfer", fixed=fixed)


def test_fixed_hyperparameters_take_their_types_and_the_oracle_holds_them():
    from sweep.tuning import build_oracle

    spec = SweepSpec(family="transfer", fixed=(("test_time_flip", "true"), ("learning_rate", "0.0005"),
                                               ("pooling", "global_avg")))
    assert dict(spec.fixed) == {"test_time_flip": True, "learning_rate": 0.0005, "pooling": "global_avg"}
    oracle = build_oracle(spec)
    assert oracle.hyperparameters.values == dict(spec.fixed)


def test_paths_are_absolute_and_the_download_is_named_by_its_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = SweepSpec(family="scratch", data_dir=Path("data"), weights="ImageNet")
    assert spec.data_dir == tmp_path / "data" and spec.weights == "imagenet"
    assert SweepSpec(family="scratch").to_params()["data"] == DATASET_URL
    assert SweepSpec.from_params(SweepSpec(family="scratch").to_params()).data_dir is None


def test_a_run_without_a_spec_is_refused_by_name():
    with pytest.raises(ConfigError, match="trials, tuner.*missing"):
        SweepSpec.from_params({"family": "scratch"})


def test_no_hyperparameter_shares_a_name_with_a_setting():
    # trial runs hold both as params; record_from_run tells them apart by SweepSpec.param_names()
    for family in FAMILIES:
        assert not {row["name"] for row in describe(family)} & SweepSpec.param_names(), family
