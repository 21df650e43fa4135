"""The CLI: help, families, and bad input answered with one message, a non-zero exit and no MLflow run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sweep.cli import main
from tests.conftest import make_image_folders, runs_in


def test_help_lists_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.output and "families" in result.output


@pytest.mark.slow
def test_commands_print_no_tensorflow_start_up_lines():
    """The lines TensorFlow's C++ side writes while it loads (oneDNN, CUDA, absl) do not reach the user."""
    sweep = str(Path(sys.executable).with_name("sweep"))
    result = subprocess.run([sweep, "families", "scratch", "transfer"], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("scratch: ") and "transfer: " in result.stdout
    assert result.stderr == ""


def test_families_lists_the_registered_ones_without_importing_tensorflow():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from sweep.cli import main; "
            "r = CliRunner().invoke(main, ['families']); print(r.output); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for family, target in (("scratch", "search_spaces.conv:HyperScratch"),
                           ("transfer", "search_spaces.transfer:HyperTransfer")):
        assert re.search(rf"^{family} +{target} \(built in\)$", out, re.M), out
    assert out.strip().endswith("False")  # nothing heavy was imported


def test_families_prints_hyperparameters_and_defaults(runner):
    result = runner.invoke(main, ["families", "scratch", "augmented", "preprocessed", "transfer"])
    assert result.exit_code == 0, result.output
    for family in ("scratch", "augmented", "preprocessed", "transfer"):
        assert f"{family}: " in result.output
    assert "study's validation accuracy 95%-98%; loads --weights" in result.output
    assert "a later stage switched by fine_tune_from" in result.output
    assert "rotation_factor      Float   [0.0, 0.3] step 0.1" in result.output
    assert "fine_tune_from       Choice  {none, block_16}" in result.output
    assert "fine_tune_epochs     Int     [1, 3] step 1" in result.output
    assert "default 2 (when fine_tune_from is block_16)" in result.output
    assert "{global_max, global_avg}" in result.output
    assert "default flatten" in result.output


@pytest.fixture()
def data_variants(tmp_path):
    good = make_image_folders(tmp_path / "good", train=4, validation=12)
    single = make_image_folders(tmp_path / "single", train=4, validation=12)
    shutil.rmtree(single / "train" / "dogs")
    shutil.rmtree(single / "validation" / "dogs")
    (tmp_path / "empty").mkdir()
    return {"good": good, "single": single, "empty": tmp_path / "empty", "missing": tmp_path / "missing"}


BASE = ["run", "--trials", "1", "--epochs", "1", "--batch-size", "4", "--image-size", "32"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["run", "--family", "resnet"], 1, "Error: unknown family 'resnet' (registered: augmented, preprocessed, "
                                          "scratch, transfer); give a registered name"),
        (["run", "--family", "scratch", "--trials", "0"], 2, "Invalid value for '--trials': 0 is not in the range x>=1"),
        (["run", "--family", "scratch", "--tuner", "grid"], 2, "Invalid value for '--tuner'"),
        (["run", "--family", "scratch", "--image-size", "abc"], 2, "'abc' is not a size like 160 or 160x160"),
        ([*BASE, "--family", "scratch", "--data-dir", "{missing}"], 1, "does not exist; pass a folder holding train/"),
        ([*BASE, "--family", "scratch", "--data-dir", "{empty}"], 1, "train is missing"),
        ([*BASE, "--family", "scratch", "--data-dir", "{single}"], 1, "has 1 class folder(s) (cats)"),
        ([*BASE, "--family", "transfer", "--data-dir", "{good}", "--weights", "/no/such/weights.h5"], 1,
         "weights file /no/such/weights.h5 does not exist"),
        ([*BASE, "--family", "transfer", "--data-dir", "{good}", "--hp", "rotation_factor=0.15"], 1,
         "Error: --hp: rotation_factor takes multiples of 0.1 from 0.0, not '0.15'."),
        ([*BASE, "--family", "scratch", "--data-dir", "{good}", "--hp", "flip_mode=none"], 1,
         "Error: --hp: scratch has no hyperparameter 'flip_mode'; it has dropout, learning_rate"),
        ([*BASE, "--family", "scratch", "--hp", "dropout"], 2, "'dropout' is not NAME=VALUE (e.g. flip_mode=none)."),
    ],
)
def test_bad_input_gets_one_message_and_no_run(runner, tracking_env, data_variants, args, code, message):
    args = [a.format(**data_variants) for a in args]
    result = runner.invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    if code == 1:  # our checks ran after click's: they ran before any MLflow run was made
        assert runs_in(tracking_env) == []
        assert result.output.count("Error: ") == 1


@pytest.mark.no_store
def test_malformed_mlflow_yaml(runner, tracking_env, data_variants):
    (tracking_env / "mlflow.yaml").write_text("tracking_uri: [oops\n")
    result = runner.invoke(main, [*BASE, "--family", "scratch", "--data-dir", str(data_variants["good"])])
    assert result.exit_code == 1
    assert "mlflow.yaml is not valid YAML (line" in result.output
    assert "Traceback" not in result.output
    assert not (tracking_env / "mlruns" / "mlflow.db").exists()


def test_corrupt_weights_file_leaves_no_run(runner, tracking_env, data_variants):
    bad = tracking_env / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    result = runner.invoke(main, [*BASE, "--family", "transfer", "--data-dir", str(data_variants["good"]),
                                  "--weights", str(bad)])
    assert result.exit_code == 1, result.output
    assert f"could not load MobileNetV2 weights from {bad}" in result.output
    assert [r for r in runs_in(tracking_env)] == []


def test_offline_download_failure_is_one_message(runner, tracking_env, empty_keras_cache, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    result = runner.invoke(main, ["run", "--family", "scratch", "--trials", "1"])
    assert result.exit_code == 1
    assert "could not download the dataset" in result.output and "--data-dir DIR" in result.output
    assert "Traceback" not in result.output
    assert runs_in(tracking_env) == []


@pytest.mark.slow  # a process, and seconds of waiting
def test_a_stopping_process_takes_one_stop_signal_and_a_second_ctrl_c_exits_at_once():
    """The first SIGTERM or Ctrl-C interrupts; a repeated SIGTERM (a supervisor passing the stop on, a
    scheduler repeating it) must not interrupt the closing of the runs; a second Ctrl-C ends the process."""
    script = """
import os, signal, time
from sweep.cli_common import stop_on_sigterm
stop_on_sigterm()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except KeyboardInterrupt as exc:
    print("interrupted:", exc, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print("closing undisturbed", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still here", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["interrupted: stopped by signal 15", "closing undisturbed"], done
    assert done.returncode == 130 and "Stopping at once" in done.stderr and "Traceback" not in done.stderr
