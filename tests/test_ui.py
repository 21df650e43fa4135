"""`sweep ui` and tracking servers: the UI on the configured store, the link it prints, and a sweep logged to `mlflow server`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from sweep.cli import main
from tests.helpers import free_port, stop, store_client, sweep_args, wait_http

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.mark.no_store
def test_ui_refuses_a_store_mlflow_cannot_open_and_best_refuses_a_lone_no_verify(tracking_env, runner, monkeypatch,
                                                                                  no_exec):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    result = runner.invoke(main, ["ui"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: tracking URI bogus://x has an unknown scheme 'bogus'; use http:// or ")
    assert "MLflow UI for" not in result.output and "Traceback" not in result.output
    (tracking_env / "mlruns").mkdir()
    (tracking_env / "mlruns" / "mlflow.db").write_text("not a database")  # a store MLflow cannot open
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = runner.invoke(main, ["ui"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot read MLflow store sqlite:///{tracking_env}/mlruns/mlflow.db: ")
    assert "fix tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI." in result.output
    assert "MLflow UI for" not in result.output and "Traceback" not in result.output
    lone = runner.invoke(main, ["best", "--no-verify"])
    assert lone.exit_code == 2 and "--no-verify only applies with --export DIR." in lone.output


def test_ui_refuses_a_port_in_use(swept, runner, no_exec):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = runner.invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 1
    assert f"Error: cannot serve on 127.0.0.1:{port} (Address already in use); pick another with --port." \
        in result.output


def test_ui_prints_the_link_that_opens_the_experiments_training_runs(swept, runner, monkeypatch):
    started = []
    monkeypatch.setattr(os, "execv", lambda *args: started.append(args))
    port = free_port()
    result = runner.invoke(main, ["ui", "--port", str(port)])
    assert result.exit_code == 0, result.output
    experiment = store_client().get_experiment_by_name("test-exp")
    # MLflow 3's UI opens an experiment on its GenAI overview unless the link asks for the training runs
    assert (f"Experiment 'test-exp', its runs: http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
            "/runs?workflowType=machine_learning") in result.output
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert started and started[0][1][1:3] == ["ui", "--backend-store-uri"]
    assert started[0][1][-2:] == ["--workers", "2"]  # MLflow's default of 4 server processes is for teams


@pytest.mark.slow
def test_ui_serves_the_configured_store(swept):
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("sweep")), "ui", "--port", str(port)], cwd=swept,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=test-exp")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["experiment"]["name"] == "test-exp"
    finally:
        stop(proc)


@pytest.mark.slow
def test_mlflow_server_receives_a_sweep(tiny_data, tmp_path, runner, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=server)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "remote-exp")
        result = runner.invoke(main, sweep_args(tiny_data, "scratch"))
        assert result.exit_code == 0, result.output
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        with urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=remote-exp") as response:
            experiment_id = json.load(response)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode()
        request = urllib.request.Request(f"{api}/runs/search", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            runs = json.load(response)["runs"]
        assert len(runs) == 3
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [t for t in tags if "mlflow.parentRunId" not in t]
        assert len(parents) == 1
        assert sum(1 for t in tags if "mlflow.parentRunId" in t) == 2
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
        assert list((tmp_path / "artifacts").rglob("accuracy.png"))
    finally:
        stop(server)
