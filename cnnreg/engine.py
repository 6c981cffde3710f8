"""The engine: ``build(recipe) -> Run``, ``fit(run) -> FitResult``, ``evaluate(run, split)``.

Plain functions, readable top to bottom. The model and the optimizer (with
its scheduler and scaler) are the only mutable objects. Data lives on the
device as uint8 and is augmented there; every per-batch quantity (loss,
confusion matrix, top-k) accumulates in device tensors that are read once per
epoch, so the training step never waits for the host.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from cnnreg import checkpoint, distributed
from cnnreg.assembly import Choice, assemble, sample_images
from cnnreg.batches import make_batches
from cnnreg.data import DataContext, DataSource
from cnnreg.device import (apply_precision, autocast, configure_backends, input_dtype, resolve_device,
                           resolve_precision, seed_everything)
from cnnreg.errors import UserError
from cnnreg.forward import merge_views, prepare_batch, view_weights
from cnnreg.plugins import PluginManager
from cnnreg.recipe import RecipeBase
from cnnreg.records import EpochRecord, EvalResult, FitResult, Metric, ProgressRecord, Schedule
from cnnreg.rundir import new_run_dir, write_run_files, write_summary
from cnnreg.state import restore_training_state, save_training_state
from cnnreg.tallies import LossReader, Tallies

PROGRESS_INTERVAL = 0.25  # seconds between progress hook calls


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, signum: int, run_dir: Path | None):
        self.signum, self.run_dir = signum, run_dir
        name = signal.Signals(signum).name
        where = f"; resume with: cnnreg run --resume {run_dir}" if run_dir else ""
        super().__init__(f"interrupted by {name}; a resumable checkpoint was saved{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TrainingStopped(UserError):
    """Training could not go on (a fault of the run, not of its input); the last
    good checkpoint is kept."""


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite."""


class OutOfMemory(TrainingStopped):
    """The device ran out of memory."""


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


@dataclass(frozen=True)
class Run:
    """Everything one training run is made of.

    Frozen: the fields never change; the model, optimizer, scheduler and
    scaler they point to are the run's mutable state.
    """

    recipe: RecipeBase
    pm: PluginManager
    device: torch.device
    precision: str
    channels_last: bool
    data: DataSource
    context: DataContext
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_transforms: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    eval_transforms: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    metrics: tuple[tuple[str, Metric], ...]
    callbacks: tuple[object, ...]
    batches: dict[str, Any]
    scaler: torch.amp.GradScaler | None
    monitor: str
    mode: str
    run_dir: Path | None
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    step_model: nn.Module | None = None  # the compiled/DDP-wrapped model the step calls
    choices: tuple[Choice, ...] = ()  # what the run chose for what the recipe left out

    @property
    def epochs(self) -> int:
        return self.recipe.trainer.epochs

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.classes

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


# -- build -------------------------------------------------------------------------------------


