"""``sweep serve``: an exported model behind HTTP. Image files in, class names out.

One process holds the model in the fastest runtime its export verified (LiteRT, then ONNX Runtime, then
Keras), and serves:

* ``POST /predict``: one image as the body (``image/jpeg``, ``image/png``, ...) or several as
  ``multipart/form-data`` files. The answer is JSON: per image, the class, its probability and every class's
  probability, with the model's name, version and format. Decoding and resizing are training's own
  (``sweep.data.decode_bytes``), so an answer equals ``sweep predict``'s for the same file.
* ``GET /health`` (the process is alive), ``/ready`` (a model is loaded and requests are taken), ``/metadata``
  (classes, image size, the sweep run and trial, the export's verified accuracy) and ``/metrics``
  (Prometheus' text format: requests, errors, latency, batch sizes, images, the process's memory).

Concurrent requests are batched on the server, as TensorFlow Serving and Triton do: the batcher thread takes
the first waiting request, collects more for up to ``batch_window`` seconds or ``max_batch`` images, and runs
them as one batch (the runtime is used by that thread alone). It waits only while the server is answering
requests that are not in the batch yet, so a lone request does not pay the window. Request threads only read
and decode.

Bad input never reaches the model. The body's size is checked before it is read and the image's declared
pixel count before it is decoded (Pillow reads only the header), so a 100 MB upload or a decompression bomb
costs nothing; each gets a 4xx JSON error naming the problem. On SIGTERM or Ctrl-C the server stops taking
requests (``/ready`` says 503), finishes those in flight and exits, within ``DRAIN_SECONDS``.
"""

from __future__ import annotations

import io
import json
import queue
import signal
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sweep.errors import SweepError, first_line

# Formats in the order `sweep serve` prefers them (fastest first, as measured by `sweep best --export`).
PREFERRED_FORMATS = ("litert", "onnx", "keras", "saved_model")
DRAIN_SECONDS = 25.0
# a body refused for its size is read and dropped for up to this long, so that a client that sends the whole body
# before it reads the answer (most do, unless they ask with "Expect: 100-continue") gets the 413, not a reset
LINGER_SECONDS = 5.0
DEFAULT_MAX_BODY = 20 * 2**20  # bytes
DEFAULT_MAX_PIXELS = 40_000_000  # declared width x height of one image (a 40-megapixel photo)
# seconds a connection may stay silent: between keep-alive requests, or mid-request (headers or body)
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_BATCH_WINDOW = 0.005  # seconds
DEFAULT_MAX_BATCH = 32
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # what training's decoder reads (Pillow's names)
Reporter = Callable[[str], None]


class BadRequest(Exception):
    """A request the server answers with a 4xx status and one line naming the problem."""

    def __init__(self, status: int, message: str, unread: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.unread = unread  # bytes of the body the client still sends: dropped after the answer


@dataclass
class Limits:
    max_body: int = DEFAULT_MAX_BODY
    max_pixels: int = DEFAULT_MAX_PIXELS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


# -- the model ------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model in its runtime, with what ``/metadata`` and the answers say about it."""

    runtime: Any
    classes: list[str]
    format: str
    path: Path
    name: str = ""
    version: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.runtime.input_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "format": self.format}

    def metadata(self) -> dict[str, Any]:
        return {**self.describe(), "classes": self.classes, "image_size": list(self.image_size),
                "path": str(self.path.resolve()), **self.info}


def pick_format(folder: Path, wanted: str | None) -> tuple[str, Path]:
    """The format to serve from an export folder: ``wanted``, else the first of ``PREFERRED_FORMATS`` that
    the folder holds and whose runtime is installed."""
    from sweep.formats import FORMATS

    present = [name for name in FORMATS if (folder / FORMATS[name].filename).exists()]
    if wanted is not None:
        if wanted not in present:
            raise SweepError(f"{folder} holds no {wanted} model (it has {', '.join(present) or 'none'}); export "
                             f"it with `sweep best --export DIR --format {wanted}` or pick another --format.")
        return wanted, folder / FORMATS[wanted].filename
    for name in PREFERRED_FORMATS:
        if name in present and not FORMATS[name].missing():
            return name, folder / FORMATS[name].filename
    raise SweepError(f"{folder} holds no model this machine can run (it has {', '.join(present) or 'none'}).")


