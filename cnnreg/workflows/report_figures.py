"""The run report's pictures, as PNG bytes: figures drawn with matplotlib, image tiles with Pillow.

Figures are drawn on matplotlib's Agg canvas without pyplot (no display is
opened and no global backend is changed), as the plots plugin does; the
report inlines every PNG as a ``data:`` URI, so the page is one file.
"""

from __future__ import annotations

import importlib.util
import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from cnnreg.core.errors import UserError
from cnnreg.core.records import EpochRecord

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from cnnreg.workflows.calibration import ReliabilityBin

PLOTS_HINT = "pip install 'cnnreg-framework[plots]'"
TILE = 128  # px: the gallery's images are shown at least this large (CIFAR's 32 px are 4x)


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"the run report draws its figures with matplotlib, which is not installed: {PLOTS_HINT}")


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _epoch_axis(ax) -> None:  # noqa: ANN001 - a matplotlib Axes
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def curves_figure(records: Sequence[EpochRecord]) -> Figure:
    """Loss and accuracy per epoch, train and val, and the learning rate."""
    from matplotlib.figure import Figure

    names = {name for r in records for name in r.metrics}
    panels = ["loss"] + (["accuracy"] if {"train_accuracy", "val_accuracy"} & names else []) + ["lr"]
    figure = Figure(figsize=(4.0 * len(panels), 3.2), layout="constrained")
    for ax, metric in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        keys = [("lr", "lr")] if metric == "lr" else [(f"{s}_{metric}", s) for s in ("train", "val")]
        for key, label in keys:
            points = [(r.epoch, r.metrics[key]) for r in records if key in r.metrics]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        lrs = [r.metrics["lr"] for r in records if r.metrics.get("lr", 0) > 0]
        if metric == "lr" and lrs and max(lrs) / min(lrs) > 20:
            ax.set_yscale("log")
        elif metric != "lr" and ax.lines:
            ax.legend()
        ax.set_title("learning rate" if metric == "lr" else metric)
        _epoch_axis(ax)
    return figure


def overlaid_curves_figure(runs: Sequence[tuple[str, Sequence[EpochRecord]]], metrics: Sequence[str]) -> Figure:
    """One panel per metric, one line per run: a sweep's trials or a k-fold's folds side by side."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6 * len(metrics), 3.4), layout="constrained")
    for ax, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for label, records in runs:
            points = [(r.epoch, r.metrics[metric]) for r in records if metric in r.metrics]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=2, label=label)
        if ax.lines and len(ax.lines) <= 12:
            ax.legend(fontsize=7)
        ax.set_title(metric)
        _epoch_axis(ax)
    return figure


def confusion_figure(counts: np.ndarray, classes: Sequence[str], split: str) -> Figure:
    """The matrix twice: counts, and each row normalised to the share of its true class."""
    from matplotlib.figure import Figure

    n = len(classes)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(max(3.6, 0.42 * n + 2.2), 12.0)
    figure = Figure(figsize=(2 * side + 1.5, side), layout="constrained")
    font = 8 if n <= 12 else 6
    for ax, values, title, fmt in zip(figure.subplots(1, 2), (counts, rates), ("counts", "normalised by true class"),
                                      ("{:d}", "{:.0%}")):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
        ax.set_yticks(range(n), labels=classes, fontsize=font)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{title} ({split}, {int(counts.sum())} images)", fontsize=9)
        top = float(values.max()) or 1.0
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    value = values[i, j]
                    ax.text(j, i, fmt.format(int(value) if fmt == "{:d}" else float(value)), ha="center",
                            va="center", fontsize=7, color="white" if value > top / 2 else "black")
    return figure


def reliability_figure(before: Sequence[ReliabilityBin], after: Sequence[ReliabilityBin] | None,
                       temperature: float | None) -> Figure:
    """Accuracy against confidence per bin (the diagonal is a calibrated model), before and after T."""
    from matplotlib.figure import Figure

    panels = [("as trained", before)] + ([(f"with T = {temperature:.3f}", after)] if after is not None else [])
    figure = Figure(figsize=(3.8 * len(panels), 3.6), layout="constrained")
    for ax, (title, bins) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        filled = [b for b in bins if b.count]
        width = bins[0].high - bins[0].low if bins else 0.1
        ax.bar([b.low for b in filled], [b.accuracy for b in filled], width=width, align="edge",
               edgecolor="#1f4e79", color="#6fa8dc", label="accuracy")
        ax.bar([b.low for b in filled], [b.confidence - b.accuracy for b in filled], bottom=[b.accuracy for b in filled],
               width=width, align="edge", color="none", edgecolor="#cc0000", hatch="//", label="gap")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return figure


# -- image tiles -------------------------------------------------------------------------------


def _scale(image: torch.Tensor, size: int = TILE) -> torch.Tensor:
    """uint8 ``[C, H, W]`` at least ``size`` px on its shorter side: small images by whole
    multiples, nearest neighbour (a 32 px image's pixels stay sharp squares)."""
    h, w = image.shape[-2:]
    factor = max(1, -(-size // min(h, w)))
    if factor == 1:
        return image
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _png_of(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(array[..., 0], mode="L") if array.shape[-1] == 1 else Image.fromarray(array, mode="RGB")
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tile(image: torch.Tensor) -> bytes:
    """A PNG of a uint8 ``[C, H, W]`` image (1 channel: gray; 3: RGB), scaled up when small."""
    return _png_of(_scale(image.cpu()).permute(1, 2, 0).contiguous().numpy())


def cam_tile(image: torch.Tensor, cam: torch.Tensor, alpha: float = 0.45) -> bytes:
    """A PNG of the image with its Grad-CAM map over it (the jet colour map; red: most evidence)."""
    from matplotlib import colormaps

    big = _scale(image.cpu())
    h, w = big.shape[-2:]
    heat = torch.nn.functional.interpolate(cam[None, None].float().cpu(), size=(h, w), mode="bilinear",
                                           align_corners=False)[0, 0]
    top = float(heat.max())
    heat = (heat / top) if top > 0 else heat
    colours = colormaps["jet"](heat.numpy())[..., :3]
    base = big.permute(1, 2, 0).float().numpy() / 255.0
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, axis=-1)
    blended = (1 - alpha) * base + alpha * colours
    return _png_of((blended * 255).round().clip(0, 255).astype(np.uint8))