def build(
    recipe: RecipeBase,
    *,
    run_dir: Path | str | None = None,
    output: bool = True,
    fold: int | None = None,
    device: str | None = None,
) -> Run:
    """Assemble a run from a validated recipe: data, model, optimizer, callbacks.

    Everything that can be checked before training is checked here (the
    dry run of transforms and model on real images, monitored metric names,
    class counts), so a bad recipe fails in seconds, not at epoch 3.

    :param run_dir: use this run directory (``--resume``); default: a new
        ``runs/<name>-<timestamp>`` under the recipe's ``output_dir``.
    :param output: write a run directory at all (False for dry runs and tests).
    :param fold: train on fold ``fold`` (0-based) of the recipe's k-fold cross-validation.
    :param device: override ``trainer.device``.
    """
    opts = recipe.trainer
    dist = distributed.setup(opts.device if device is None else device)
    run_device = dist.device if dist.device is not None else resolve_device(device or opts.device)
    precision = resolve_precision(opts.precision, run_device)
    configure_backends(run_device, opts.deterministic, opts.cudnn_benchmark)
    seed_everything(recipe.seed)
    channels_last = opts.channels_last if opts.channels_last is not None else run_device.type == "cuda"

    def place(model: nn.Module, data: DataSource | None, eval_tf: Sequence[Callable]) -> nn.Module:
        assert data is not None
        init_from_data(model, data, recipe.data.channels or data.channels, eval_tf)
        model.to(run_device)
        apply_precision(model, precision)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return distributed.sync_batchnorm(model, dist, opts.sync_batchnorm)

    parts = assemble(recipe, load=True, fold=fold, world_size=dist.world_size, place=place)
    recipe, data, model = parts.recipe, parts.data, parts.model
    assert data is not None
    batches = make_split_batches(recipe, data, parts.channels, run_device, dist)
    scaler = torch.amp.GradScaler(run_device.type) if precision == "fp16" else None
    if output and dist.rank == 0:
        run_dir = Path(run_dir) if run_dir is not None else new_run_dir(recipe, fold)
    elif not output:
        run_dir = None
    # Ranks > 0 keep a run_dir they were given (--resume: every rank reads
    # last.pt) but never create one; everything that writes checks is_main.
    step_model = distributed.wrap(model, dist)
    if opts.compile != "off":
        step_model = torch.compile(step_model, mode=None if opts.compile == "default" else opts.compile)
    pm = run_plugin_manager(recipe.plugins, parts.callbacks)
    run = Run(recipe=recipe, pm=pm, device=run_device, precision=precision, channels_last=channels_last,
              data=data, context=parts.context, model=model, optimizer=parts.optimizer, schedule=parts.schedule,
              loss_fn=parts.loss_fn, train_transforms=parts.train_transforms, eval_transforms=parts.eval_transforms,
              metrics=parts.metrics, callbacks=parts.callbacks, batches=batches, scaler=scaler,
              monitor=parts.monitor, mode=parts.mode, run_dir=Path(run_dir) if run_dir is not None else None,
              dist=dist, step_model=step_model, choices=parts.choices)
    if run.is_main:
        for plugins in pm.hook.cnnreg_run_plugins(run=run):
            for plugin in plugins or ():
                pm.register(plugin)
    if run.run_dir is not None and run.is_main:
        write_run_files(run)
    return run


def init_from_data(model: nn.Module, data: DataSource, channels: int, eval_tf: Sequence[Callable]) -> None:
    """Data-dependent initialisation: a model with ``cnnreg_init_from_data(images)``
    gets its first ``cnnreg_init_images`` training images, as evaluation sees
    them (eval transforms, no augmentation), on the CPU, before it moves to
    the device. A resumed run then loads its saved weights over it."""
    init = getattr(model, "cnnreg_init_from_data", None)
    if not callable(init):
        return
    count = int(getattr(model, "cnnreg_init_images", 5000))
    images = sample_images(data.train, count, data.image_size, channels, data.fit)
    with torch.no_grad():
        init(prepare_batch(images, eval_tf, channels_last=False))


def make_split_batches(recipe: RecipeBase, data: DataSource, channels: int, device: torch.device,
                       dist: distributed.DistInfo) -> dict[str, Any]:
    options = recipe.data
    eval_batch = options.eval_batch_size or 2 * options.batch_size
    common = dict(device=device, image_size=data.image_size, channels=channels, rank=dist.rank,
                  world_size=dist.world_size, num_workers=options.num_workers, seed=recipe.seed,
                  num_classes=data.num_classes, fit=data.fit)
    batches = {"train": make_batches(data.train, batch_size=options.batch_size, shuffle=options.shuffle,
                                     drop_last=options.drop_last, name="train", **common)}
    for name in ("val", "test"):
        split = data.split(name)
        if split is not None and len(split):
            # exact, uneven shards: evaluation must count every sample once
            batches[name] = make_batches(split, batch_size=eval_batch, shuffle=False, drop_last=False, name=name,
                                         even_shards=False, **common)
    return batches


def run_plugin_manager(parent: PluginManager, callbacks: Iterable[object]) -> PluginManager:
    """A plugin manager for one run: every plugin of ``parent`` plus this recipe's callbacks."""
    pm = PluginManager()
    for name, plugin in parent.list_name_plugin():
        if plugin is not None and not pm.is_registered(plugin):
            pm.register(plugin, name=name)
    pm.origins.update(parent.origins)
    for i, callback in enumerate(callbacks):
        pm.register(callback, name=f"callback-{i}-{type(callback).__name__}")
    return pm