def load_served(model: str, wanted_format: str | None, registered_model: str, report: Reporter,
                tracking_uri: str | None = None) -> LoadedModel:
    """Load what ``sweep serve MODEL`` names: an export folder, one of its model files, or ``models:/NAME@ALIAS``
    / ``models:/NAME/VERSION`` (downloaded from the registry at ``tracking_uri``)."""
    from sweep.formats import FORMATS, classes_for, detect, load

    name = version = ""
    if model.startswith("models:/"):
        folder, name, version = download_registered(model, tracking_uri)
    else:
        folder = Path(model)
        if not folder.exists():
            raise SweepError(f"no model at {model}: pass an export folder from `sweep best --export`, one of its "
                             f"model files, or models:/{registered_model}@champion.")
    model_folder = any(f.marker and (folder / f.marker).exists() for f in FORMATS.values())  # a SavedModel, say
    if folder.is_dir() and not model_folder:
        fmt, path = pick_format(folder, wanted_format)
    else:
        fmt, path = detect(folder)
        if wanted_format is not None and fmt != wanted_format:
            raise SweepError(f"{folder} is a {fmt} model, not {wanted_format}; drop --format or pass the folder.")
    runtime = load(fmt, path)
    home = path if path.is_dir() else path.parent
    info = {}
    for record, key in (("metrics.json", "metrics"), ("hyperparameters.json", "hyperparameters"),
                        ("registered_model.json", "registry"), ("formats.json", "verification")):
        if (home / record).is_file():
            info[key] = json.loads((home / record).read_text())
    registry = info.get("registry", {})
    loaded = LoadedModel(runtime, classes_for(path, runtime.num_classes), fmt, path,
                         name or registry.get("name", ""), str(version or registry.get("version", "")), info)
    report(f"Loaded {fmt} model {path} ({', '.join(loaded.classes)}; {loaded.image_size[0]}x{loaded.image_size[1]})"
           f"{f', {loaded.name} version {loaded.version}' if loaded.name else ''}.")
    return loaded


