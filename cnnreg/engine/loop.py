"""The loop: ``fit(run) -> FitResult`` over epochs, and ``evaluate(run, split)``; in call order.

``fit`` runs the epochs (:func:`run_epoch`: train, evaluate when due, read
the tallies once), steps an epoch schedule, asks the plugins whether to
stop, and saves the resumable state. The step itself is in
:mod:`cnnreg.engine.step`. The model and the optimizer (with its scheduler
and scaler) are the only mutable objects.
"""

from __future__ import annotations

import json
import signal
import time
import warnings
from dataclasses import replace
from typing import Callable

import torch

from cnnreg.core import checkpoint, distributed
from cnnreg.core.checkpoint import CheckpointError
from cnnreg.core.device import autocast
from cnnreg.core.errors import UserError
from cnnreg.core.records import EpochRecord, EvalResult, FitResult
from cnnreg.core.run import Run
from cnnreg.core.stops import Interrupted, PluginFailed, StateNotSaved, TrainingStopped
from cnnreg.engine.step import (LeaveAt, LossGuard, Signals, Timing, out_of_memory_advice, prepare, raise_bad_step,
                                train_epoch)
from cnnreg.engine.tallies import Tallies
from cnnreg.engine.training_state import check_state_fits, restore_training_state, save_training_state
from cnnreg.plugin.events import emit
from cnnreg.inputs.prepare import merge_views, view_weights
from cnnreg.runs.directory import write_run_files, write_summary


def fit(run: Run, *, resume: bool = False) -> FitResult:
    """Train for ``trainer.epochs`` epochs (or until a callback stops it).

    After every ``trainer.checkpoint_every`` epochs (and on SIGINT/SIGTERM)
    the full training state is written to ``run_dir/last.pt``, atomically.

    :param resume: continue from ``run_dir/last.pt``: model, optimizer,
        scheduler, scaler, random states, callbacks, epoch and position in it.
        The state is checked against the run (readable, not finished, the
        same model and optimizer) before any file of the run is rewritten.
    :raises Interrupted: on SIGINT/SIGTERM, after saving a resumable checkpoint.
    :raises TrainingStopped: the loss diverged (``on_nan: stop``), the device ran
        out of memory, last.pt could not be written, or a plugin failed; the run's
        summary says which, and a resumable checkpoint is kept where one can be.
    """
    opts = run.recipe.trainer
    history: list[EpochRecord] = []
    start_epoch, skip_batches, partial, guard = 1, 0, None, LossGuard(opts.divergence, run.device)
    if resume:
        start_epoch, skip_batches, partial, history = resume_from(run, guard)
    if run.records_pending and run.run_dir is not None and run.is_main:
        write_run_files(run)  # only now: a resume that cannot go on leaves the records as they were
    signals = Signals(run.dist)
    timing = Timing(measure_first=opts.compile != "off")
    stopped = "completed"
    tallies = None
    saved = start_epoch - 1  # the epoch last.pt holds
    boundary = True  # between epochs: the model is exactly the last epoch's

    def save(epoch: int, step: int = 0) -> None:
        nonlocal saved
        try:
            save_training_state(run, epoch, step, tallies, history, loss_reference=guard.reference_value())
        except CheckpointError as exc:
            raise StateNotSaved(f"{exc}. Training stops rather than go on without a way back: free space "
                                f"(or fix the folder) and {_resume_hint(run, saved)}") from exc
        saved = epoch

    def keep(result: FitResult) -> None:
        if run.run_dir is not None and run.is_main:
            try:
                write_summary(run, result)
            except CheckpointError as exc:
                warnings.warn(f"{exc}; the epochs are in the run's other files", stacklevel=3)

    def finish(reason: str) -> FitResult:
        result = _result(run, history, reason, timing)
        keep(result)  # first: a failing fit-end plugin must not lose it
        try:
            emit(run, "cnnreg_fit_end", run=run, result=result)
        except PluginFailed as exc:  # after the training: the summary says both
            keep(replace(result, stopped=f"{reason}; then {exc}"))
            raise
        return result

    try:
        emit(run, "cnnreg_fit_start", run=run, start_epoch=start_epoch)
        with signals.watching():
            for epoch in range(start_epoch, opts.epochs + 1):
                on_epoch_start = getattr(run.model, "cnnreg_epoch_start", None)
                if callable(on_epoch_start):
                    on_epoch_start(epoch)
                emit(run, "cnnreg_epoch_start", run=run, epoch=epoch)
                tallies = Tallies(run.data.num_classes, run.metrics, run.device)
                if partial is not None:
                    tallies.load(partial)
                    partial = None
                boundary = False
                record = run_epoch(run, epoch, tallies, skip_batches, signals, timing, guard)
                boundary = True
                skip_batches = 0
                history.append(record)
                step_epoch_scheduler(run, record)
                emit(run, "cnnreg_epoch_end", run=run, record=record)
                reasons = emit(run, "cnnreg_should_stop", run=run, record=record)
                # every rank must leave the loop at the same epoch, or the others hang
                decision = distributed.agree("; ".join(r for r in reasons if r) or None, run.dist)
                if decision:
                    stopped = decision
                periodic = opts.checkpoint_every and epoch % opts.checkpoint_every == 0
                if periodic or decision or epoch == opts.epochs:
                    save(epoch)
                if decision:
                    break
                if signals.leave_now():
                    raise LeaveAt(epoch + 1, 0)
    except LeaveAt as place:
        try:
            save(place.epoch - 1, place.step)
        except StateNotSaved as exc:  # interrupted on a full disk: the earlier last.pt is what there is
            finish(f"stopped: {exc}")
            raise
        finish("interrupted")
        raise Interrupted(signals.received or signal.SIGINT, run.run_dir) from None
    except TrainingStopped as exc:
        if isinstance(exc, PluginFailed) and boundary and history and history[-1].epoch > saved:
            _save_after_failure(run, save, history[-1].epoch)  # the model is exactly that epoch's
        if not isinstance(exc, StateNotSaved):  # that one says what is kept itself
            exc.args = (f"{exc.args[0] if exc.args else exc}; {_kept(run, saved)}",)
        finish(f"stopped: {exc}")
        raise
    return finish(stopped)