# -- the step ----------------------------------------------------------------------------------


def prepare(run: Run, images: torch.Tensor, transforms: Sequence[Callable], index: torch.Tensor | None = None,
            epoch: int = 0) -> torch.Tensor:
    """uint8 batch -> float in [0, 1] -> the recipe's transforms -> the model's dtype and memory format."""
    return prepare_batch(images, transforms, channels_last=run.channels_last, dtype=input_dtype(run.precision),
                         index=index, epoch=epoch)


def train_epoch(run: Run, epoch: int, tallies: Tallies, skip_batches: int, stop: StopFlag,
                timing: Timing) -> float:
    """One pass over the training split; returns its wall time in seconds."""
    opts = run.recipe.trainer
    model = run.step_model if run.step_model is not None else run.model
    batches = run.batches["train"]
    batches.set_epoch(epoch, start_batch=skip_batches)  # resuming mid-epoch: the same order, from there
    run.model.train()
    total = len(batches)
    reader = LossReader(run.device)
    start = last_report = time.perf_counter()
    seen = skip_batches
    skip_nan = opts.on_nan == "skip"
    clip_params = [p for g in run.optimizer.param_groups for p in g["params"]]
    # Per-step events cost a hook call per step: only made when a plugin listens.
    step_hook = run.pm.hook.cnnreg_optimizer_step
    step_listeners = bool(step_hook.get_hookimpls())
    steps_per_epoch = math.ceil(total / opts.accumulate)
    total_steps = steps_per_epoch * opts.epochs
    with out_of_memory_advice(run, "train", batches.batch_size):
        for index, (images, targets, sample_index) in enumerate(batches.indexed(), start=skip_batches):
            x = prepare(run, images, run.train_transforms, sample_index, epoch)
            boundary = (index + 1) % opts.accumulate == 0 or index + 1 == total
            sync_grads = contextlib.nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
            with sync_grads:
                with autocast(run.device, run.precision):
                    logits = model(x)
                    loss = run.loss_fn(logits, targets)
                scaled = loss / opts.accumulate
                (run.scaler.scale(scaled) if run.scaler else scaled).backward()
            finite = torch.isfinite(loss.detach())
            tallies.bad_step.copy_(torch.where((tallies.bad_step < 0) & ~finite, index, tallies.bad_step))
            if skip_nan and not bool(finite):  # opt-in: costs one host sync per step
                run.optimizer.zero_grad(set_to_none=True)
                continue
            tallies.update(logits, targets, loss)
            if boundary:
                optimizer_step(run, clip_params)
                if run.schedule is not None and run.schedule.interval == "step":
                    run.schedule.scheduler.step()
                if step_listeners:
                    step = (epoch - 1) * steps_per_epoch + math.ceil((index + 1) / opts.accumulate)
                    step_hook(run=run, epoch=epoch, step=step, total_steps=total_steps)
            seen += 1
            if timing.measure_first and not timing.compiled_train:
                timing.compile_seconds += _synchronized_since(run.device, start)
                timing.compiled_train = True
            now = time.perf_counter()
            if now - last_report >= PROGRESS_INTERVAL:
                last_report = now
                loss_value = reader.poll(tallies.loss_sum, tallies.count)
                if loss_value is not None and not math.isfinite(loss_value) and not skip_nan:
                    raise_bad_step(run, epoch, tallies)
                if run.is_main:
                    run.pm.hook.cnnreg_train_progress(run=run, progress=ProgressRecord(
                        epoch=epoch, epochs=run.epochs, step=index + 1, steps=total,
                        images=seen * batches.batch_size, seconds=now - start, loss=loss_value))
            if stop.signum is not None:
                raise _Stop(epoch, index + 1)
    return _synchronized_since(run.device, start)


