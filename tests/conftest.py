"""Shared fixtures: tiny synthetic image folders, an MLflow store under tmp_path, a CLI runner, Keras' cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_DATA = SHARED / "datasets" / "cats_and_dogs_filtered"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.coral-ptq-dequant.h5"
# the installed command, for tests that run it as a user would (in its own process)
SWEEP_BIN = str(Path(sys.executable).with_name("sweep"))


def make_image_folders(root: Path, classes=("cats", "dogs"), train=16, validation=12, size=40, seed=0) -> Path:
    """Write JPEGs in ``root/{train,validation}/<class>/``; each class has its own colour, so it is learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(200, 60, 60), (60, 60, 200), (60, 200, 60), (200, 200, 60)]
    for split, count in (("train", train), ("validation", validation)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.normal(0, 40, (size, size, 3)) + np.array(colours[index % len(colours)])
                Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(folder / f"{name}.{i}.jpg")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """2 classes, 16 train and 12 validation images each (batch 4: 6 validation batches, 1 for test)."""
    return make_image_folders(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, its schema created once per session: creating it costs about a second
    (MLflow's migrations), and some fifty tests each start from one."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("template-store")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments(max_results=1)
    return folder / "mlflow.db"


@pytest.fixture()
def tracking_env(tmp_path, monkeypatch, request, migrated_store):
    """An empty MLflow store and Keras Tuner folder under tmp_path, set up through mlflow.yaml in the cwd. The
    store starts as a copy of the session's migrated one; a test marked ``no_store`` starts with none (it
    checks that a refused command creates none)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    (tmp_path / "mlflow.yaml").write_text(
        "tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_root: mlruns/artifacts\n"
        "experiment: test-exp\ntuner_dir: mlruns/keras_tuner\n"
    )
    if request.node.get_closest_marker("no_store") is None:
        (tmp_path / "mlruns").mkdir()
        shutil.copy(migrated_store, tmp_path / "mlruns" / "mlflow.db")
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def swept_store(tiny_data, tmp_path_factory) -> Path:
    """One small 2-trial scratch sweep (``helpers.sweep_args``) in a store of its own, made once per process:
    the tests of best, export, predict, report and the UI start from copies of it."""
    from click.testing import CliRunner

    from sweep.cli import main
    from tests.helpers import sweep_args

    store = tmp_path_factory.mktemp("swept")
    (store / "mlflow.yaml").write_text(
        "tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_root: mlruns/artifacts\n"
        "experiment: test-exp\ntuner_dir: mlruns/keras_tuner\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        result = CliRunner().invoke(main, sweep_args(tiny_data, "scratch"))
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture()
def swept(swept_store, tracking_env) -> Path:
    """A copy of the swept store as this test's tracking folder, to change freely. Its runs keep their artifacts
    in the shared store, where an export only adds a logged model under a new id."""
    shutil.rmtree(tracking_env / "mlruns", ignore_errors=True)  # the empty store tracking_env starts with
    shutil.copytree(swept_store / "mlruns", tracking_env / "mlruns")
    return tracking_env


@pytest.fixture()
def no_exec(monkeypatch):
    """`sweep ui` replaces its process with MLflow's UI; inside pytest that must fail loudly instead."""
    def refuse(*args):
        raise AssertionError(f"sweep ui went on to start the UI: {args}")

    monkeypatch.setattr(os, "execv", refuse)


@pytest.fixture()
def runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture()
def shared_weights() -> Path:
    """MobileNetV2's ImageNet 224 checkpoint (no top), passed by path: it runs at any image size."""
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"{SHARED_WEIGHTS} is not available")
    return SHARED_WEIGHTS


@pytest.fixture()
def keras_cache(tmp_path, monkeypatch, shared_weights) -> Path:
    """A KERAS_HOME pre-seeded with the 224 ImageNet checkpoint under Keras' own 224 file name (what it is),
    so 'imagenet' at 224 needs no network."""
    from sweep.weights import imagenet_weights_name

    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    os.symlink(shared_weights, home / "models" / imagenet_weights_name((224, 224)))
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture()
def empty_keras_cache(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "empty_keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def runs_in(tracking_dir: Path, experiment: str = "test-exp"):
    """Every run of ``experiment`` in the store under ``tracking_dir`` (empty when nothing was written)."""
    from mlflow.tracking import MlflowClient

    db = tracking_dir / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=1000)


def copy_sample(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """Copy the first N images of each class of each split of a real dataset."""
    for split, count in per_class.items():
        for class_dir in sorted((src / split).iterdir()):
            target = dst / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, target / image.name)
    return dst


def signal_on_line(args: list[str], cwd: Path, prefix: str, signum: int) -> tuple[int, str, float]:
    """Run ``sweep ARGS``, send ``signum`` as the first output line starting with ``prefix`` appears, and
    return its exit code, its whole output and the seconds it took to end after the signal."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([SWEEP_BIN, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines, signalled = [], time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                signalled = time.monotonic()
                proc.send_signal(signum)
                break
        output = "".join(lines) + proc.communicate(timeout=60)[0]
        return proc.returncode, output, time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
