"""The training step, and one epoch of it.

A step, as airbench or nanoGPT write it: prepare the batch, forward and
backward under autocast, and every ``trainer.accumulate`` batches clip and
step the optimizer (and a per-step schedule). Everything else the loop does
per batch is one call each: the running tallies, a throttled progress
report, the signal check. Nothing here reads a value back from the device
(``tests/test_no_sync.py``), except the opt-in ``on_nan: "skip"``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from cnnreg.core.device import autocast, input_dtype
from cnnreg.core.distributed import DistInfo, any_rank
from cnnreg.core.records import ProgressRecord
from cnnreg.core.run import Run
from cnnreg.core.stops import NonFiniteLoss, OutOfMemory
from cnnreg.engine.tallies import LossReader, Tallies
from cnnreg.inputs.prepare import prepare_batch, prepare_training_batch
from cnnreg.plugin.events import emit, listens

PROGRESS_INTERVAL = 0.25  # seconds between progress hook calls


@dataclass
class Timing:
    """Compilation and training time, kept apart: the first step of a compiled
    model (and its first evaluation batch) is compilation, not training."""

    measure_first: bool
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    compiled_train: bool = False
    compiled_eval: bool = False

    def first_batch_done(self, device: torch.device, start: float, split: str) -> None:
        """Count the time since ``start`` as compilation, once per kind of pass, when compiling."""
        done = self.compiled_train if split == "train" else self.compiled_eval
        if self.measure_first and not done:
            self.compile_seconds += synchronized_since(device, start)
            if split == "train":
                self.compiled_train = True
            else:
                self.compiled_eval = True


class LossGuard:
    """Divergence, on the device: a step whose loss is NaN, infinite, or above
    ``factor`` times the run's first loss (at least 1) is bad, as ``trainer.divergence`` says.

    The first loss is kept as a device tensor, set without a host read at the
    first step, and saved with the training state so a resumed run keeps its reference.
    """

    def __init__(self, factor: float, device: torch.device):
        self.factor = float(factor)
        self.reference = torch.full((), -1.0, dtype=torch.float32, device=device)

    def bad(self, loss: torch.Tensor) -> torch.Tensor:
        """bool tensor: this step's loss has diverged (or is not finite)."""
        return self.bad_of(loss.reshape(1)).reshape(())

    def bad_of(self, losses: torch.Tensor) -> torch.Tensor:
        """:meth:`bad` for consecutive steps' losses at once (``[n]``): the same answers as one by one.

        Without a reference yet, it is the first finite loss among them; the
        steps before it are not finite, so they are bad either way.
        """
        losses = losses.detach().float()
        finite = torch.isfinite(losses)
        first = losses[finite.int().argmax()]
        self.reference.copy_(torch.where((self.reference < 0) & finite.any(), first, self.reference))
        if self.factor <= 0:
            return ~finite
        return ~finite | (losses > self.factor * self.reference.clamp(min=1.0))

    def reference_value(self) -> float | None:
        value = float(self.reference.item())  # at checkpoints only, not in the step
        return value if value >= 0 else None

    def restore(self, value: float | None) -> None:
        if value is not None:
            self.reference.fill_(float(value))


#: Under torchrun, the ranks agree every this many steps whether one of them got a signal.
STOP_CHECK_EVERY = 16


