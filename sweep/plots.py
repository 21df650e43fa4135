"""Matplotlib figures drawn from plain records; nothing here queries MLflow or Keras Tuner."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sweep.results import TrialRecord


def _epochs(values: list[float], start: int = 1) -> list[int]:
    return list(range(start, start + len(values)))


def _baseline(ax, baseline: float) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(baseline, color="grey", linestyle="--", linewidth=1.2, label=f"baseline {baseline:.1%}")


def plot_accuracy(record: TrialRecord, baseline: float) -> Figure:
    """Training and validation accuracy per epoch of one trial, over the majority-class baseline."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    train, val = record.history.get("accuracy", []), record.history.get("val_accuracy", [])
    ax.plot(_epochs(train, record.first_epoch), train, marker="o", markersize=3, label="training accuracy")
    ax.plot(_epochs(val, record.first_epoch), val, marker="o", markersize=3, label="validation accuracy")
    _baseline(ax, baseline)
    for stage, epoch in record.stages.items():
        ax.axvline(epoch - 0.5, color="tab:purple", linestyle="--", linewidth=1,
                   label=f"{stage.replace('_', '-')} from epoch {epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{record.family} trial {record.number}: test accuracy {record.test_accuracy:.1%}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_trials(records: list[TrialRecord], baseline: float, title: str) -> Figure:
    """Every trial's validation accuracy per epoch on one chart, over the baseline."""
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for record in records:
        val = record.history.get("val_accuracy", [])
        ax.plot(_epochs(val, record.first_epoch), val, linewidth=1.2, alpha=0.85,
                label=f"trial {record.number} ({record.val_accuracy:.1%}, loss {record.val_loss:.3f})")
    _baseline(ax, baseline)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(records) <= 20:
        ax.legend(loc="lower right", fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def plot_report(rows: list[tuple[str, float, float]], baseline: float, title: str) -> Figure:
    """Grouped bars of each family's best validation and test accuracy, with the baseline line."""
    fig = Figure(figsize=(8, 4.8), dpi=100)
    ax = fig.add_subplot()
    names = [r[0] for r in rows]
    xs = range(len(rows))
    val = ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="validation")
    test = ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="test")
    for bars in (val, test):
        ax.bar_label(bars, labels=[f"{b.get_height():.1%}" for b in bars], fontsize="small", padding=2)
    ax.axhline(baseline, color="grey", linestyle="--", linewidth=1.2, label=f"baseline {baseline:.1%}")
    ax.set_xticks(list(xs), names)
    ax.set_xlim(-0.6, max(len(rows), 4) - 0.4)  # fewer than the study's four families: bars keep their width
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy of the best trial")
    ax.set_title(f"{title}: best trial per family against the baseline")
    # below the axes: bars of accurate models reach the top, where a legend inside would cover them
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def plot_importances(importances: dict[str, dict[str, float]], title: str) -> Figure:
    """One panel per family: its hyperparameters' importance (fANOVA share), largest at the top."""
    fig = Figure(figsize=(max(4 * len(importances), 7), 3.6), dpi=100)  # wide enough for the title
    for i, (family, shares) in enumerate(importances.items()):
        ax = fig.add_subplot(1, len(importances), i + 1)
        names = list(shares)[::-1]
        ax.barh(names, [shares[n] for n in names], color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the variance")
        ax.set_title(family)
    fig.suptitle(f"{title}: which hyperparameters mattered (fANOVA)")
    fig.tight_layout()
    return fig


def plot_samples(images, labels, class_names, per_class: int = 3) -> Figure:
    """A row per class with its first ``per_class`` images (the study's two-row grid for two classes)."""
    import numpy as np

    fig = Figure(figsize=(2.4 * per_class, 2.5 * len(class_names)), dpi=100)
    for row, name in enumerate(class_names):
        picks = np.flatnonzero(labels == row)[:per_class]
        for col, index in enumerate(picks):
            ax = fig.add_subplot(len(class_names), per_class, row * per_class + col + 1)
            ax.imshow(images[index].astype("uint8"))
            ax.set_title(name)
            ax.axis("off")
    fig.tight_layout()
    return fig


def plot_augmentations(image, flips, rotations, rotation_factor: float) -> Figure:
    """The original image, then RandomFlip draws on one row and RandomRotation draws on the next."""
    cols = 1 + max(len(flips), len(rotations))
    fig = Figure(figsize=(2.3 * cols, 5), dpi=100)
    for row, (title, views) in enumerate((("RandomFlip", flips), (f"RandomRotation({rotation_factor})", rotations))):
        ax = fig.add_subplot(2, cols, row * cols + 1)
        ax.imshow(image.astype("uint8"))
        ax.set_title("original")
        ax.axis("off")
        for col, view in enumerate(views):
            ax = fig.add_subplot(2, cols, row * cols + col + 2)
            ax.imshow(view.clip(0, 255).astype("uint8"))
            ax.set_title(title, fontsize="small")
            ax.axis("off")
    fig.tight_layout()
    return fig
