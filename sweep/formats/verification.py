"""Verification of a written format: run it in its own runtime on the sweep's test split beside the Keras model
it came from, measure it (size, batch-1 latency, images/s), and print and record the figures."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sweep.formats.catalog import FORMATS, load
from sweep.formats.runtimes import THROUGHPUT_BATCH, Runtime

LATENCY_WARMUP, LATENCY_RUNS = 5, 30


@dataclass
class Verification:
    """One format's figures on the test split, beside the Keras model's."""

    format: str
    runtime: str
    path: str
    size_bytes: int
    accuracy: float
    keras_accuracy: float
    agreement: float
    same_twice: bool
    latency_ms_median: float
    latency_ms_p95: float
    images_per_s: float
    min_agreement: float
    max_gap: float
    passed: bool
    problem: str = ""

    def metrics(self) -> dict[str, float]:
        """MLflow metrics for the trial's run: ``export_<format>_<figure>``."""
        p = f"export_{self.format}_"
        return {p + "accuracy": self.accuracy, p + "agreement": self.agreement, p + "size_mb": self.size_bytes / 1e6,
                p + "latency_ms_median": self.latency_ms_median, p + "latency_ms_p95": self.latency_ms_p95,
                p + "images_per_s": self.images_per_s}


def size_on_disk(path: Path) -> int:
    """The bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _logits(runtime: Runtime, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Logits of ``images`` in batches of 32, and the images per second of that pass."""
    started = time.perf_counter()
    out = np.concatenate([runtime(images[i:i + THROUGHPUT_BATCH]) for i in range(0, len(images), THROUGHPUT_BATCH)])
    return out, len(images) / (time.perf_counter() - started)


def verify(name: str, path: Path, images: np.ndarray, labels: np.ndarray, keras_classes: np.ndarray) -> Verification:
    """Run ``path`` in its runtime on the test split: accuracy, agreement with the Keras model's classes, the same
    logits for the same input twice, size, batch-1 latency (median and p95 after warm-up), images/s at batch 32.

    Raises:
        SweepError: the runtime is not installed, or ``path`` is not a model it can read.
    """
    fmt = FORMATS[name]
    runtime = load(name, path)
    first, _ = _logits(runtime, images)  # also the warm-up of the batch-32 path
    second, images_per_s = _logits(runtime, images)
    for i in range(LATENCY_WARMUP):
        runtime(images[i % len(images)][None])
    times = []
    for i in range(LATENCY_RUNS):
        x = images[i % len(images)][None]
        started = time.perf_counter()
        runtime(x)
        times.append((time.perf_counter() - started) * 1000)
    classes = first.argmax(axis=1)
    accuracy = float(np.mean(classes == labels))
    keras_accuracy = float(np.mean(keras_classes == labels))
    agreement = float(np.mean(classes == keras_classes))
    same_twice = bool(np.array_equal(first, second))
    problems = []
    if agreement < fmt.min_agreement:
        problems.append(f"agrees with Keras on {agreement:.1%} of the test images (needs {fmt.min_agreement:.1%})")
    if abs(accuracy - keras_accuracy) * 100 > fmt.max_gap + 1e-9:
        problems.append(f"accuracy {accuracy:.2%} against Keras' {keras_accuracy:.2%} (more than {fmt.max_gap:g} "
                        "points apart)")
    if not same_twice:
        problems.append(f"answers the same images differently twice (by up to {np.abs(first - second).max():.3g})")
    times.sort()
    return Verification(
        format=name, runtime=fmt.runtime, path=Path(path).name, size_bytes=size_on_disk(path), accuracy=accuracy,
        keras_accuracy=keras_accuracy, agreement=agreement, same_twice=same_twice,
        latency_ms_median=statistics.median(times), latency_ms_p95=float(np.percentile(times, 95)),
        images_per_s=images_per_s, min_agreement=fmt.min_agreement, max_gap=fmt.max_gap, passed=not problems,
        problem="; ".join(problems))


def table(rows: Sequence[Verification], test_images: int) -> str:
    """The formats table as printed (and as the README shows it)."""
    head = (f"{'format':<12} {'runtime':<29} {'size':>8} {'accuracy':>9} {'agreement':>9} {'same twice':>10} "
            f"{'batch-1 median / p95':>20} {'images/s':>8}")
    lines = [f"Formats, verified on the sweep's {test_images} test images (agreement: the predicted class equals "
             "Keras'; images/s at batch 32):", head]
    for r in rows:
        lines.append(f"{r.format:<12} {r.runtime:<29} {r.size_bytes / 1e6:>5.1f} MB {r.accuracy:>9.2%} "
                     f"{r.agreement:>9.1%} {'yes' if r.same_twice else 'NO':>10} "
                     f"{r.latency_ms_median:>9.1f} / {r.latency_ms_p95:>5.1f} ms {r.images_per_s:>8.0f}"
                     f"{'' if r.passed else '  FAILED'}")
    return "\n".join(lines)


def record(rows: Sequence[Verification], test_images: int, verified: bool, formats: Sequence[str]) -> dict:
    """What ``formats.json`` holds: every format's file and, when verified, its figures and thresholds."""
    import platform

    return {
        "verified": verified,
        "test_images": test_images,
        "input": "float32 RGB 0-255, NHWC at the sweep's image size, any batch size; output: logits",
        "machine": {"processor": _cpu_name() or platform.processor(), "cores": os.cpu_count()},
        "formats": ([asdict(r) for r in rows] if verified
                    else [{"format": f, "path": FORMATS[f].filename} for f in formats]),
    }


def _cpu_name() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (Linux), else ""."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
