"""The loop: ``fit(run) -> FitResult`` over epochs, and ``evaluate(run, split)``; in call order.

``fit`` runs the epochs (:func:`run_epoch`: train, evaluate when due, read
the tallies once), steps an epoch schedule, asks the plugins whether to
stop, and saves the resumable state. The step itself is in
:mod:`cnnreg.engine.step`. The model and the optimizer (with its scheduler
and scaler) are the only mutable objects.
"""

from __future__ import annotations

import signal
import time

import torch

from cnnreg.core import checkpoint, distributed
from cnnreg.core.device import autocast
from cnnreg.core.errors import UserError
from cnnreg.core.records import EpochRecord, EvalResult, FitResult
from cnnreg.core.run import Run
from cnnreg.core.stops import Interrupted, TrainingStopped
from cnnreg.engine.step import (LeaveAt, Signals, Timing, out_of_memory_advice, prepare, raise_bad_step,
                                train_epoch)
from cnnreg.engine.tallies import Tallies
from cnnreg.engine.training_state import restore_training_state, save_training_state
from cnnreg.inputs.prepare import merge_views, view_weights
from cnnreg.runs.directory import write_summary


def fit(run: Run, *, resume: bool = False) -> FitResult:
    """Train for ``trainer.epochs`` epochs (or until a callback stops it).

    After every ``trainer.checkpoint_every`` epochs (and on SIGINT/SIGTERM)
    the full training state is written to ``run_dir/last.pt``, atomically.

    :param resume: continue from ``run_dir/last.pt``: model, optimizer,
        scheduler, scaler, random states, callbacks, epoch and position in it.
    :raises Interrupted: on SIGINT/SIGTERM, after saving a resumable checkpoint.
    :raises NonFiniteLoss: when the loss becomes NaN/inf (``on_nan: stop``).
    """
    opts = run.recipe.trainer
    history: list[EpochRecord] = []
    start_epoch, skip_batches, partial = 1, 0, None
    if resume:
        if run.run_dir is None:
            raise UserError("cannot resume a run without a run directory")
        checkpoint.remove_stale_temporaries(run.run_dir)  # left by a kill during an atomic write
        state = checkpoint.load_state(run.run_dir / checkpoint.LAST)
        start_epoch, skip_batches, partial, history = restore_training_state(run, state)
    signals = Signals()
    timing = Timing(measure_first=opts.compile != "off")
    stopped = "completed"
    tallies = None

    def finish(reason: str) -> FitResult:
        result = _result(run, history, reason, timing)
        if run.run_dir is not None and run.is_main:
            write_summary(run, result)  # first: a failing fit-end plugin must not lose it
        run.pm.hook.cnnreg_fit_end(run=run, result=result)
        return result

    run.pm.hook.cnnreg_fit_start(run=run, start_epoch=start_epoch)
    try:
        with signals.watching():
            for epoch in range(start_epoch, opts.epochs + 1):
                on_epoch_start = getattr(run.model, "cnnreg_epoch_start", None)
                if callable(on_epoch_start):
                    on_epoch_start(epoch)
                run.pm.hook.cnnreg_epoch_start(run=run, epoch=epoch)
                tallies = Tallies(run.data.num_classes, run.metrics, run.device)
                if partial is not None:
                    tallies.load(partial)
                    partial = None
                record = run_epoch(run, epoch, tallies, skip_batches, signals, timing)
                skip_batches = 0
                history.append(record)
                step_epoch_scheduler(run, record)
                run.pm.hook.cnnreg_epoch_end(run=run, record=record)
                reasons = [r for r in run.pm.hook.cnnreg_should_stop(run=run, record=record) if r]
                # every rank must leave the loop at the same epoch, or the others hang
                decision = distributed.agree("; ".join(reasons) or None, run.dist)
                if decision:
                    stopped = decision
                periodic = opts.checkpoint_every and epoch % opts.checkpoint_every == 0
                if periodic or decision or epoch == opts.epochs:
                    save_training_state(run, epoch, history=history)
                if decision:
                    break
                if signals.received is not None:
                    raise LeaveAt(epoch + 1, 0)
    except LeaveAt as place:
        save_training_state(run, place.epoch - 1, place.step, tallies, history)
        finish("interrupted")
        raise Interrupted(signals.received or signal.SIGINT, run.run_dir) from None
    except TrainingStopped as exc:
        finish(f"stopped: {exc}")
        raise
    return finish(stopped)