def resume_from(run: Run, guard: LossGuard) -> tuple[int, int, dict | None, list[EpochRecord]]:
    """Load ``last.pt`` into the run, once it is known to fit: readable, not finished, the same model."""
    if run.run_dir is None:
        raise UserError("cannot resume a run without a run directory")
    checkpoint.remove_stale_temporaries(run.run_dir)  # left by a kill during an atomic write
    state = checkpoint.load_state(run.run_dir / checkpoint.LAST)
    epochs = run.recipe.trainer.epochs
    done, step = int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0))
    ended = _summary_stop(run.run_dir)
    if done >= epochs and not step:
        raise UserError(f"{run.run_dir} is finished: it trained {done} of {epochs} epochs; nothing was changed. "
                        f"To train it further, resume with more epochs: cnnreg run --resume {run.run_dir} "
                        f"--set trainer.epochs={done + 10}")
    if ended is not None and not _resumable(ended):
        raise UserError(f"{run.run_dir} is finished: it stopped early at epoch {done} ({ended}), and a resume "
                        "would stop there again; nothing was changed. Train longer in a new run "
                        f"(cnnreg run {run.run_dir / 'recipe.json'}, with the stopping callback changed)")
    check_state_fits(run, state)
    guard.restore(state.get("loss_reference"))
    return restore_training_state(run, state)


def _summary_stop(run_dir) -> str | None:
    """Why the run's last fit ended, from summary.json (None when it has none or it is unreadable)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stopped = summary.get("stopped") if isinstance(summary, dict) else None
    return stopped if isinstance(stopped, str) else None


def _resumable(stopped: str) -> bool:
    """A fit that was interrupted, stopped by a fault, or completed (and is given more epochs) can go
    on; one a callback stopped early (early stopping) cannot: it would stop again."""
    return stopped in ("interrupted", "completed") or stopped.startswith("stopped:")


def _save_after_failure(run: Run, save: Callable[[int], None], epoch: int) -> None:
    try:
        save(epoch)
    except StateNotSaved as exc:
        warnings.warn(f"after the failure, last.pt could not be written either: {exc}", stacklevel=3)


def _kept(run: Run, saved: int) -> str:
    """What a stopped run leaves to go on from, as it is on disk."""
    if run.run_dir is None:
        return "no run directory was written"
    if saved >= 1 and (run.run_dir / checkpoint.LAST).is_file():
        return f"last.pt holds epoch {saved}: {_resume_hint(run, saved)}"
    return "no checkpoint was saved before it (the run must start again)"


def _resume_hint(run: Run, saved: int) -> str:
    if run.run_dir is None or saved < 1:
        return "start the run again"
    return f"resume from epoch {saved} with: cnnreg run --resume {run.run_dir}"


def run_epoch(run: Run, epoch: int, tallies: Tallies, skip_batches: int, signals: Signals,
              timing: Timing, guard: LossGuard) -> EpochRecord:
    """Train one epoch, evaluate when due, and read the results once."""
    opts = run.recipe.trainer
    started = time.perf_counter()
    seconds = train_epoch(run, epoch, tallies, skip_batches, signals, timing, guard)
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


def evaluate(run: Run, split: str = "test", temperature: float | None = None) -> EvalResult:
    """Metrics of the current model on one split (``train``, ``val`` or ``test``).

    :param temperature: divide the logits by it before the loss and the
        metrics (calibrated confidences; the predictions, so accuracy, stay as
        they are); ``None``: the run's own (``run.temperature``, which
        ``load_run`` reads from calibration.json), none when it has none.
    """
    return _evaluate(run, split, None, temperature if temperature is not None else run.temperature)


def _evaluate(run: Run, split: str, timing: Timing | None, temperature: float | None = None) -> EvalResult:
    if split not in run.batches:
        have = ", ".join(run.batches)
        raise UserError(f"this run has no {split!r} split (it has: {have})")
    emit(run, "cnnreg_evaluate_start", run=run, split=split)
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
            if temperature is not None:
                logits = logits.float() / temperature
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
    # every epoch of the run, those before a resume included (their records came back with last.pt)
    seconds = sum(r.seconds for r in history)
    return FitResult(records=tuple(history), monitor=run.monitor, mode=run.mode, best_epoch=best, stopped=stopped,
                     train_seconds=seconds - timing.compile_seconds,
                     compile_seconds=timing.compile_seconds, run_dir=run.run_dir)
