"""``sweep bench``: the same trial the plain Keras Tuner way and ours, side by side, and whole sweeps our way.

The plain way is a stock Keras Tuner trial: ``kt.Tuner`` with its own ``run_trial`` (checkpointing, its
callbacks) and the family's model fitted on raw images every epoch. Our way is ``sweep run``'s trial loop with
everything it logs to MLflow; a family with a cached frozen base trains its head on the cached features.

Our sweeps run in child processes, one after the other, so each one's peak memory is its own: first with a
cold feature cache (a temporary folder), then again on the cache the first one filled (warm). The plain trials
run last, in this process. Nothing runs at the same time, so no figure borrows another's cores.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt

from search_spaces import make_hypermodel
from sweep import tracking
from sweep.config import TrackingSettings
from sweep.data import Splits
from sweep.errors import SweepError
from sweep.results import TrialRecord, best_record, record_from_run
from sweep.spec import SweepSpec
from sweep.study import Prepared
from sweep.tuning import build_oracle


class _EvaluatingHyperModel(kt.HyperModel):
    """Wraps a family: after the stock fit, scores the final model on the validation and test splits."""

    def __init__(self, family, splits: Splits, batch_size: int) -> None:
        super().__init__(name=family.name)
        self.family = family
        self.splits = splits
        self.batch_size = batch_size
        self.scores: list[dict[str, float]] = []

    def build(self, hp):
        return self.family.build(hp)

    def fit(self, hp, model, *args, **kwargs):
        started = time.monotonic()
        history = model.fit(*args, **kwargs)
        s = self.splits
        model = self.family.inference_model(model, hp.values)
        _, val = model.evaluate(s.validation.images, s.validation.labels, batch_size=self.batch_size, verbose=0)
        _, test = model.evaluate(s.test.images, s.test.labels, batch_size=self.batch_size, verbose=0)
        self.scores.append({"val_accuracy": float(val), "test_accuracy": float(test),
                            "seconds": time.monotonic() - started, "hyperparameters": dict(hp.values)})
        return history


@dataclass
class SweepFigures:
    """One of our sweeps, run in its own process."""

    label: str
    run_id: str
    wall_seconds: float
    setup_seconds: float  # feature cache built or loaded
    peak_rss_bytes: int
    records: list[TrialRecord]
    trial_seconds: dict[int, float]  # trial number -> wall time of its MLflow run
    objective: str

    @property
    def best(self) -> TrialRecord | None:
        return best_record(self.records, self.objective)

    @property
    def first(self) -> TrialRecord | None:
        return next((r for r in self.records if r.number == 1), None)


@dataclass
class BenchResult:
    family: str
    epochs: int
    trials: int
    plain: list[dict]
    plain_seconds: float
    plain_peak_rss_bytes: int
    sweeps: list[SweepFigures]
    baseline_accuracy: float


def plain_trials(spec: SweepSpec, splits: Splits, weights_path: str | None, trials: int, directory: Path,
                 verbose: int = 0) -> tuple[list[dict], float]:
    """Run ``trials`` stock Keras Tuner trials (the first is the family's defaults, with the spec's fixed
    hyperparameters); returns their scores and the time."""
    keras.utils.set_random_seed(spec.seed)
    family = make_hypermodel(spec.family, len(splits.class_names), splits.image_size, weights_path)
    hypermodel = _EvaluatingHyperModel(family, splits, spec.batch_size)
    tuner = kt.Tuner(oracle=build_oracle(replace(spec, tuner="random", trials=trials)), hypermodel=hypermodel,
                     directory=str(directory), project_name="plain", overwrite=True)
    started = time.monotonic()
    tuner.search(splits.train.images, splits.train.labels, batch_size=spec.batch_size,
                 epochs=spec.epochs, shuffle=True, verbose=verbose,
                 validation_data=(splits.validation.images, splits.validation.labels))
    return hypermodel.scores, time.monotonic() - started


def _settings_json(settings: TrackingSettings) -> str:
    return json.dumps({k: str(v) for k, v in asdict(settings).items()})


def _settings_from_json(text: str) -> TrackingSettings:
    values = json.loads(text)
    return TrackingSettings(**{k: Path(v) if k in ("artifact_root", "tuner_dir", "cache_dir") else v
                               for k, v in values.items()})


def run_child_sweep(spec: SweepSpec, settings: TrackingSettings, label: str, quiet: bool,
                    report: Callable[[str], None] = print) -> SweepFigures:
    """``sweep run``'s sweep in a child process (its lines go to ``report``); its wall time, peak RSS and
    trials (read back from MLflow)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        command = [sys.executable, "-c", _CHILD, json.dumps(spec.to_params()), _settings_json(settings),
                   out.name, "1" if quiet else "0"]
        started = time.monotonic()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in child.stdout:
                report(line.rstrip("\n"))
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.terminate()
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        if child.returncode != 0:
            raise SweepError(f"bench: our {label} sweep failed (exit {child.returncode}); its output is above.")
        produced = json.loads(Path(out.name).read_text())
    runs = tracking.child_runs(tracking.Store(settings).client, produced["experiment_id"], produced["run_id"])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return SweepFigures(label, produced["run_id"], wall, produced["setup_seconds"],
                        usage.ru_maxrss * 1024,  # kilobytes on Linux
                        sorted((record_from_run(r) for r in finished), key=lambda r: r.number),
                        {int(r.data.tags["trial_number"]): (r.info.end_time - r.info.start_time) / 1000
                         for r in finished}, spec.objective)


