"""A family of the user's own: found by name, module:Class or file.py:Class; checked against the data before
anything is written; swept, resumed, served by workers and exported like the study's; and no module outside a
family's own names one."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from search_spaces import registry
from sweep.cli import main
from sweep.errors import FamilyError
from sweep.spec import SweepSpec
from tests.conftest import runs_in, signal_on_line
from tests.helpers import store_client

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "augmented_preprocessed.py"
EXAMPLE_REF = f"{EXAMPLE}:AugmentedPreprocessed"
TINY = ["--batch-size", "4", "--image-size", "32", "-q"]
EXAMPLE_SIZE = ["--batch-size", "4", "--image-size", "64", "-q"]  # its fourth block needs 64 pixels

GOOD = '''
import keras, keras_tuner as kt

class Tiny(kt.HyperModel):
    """A two-layer net on raw pixels."""
    def __init__(self, num_classes=2, image_size=(160, 160)):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
    def build(self, hp):
        inputs = keras.Input((*self.image_size, 3))
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
        x = keras.layers.Dense(hp.Int("units", 2, 8, step=2, default=4), activation="relu")(x)
        return keras.Model(inputs, keras.layers.Dense(self.num_classes)(x))

class NotAModel:
    pass
'''


@pytest.fixture()
def family_file(tmp_path) -> Path:
    path = tmp_path / "my_families.py"
    path.write_text(GOOD)
    return path


def test_a_reference_is_kept_as_a_later_process_can_import_it(family_file, monkeypatch):
    monkeypatch.chdir(family_file.parent)
    assert registry.normalize("transfer") == "transfer"
    assert registry.normalize("my_families.py:Tiny") == f"{family_file}:Tiny"  # absolute: workers, resume, export
    assert registry.normalize("pkg.mod:Wide") == "pkg.mod:Wide"
    cls = registry.load("my_families.py:Tiny")
    assert cls.__name__ == "Tiny" and registry.normalize(cls) == f"{family_file}:Tiny"
    from search_spaces.conv import HyperScratch

    assert registry.normalize(HyperScratch) == "scratch"  # a registered class is recorded by its name
    spec = SweepSpec(family=cls)
    assert spec.to_params()["family"] == f"{family_file}:Tiny" and spec.family_name == "Tiny"
    assert SweepSpec.from_params(spec.to_params()) == spec


def test_a_plain_hypermodel_gets_the_loop_defaults(family_file):
    family = registry.make(f"{family_file}:Tiny", num_classes=3, image_size=(48, 48))
    assert (family.name, family.num_classes, family.image_size) == ("Tiny", 3, (48, 48))
    assert family.description == "A two-layer net on raw pixels."
    assert family.prunable and not family.mixed_precision and family.stage_switch is None
    import keras_tuner as kt

    model = family.build(kt.HyperParameters())
    assert model.output_shape == (None, 3) and model.input_shape == (None, 48, 48, 3)
    assert model.optimizer.learning_rate.numpy() == pytest.approx(1e-3)  # compiled as the study's, from logits
    assert model.loss.from_logits
    assert [item.name for item in registry.space(f"{family_file}:Tiny").space] == ["units"]


def test_the_example_declares_what_it_can_do():
    cls = registry.family_class(EXAMPLE_REF)
    assert cls.study_range == (0.80, 1.00) and cls.prunable and not cls.uses_weights and cls.first_rung == 3
    from sweep.oracles import build_oracle
    from sweep.pruning import rungs

    oracle = build_oracle(SweepSpec(family=EXAMPLE_REF, image_size=(64, 64)))
    assert oracle.pruning and oracle.first_rung == 3 and rungs(20, oracle.first_rung) == [3, 9]
    assert build_oracle(SweepSpec(family="scratch")).first_rung == 1 and rungs(20) == [1, 3, 9]
    import keras_tuner as kt

    family = registry.make(EXAMPLE_REF, 2, (64, 64))
    model = family.build(kt.HyperParameters())
    # its defaults are the study's preprocessed network behind the augmented family's augmentation
    assert [layer.name for layer in model.layers[1:5]] == ["preprocess", "random_flip", "random_rotation", "conv1"]
    kept = family.inference_model(model, {"test_time_flip": False})
    assert not any("random" in layer.name for layer in kept.layers)  # the kept model never augments


@pytest.mark.parametrize("family, message", [
    ("resnet", "Error: unknown family 'resnet' (registered: augmented, preprocessed, scratch, transfer); give a "
               "registered name (`sweep families`), package.module:Class, or path/to/file.py:Class."),
    ("{dir}/missing.py:Tiny", "Error: --family {dir}/missing.py:Tiny: {dir}/missing.py is not a file; give "
                              "path/to/file.py:Class."),
    ("{dir}/my_families.py:Wide", "Error: --family {dir}/my_families.py:Wide: {dir}/my_families.py has no 'Wide'; "
                                  "it defines Tiny."),
    ("{dir}/my_families.py:NotAModel", "Error: --family {dir}/my_families.py:NotAModel: NotAModel is a type, not a "
                                       "Keras Tuner HyperModel class; subclass keras_tuner.HyperModel and build the "
                                       "model in build(hp)."),
    ("no_such_package.families:Wide", "Error: --family no_such_package.families:Wide: no module named "
                                      "'no_such_package'; install its package"),
])
@pytest.mark.no_store
def test_a_family_that_cannot_be_found_gets_one_line_and_nothing_is_written(family, message, family_file, tiny_data,
                                                                          tracking_env, runner):
    family, message = (text.replace("{dir}", str(family_file.parent)) for text in (family, message))
    result = runner.invoke(main, ["run", "--family", family, "--data-dir", str(tiny_data), *TINY])
    assert result.exit_code == 1 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tracking_env / "mlruns").exists()


BROKEN = {
    "raises": ("def build(self, hp):\n        raise ValueError('no layers yet')",
               r"Error: family Broken: build\(hp\) raised ValueError: no layers yet \(.*broken\.py:\d+\); fix the "
               r"family's build, then run again\."),
    "wrong_size": ("def build(self, hp):\n        i = keras.Input((64, 64, 3))\n"
                   "        return keras.Model(i, keras.layers.Dense(2)(keras.layers.Flatten()(i)))",
                   r"Error: family Broken: its model takes inputs of 64x64x3, but the sweep's images are 32x32x3 \(RGB\); "
                   r"build the Input from the image_size"),
    "wrong_classes": ("def build(self, hp):\n        i = keras.Input((32, 32, 3))\n"
                      "        return keras.Model(i, keras.layers.Dense(10)(keras.layers.Flatten()(i)))",
                      r"Error: family Broken: its model's output has shape \(10,\), but the data has 2 classes; end it "
                      r"in Dense\(num_classes\)"),
    "any_size_but_not_this": ("def build(self, hp):\n        i = keras.Input((None, None, 3))\n"
                              "        x = keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(2, 40)(i))\n"
                              "        return keras.Model(i, keras.layers.Dense(2)(x))",
                              r"Error: family Broken: its model failed on a 32x32x3 image: .*; build it for the sweep's "
                              r"--image-size\."),
    "softmax": ("def build(self, hp):\n        i = keras.Input((32, 32, 3))\n"
                "        return keras.Model(i, keras.layers.Dense(2, activation='softmax')(keras.layers.Flatten()(i)))",
                r"Error: family Broken: its model ends in a softmax, but sweep trains on logits"),
    "not_a_model": ("def build(self, hp):\n        return 'a model'",
                    r"Error: family Broken: build\(hp\) returned a str, not a Keras model"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_model_that_does_not_fit_the_data_is_refused_before_anything_is_written(case, tmp_path, tiny_data,
                                                                                  tracking_env, runner):
    body, expected = BROKEN[case]
    (tmp_path / "broken.py").write_text("import keras, keras_tuner as kt\n\nclass Broken(kt.HyperModel):\n    "
                                        + body + "\n")
    result = runner.invoke(main, ["run", "--family", "broken.py:Broken", "--data-dir", str(tiny_data), *TINY])
    assert result.exit_code == 1 and re.search(expected, result.output), result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == result.output.splitlines()[-1:]
    assert runs_in(tracking_env) == []  # the store may exist (the check ran after it was opened), but holds no run


def test_a_worker_without_the_family_file_says_so_in_one_line(tmp_path, tiny_data, tracking_env):
    """What a worker reads from the sweep's run: a family file it cannot reach is one clear error, before any run."""
    from sweep.config import load_tracking
    from sweep.study import prepare

    params = SweepSpec(family=f"{tmp_path}/gone.py:Tiny", data_dir=tiny_data, image_size=(32, 32)).to_params()
    with pytest.raises(FamilyError, match=r"gone\.py is not a file; give path/to/file\.py:Class\.$"):
        prepare(SweepSpec.from_params(params), load_tracking(None), report=lambda line: None)


