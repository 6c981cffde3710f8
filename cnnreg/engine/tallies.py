"""What a pass over a split accumulates, kept on the device and read once.

The training step never waits for the host: loss sums, counts, the confusion
matrix and each metric's own state live in device tensors, updated in place,
and :meth:`Tallies.read` is the one synchronisation per pass. Progress
displays get the running loss through :class:`LossReader`, which copies it
without waiting.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from cnnreg.core import distributed
from cnnreg.core.records import EvalResult, Metric, Tally

class Tallies:
    """Device-side accumulators for one pass over a split: loss sum, count,
    confusion matrix, and each metric's own state. Read once, by :meth:`read`."""

    def __init__(self, num_classes: int, metrics: Sequence[tuple[str, Metric]], device: torch.device):
        self.num_classes = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.extra = [m.init(num_classes, device) if m.init else None for _, m in metrics]
        self.metrics = metrics
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def note_bad(self, bad: torch.Tensor, loss: torch.Tensor, index: int) -> torch.Tensor:
        """Remember the first batch whose loss was bad (not finite, or diverged) and that
        loss, on the device, without waiting; returns ``bad``."""
        first = (self.bad_step < 0) & bad
        self.bad_step.copy_(torch.where(first, index, self.bad_step))
        self.bad_loss.copy_(torch.where(first, loss.detach().float(), self.bad_loss))
        return bad

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        logits = logits.detach()
        n = targets.shape[0]
        self.loss_sum += loss.detach().double() * n
        self.count += n
        predicted = logits.argmax(dim=1)
        self.confusion += torch.bincount(targets * self.num_classes + predicted, minlength=self.num_classes ** 2)
        for (_, metric), state in zip(self.metrics, self.extra):
            if metric.update is not None:
                metric.update(state, logits, targets)

    def state(self) -> dict[str, Any]:
        # the first bad step too: interrupted just after one, the resumed epoch still stops there
        return {"loss_sum": self.loss_sum, "count": self.count, "confusion": self.confusion, "extra": self.extra,
                "bad_step": self.bad_step, "bad_loss": self.bad_loss}

    def load(self, state: dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.count.copy_(state["count"])
        self.confusion.copy_(state["confusion"])
        if "bad_step" in state:  # absent from states saved before it was kept
            self.bad_step.copy_(state["bad_step"])
            self.bad_loss.copy_(state["bad_loss"])
        for mine, saved in zip(self.extra, state["extra"]):
            if mine is not None:
                mine.copy_(saved)

    def all_reduce(self, dist: distributed.DistInfo) -> None:
        for tensor in [self.loss_sum, self.count, self.confusion, *[e for e in self.extra if e is not None]]:
            distributed.all_reduce(tensor, dist)

    def read(self, split: str, classes: tuple[str, ...]) -> EvalResult:
        """The one host synchronisation per pass."""
        confusion = self.confusion.view(self.num_classes, self.num_classes).cpu()
        count = int(self.count.item())
        loss = float(self.loss_sum.item()) / max(count, 1)
        metrics: dict[str, float] = {"loss": loss}
        per_class: dict[str, tuple[float, ...]] = {"support": tuple(float(v) for v in confusion.sum(1).tolist())}
        for (_, metric), extra in zip(self.metrics, self.extra):
            tally = Tally(confusion=confusion, loss_sum=loss * count, count=count,
                          extra=extra.cpu() if extra is not None else None)
            for name, value in metric.compute(tally).items():
                if isinstance(value, (list, tuple)):
                    per_class[name.removesuffix("_per_class")] = tuple(float(v) for v in value)
                else:
                    metrics[name] = float(value)
        return EvalResult(split=split, metrics=metrics, per_class=per_class,
                          confusion=tuple(tuple(int(v) for v in row) for row in confusion.tolist()), classes=classes)


class LossReader:
    """The latest finished value of a device scalar, read without waiting.

    The training loop never calls ``.item()``: every few hundred milliseconds
    it copies the running loss into pinned host memory (non-blocking) and
    records an event; the value is shown once the event says it arrived.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.float64, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False
        self.value: float | None = None

    def poll(self, loss_sum: torch.Tensor, count: torch.Tensor) -> float | None:
        if not self.cuda:
            n = int(count)
            return float(loss_sum) / n if n else None
        if self.pending and self.event.query():
            self.value = float(self.host[0]) / max(float(self.host[1]), 1.0)
            self.pending = False
        if not self.pending:
            self.host[0].copy_(loss_sum, non_blocking=True)
            self.host[1].copy_(count, non_blocking=True)
            self.event.record()
            self.pending = True
        return self.value