class Signals:
    """SIGINT/SIGTERM during training: the first one is noted (the loop saves at
    the end of the step and leaves), a second one stops at once.

    With several processes the ranks stop at the same step, or the ones still
    training would wait forever for the others: every :data:`STOP_CHECK_EVERY`
    steps (and at the end of an epoch) they agree whether any of them got a
    signal, one all-reduce of a flag. There a repeated signal does not stop at
    once: torchrun passes the Ctrl-C it gets on to every worker, which has
    already had its own.
    """

    def __init__(self, dist: DistInfo | None = None) -> None:
        self.received: int | None = None
        self.dist = dist or DistInfo()

    def leave_now(self, index: int | None = None, last: bool = True) -> bool:
        """Whether to save and leave after this step (``index``) or at this epoch's end (``None``)."""
        if not self.dist.enabled:
            return self.received is not None
        if index is not None and (index + 1) % STOP_CHECK_EVERY and not last:
            return False
        return any_rank(self.received is not None, self.dist)

    @contextlib.contextmanager
    def watching(self) -> Iterator[Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set in the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            if self.received is not None and not self.dist.enabled:
                raise KeyboardInterrupt
            self.received = self.received or signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class LeaveAt(Exception):
    """Raised inside the loop when a signal arrived: the place to save, ``step`` batches into ``epoch``."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step


def train_epoch(run: Run, epoch: int, tallies: Tallies, skip_batches: int, signals: Signals,
                timing: Timing, guard: LossGuard) -> float:
    """One pass over the training split (from batch ``skip_batches`` on); returns its wall time in seconds."""
    opts = run.recipe.trainer
    model = run.step_model if run.step_model is not None else run.model
    batches = run.batches["train"]
    batches.set_epoch(epoch, start_batch=skip_batches)  # resuming mid-epoch: the same order, from there
    run.model.train()
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    on_step = _step_hook(run, len(batches))
    # on_nan "stop" can wait for the epoch's end to find a bad step (the losses
    # go into slots, judged together: tallies.settle); "skip" must know at once
    skip_bad = opts.on_nan == "skip"
    if not skip_bad:
        tallies.track_steps(len(batches), start=skip_batches)
    progress = _Progress(run, epoch, len(batches), done=skip_batches, guard=guard)
    start = time.perf_counter()
    with out_of_memory_advice(run, "train", batches.batch_size):
        for index, (images, targets, sample_index) in enumerate(batches.indexed(), start=skip_batches):
            # gradients add up over `accumulate` batches; the last batch of each group steps
            steps = (index + 1) % opts.accumulate == 0 or index + 1 == len(batches)
            logits, loss = forward_backward(run, model, images, targets, sample_index, epoch, sync=steps)
            if skip_bad:
                if bool(tallies.note_bad(guard.bad(loss), loss, index)):  # opt-in: one host sync per step
                    run.optimizer.zero_grad(set_to_none=True)
                    continue
                tallies.update(logits, targets, loss)
            else:
                tallies.update_step(index, logits, targets, loss)
            if steps:
                optimizer_step(run, params)
                if run.schedule is not None and run.schedule.interval == "step":
                    run.schedule.scheduler.step()
                if on_step is not None:
                    on_step(epoch, index)
            timing.first_batch_done(run.device, start, "train")
            progress.batch_done(index, tallies, start)
            if signals.leave_now(index, last=index + 1 == len(batches)):
                tallies.settle(guard)  # the partial epoch's tallies are saved with the state
                raise LeaveAt(epoch, index + 1)
    tallies.settle(guard)
    return synchronized_since(run.device, start)


def forward_backward(run: Run, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     sample_index: torch.Tensor, epoch: int, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's transforms, the forward pass under autocast, the loss, and its backward pass.

    ``sync`` false (a batch inside an accumulation group): under DDP the
    gradients are not all-reduced yet (``no_sync``), only at the group's last batch.
    """
    # Mixing transforms (mixup, cutmix) give the loss soft targets; the caller
    # keeps the hard `targets` for the tallies, so train metrics count real labels.
    x, loss_targets = prepare_training_batch(images, targets, run.train_transforms,
                                             channels_last=run.channels_last, dtype=input_dtype(run.precision),
                                             index=sample_index, epoch=epoch)
    accumulate = run.recipe.trainer.accumulate
    waiting = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
    with waiting:
        with autocast(run.device, run.precision):
            logits = model(x)
            loss = run.loss_fn(logits, loss_targets)
        scaled = loss / accumulate if accumulate > 1 else loss  # no division kernel for nothing
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    return logits, loss


def optimizer_step(run: Run, params: list[torch.Tensor]) -> None:
    """Clip (after unscaling fp16 gradients), step, and clear the gradients."""
    opts = run.recipe.trainer
    if opts.grad_clip_norm is not None or opts.grad_clip_value is not None:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        if opts.grad_clip_value is not None:
            nn.utils.clip_grad_value_(params, opts.grad_clip_value)
        if opts.grad_clip_norm is not None:
            # foreach and no error_if_nonfinite: no host sync
            nn.utils.clip_grad_norm_(params, opts.grad_clip_norm, foreach=True)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def prepare(run: Run, images: torch.Tensor, transforms: Sequence[Callable], index: torch.Tensor | None = None,
            epoch: int = 0) -> torch.Tensor:
    """uint8 batch -> float in [0, 1] -> the recipe's transforms -> the model's dtype and memory format."""
    return prepare_batch(images, transforms, channels_last=run.channels_last, dtype=input_dtype(run.precision),
                         index=index, epoch=epoch)


def _step_hook(run: Run, batches: int) -> Callable[[int, int], None] | None:
    """``cnnreg_optimizer_step`` for the step ending at a batch, or ``None`` when no plugin
    listens (the call would cost a hook dispatch per step for nothing)."""
    if not listens(run, "cnnreg_optimizer_step"):
        return None
    accumulate = run.recipe.trainer.accumulate
    per_epoch = math.ceil(batches / accumulate)
    total = per_epoch * run.recipe.trainer.epochs

    def call(epoch: int, index: int) -> None:
        step = (epoch - 1) * per_epoch + math.ceil((index + 1) / accumulate)
        emit(run, "cnnreg_optimizer_step", run=run, epoch=epoch, step=step, total_steps=total)

    return call


class _Progress:
    """The running loss and speed for ``cnnreg_train_progress``, at most every
    :data:`PROGRESS_INTERVAL` seconds (the loss is copied without waiting)."""

    def __init__(self, run: Run, epoch: int, steps: int, done: int, guard: LossGuard):
        self.run, self.epoch, self.steps, self.done, self.guard = run, epoch, steps, done, guard
        self.reader = LossReader(run.device)
        self.last = time.perf_counter()

    def batch_done(self, index: int, tallies: Tallies, start: float) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        run = self.run
        tallies.settle(self.guard)  # a few operations, at most every PROGRESS_INTERVAL
        loss = self.reader.poll(tallies.loss_sum, tallies.count)
        if loss is not None and not math.isfinite(loss) and run.recipe.trainer.on_nan == "stop":
            raise_bad_step(run, self.epoch, tallies)
        if run.is_main:
            emit(run, "cnnreg_train_progress", run=run, progress=ProgressRecord(
                epoch=self.epoch, epochs=run.epochs, step=index + 1, steps=self.steps,
                images=self.done * run.batches["train"].batch_size, seconds=now - start, loss=loss))


def raise_bad_step(run: Run, epoch: int, tallies: Tallies) -> None:
    """Stop on the epoch's first bad step (``on_nan: "stop"``): what the loss was, and what to change."""
    step, loss = int(tallies.bad_step.item()), float(tallies.bad_loss.item())
    factor = run.recipe.trainer.divergence
    what = ("became NaN or infinite" if not math.isfinite(loss)
            else f"diverged to {loss:.3g}, more than {factor:g} times the run's first loss (trainer.divergence)")
    raise NonFiniteLoss(f"the loss {what} at epoch {epoch}, step {step + 1}. Lower the learning rate, add "
                        "gradient clipping (trainer.grad_clip_norm), or set trainer.on_nan to \"skip\"")


@contextlib.contextmanager
def out_of_memory_advice(run: Run, split: str, batch_size: int) -> Iterator[None]:
    """Turn torch's out-of-memory error into one that says what to change."""
    try:
        yield
    except torch.OutOfMemoryError:
        total = ""
        if run.device.type == "cuda":
            total = f" ({torch.cuda.get_device_properties(run.device).total_memory / 2**30:.0f} GiB)"
            torch.cuda.empty_cache()
        key = "data.batch_size" if split == "train" else "data.eval_batch_size"
        advice = (f"lower {key} (e.g. to {max(1, batch_size // 2)})"
                  + (", with trainer.accumulate 2 to keep the effective batch" if split == "train" else ""))
        if run.precision == "fp32" and run.device.type == "cuda":
            advice += "; trainer.precision bf16 halves activation memory"
        raise OutOfMemory(f"{run.device}{total} ran out of memory on a {split} batch of {batch_size} images "
                          f"at {tuple(run.data.image_size)}: {advice}") from None


def synchronized_since(device: torch.device, start: float) -> float:
    """Seconds since ``start``, once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
