"""Figures of a finished fit: ``curves.png`` and ``confusion.png`` in the run directory.

A plugin, not a recipe callback: it runs for every fit with a run
directory, and ``cnnreg run --disable plots`` turns it off. It needs
matplotlib (``pip install 'cnnreg-framework[plots]'``); without it the
plugin does nothing and says nothing, since the figures are an optional
extra and every number in them is also in summary.json (and in
metrics.jsonl with the metrics_logger callback).

Figures are drawn on matplotlib's Agg canvas without pyplot: no display is
ever opened and no global backend is changed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from cnnreg.core import checkpoint
from cnnreg import hookimpl
from cnnreg.core.records import EpochRecord, FitResult
from cnnreg_plugins._figures import confusion_figure, last_evaluation

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from cnnreg.core.run import Run

CURVES = "curves.png"
CONFUSION = "confusion.png"


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def curves_figure(records: Sequence[EpochRecord]) -> Figure:
    """Loss and accuracy per epoch for train and val, and the learning rate."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = {name for r in records for name in r.metrics}
    panels = [("loss", "loss")]
    if "train_accuracy" in names or "val_accuracy" in names:
        panels.append(("accuracy", "accuracy"))
    panels.append(("lr", "learning rate"))
    figure = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    for ax, (metric, title) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        series = [("lr", "lr")] if metric == "lr" else [(f"{s}_{metric}", s) for s in ("train", "val")]
        for key, label in series:
            points = [(r.epoch, r.metrics[key]) for r in records if key in r.metrics]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
        if metric == "lr":
            lrs = [r.metrics["lr"] for r in records if "lr" in r.metrics]
            if lrs and min(lrs) > 0 and max(lrs) / min(lrs) > 20:
                ax.set_yscale("log")
        elif ax.lines:
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    """PNG, written atomically (a reader never sees half a file)."""
    checkpoint.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def write_plots(run_dir: Path, records: Sequence[EpochRecord]) -> list[Path]:
    """Write curves.png and confusion.png (the last val evaluation, else train's); returns the paths."""
    written = []
    if records:
        save_figure(curves_figure(records), run_dir / CURVES)
        written.append(run_dir / CURVES)
    evaluation = last_evaluation(records)
    if evaluation is not None:
        epoch, result = evaluation
        save_figure(confusion_figure(result, epoch), run_dir / CONFUSION)
        written.append(run_dir / CONFUSION)
    return written


@hookimpl
def cnnreg_fit_end(run: Run, result: FitResult) -> None:
    if run.run_dir is None or not run.is_main or not has_matplotlib():
        return
    try:
        write_plots(run.run_dir, result.records)
    except Exception as exc:  # noqa: BLE001 - a figure is never worth losing the run's summary, written next
        print(f"cnnreg: warning: plots: could not draw the figures: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