def test_a_family_importing_a_missing_package_names_it_and_where(tmp_path):
    (tmp_path / "needs.py").write_text("import keras_tuner as kt\nimport not_installed_anywhere\n")
    with pytest.raises(FamilyError) as caught:
        registry.load(f"{tmp_path}/needs.py:Needs")
    assert re.search(r"importing needs\.py raised ModuleNotFoundError: No module named 'not_installed_anywhere' "
                     r"\(.*needs\.py:2\); fix the file\.$", str(caught.value))


def test_no_module_outside_a_familys_own_names_one():
    """The loop asks a family's class what it can do: outside the families' own modules (and the transfer
    family's engine, ``feature_cache``), no code names a family or decides by one's hyperparameter. Docstrings
    and comments may."""
    import ast

    own = {ROOT / "search_spaces" / "conv.py", ROOT / "search_spaces" / "transfer.py"}
    families = {"scratch", "augmented", "preprocessed", "transfer"}
    offenders = []
    for folder in ("sweep", "search_spaces"):
        for path in sorted((ROOT / folder).glob("*.py")):
            if path in own:
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                named = (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                         and (node.value in families or "fine_tune_from" in node.value))
                named = named or (isinstance(node, (ast.Name, ast.alias)) and
                                  getattr(node, "id", getattr(node, "name", "")) in ("HyperTransfer", "HyperScratch"))
                if named:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.slow
