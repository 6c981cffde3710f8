"""Figures shared by the plots plugin and the TensorBoard callback: the confusion matrix
and the evaluation it shows. matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from cnnreg.core.records import EpochRecord, EvalResult

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

ANNOTATE_UP_TO = 20  # classes; beyond that the cells are too small to read numbers in


def confusion_figure(result: EvalResult, epoch: int | None = None) -> Figure:
    """The confusion matrix, rows normalised to the share of each true class,
    with the counts in the cells (up to 20 classes) and class names on the axes."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(result.confusion, dtype=np.int64).reshape(len(result.classes), len(result.classes))
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = len(result.classes)
    side = min(max(4.0, 0.45 * n + 2.5), 40.0)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    font = 8 if n <= 30 else 6 if n <= 60 else 4
    ax.set_xticks(range(n), labels=result.classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(range(n), labels=result.classes, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    when = f", epoch {epoch}" if epoch is not None else ""
    ax.set_title(f"confusion matrix ({result.split}{when}, {int(counts.sum())} images)")
    if n <= ANNOTATE_UP_TO:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{rates[i, j]:.0%}\n{counts[i, j]}", ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    return figure


def last_evaluation(records: Sequence[EpochRecord]) -> tuple[int, EvalResult] | None:
    """The latest validation result with its epoch, else the latest train result."""
    for split in ("val", "train"):
        for record in reversed(records):
            if split in record.evals:
                return record.epoch, record.evals[split]
    return None
