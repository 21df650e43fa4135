"""``sweep loadtest``: how a running ``sweep serve`` holds up, measured from the client's side over loopback.

Two phases, bounded in requests and time: one client sending one image a request (latency), then ``clients``
concurrent clients for ``seconds`` (throughput, latency under load, errors). The server's resident memory is
read from its ``/metrics`` once a second, so "memory flat" is measured, not assumed. Each client keeps one
HTTP/1.1 connection open, as a real client library does.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from sweep.errors import SweepError
from sweep.serving import is_loopback

MEMORY_FROM = 10.0  # seconds into the throughput phase: memory is compared from here to its end
TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".bmp": "image/bmp",
         ".webp": "image/webp"}


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    errors: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


@dataclass
class LoadResult:
    single: Phase
    load: Phase
    clients: int
    memory: list[tuple[float, float]]  # (seconds into the load phase, resident MiB)

    @property
    def memory_change(self) -> float | None:
        """Relative change of the server's memory from ``MEMORY_FROM`` seconds to the end (None: too short)."""
        later = [m for t, m in self.memory if t >= MEMORY_FROM]
        if len(later) < 2:
            return None
        return (later[-1] - later[0]) / later[0]

    def table(self) -> str:
        s, l = self.single, self.load
        change = self.memory_change
        rows = [
            ("one client, one image a request", f"{len(s.latencies)} requests, {s.errors} errors",
             f"median {s.percentile(0.5) * 1000:.1f} ms, p99 {s.percentile(0.99) * 1000:.1f} ms",
             f"{s.rate:.0f} images/s"),
            (f"{self.clients} concurrent clients, {l.seconds:.0f} s", f"{len(l.latencies)} requests, {l.errors} errors",
             f"median {l.percentile(0.5) * 1000:.1f} ms, p99 {l.percentile(0.99) * 1000:.1f} ms",
             f"{l.rate:.0f} images/s"),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
        if change is not None:
            first = next(m for t, m in self.memory if t >= MEMORY_FROM)
            lines.append(f"server memory from second {MEMORY_FROM:.0f} to the end: {first:.0f} -> "
                         f"{self.memory[-1][1]:.0f} MiB ({change:+.1%})")
        return "\n".join(lines)


def image_bodies(paths: list[str]) -> list[tuple[bytes, str]]:
    from sweep.prediction import image_files  # the walk `sweep predict` does

    files = image_files([Path(p) for p in paths])
    bodies = [(f.read_bytes(), TYPES[f.suffix.lower()]) for f in files if f.suffix.lower() in TYPES]
    if not bodies:
        raise SweepError(f"no images (.jpg, .png, ...) in {', '.join(paths)}.")
    return bodies


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connection = http.client.HTTPConnection(host, port, timeout=30)

    def post(self, body: bytes, kind: str) -> bool:
        try:
            self.connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
            response = self.connection.getresponse()
            response.read()
            return response.status == 200
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
            return False

    def get(self, path: str) -> str:
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        return response.read().decode()


def resident_mib(text: str) -> float | None:
    found = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) / 2**20 if found else None


def run(url: str, images: list[str], clients: int = 16, seconds: float = 60.0, single: int = 200,
        report: Callable[[str], None] = print) -> LoadResult:
    """Measure the server at ``url`` (loopback only)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if not is_loopback(host):
        raise SweepError(f"the load test runs over loopback only; {host} is not this machine.")
    bodies = image_bodies(images)
    try:
        Client(host, port).get("/health")
    except OSError as exc:
        raise SweepError(f"no server answers at {host}:{port} ({exc.strerror or exc}); start one with "
                         "`sweep serve`.") from None

    report(f"One client, {single} requests ...")
    one = Phase()
    client = Client(host, port)
    started = time.monotonic()
    for i in range(single):
        body, kind = bodies[i % len(bodies)]
        sent = time.monotonic()
        if client.post(body, kind):
            one.latencies.append(time.monotonic() - sent)
        else:
            one.errors += 1
    one.seconds = time.monotonic() - started

    report(f"{clients} clients for {seconds:.0f} s ...")
    load, lock, memory = Phase(), threading.Lock(), []
    stop = threading.Event()
    start = time.monotonic()

    def work(k: int) -> None:
        mine, own = Client(host, port), []
        errors, i = 0, k
        while not stop.is_set():
            body, kind = bodies[i % len(bodies)]
            i += clients
            sent = time.monotonic()
            if mine.post(body, kind):
                own.append(time.monotonic() - sent)
            else:
                errors += 1
        with lock:
            load.latencies += own
            load.errors += errors

    def watch() -> None:
        probe = Client(host, port)
        while not stop.wait(1.0):
            try:
                mib = resident_mib(probe.get("/metrics"))
            except (OSError, http.client.HTTPException):
                continue
            if mib is not None:
                memory.append((time.monotonic() - start, mib))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)] + [threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    load.seconds = time.monotonic() - start
    return LoadResult(one, load, clients, memory)
