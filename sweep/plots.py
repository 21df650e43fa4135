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
                label=f"trial {record.number} ({record.val_accuracy:.1%})")
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