# The child imports TensorFlow quietly (as the CLI does) before this module brings Keras in.
_CHILD = ("import sys; from sweep.cli_common import quiet_tensorflow; quiet_tensorflow(); "
          "from sweep.bench import _child_main; _child_main(*sys.argv[1:5])")


def _child_main(spec_json: str, settings_json: str, out_path: str, quiet: str) -> None:
    """The child process: prepare and run one sweep, write what the parent reads."""
    from sweep.study import prepare, run_sweep

    sys.stdout.reconfigure(line_buffering=True)  # the parent shows each line as it comes
    spec = SweepSpec.from_params(json.loads(spec_json))
    settings = _settings_from_json(settings_json)
    prepared = prepare(spec, settings, report=print)
    result = run_sweep(spec, prepared, settings, print, 0 if quiet == "1" else 1, tags={"bench": "true"})
    Path(out_path).write_text(json.dumps({"run_id": result.run_id, "experiment_id": prepared.experiment_id,
                                          "setup_seconds": result.setup_seconds}))


def run_bench(spec: SweepSpec, prepared: Prepared, tracking_settings: TrackingSettings, plain: int, warm_only: bool,
              report: Callable[[str], None] = print, verbose: int = 0) -> BenchResult:
    """Our sweep with a cold cache then a warm one (or only the configured cache with ``warm_only``), each in
    its own process, then ``plain`` stock trials here."""
    sweeps = []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        if warm_only:
            phases = [("configured cache", tracking_settings)]
        else:
            cold = replace(tracking_settings, cache_dir=Path(tmp) / "feature_cache")
            phases = [("cold cache", cold), ("warm cache", cold)]
        for label, settings in phases:
            report(f"[bench] ours: {spec.trials} trial(s), {label} ...")
            sweeps.append(run_child_sweep(spec, settings, label, quiet=verbose == 0, report=report))
        report(f"[bench] plain Keras Tuner: {plain} trial(s) x {spec.epochs} epoch(s) on raw images ...")
        scores, plain_seconds = plain_trials(spec, prepared.splits, prepared.weights_path, plain, Path(tmp), verbose)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return BenchResult(spec.family_name, spec.epochs, spec.trials, scores, plain_seconds, peak, sweeps,
                       prepared.splits.baseline_accuracy)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def format_table(result: BenchResult) -> str:
    """The side-by-side table ``sweep bench`` prints."""
    plain_trial = result.plain[0]
    per_plain = result.plain_seconds / max(len(result.plain), 1)
    warm = result.sweeps[-1]
    ours_first = warm.first
    rows = [("", "wall time", "peak RSS", "val acc", "test acc")]
    rows.append(("plain Keras Tuner trial 1 (raw images)", _duration(plain_trial["seconds"]),
                 _gib(result.plain_peak_rss_bytes), f"{plain_trial['val_accuracy']:.1%}",
                 f"{plain_trial['test_accuracy']:.1%}"))
    if ours_first is not None:
        rows.append(("our trial 1 (same hyperparameters)", _duration(warm.trial_seconds[1]), "",
                     f"{ours_first.val_accuracy:.1%}", f"{ours_first.test_accuracy:.1%}"))
        others = [s for n, s in warm.trial_seconds.items() if n != 1]
        if others:
            rows.append((f"our other trials (min-median-max of {len(others)})",
                         "-".join(_duration(s) for s in (min(others), sorted(others)[len(others) // 2], max(others))),
                         "", "", ""))
    for sweep in result.sweeps:
        best = sweep.best
        rows.append((f"our {result.trials}-trial sweep, {sweep.label}", _duration(sweep.wall_seconds),
                     _gib(sweep.peak_rss_bytes), f"{best.val_accuracy:.1%}" if best else "",
                     f"{best.test_accuracy:.1%}" if best else ""))
        rows.append((f"  of which feature cache ({sweep.label})", _duration(sweep.setup_seconds), "", "", ""))
    rows.append((f"plain {result.trials}-trial sweep (projected {result.trials} x {_duration(per_plain)})",
                 _duration(per_plain * result.trials), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if ours_first is not None:
        ratio = plain_trial["seconds"] / max(warm.trial_seconds[1], 1e-9)
        whole = ", ".join(f"{s.label} {per_plain * result.trials / max(s.wall_seconds, 1e-9):.0f}x"
                          for s in result.sweeps)
        lines.append(f"per-trial speed-up (plain trial 1 / our trial 1): {ratio:.0f}x; whole sweep: {whole} "
                     f"(family {result.family}, {result.epochs} epochs a trial, baseline "
                     f"{result.baseline_accuracy:.1%})")
    return "\n".join(lines)


def cut_costs(family, train_images: int, validation_images: int, batch_size: int, views: int,
              report: Callable[[str], None] = print) -> list[dict]:
    """What fine-tuning from each cut point costs at the family's image size: the cached activations of
    ``train_images`` x ``views`` (float16), and the seconds of one fine-tuning epoch over ``train_images``
    (after a first, tracing epoch) and of scoring ``validation_images``. The activations are random: the
    cost depends on their shape only."""
    import numpy as np

    from feature_cache.finetune import CUT_LAYERS, CUTS, TopTrainer, view_logits

    base = family.build_base()
    rng = np.random.default_rng(0)
    values = {"pooling": "global_max", "dropout": 0.2, "learning_rate": 1e-3, "fine_tune_lr_factor": 0.1}
    rows = []
    for cut in CUT_LAYERS:
        shape = tuple(base.get_layer(CUT_LAYERS[cut]).output.shape[1:])
        steps = -(-train_images // batch_size)
        trainer = TopTrainer(base, cut, family.num_classes, steps, family.compile)
        head = [rng.normal(0, 0.02, (base.output_shape[-1], family.num_classes)).astype("float32"),
                np.zeros(family.num_classes, "float32")]
        model = trainer.reset(head, values, 0, steps=steps)
        x = rng.normal(size=(train_images, *shape)).astype("float32")
        y = rng.integers(0, family.num_classes, train_images)
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)  # traces the training step
        started = time.monotonic()
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
        epoch = time.monotonic() - started
        view_logits(model, [x[:validation_images]])
        started = time.monotonic()
        view_logits(model, [x[:validation_images]])
        scoring = time.monotonic() - started
        row = {"cut": cut, "offered": cut in CUTS, "activation": "x".join(map(str, shape)),
               "trained_parameters": sum(int(np.prod(v.shape)) for v in trainer.top.trainable_variables),
               "cache_gib": train_images * views * int(np.prod(shape)) * 2 / 2 ** 30,
               "epoch_seconds": epoch, "validation_seconds": scoring}
        rows.append(row)
        report(f"  {cut}: {row['activation']}, {row['cache_gib']:.2f} GiB, epoch {epoch:.1f}s, validation {scoring:.1f}s")
        del x
    return rows


def format_cut_costs(rows: list[dict], image_size: tuple[int, int], train_images: int, views: int) -> str:
    lines = [f"Fine-tuning cut points at {image_size[0]}x{image_size[1]} ({train_images} training images x {views} "
             "views cached, float16):", "",
             "| cut point | offered | activation per view | top's trained parameters | cache | s per epoch | "
             "s per validation |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cut']} | {'yes' if r['offered'] else 'no'} | {r['activation']} | "
                     f"{r['trained_parameters'] / 1e6:.2f} M | {r['cache_gib']:.2f} GiB | {r['epoch_seconds']:.1f} | "
                     f"{r['validation_seconds']:.1f} |")
    return "\n".join(lines)
