"""One or more family sweeps over the same data: validate everything first, then train.

All checks that can fail on user input (data layout, weights, tracking store) run before the first MLflow
run is created, so bad input leaves nothing half-written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sweep.config import SweepSettings, TrackingSettings
from sweep.data import Splits
from sweep.errors import SweepError

Reporter = Callable[[str], None]


@dataclass
class Prepared:
    """Everything a sweep needs that is checked or loaded once: data, weights file, experiment."""

    splits: Splits
    weights_path: str | None
    experiment_id: str


def prepare(first: SweepSettings, tracking_settings: TrackingSettings, need_weights: bool,
            report: Reporter = print) -> Prepared:
    """Check data, weights and the tracking store, then decode the images once.

    Raises:
        SweepError: bad data, weights or tracking settings.
    """
    from search_spaces import resolve_weights
    from sweep import tracking
    from sweep.data import DATASET_URL, check_layout, download_dataset, load_splits

    data_dir = first.data_dir if first.data_dir is not None else download_dataset()
    check_layout(data_dir)  # fail in a second, before decoding thousands of images
    weights_path = resolve_weights(first.weights, first.image_size) if need_weights else None
    experiment_id = tracking.use_experiment(tracking_settings)
    report(f"Loading images from {data_dir} ...")
    source = str(first.data_dir) if first.data_dir is not None else DATASET_URL
    splits = load_splits(data_dir, first.image_size, first.batch_size, first.seed, source=source)
    if splits.skipped:
        shown = "\n  ".join(splits.skipped[:20]) + ("\n  ..." if len(splits.skipped) > 20 else "")
        report(f"Warning: skipped {len(splits.skipped)} unreadable file(s) (listed in the sweep's data.json):\n  {shown}")
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in splits.counts().items())
    report(f"Classes {', '.join(splits.class_names)}; images: {counts}; "
           f"baseline (always '{splits.class_names[splits.majority_class]}') {splits.baseline_accuracy:.1%}")
    return Prepared(splits, weights_path, experiment_id)


def run_study(settings: list[SweepSettings], tracking_settings: TrackingSettings, report: Reporter = print):
    """Run each family's sweep in turn on one decoded copy of the data.

    Args:
        settings: one entry per family, sharing data options (data dir, image size, batch size, seed).
        tracking_settings: the MLflow store and experiment.
        report: receives progress lines.

    Returns:
        A list of ``SweepResult``, one per family.

    Raises:
        SweepError: bad data, weights or tracking settings, or a sweep that stopped on failures.
    """
    from sweep.tuning import run_sweep

    if not settings:
        raise SweepError("no family to sweep.")
    prepared = prepare(settings[0], tracking_settings, any(s.family == "transfer" for s in settings), report)
    return [run_sweep(s, prepared.splits, tracking_settings, prepared.experiment_id, prepared.weights_path, report)
            for s in settings]
