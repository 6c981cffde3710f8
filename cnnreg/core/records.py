"""Frozen records that pass between the engine and plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch


def infer_mode(metric: str) -> Literal["min", "max"]:
    """Whether a metric is better low or high: losses, errors and times are
    better low, everything else (accuracy, F1, AUC, ...) high."""
    return "min" if any(w in metric for w in ("loss", "error", "seconds", "lr")) else "max"


@dataclass(frozen=True)
class Schedule:
    """A learning-rate scheduler and how the engine drives it.

    :param scheduler: a ``torch.optim.lr_scheduler`` object.
    :param interval: ``"epoch"`` steps it after each epoch, ``"step"`` after
        each optimizer step.
    :param monitor: the metric passed to ``step()`` (ReduceLROnPlateau), e.g.
        ``"val_loss"``; ``None`` for schedules of time alone.
    """

    scheduler: Any
    interval: Literal["epoch", "step"] = "epoch"
    monitor: str | None = None


@dataclass(frozen=True)
class Tally:
    """What one pass over a split accumulated, read from the device once.

    :param confusion: int64 ``[C, C]``, rows are true classes, columns predictions.
    :param loss_sum: summed per-sample loss.
    :param count: number of samples.
    :param extra: this metric's own accumulator (see :attr:`Metric.update`), on the host.
    """

    confusion: torch.Tensor
    loss_sum: float
    count: int
    extra: torch.Tensor | None = None


@dataclass(frozen=True)
class Metric:
    """A metric the engine reports per split and epoch.

    Most classification metrics follow from the confusion matrix, which the
    engine always accumulates on the device; those need only ``compute``.
    A metric that needs the logits (top-k) also gives ``init``/``update``,
    which run on the device inside the step and must not synchronise.

    :param names: the scalar names ``compute`` returns (the engine prefixes the
        split, e.g. ``val_accuracy``); monitors are checked against them.
    :param compute: ``Tally -> {name: float or per-class list}``, on the host.
    :param init: ``(num_classes, device) -> accumulator tensor``.
    :param update: ``(accumulator, logits, targets) -> None``, in place.
    """

    names: tuple[str, ...]
    compute: Callable[[Tally], Mapping[str, float | list[float]]]
    init: Callable[[int, torch.device], torch.Tensor] | None = None
    update: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None


@dataclass(frozen=True)
class ProgressRecord:
    """Where an epoch stands, for progress displays."""

    epoch: int
    epochs: int
    step: int
    steps: int
    images: int
    seconds: float
    loss: float | None


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one pass over one split.

    :param split: "train", "val" or "test".
    :param metrics: scalar metrics without the split prefix (``loss``, ``accuracy``, ...).
    :param per_class: per-class lists (``precision``, ``recall``, ``f1``, ``support``).
    :param confusion: rows are true classes, columns predictions.
    :param classes: class names, index order.
    """

    split: str
    metrics: Mapping[str, float]
    per_class: Mapping[str, tuple[float, ...]]
    confusion: tuple[tuple[int, ...], ...]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's results.

    :param metrics: flat ``{split_metric: value}`` plus ``lr`` and ``epoch_seconds``.
    :param evals: each evaluated split's full result (per-class, confusion).
    """

    epoch: int
    epochs: int
    metrics: Mapping[str, float]
    evals: Mapping[str, EvalResult] = field(default_factory=dict)
    train_seconds: float = 0.0
    seconds: float = 0.0
    images_per_second: float = 0.0


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`cnnreg.fit`.

    :param records: one per epoch run (in this process, and before it when resumed).
    :param monitor: the metric that chooses the best epoch.
    :param best_epoch: the epoch with the best ``monitor`` value.
    :param stopped: why training ended ("completed", "early stopping: ...", "interrupted").
    :param train_seconds: wall time of training and evaluation, compilation excluded.
    :param compile_seconds: time spent compiling or capturing the step.
    :param run_dir: where the run's files are, if it has a directory.
    """

    records: tuple[EpochRecord, ...]
    monitor: str
    mode: Literal["min", "max"]
    best_epoch: int | None
    stopped: str
    train_seconds: float
    compile_seconds: float
    run_dir: Path | None = None

    @property
    def best(self) -> EpochRecord | None:
        return next((r for r in self.records if r.epoch == self.best_epoch), None)

    @property
    def last(self) -> EpochRecord | None:
        return self.records[-1] if self.records else None


@dataclass(frozen=True)
class Prediction:
    """The classes one image most likely belongs to, best first."""

    source: str
    classes: tuple[str, ...]
    indices: tuple[int, ...]
    confidences: tuple[float, ...]


@dataclass(frozen=True)
class Choice:
    """A value the recipe left out and the assembly chose.

    :param key: the dotted recipe key, e.g. ``data.size``.
    :param value: the JSON value written into the recipe.
    :param reason: what it follows (the model's preprocessing, the data).
    :param override: how to choose otherwise.
    """

    key: str
    value: Any
    reason: str
    override: str

    def __str__(self) -> str:
        return f"{self.key} = {_show(self.value)}: {self.reason}; {self.override}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "reason": self.reason, "override": self.override}


def _show(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, dict) and set(value) <= {"train", "eval"}:
        return "; ".join(f"{split}: " + ", ".join(t["name"] for t in value[split]) for split in value)
    return str(value)