def test_a_logged_trial_reruns_to_the_same_validation_figures(tiny_data, tracking_env, runner):
    """Hyperparameters are logged exactly: trial 2's drawn values, read back from MLflow and held with --hp
    semantics, train the very model again."""
    import keras

    from search_spaces.space import fix_hyperparameters, fixed_space
    from sweep.data import load_splits
    from sweep.results import record_from_run

    args = ["run", "--family", EXAMPLE_REF, "--trials", "2", "--epochs", "2", "--seed", "3", "--no-prune",
            "--data-dir", str(tiny_data), *EXAMPLE_SIZE]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    client = store_client()
    trial = next(r for r in runs_in(tracking_env) if r.data.tags.get("trial_number") == "2")
    record = record_from_run(trial)
    drawn = json.loads(next((tracking_env / "mlruns" / "keras_tuner").glob("*/trial_1/trial.json")).read_text())
    drawn = {k: v for k, v in drawn["hyperparameters"]["values"].items()}
    assert record.hyperparameters == drawn  # exact: not rounded to 4 digits
    assert float(trial.data.params["learning_rate"]) == drawn["learning_rate"]
    fixed = fix_hyperparameters(EXAMPLE_REF, {k: v for k, v in trial.data.params.items() if k in drawn})
    hp = fixed_space(EXAMPLE_REF, fixed)
    family = registry.make(EXAMPLE_REF, 2, (64, 64))
    splits = load_splits(tiny_data, (64, 64), 4, 3)
    family.new_session()
    keras.utils.set_random_seed(3 + 2 - 1)  # trial 2's seed
    model = family.build(hp)
    again = family.fit(hp, model, data=splits, batch_size=4, epochs=2, seed=3 + 2 - 1)
    logged = [m.value for m in client.get_metric_history(trial.info.run_id, "val_loss")]
    assert again.history["val_loss"] == pytest.approx(logged, abs=1e-6)
    assert again.val_accuracy == trial.data.metrics["val_accuracy"]