def _synchronized_since(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def optimizer_step(run: Run, params: list[torch.Tensor]) -> None:
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


def raise_bad_step(run: Run, epoch: int, tallies: Tallies) -> None:
    step = int(tallies.bad_step.item())
    kept = f"; the last good checkpoint in {run.run_dir} is kept" if run.run_dir else ""
    raise NonFiniteLoss(f"the loss became NaN or infinite at epoch {epoch}, step {step + 1}{kept}. "
                        "Lower the learning rate, add gradient clipping (trainer.grad_clip_norm), "
                        "or set trainer.on_nan to \"skip\"")


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
            if timing is not None and timing.measure_first and not timing.compiled_eval:
                timing.compile_seconds += _synchronized_since(run.device, start)
                timing.compiled_eval = True
    tallies.all_reduce(run.dist)
    return tallies.read(split, run.data.classes)


# -- fit ---------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it after each step and saves before leaving."""

    def __init__(self) -> None:
        self.signum: int | None = None


class _Stop(Exception):
    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag) -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into a flag; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
    stop = StopFlag()
    timing = Timing(measure_first=opts.compile != "off")
    stopped = "completed"
    epoch, tallies = start_epoch, None

    def finish(reason: str) -> FitResult:
        result = _result(run, history, reason, timing)
        if run.run_dir is not None and run.is_main:
            write_summary(run, result)  # first: a failing fit-end plugin must not lose it
        run.pm.hook.cnnreg_fit_end(run=run, result=result)
        return result

    run.pm.hook.cnnreg_fit_start(run=run, start_epoch=start_epoch)
    try:
        with stop_on_signals(stop):
            for epoch in range(start_epoch, opts.epochs + 1):
                on_epoch_start = getattr(run.model, "cnnreg_epoch_start", None)
                if callable(on_epoch_start):
                    on_epoch_start(epoch)
                run.pm.hook.cnnreg_epoch_start(run=run, epoch=epoch)
                tallies = Tallies(run.data.num_classes, run.metrics, run.device)
                if partial is not None:
                    tallies.load(partial)
                    partial = None
                record = run_epoch(run, epoch, tallies, skip_batches, stop, timing)
                skip_batches = 0
                history.append(record)
                step_epoch_scheduler(run, record)
                run.pm.hook.cnnreg_epoch_end(run=run, record=record)
                reasons = [r for r in run.pm.hook.cnnreg_should_stop(run=run, record=record) if r]
                # every rank must leave the loop at the same epoch, or the others hang
                decision = distributed.agree("; ".join(reasons) or None, run.dist)
                reasons = [decision] if decision else []
                if reasons:
                    stopped = decision
                periodic = opts.checkpoint_every and epoch % opts.checkpoint_every == 0
                if periodic or reasons or epoch == opts.epochs:
                    save_training_state(run, epoch, history=history)
                if reasons:
                    break
                if stop.signum is not None:
                    raise _Stop(epoch + 1, 0)
    except _Stop as interruption:
        save_training_state(run, interruption.epoch - 1, interruption.step, tallies, history)
        finish("interrupted")
        raise Interrupted(stop.signum or signal.SIGINT, run.run_dir) from None
    except TrainingStopped as exc:
        finish(f"stopped: {exc}")
        raise
    return finish(stopped)


@dataclass
class Timing:
    """Compilation and training time, kept apart: the first step of a compiled
    model (and its first evaluation batch) is compilation, not training."""

    measure_first: bool
    compile_seconds: float = 0.0
    train_seconds: float = 0.0
    compiled_train: bool = False
    compiled_eval: bool = False


def run_epoch(run: Run, epoch: int, tallies: Tallies, skip_batches: int, stop: StopFlag,
              timing: Timing) -> EpochRecord:
    """Train one epoch, evaluate when due, and read the results once."""
    opts = run.recipe.trainer
    started = time.perf_counter()
    seconds = train_epoch(run, epoch, tallies, skip_batches, stop, timing)
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


def _result(run: Run, history: list[EpochRecord], stopped: str, timing: Timing) -> FitResult:
    scored = [r for r in history if run.monitor in r.metrics]
    best = None
    if scored:
        pick = min if run.mode == "min" else max
        best = pick(scored, key=lambda r: r.metrics[run.monitor]).epoch
    return FitResult(records=tuple(history), monitor=run.monitor, mode=run.mode, best_epoch=best, stopped=stopped,
                     train_seconds=timing.train_seconds - timing.compile_seconds,
                     compile_seconds=timing.compile_seconds, run_dir=run.run_dir)
