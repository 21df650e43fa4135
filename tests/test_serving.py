"""`sweep serve`: an export folder behind HTTP, answered as `sweep predict` answers, bad input at the door,
batching, metrics and a drain on SIGTERM. The model is a tiny Keras one, so the server starts in seconds."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SWEEP_BIN, make_image_folders

SIZE = 32


def tiny_export(folder: Path, classes=("cats", "dogs"), scale: float = 1.0) -> Path:
    """An export folder as `sweep best --export --format keras` writes it, with a tiny model: raw 0-255 RGB in,
    logits out (mean colour through a fixed dense layer)."""
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(classes), kernel_initializer=keras.initializers.Constant(0.0))(x)
    model = keras.Model(inputs, outputs)
    weights = np.array([[4.0, -4.0], [-4.0, 4.0], [0.5, 0.5]], dtype="float32")[:, :len(classes)] * scale
    model.layers[-1].set_weights([weights, np.zeros(len(classes), "float32")])
    model.save(folder / "model.keras")
    (folder / "classes.json").write_text(json.dumps(list(classes)))
    (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9}))
    return folder


def start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, int]:
    """`sweep serve ARGS --port 0` in its own process; returns it and the port it says it listens on."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([SWEEP_BIN, "serve", *args, "--port", "0"], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Serving "):
            port = int(line.split("http://127.0.0.1:")[1].split(" ")[0])
            threading.Thread(target=lambda: [lines.append(x) for x in process.stdout], daemon=True).start()
            process.lines = lines  # type: ignore[attr-defined]
            return process, port
    process.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines))


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    kind = response.getheader("Content-Type", "")
    return response.status, (json.loads(data) if kind.startswith("application/json") else data.decode())


def encoded(image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 256))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    export = tiny_export(root / "export")
    images = make_image_folders(root / "data", train=2, validation=2, size=48)
    process, port = start([str(export), "--max-body", "1MB", "--max-pixels", "1000000", "--idle-timeout", "2"], root)
    yield port, export, images
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