def download_registered(uri: str, tracking_uri: str | None = None) -> tuple[Path, str, str]:
    """Download a registered model version's files; returns (the folder holding its formats, name, version)."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    rest = uri[len("models:/"):]
    client = MlflowClient(tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            found = client.get_model_version_by_alias(name, alias)
        else:
            name, number = rest.rsplit("/", 1)
            found = client.get_model_version(name, number)
        # where the version's files are, asked of this client's registry: a models:/ URI would be resolved
        # through MLflow's process-wide registry URI, which need not be this store
        where = client.get_model_version_download_uri(name, found.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where,
                                                         dst_path=tempfile.mkdtemp(prefix="sweep-serve-"),
                                                         tracking_uri=tracking_uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for "not there"
        raise SweepError(f"cannot load {uri} from the registry ({first_line(exc, 200)}); export a model with "
                         "`sweep best --export DIR` first, or pass an export folder.") from None
    # the export's files, as `sweep best --export` registers them (sweep.pyfunc_model)
    folder = next((p.parent for p in sorted(local.rglob("classes.json"))), None)
    if folder is None:
        raise SweepError(f"{uri} (version {found.version}) holds no export folder; it was not registered by "
                         "`sweep best --export`. Pass an export folder instead.")
    return folder, name, str(found.version)


# -- decoding -------------------------------------------------------------------------------------------------
def decode_upload(body: bytes, image_size: tuple[int, int], limits: Limits) -> np.ndarray:
    """One uploaded image as training decodes it, after checking it is an image of a sane size.

    Raises:
        BadRequest: empty, not an image, a kind training cannot decode, more pixels than allowed, or damaged.
    """
    from PIL import Image, UnidentifiedImageError

    from sweep.data import decode_bytes, decode_error

    if not body:
        raise BadRequest(400, "empty body: send an image file (JPEG, PNG, GIF, BMP or WebP)")
    try:
        with Image.open(io.BytesIO(body)) as header:  # reads the header only, never the pixels
            kind, (width, height) = header.format, header.size
    except Image.DecompressionBombError:  # Pillow's own limit (``serve`` lifts it: ours below says it better)
        raise BadRequest(413, f"the image declares more pixels than this server's --max-pixels "
                              f"{limits.max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadRequest(415, "the body is not an image (JPEG, PNG, GIF, BMP or WebP)") from None
    if kind not in IMAGE_FORMATS:
        raise BadRequest(415, f"{kind} images are not supported; send JPEG, PNG, GIF, BMP or WebP")
    if width * height > limits.max_pixels:
        raise BadRequest(413, f"the image declares {width}x{height} pixels, more than this server's "
                              f"--max-pixels {limits.max_pixels}")
    try:
        return decode_bytes(body, image_size)
    except Exception as exc:  # noqa: BLE001 - truncated or damaged data
        raise BadRequest(400, f"the {kind} image does not decode ({decode_error(exc)})") from None


def multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(file name, content) of each part of a ``multipart/form-data`` body, in order."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                   + body)
    if not message.is_multipart():
        raise BadRequest(400, "a multipart/form-data body without parts (or without its boundary)")
    files = [(part.get_filename() or part.get_param("name", header="content-disposition") or f"part{i + 1}",
              part.get_payload(decode=True) or b"")
             for i, part in enumerate(message.iter_parts())]
    if not files:
        raise BadRequest(400, "a multipart/form-data body without files")
    return files


# -- metrics --------------------------------------------------------------------------------------------------
class Metrics:
    """The server's Prometheus metrics, in a registry of its own (``prometheus_client``)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        self.requests = Counter("sweep_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("sweep_serve_request_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5))
        self.batch = Histogram("sweep_serve_batch_images", "Images per batch run through the model",
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.images = Counter("sweep_serve_images", "Images classified", registry=self.registry)
        self.in_flight = Gauge("sweep_serve_in_flight_requests", "Requests being answered", registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- batching -------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    images: np.ndarray
    answer: Future
    model: LoadedModel | None = None


class Batcher:
    """Runs the model on batches of waiting requests, on one thread (the runtime is not shared)."""

    def __init__(self, holder: ModelHolder, metrics: Metrics, window: float = DEFAULT_BATCH_WINDOW,
                 max_batch: int = DEFAULT_MAX_BATCH, in_flight: Callable[[], int] | None = None) -> None:
        """``in_flight``: how many requests the server is answering now; the batcher waits for more only
        while some of them are not in the batch yet (a lone request runs at once, not after the window)."""
        self.holder, self.metrics, self.window, self.max_batch = holder, metrics, window, max(1, max_batch)
        self.in_flight = in_flight
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.thread.start()

    def classify(self, images: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        """The class probabilities of ``images`` [n, h, w, 3], and the model that gave them."""
        job = _Job(images, Future())
        self.jobs.put(job)
        return job.answer.result(), job.model

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=DRAIN_SECONDS)

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, count = [first], len(first.images)
            deadline = time.monotonic() + self.window
            while count < self.max_batch and (self.in_flight is None or self.in_flight() > len(batch)):
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(job)
                count += len(job.images)
            self._answer(batch)

    def _answer(self, batch: list[_Job]) -> None:
        model = self.holder.current  # swapped only between batches
        try:
            logits = model.runtime(np.concatenate([job.images for job in batch]))
            probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
        except Exception as exc:  # noqa: BLE001 - answered as a 500 to these requests, the server goes on
            for job in batch:
                job.answer.set_exception(exc)
            return
        self.metrics.batch.observe(len(probabilities))
        self.metrics.images.inc(len(probabilities))
        start = 0
        for job in batch:
            job.model = model
            job.answer.set_result(probabilities[start:start + len(job.images)])
            start += len(job.images)


class ModelHolder:
    """The model being served; ``swap`` replaces it between batches (``--reload-on-alias``)."""

    def __init__(self, model: LoadedModel) -> None:
        self.current = model

    def swap(self, model: LoadedModel) -> None:
        self.current = model


def watch_alias(uri: str, holder: ModelHolder, wanted_format: str | None, registered_model: str,
                interval: float, stop: threading.Event, report: Reporter,
                tracking_uri: str | None = None) -> threading.Thread:
    """Poll the registry every ``interval`` seconds; when ``uri``'s alias points at another version, load it
    and swap it in (requests keep being answered by the old model until the new one is ready)."""
    from mlflow import MlflowClient

    name, alias = uri[len("models:/"):].split("@", 1)

    def poll() -> None:
        while not stop.wait(interval):
            try:
                version = str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
                if version != holder.current.version:
                    report(f"{uri} now points at version {version}; loading it ...")
                    holder.swap(load_served(f"models:/{name}/{version}", wanted_format, registered_model, report,
                                            tracking_uri))
                    report(f"Serving {name} version {version}.")
            except Exception as exc:  # noqa: BLE001 - the old model keeps serving; try again next time
                report(f"Warning: could not reload {uri}: {first_line(exc, 200)}")

    thread = threading.Thread(target=poll, name="alias-watch", daemon=True)
    thread.start()
    return thread


# -- HTTP -----------------------------------------------------------------------------------------------------
class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], holder: ModelHolder, batcher: Batcher, metrics: Metrics,
                 limits: Limits) -> None:
        super().__init__(address, Handler)
        self.holder, self.batcher, self.metrics, self.limits = holder, batcher, metrics, limits
        self.draining = False
        self._active = 0
        self._predicting = 0
        self._idle = threading.Condition()

    def enter(self) -> None:
        with self._idle:
            self._active += 1

    def leave(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    @property
    def predicting(self) -> int:
        """``/predict`` requests being answered now (reading, decoding or waiting for the model)."""
        return self._predicting

    def count_predicting(self, delta: int) -> None:
        """One more (+1) or one fewer (-1) ``/predict`` request being answered."""
        with self._idle:
            self._predicting += delta

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout=timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client sends many requests on one connection
    server: Server

    def setup(self) -> None:
        # a silent connection (an idle keep-alive, or headers or a body that stop coming) is closed after this:
        # otherwise each one would hold a thread for good
        self.timeout = self.server.limits.idle_timeout
        super().setup()
        # answers are written as headers then body: without this, Nagle's algorithm and the client's delayed
        # ACK hold the body back about 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def parse_request(self) -> bool:
        self.body_withheld = False
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        """A client that asks before sending its body (curl does, over 1 MB) is refused a too-large one unsent."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.limits.max_body:
            self.body_withheld = True  # no "100 Continue": the 413 is the answer and the body never comes
            return True
        return super().handle_expect_100()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's name
        pass  # /metrics counts requests; a line per request would cost more than the request

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self._serve({"/health": self._health, "/ready": self._ready, "/metadata": self._metadata,
                     "/metrics": self._metrics})

    def do_POST(self) -> None:  # noqa: N802
        self._serve({"/predict": self._predict})

    def do_OTHER(self) -> None:  # noqa: N802 - PUT, DELETE, ...: a JSON 404 or 405, not the standard 501 page
        self._serve({})

    do_PUT = do_DELETE = do_PATCH = do_OTHER

    def _serve(self, routes: dict[str, Callable[[], tuple[int, bytes, str]]]) -> None:
        started = time.monotonic()
        unread = 0
        path = self.path.split("?", 1)[0]
        endpoint = path if path in ("/health", "/ready", "/metadata", "/metrics", "/predict") else "other"
        self.server.enter()
        self.server.metrics.in_flight.inc()
        try:
            if path not in routes:
                known = path in ("/health", "/ready", "/metadata", "/metrics", "/predict")
                raise BadRequest(405 if known else 404, f"{self.command} {path} is not served here; "
                                 "POST /predict, GET /health, /ready, /metadata or /metrics")
            status, body, kind = routes[path]()
        except BadRequest as exc:
            status, body, kind = exc.status, _json({"error": str(exc)}), "application/json"
            if exc.status in (408, 413):  # the body was not (all) read: the connection closes after the answer
                self.close_connection = True
                unread = exc.unread
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            status = 500
            body, kind = _json({"error": f"internal error: {type(exc).__name__}: {str(exc)[:200]}"}), "application/json"
        finally:
            self.server.metrics.in_flight.dec()
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            if self.server.draining:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        finally:
            self.server.metrics.requests.labels(endpoint, str(status)).inc()
            self.server.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            self.server.leave()
        if unread:
            self._drop_body(unread)

    def _drop_body(self, length: int) -> None:
        """Read and drop a refused body for up to LINGER_SECONDS: closing a socket with data still arriving resets
        the connection, and a client still sending would see a broken pipe instead of the 413 it was sent."""
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            while length > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass  # the client gave up or went quiet: the connection closes either way

    # endpoints: (status, body, content type)
    def _health(self):
        return 200, _json({"status": "alive"}), "application/json"

    def _ready(self):
        if self.server.draining:
            return 503, _json({"ready": False, "reason": "shutting down"}), "application/json"
        return 200, _json({"ready": True, "model": self.server.holder.current.describe()}), "application/json"

    def _metadata(self):
        return 200, _json(self.server.holder.current.metadata()), "application/json"

    def _metrics(self):
        return 200, self.server.metrics.text(), "text/plain; version=0.0.4; charset=utf-8"

    def _predict(self):
        if self.server.draining:
            raise BadRequest(503, "the server is shutting down; send the request to another replica")
        self.server.count_predicting(1)
        try:
            return self._classify()
        finally:
            self.server.count_predicting(-1)

    def _classify(self):
        uploads = self._uploads()
        size = self.server.holder.current.image_size
        images, answers = [], []
        for name, data in uploads:
            try:
                images.append(decode_upload(data, size, self.server.limits))
            except BadRequest as exc:
                if len(uploads) == 1:
                    raise
                answers.append({"file": name, "error": str(exc)})
            else:
                answers.append({"file": name})
        if not images:
            raise BadRequest(400, "no file of the request is a readable image: " +
                             "; ".join(f"{a['file']}: {a['error']}" for a in answers))
        probabilities, model = self.server.batcher.classify(np.stack(images))
        rows = iter(probabilities)
        for answer in answers:
            if "error" not in answer:
                p = next(rows)
                best = int(np.argmax(p))
                answer.update({"class": model.classes[best], "probability": float(p[best]),
                               "probabilities": {c: float(v) for c, v in zip(model.classes, p)}})
        return 200, _json({"model": model.describe(), "predictions": answers}), "application/json"

    def _uploads(self) -> list[tuple[str, bytes]]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest(411, "send the image with a Content-Length header (chunked uploads are not taken)")
        try:
            length = int(length)
        except ValueError:
            raise BadRequest(400, f"Content-Length {length!r} is not a number") from None
        if length > self.server.limits.max_body:
            raise BadRequest(413, f"the body is {length} bytes, more than this server's --max-body "
                                  f"{self.server.limits.max_body} bytes", unread=0 if self.body_withheld else length)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise BadRequest(408, f"the body stopped coming for {self.server.limits.idle_timeout:g} s (this "
                                  f"server's --idle-timeout) before its {length} bytes arrived") from None
        kind = self.headers.get("Content-Type", "")
        media = kind.split(";", 1)[0].strip().lower()
        if media.startswith("image/") or media == "application/octet-stream":
            return [("body", body)]
        if media == "multipart/form-data":
            return multipart_files(body, kind)
        raise BadRequest(415, f"Content-Type {media or '(none)'} is not taken; send the image as image/jpeg, "
                              "image/png, ... or several as multipart/form-data")


def _json(value: Any) -> bytes:
    return (json.dumps(value) + "\n").encode()


# -- running --------------------------------------------------------------------------------------------------
def serve(model: LoadedModel, host: str, port: int, limits: Limits, batch_window: float, max_batch: int,
          report: Reporter, watch: tuple[str, str | None, str, float, str | None] | None = None,
          ready: Callable[[Server], None] | None = None) -> None:
    """Serve ``model`` until SIGTERM or Ctrl-C, then drain: refuse new requests, finish those in flight
    (at most ``DRAIN_SECONDS``), exit. ``watch``: (models:/NAME@ALIAS, format, registered model, seconds,
    tracking URI) to reload the model when the alias moves."""
    from PIL import Image

    # Pillow refuses very large declared sizes on its own; the server's --max-pixels check names the limit
    # that applies (Pillow only reads headers here: it never decodes a pixel).
    Image.MAX_IMAGE_PIXELS = None
    holder, metrics = ModelHolder(model), Metrics()
    server = None
    batcher = Batcher(holder, metrics, batch_window, max_batch,
                      in_flight=lambda: server.predicting if server is not None else 0)
    try:
        server = Server((host, port), holder, batcher, metrics, limits)
    except OSError as exc:
        batcher.stop()
        raise SweepError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port.") from None
    stop_watch = threading.Event()
    if watch is not None:
        watch_alias(watch[0], holder, watch[1], watch[2], watch[3], stop_watch, report, watch[4])
    stopping = threading.Event()

    def drain(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
        if stopping.is_set():
            return
        stopping.set()
        server.draining = True
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    previous = {sig: signal.signal(sig, drain) for sig in (signal.SIGTERM, signal.SIGINT)}
    where = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_address[1]}"
    batching = (f"batches of up to {max_batch} within {batch_window * 1000:.0f} ms" if max_batch > 1
                else "one image a batch")
    report(f"Serving {model.format} model on {where} (POST /predict; GET /health, /ready, /metadata, /metrics); "
           f"{batching}. Ctrl-C or SIGTERM stops it.")
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        started = time.monotonic()
        drained = server.wait_idle(DRAIN_SECONDS)
        stop_watch.set()
        batcher.stop()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        report(f"Stopped: {'every request in flight was answered' if drained else 'requests still in flight were cut'}"
               f" ({time.monotonic() - started:.1f}s).")


def default_max_batch(fmt: str) -> int:
    """The batch limit a format is served with unless ``--max-batch`` says otherwise. LiteRT (XNNPACK) runs one
    image as fast per image as a batch on a CPU (2-core AMD EPYC: 3.5 ms batch-1 against 232 images/s at
    batch 32), so batching only adds the window and larger tensors: served with batches of up to 32 it gave
    96 images/s (p99 224 ms) against 105 (p99 176 ms) without, for a test-time-flip model (docs/serving.md).
    Keras, the SavedModel and ONNX Runtime pay a cost per call that batching shares out."""
    return 1 if fmt.startswith("litert") else DEFAULT_MAX_BATCH


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")