def run_epoch(run: Run, epoch: int, tallies: Tallies, skip_batches: int, signals: Signals,
              timing: Timing) -> EpochRecord:
    """Train one epoch, evaluate when due, and read the results once."""
    opts = run.recipe.trainer
    started = time.perf_counter()
    seconds = train_epoch(run, epoch, tallies, skip_batches, signals, timing)
    if int(tallies.bad_step.item()) >= 0 and opts.on_nan == "stop":
        raise_bad_step(run, epoch, tallies)
    tallies.all_reduce(run.dist)
    evals = {"train": tallies.read("train", run.data.classes)}
    if "val" in run.batches and (epoch % opts.eval_every == 0 or epoch == opts.epochs):
        evals["val"] = _evaluate(run, "val", timing)
    metrics = {f"{split}_{name}": value for split, result in evals.items() for name, value in result.metrics.items()}
    metrics["lr"] = float(run.optimizer.param_groups[-1]["lr"])
    elapsed = time.perf_counter() - started
    metrics["epoch_seconds"] = elapsed
    timing.train_seconds += elapsed
    images = run.batches["train"].num_samples * max(run.dist.world_size, 1)
    return EpochRecord(epoch=epoch, epochs=opts.epochs, metrics=metrics, evals=evals, train_seconds=seconds,
                       seconds=elapsed, images_per_second=images / max(seconds, 1e-9))


def step_epoch_scheduler(run: Run, record: EpochRecord) -> None:
    schedule = run.schedule
    if schedule is None or schedule.interval != "epoch":
        return
    if schedule.monitor is None:
        schedule.scheduler.step()
    elif schedule.monitor in record.metrics:
        schedule.scheduler.step(record.metrics[schedule.monitor])
    # a monitored split not evaluated this epoch (eval_every) leaves the plateau count alone


def evaluate(run: Run, split: str = "test") -> EvalResult:
    """Metrics of the current model on one split (``train``, ``val`` or ``test``)."""
    return _evaluate(run, split, None)


def _evaluate(run: Run, split: str, timing: Timing | None) -> EvalResult:
    if split not in run.batches:
        have = ", ".join(run.batches)
        raise UserError(f"this run has no {split!r} split (it has: {have})")
    run.pm.hook.cnnreg_evaluate_start(run=run, split=split)
    model = run.step_model if run.step_model is not None else run.model
    batches = run.batches[split]
    tallies = Tallies(run.data.num_classes, run.metrics, run.device)
    views = view_weights(run.eval_transforms)
    run.model.eval()
    start = time.perf_counter()
    with out_of_memory_advice(run, split, batches.batch_size), torch.inference_mode(), \
            autocast(run.device, run.precision):
        for images, targets, index in batches.indexed():
            logits = merge_views(model(prepare(run, images, run.eval_transforms, index)), views)
            loss = run.loss_fn(logits.float(), targets)
            tallies.update(logits, targets, loss)
            if timing is not None:
                timing.first_batch_done(run.device, start, "eval")
    tallies.all_reduce(run.dist)
    return tallies.read(split, run.data.classes)


def _result(run: Run, history: list[EpochRecord], stopped: str, timing: Timing) -> FitResult:
    scored = [r for r in history if run.monitor in r.metrics]
    best = None
    if scored:
        pick = min if run.mode == "min" else max
        best = pick(scored, key=lambda r: r.metrics[run.monitor]).epoch
    return FitResult(records=tuple(history), monitor=run.monitor, mode=run.mode, best_epoch=best, stopped=stopped,
                     train_seconds=timing.train_seconds - timing.compile_seconds,
                     compile_seconds=timing.compile_seconds, run_dir=run.run_dir)