@pytest.mark.slow  # a server process
def test_an_image_gets_the_class_and_probabilities_sweep_predict_gives(served):
    from sweep.prediction import predict

    port, export, images = served
    photo = next((images / "validation" / "dogs").iterdir())
    status, answer = request(port, "POST", "/predict", photo.read_bytes(), {"Content-Type": "image/jpeg"})
    assert status == 200, answer
    assert answer["model"]["format"] == "keras"
    (one,) = answer["predictions"]
    offline = predict(export, [photo])[0]
    assert one["class"] == offline.label == "dogs"
    assert one["probability"] == pytest.approx(offline.probability, abs=1e-6)
    assert sum(one["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert set(one["probabilities"]) == {"cats", "dogs"}


@pytest.mark.slow  # a server process
def test_several_files_in_one_multipart_request_are_answered_in_order(served):
    port, _, images = served
    cat, dog = next((images / "validation" / "cats").iterdir()), next((images / "validation" / "dogs").iterdir())
    boundary = "sweepboundary"
    parts = [("a.jpg", cat.read_bytes()), ("b.txt", b"not an image"), ("c.jpg", dog.read_bytes())]
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    body += f"--{boundary}--\r\n".encode()
    status, answer = request(port, "POST", "/predict", body,
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer
    assert [p["file"] for p in answer["predictions"]] == ["a.jpg", "b.txt", "c.jpg"]
    assert answer["predictions"][0]["class"] == "cats" and answer["predictions"][2]["class"] == "dogs"
    assert "not an image" in answer["predictions"][1]["error"]


@pytest.mark.slow  # a server process
def test_health_ready_metadata_and_metrics(served):
    port, export, _ = served
    assert request(port, "GET", "/health") == (200, {"status": "alive"})
    status, ready = request(port, "GET", "/ready")
    assert status == 200 and ready["ready"] is True
    status, meta = request(port, "GET", "/metadata")
    assert status == 200
    assert meta["classes"] == ["cats", "dogs"] and meta["image_size"] == [SIZE, SIZE]
    assert meta["format"] == "keras" and meta["metrics"] == {"test_accuracy": 0.9}
    assert Path(meta["path"]) == (export / "model.keras").resolve()
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    assert 'sweep_serve_requests_total{code="200",endpoint="/health"}' in text
    assert "sweep_serve_request_seconds_bucket" in text and "sweep_serve_batch_images_bucket" in text
    assert "process_resident_memory_bytes" in text


def bad_inputs():
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype="uint8"))
    jpeg = encoded(rgb, "JPEG")
    return {
        "not an image": (b"hello, world", "image/jpeg", 415, "not an image"),
        "truncated JPEG": (jpeg[:len(jpeg) // 3], "image/jpeg", 400, "does not decode"),
        "empty body": (b"", "image/jpeg", 400, "empty body"),
        "wrong content type": (jpeg, "text/plain", 415, "Content-Type text/plain is not taken"),
        "too large": (b"\xff" * (2 * 2**20), "image/jpeg", 413, "more than this server's --max-body"),
        "decompression bomb": (png_declaring(50_000, 50_000), "image/png", 413, "declares 50000x50000 pixels"),
        "greyscale": (encoded(rgb.convert("L"), "PNG"), "image/png", 200, None),
        "RGBA": (encoded(rgb.convert("RGBA"), "PNG"), "image/png", 200, None),
        "CMYK": (encoded(rgb.convert("CMYK"), "JPEG"), "image/jpeg", 200, None),
        "16-bit PNG": (encoded(Image.fromarray(np.arange(4800, dtype="uint16").reshape(60, 80) * 13), "PNG"),
                       "image/png", 200, None),
        "animated GIF": (encoded(rgb, "GIF", save_all=True, append_images=[rgb.rotate(90)]), "image/gif", 200, None),
    }


@pytest.mark.slow  # a server process
@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_gets_a_4xx_naming_it_or_a_correct_answer_and_the_server_goes_on(served, case):
    port, _, _ = served
    body, kind, expected, words = bad_inputs()[case]
    status, answer = request(port, "POST", "/predict", body, {"Content-Type": kind})
    assert status == expected, answer
    if words is None:
        assert answer["predictions"][0]["class"] in ("cats", "dogs")
    else:
        assert set(answer) == {"error"} and words in answer["error"]
    assert request(port, "GET", "/health")[0] == 200


@pytest.mark.slow  # a server process
def test_a_body_over_max_body_gets_the_413_whether_the_client_sends_it_first_or_asks_first(served):
    import socket

    port, _, _ = served
    # http.client, like most clients, sends the whole body before it reads the answer: a server that answers and
    # closes with the body still arriving resets the connection, and the client sees a broken pipe, not the 413
    for _ in range(5):
        status, answer = request(port, "POST", "/predict", b"\xff" * (16 * 2**20), {"Content-Type": "image/jpeg"})
        assert status == 413 and "more than this server's --max-body 1048576 bytes" in answer["error"]
    # curl asks first over 1 MB ("Expect: 100-continue"): it is refused before it sends anything
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                       b"Content-Length: 16777216\r\nExpect: 100-continue\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
    assert b"more than this server's --max-body" in answer
    assert request(port, "GET", "/health")[0] == 200


@pytest.mark.slow  # a server process, and waits out its --idle-timeout
def test_a_silent_connection_is_closed_after_the_idle_timeout_and_a_stalled_body_gets_a_408(served):
    import socket

    port, _, _ = served

    def closed_after(sent: bytes) -> tuple[bytes, float]:
        """What the server answers a connection that sends ``sent`` and then nothing, and when it closes it."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(sent)
            started, answer = time.monotonic(), b""
            while chunk := client.recv(65536):
                answer += chunk
            return answer, time.monotonic() - started

    for sent in (b"", b"POST /predict HTTP/1.1\r\nHost: x\r\n"):  # connected and silent; headers stopped
        answer, seconds = closed_after(sent)
        assert answer == b"" and 1.5 < seconds < 15, (sent, seconds)
    answer, seconds = closed_after(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                   b"Content-Length: 5000\r\n\r\n" + b"\xff" * 100)  # a body that stopped
    assert answer.startswith(b"HTTP/1.1 408 ") and 1.5 < seconds < 15, answer
    assert (b"the body stopped coming for 2 s (this server's --idle-timeout) before its 5000 bytes arrived"
            in answer)
    assert request(port, "GET", "/health")[0] == 200


@pytest.mark.slow  # a server process
def test_an_unknown_path_and_method_get_json_errors(served):
    port, _, _ = served
    status, answer = request(port, "GET", "/nope")
    assert status == 404 and "POST /predict" in answer["error"]
    status, answer = request(port, "GET", "/predict")
    assert status == 405
    status, answer = request(port, "DELETE", "/predict")
    assert status == 405 and "POST /predict" in answer["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer():
    from sweep.serving import Batcher, LoadedModel, Metrics, ModelHolder

    sizes = []

    class Runtime:
        input_size = (2, 2)

        def __call__(self, x):
            sizes.append(len(x))
            time.sleep(0.05)  # a slow model: requests pile up behind it
            return np.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], axis=1)

    batcher = Batcher(ModelHolder(LoadedModel(Runtime(), ["a", "b"], "keras", Path("m"))), Metrics(),
                      window=0.02, max_batch=8)
    results = {}

    def ask(k):
        results[k] = batcher.classify(np.full((1, 2, 2, 3), float(k % 2 * 2 - 1), "float32"))[0][0]

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop()
    assert sum(sizes) == 12 and len(sizes) < 12 and max(sizes) <= 8
    for k, p in results.items():  # image k was filled with +1 (odd k) or -1: its own row came back
        assert (p[0] > p[1]) == (k % 2 == 1)


@pytest.mark.slow  # a server process
def test_sigterm_finishes_the_requests_in_flight_and_exits(tmp_path):
    export = tiny_export(tmp_path / "export")
    images = make_image_folders(tmp_path / "data", train=1, validation=1, size=48)
    photo = next((images / "validation" / "cats").iterdir()).read_bytes()
    process, port = start([str(export), "--batch-window", "200"], tmp_path)  # requests wait 200 ms to batch
    answers = []

    def ask():
        answers.append(request(port, "POST", "/predict", photo, {"Content-Type": "image/jpeg"})[0])

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.1)  # in flight, waiting in the batch window
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - sent < 30
    assert answers == [200] * 6
    assert any("every request in flight was answered" in line for line in process.lines)
    with pytest.raises(OSError):
        request(port, "GET", "/health")


def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path, runner, tracking_env):
    from sweep.cli import main

    result = runner.invoke(main, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "Error: no model at" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["serve", str(tmp_path), "--reload-on-alias"])
    assert result.exit_code == 2 and "--reload-on-alias needs MODEL as models:/NAME@ALIAS" in result.output
    export = tiny_export(tmp_path / "export")
    result = runner.invoke(main, ["serve", str(export), "--format", "litert"])
    assert result.exit_code == 1 and "holds no litert model (it has keras)" in result.output
    result = runner.invoke(main, ["serve"])  # the registry's champion, and there is none
    assert result.exit_code == 1 and "cannot load models:/" in result.output and "sweep best --export" in result.output


@pytest.mark.slow  # a server process
def test_the_load_test_prints_latency_throughput_errors_and_memory(served, runner):
    from sweep.cli import main

    port, _, images = served
    result = runner.invoke(main, ["loadtest", f"http://127.0.0.1:{port}", str(images / "validation"),
                                  "--clients", "4", "--seconds", "12", "--single", "5"])
    assert result.exit_code == 0, result.output
    assert "one client, one image a request  5 requests, 0 errors" in result.output
    assert "4 concurrent clients, 12 s" in result.output and " 0 errors" in result.output
    assert "server memory from second 10 to the end" in result.output
    refused = runner.invoke(main, ["loadtest", "http://example.com:80", str(images)])
    assert refused.exit_code == 1 and "loopback only" in refused.output


@pytest.mark.slow  # a server process and an MLflow registry
def test_the_registrys_champion_is_served_and_a_moved_alias_swaps_in_without_a_failed_request(tracking_env):
    from mlflow import MlflowClient

    from sweep import tracking

    client = MlflowClient("sqlite:///mlruns/mlflow.db")
    experiment = client.create_experiment("test-exp", artifact_location=str(tracking_env / "mlruns" / "artifacts"))
    run = client.create_run(experiment).info.run_id
    first = tiny_export(tracking_env / "one")
    second = tiny_export(tracking_env / "two", scale=-1.0)  # the opposite answers
    name = "sweep-best"  # the registered model of a mlflow.yaml that names none
    assert tracking.register_model(client, run, first, ["cats", "dogs"], name, "champion") == 1
    images = make_image_folders(tracking_env / "data", train=1, validation=1, size=48)
    photo = next((images / "validation" / "cats").iterdir()).read_bytes()

    process, port = start(["--reload-on-alias", "--reload-interval", "0.5"], tracking_env)
    try:
        status, answer = request(port, "POST", "/predict", photo, {"Content-Type": "image/jpeg"})
        assert status == 200 and answer["model"] == {"name": name, "version": "1", "format": "keras"}
        assert answer["predictions"][0]["class"] == "cats"
        assert tracking.register_model(client, run, second, ["cats", "dogs"], name, "champion") == 2
        seen, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline and (not seen or seen[-1][0] != "2"):
            status, answer = request(port, "POST", "/predict", photo, {"Content-Type": "image/jpeg"})
            assert status == 200, answer  # no request fails while the new version loads and swaps in
            seen.append((answer["model"]["version"], answer["predictions"][0]["class"]))
        assert seen[-1] == ("2", "dogs")
        assert request(port, "GET", "/metadata")[1]["version"] == "2"
        assert any("Serving sweep-best version 2." in line for line in process.lines)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_litert_is_served_one_image_a_batch_and_other_runtimes_batched():
    from sweep.serving import DEFAULT_MAX_BATCH, default_max_batch

    assert default_max_batch("litert") == default_max_batch("litert_int8") == 1
    assert default_max_batch("keras") == default_max_batch("onnx") == default_max_batch("saved_model") == DEFAULT_MAX_BATCH