@pytest.mark.slow
def test_the_example_family_through_workers_resume_and_every_format(tiny_data, tracking_env, runner):
    """The example in examples/, as CI runs it: a sweep on two local workers, a second sweep stopped mid-trial
    and resumed, the best trial exported in all five formats, and predict on the export."""

    common = ["--family", EXAMPLE_REF, "--epochs", "2", "--data-dir", str(tiny_data), *EXAMPLE_SIZE]
    result = runner.invoke(main, ["run", *common, "--trials", "3", "--workers", "2", "--sweep", "with-workers"])
    assert result.exit_code == 0, result.output
    assert "KERASTUNER_TUNER_ID" not in os.environ  # the chief's variables end with its sweep (the next would hang)
    runs = runs_in(tracking_env)
    sweep = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert sweep.data.tags["family"] == "AugmentedPreprocessed" and sweep.data.params["family"] == EXAMPLE_REF
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FINISHED"}
    assert all(r.data.tags["tuner_id"] != "chief" for r in trials)  # trained in the worker processes
    assert all("zoom_factor" in r.data.params and "val_accuracy" in r.data.metrics for r in trials)
    client = store_client()
    assert "accuracy.png" in {a.path for a in client.list_artifacts(trials[0].info.run_id)}

    code, output, _ = signal_on_line(["run", *common, "--trials", "3", "--sweep", "resumed"], tracking_env,
                                     "[AugmentedPreprocessed] trial 1/3", signal.SIGTERM)
    assert code != 0 and "Resume with: sweep run --family" in output, output
    result = runner.invoke(main, ["run", "--family", EXAMPLE_REF, "--resume", "--sweep", "resumed", "-q"])
    assert result.exit_code == 0, result.output
    runs = runs_in(tracking_env)
    parent = next(r for r in runs if r.data.tags.get("sweep") == "resumed" and r.data.tags.get("kind") == "sweep")
    resumed = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
               and r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["trial_number"]) for r in resumed) == [1, 2, 3]

    out = tracking_env / "export"
    result = runner.invoke(main, ["best", "--family", "AugmentedPreprocessed", "--export", str(out), "--format", "all"])
    assert result.exit_code == 0, result.output
    checks = json.loads((out / "formats.json").read_text())
    assert checks["verified"] and [c["format"] for c in checks["formats"]] == [
        "keras", "saved_model", "litert", "litert_int8", "onnx"] and all(c["passed"] for c in checks["formats"])
    result = runner.invoke(main, ["predict", str(out), str(tiny_data / "validation" / "cats")])
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(lines) == 12 and all(line[1] in ("cats", "dogs") for line in lines), result.output


@pytest.mark.slow
def test_the_own_family_page_runs_as_written(tracking_env, runner, monkeypatch):
    """docs/your-own-family.md: its family file, every `sweep` command and its Python, as a reader runs them
    (on small synthetic images, enough for the default batch of 32: the test split is a fifth of the batches)."""
    import shlex

    from tests.conftest import make_image_folders

    text = (ROOT / "docs" / "your-own-family.md").read_text()
    python = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                for line in block.splitlines() if line.startswith("sweep ")]
    assert len(python) == 2 and len(commands) == 5
    (tracking_env / "wide_net.py").write_text(python[0])
    make_image_folders(tracking_env / "data" / "cats_and_dogs_filtered", train=32, validation=80)
    monkeypatch.syspath_prepend(str(tracking_env))
    outputs = []
    for command in commands:
        result = runner.invoke(main, shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
        outputs.append(result.output)
    assert "WideNet: Two wide convolutions and a global pooling head." in outputs[0]
    assert re.search(r"^  width +Choice +\{16, 32\} +default 16$", outputs[0], re.M)
    assert "[WideNet] trial 3/3" in outputs[1] and "| WideNet |" in (tracking_env / "report" / "report.md").read_text()
    assert (tracking_env / "wide-model" / "model.tflite").is_file()
    assert outputs[4].strip().endswith("80 predicted, 0 skipped")  # one line per validation cat, then the count
    namespace: dict = {}
    exec(compile(python[1], "your-own-family.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["result"].trials) == 2 and namespace["result"].family == "WideNet"


@pytest.mark.slow
def test_a_plain_family_under_every_tuner_the_time_budget_the_report_and_bench(family_file, tiny_data, tracking_env,
                                                                               runner):
    ref = f"{family_file}:Tiny"
    common = ["--family", ref, "--data-dir", str(tiny_data), *TINY]
    for tuner in ("bayesian", "hyperband", "random"):  # Tiny has four models (units 2, 4, 6 or 8): all of them
        result = runner.invoke(main, ["run", *common, "--tuner", tuner, "--trials", "4", "--epochs", "3",
                                      "--sweep", tuner])
        assert result.exit_code == 0, result.output
        assert f"[Tiny] sweep {tuner}: 4 trial(s) x 3 epoch(s), {tuner} search" in result.output
        assert re.search(r"^\[Tiny\] trial \d/4 .*units=", result.output, re.M), result.output
    result = runner.invoke(main, ["run", *common, "--trials", "50", "--epochs", "10", "--time-budget", "5s",
                                  "--sweep", "budget"])
    assert result.exit_code == 0 and "time budget reached after" in result.output, result.output
    result = runner.invoke(main, ["report", "--out", "report"])
    assert result.exit_code == 0, result.output
    report = (tracking_env / "report" / "report.md").read_text()
    assert re.search(r"^\| Tiny \| (final|epoch \d+) \| units 1\.00 \|$", report, re.M), report
    result = runner.invoke(main, ["bench", "--family", ref, "--trials", "2", "--epochs", "1", "--data-dir",
                                  str(tiny_data), "--batch-size", "4", "--image-size", "32", "-q"])
    assert result.exit_code == 0 and "family Tiny" in result.output, result.output
