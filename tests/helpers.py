"""Helpers several test files share (fixtures live in conftest.py): ports and servers, the small sweep's
arguments, an oracle without training, the store's run states."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

from search_spaces.conv import HyperScratch
from sweep.spec import SweepSpec
from sweep.tuning import build_oracle


def sweep_args(data_dir, family: str, trials: int = 2) -> list[str]:
    """``sweep run`` of the small sweep (``tiny_args``) in which every trial runs its two epochs (pruning, at
    epoch 1 here, has its own tests): what the tests of best, export, predict, report and the UI rank, export
    and read."""
    return ["run", "--family", family, "--trials", str(trials), *tiny_args(data_dir), "-q", "--no-prune"]


def store_client(root: Path | str = "."):
    """An MLflow client on the store ``tracking_env`` sets up (``mlruns/mlflow.db`` under ``root``, by default
    the test's working folder). The code under test never sets MLflow's process-wide tracking URI, so tests
    name the store too."""
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{Path(root).resolve() / 'mlruns' / 'mlflow.db'}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90, proc=None) -> None:
    """Wait until ``url`` answers 200 (``proc``: the server's process, which must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def stop(proc) -> None:
    """Stop a server started with start_new_session=True, and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # uvicorn and MLflow's job runners, if any outlived it
    except ProcessLookupError:
        pass
    proc.wait(timeout=15)


def tiny_args(data_dir, image_size="32"):
    """The small sweep's options: the tiny data at ``image_size``, batch 4, 2 epochs, seed 3."""
    return ["--data-dir", str(data_dir), "--batch-size", "4", "--image-size", image_size, "--epochs", "2",
            "--seed", "3"]


def make_oracle(tmp_path, **spec):
    """A scratch sweep's oracle with its space declared, driven without training (``spec`` overrides)."""
    oracle = build_oracle(SweepSpec(family="scratch", **{"trials": 10, "epochs": 20, "seed": 1, **spec}))
    oracle._set_project_dir(str(tmp_path), "prune")
    space = oracle.get_space()
    HyperScratch().declare(space)
    oracle.update_space(space)
    return oracle


def store_rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """The rows of ``sql`` read straight from the SQLite store ``db`` (without MLflow, while other processes
    write to it); none when it is not there yet or is busy."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []


def run_states(db: Path) -> list[tuple[str, str]]:
    """(status, parent id or '') of every run, read straight from the SQLite store."""
    return store_rows(db, "select r.status, coalesce(t.value, '') from runs r left join tags t "
                          "on t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId'")
