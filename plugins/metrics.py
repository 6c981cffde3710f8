"""Classification metrics, computed once per epoch from what the engine tallied.

The engine accumulates the confusion matrix (rows true classes, columns
predictions) on the device for every split, so most metrics are a few host
operations on it at the epoch's end. ``top_k`` needs the logits: it keeps its
own hit counter on the device, updated in place inside the step.

Names, as a recipe's monitor spells them, prefix the split: ``val_accuracy``,
``val_precision``, ``val_recall``, ``val_f1``, ``val_balanced_accuracy``,
``val_top5_accuracy``. ``precision``, ``recall`` and ``f1`` are macro averages;
the per-class values come under ``<name>_per_class`` as lists in class order
(for the per-class table, not for monitors).

Conventions (those of scikit-learn with ``zero_division=0``): a class's
precision is 0 when nothing was predicted as it, its recall 0 when it has no
samples, its F1 0 when both are 0. Macro averages take the classes that occur
in the split, as a true class or as a prediction (scikit-learn's default
``labels``): a class absent from a small validation split and never predicted
does not drag the average down. Balanced accuracy is the mean recall over the
classes with samples. A split with no samples scores 0.
"""

from __future__ import annotations

from typing import Annotated, Mapping

import torch
from pydantic import Field

from cnnreg import hookimpl
from cnnreg.core.records import Metric, Tally


def accuracy() -> Metric:
    """Share of samples whose predicted class is the true one."""
    return Metric(names=("accuracy",), compute=_accuracy)


def precision() -> Metric:
    """Macro-averaged precision, plus each class's under precision_per_class."""
    return Metric(names=("precision",), compute=_precision)


def recall() -> Metric:
    """Macro-averaged recall, plus each class's under recall_per_class."""
    return Metric(names=("recall",), compute=_recall)


def f1() -> Metric:
    """Macro-averaged F1 score, plus each class's under f1_per_class."""
    return Metric(names=("f1",), compute=_f1)


def balanced_accuracy() -> Metric:
    """Mean recall over the classes present: accuracy that every class weighs equally in."""
    return Metric(names=("balanced_accuracy",), compute=_balanced_accuracy)


def top_k(k: Annotated[int, Field(ge=1)] = 5) -> Metric:
    """Share of samples whose true class is among the k highest logits (named top<k>_accuracy).

    Args:
        k: how many of the highest-scoring classes count; with fewer classes
            than k every sample counts.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k!r}")
    name = f"top{k}_accuracy"

    def update(hits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        hits += (top == targets.unsqueeze(1)).any(dim=1).sum()

    def compute(tally: Tally) -> Mapping[str, float]:
        hits = 0.0 if tally.extra is None else float(tally.extra.sum())
        return {name: _ratio(hits, tally.count)}

    return Metric(names=(name,), compute=compute, init=_counter, update=update)


@hookimpl
def cnnreg_metrics():
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "balanced_accuracy": balanced_accuracy,
        "top_k": top_k,
    }


# -- from the confusion matrix ---------------------------------------------------


def _accuracy(tally: Tally) -> Mapping[str, float]:
    confusion = _float(tally)
    return {"accuracy": _ratio(confusion.trace().item(), confusion.sum().item())}


def _precision(tally: Tally) -> Mapping[str, float | list[float]]:
    tp, predicted, _ = _counts(tally)
    return _macro("precision", _safe_divide(tp, predicted), _occurring(tally))


def _recall(tally: Tally) -> Mapping[str, float | list[float]]:
    tp, _, actual = _counts(tally)
    return _macro("recall", _safe_divide(tp, actual), _occurring(tally))


def _f1(tally: Tally) -> Mapping[str, float | list[float]]:
    # 2PR / (P + R) == 2TP / (2TP + FP + FN) == 2TP / (predicted + actual).
    tp, predicted, actual = _counts(tally)
    return _macro("f1", _safe_divide(2 * tp, predicted + actual), _occurring(tally))


def _balanced_accuracy(tally: Tally) -> Mapping[str, float]:
    tp, _, actual = _counts(tally)
    present = actual > 0
    recall = _safe_divide(tp, actual)
    return {"balanced_accuracy": recall[present].mean().item() if present.any() else 0.0}


def _float(tally: Tally) -> torch.Tensor:
    return tally.confusion.detach().to("cpu", torch.float64)


def _counts(tally: Tally) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: true positives, times predicted (column sums), samples (row sums)."""
    confusion = _float(tally)
    return confusion.diagonal(), confusion.sum(dim=0), confusion.sum(dim=1)


def _occurring(tally: Tally) -> torch.Tensor:
    """Classes that occur in the split, as a true class or as a prediction."""
    _, predicted, actual = _counts(tally)
    return (predicted + actual) > 0


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Elementwise ratio, 0 where the denominator is 0 (zero_division=0)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))


def _macro(name: str, per_class: torch.Tensor, occurring: torch.Tensor) -> dict[str, float | list[float]]:
    macro = per_class[occurring].mean().item() if occurring.any() else 0.0
    return {name: macro, f"{name}_per_class": per_class.tolist()}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _counter(num_classes: int, device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)
