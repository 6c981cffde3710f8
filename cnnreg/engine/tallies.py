"""What a pass over a split accumulates, kept on the device and read once.

The training step never waits for the host: loss sums, the confusion
matrix and each metric's own state live in device tensors, updated in place,
and :meth:`Tallies.read` is the one synchronisation per pass. Progress
displays get the running loss through :class:`LossReader`, which copies it
without waiting. The sample count is the confusion matrix's sum.

A training pass does even less per step (:meth:`Tallies.update_step`): each
step's loss is copied into its slot of a per-epoch buffer, and the loss sum
and the divergence check run over the slots in one go (:meth:`Tallies.settle`:
at the epoch's end, before a checkpoint and at a progress poll). On a GPU at
small batches a step is bound by kernel launches, so a dozen small kernels
per step for bookkeeping would show (tests/test_step_ops.py counts them).
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
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.extra = [m.init(num_classes, device) if m.init else None for _, m in metrics]
        self.metrics = metrics
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.step_losses: torch.Tensor | None = None  # training: one slot per step of the epoch
        self._settled = self._written = 0  # slots [_settled, _written) are written but not yet summed
        self._sizes: list[int] = []  # their batch sizes (host ints: the shapes, no device read)

    @property
    def count(self) -> torch.Tensor:
        """Samples tallied so far (a device scalar): every one is in exactly one cell of the matrix."""
        return self.confusion.sum()

    def track_steps(self, steps: int, start: int = 0) -> None:
        """Keep a slot for each of an epoch's ``steps`` training steps, from ``start`` on (a resumed epoch)."""
        self.step_losses = torch.zeros(steps, dtype=torch.float32, device=self.device)
        self._settled = self._written = start
        self._sizes = []

    def update_step(self, index: int, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        """A training step's tallies: its loss into slot ``index``, its predictions into the matrix.

        Slots are written in order; :meth:`settle` sums them. About five
        operations, against a dozen for :meth:`update` plus a per-step guard.
        """
        assert self.step_losses is not None and index == self._written, "track_steps first, one slot after another"
        with torch.no_grad():
            self.step_losses[index].copy_(loss)
            self._count_predictions(logits, targets)
        self._sizes.append(targets.shape[0])
        self._written = index + 1

    def settle(self, guard: Any) -> None:
        """Fold the written slots into the loss sum, and note the first bad step among them.

        ``guard`` is the run's :class:`~cnnreg.engine.step.LossGuard`: it
        judges the slots' losses as it would one by one (and takes its
        reference from the run's first finite loss, when it has none yet).
        """
        a, b = self._settled, self._written
        if self.step_losses is None or b == a:
            return
        losses = self.step_losses[a:b]
        self.note_first_bad(guard.bad_of(losses), losses, a)
        size = self._sizes[0]
        weights = torch.full((b - a,), float(size), dtype=torch.float64, device=self.device)
        for slot, n in enumerate(self._sizes):
            if n != size:  # the epoch's last, smaller batch
                weights[slot] = float(n)
        self.loss_sum += (losses.double() * weights).sum()
        self._settled, self._sizes = b, []

    def note_first_bad(self, bad: torch.Tensor, losses: torch.Tensor, start: int) -> None:
        """:meth:`note_bad` for the steps ``start, start + 1, ...`` at once."""
        first = bad.int().argmax()  # the first True (argmax returns the first of equal maxima)
        new = (self.bad_step < 0) & bad.any()
        self.bad_step.copy_(torch.where(new, first + start, self.bad_step))
        self.bad_loss.copy_(torch.where(new, losses[first].float(), self.bad_loss))

    def note_bad(self, bad: torch.Tensor, loss: torch.Tensor, index: int) -> torch.Tensor:
        """Remember the first batch whose loss was bad (not finite, or diverged) and that
        loss, on the device, without waiting; returns ``bad``."""
        self.note_first_bad(bad.reshape(1), loss.detach().reshape(1), index)
        return bad

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        """A batch's tallies, its mean ``loss`` counted once per sample."""
        with torch.no_grad():
            self.loss_sum.add_(loss, alpha=targets.shape[0])  # in float64: exact far past float32's 2**24
            self._count_predictions(logits, targets)

    def _count_predictions(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        cells = logits.argmax(dim=1).add_(targets, alpha=self.num_classes)  # row: true class, column: predicted
        self.confusion += torch.bincount(cells, minlength=self.num_classes ** 2)
        for (_, metric), state in zip(self.metrics, self.extra):
            if metric.update is not None:
                metric.update(state, logits, targets)

    def state(self) -> dict[str, Any]:
        # the first bad step too: interrupted just after one, the resumed epoch still stops there
        assert self._settled == self._written, "settle before saving: written slots are not in loss_sum yet"
        return {"loss_sum": self.loss_sum, "count": self.count, "confusion": self.confusion, "extra": self.extra,
                "bad_step": self.bad_step, "bad_loss": self.bad_loss}

    def load(self, state: dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.confusion.copy_(state["confusion"])  # the count is its sum
        if "bad_step" in state:  # absent from states saved before it was kept
            self.bad_step.copy_(state["bad_step"])
            self.bad_loss.copy_(state["bad_loss"])
        for mine, saved in zip(self.extra, state["extra"]):
            if mine is not None:
                mine.copy_(saved)

    def all_reduce(self, dist: distributed.DistInfo) -> None:
        for tensor in [self.loss_sum, self.confusion, *[e for e in self.extra if e is not None]]:
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
