"""The engine: ``build(recipe) -> Run``, ``fit(run) -> FitResult``, ``evaluate``, ``predict``.

Plain functions, readable top to bottom. The model and the optimizer (with
its scheduler and scaler) are the only mutable objects. Data lives on the
device as uint8 and is augmented there; every per-batch quantity (loss,
confusion matrix, top-k) accumulates in device tensors that are read once per
epoch, so the training step never waits for the host.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from cnnreg import checkpoint, distributed
from cnnreg.batches import make_batches
from cnnreg.components import instantiate
from cnnreg.data import DataContext, DatasetInfo, DataSource, ImageSplit
from cnnreg.device import (autocast, configure_backends, resolve_device, resolve_precision, rng_state,
                           seed_everything, set_rng_state)
from cnnreg.errors import RecipeError, UserError
from cnnreg.plugins import PluginManager
from cnnreg.recipe import RecipeBase
from cnnreg.records import (EpochRecord, EvalResult, FitResult, Metric, Prediction, ProgressRecord, Schedule, Tally,
                            infer_mode)
from cnnreg import splits

PROGRESS_INTERVAL = 0.25  # seconds between progress hook calls
STATE_FORMAT = 1


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


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


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

    data = load_data(recipe, fold)
    channels = recipe.data.channels or data.channels
    model = instantiate(recipe, "model", ("model",), recipe.model,
                        context={"num_classes": data.num_classes, "in_channels": channels})
    context = data_context(data, channels, model)
    train_tf = tuple(instantiate(recipe, "transform", ("transforms", "train", i), spec, data_context=context)
                     for i, spec in enumerate(recipe.transforms.train))
    eval_tf = tuple(instantiate(recipe, "transform", ("transforms", "eval", i), spec, data_context=context)
                    for i, spec in enumerate(recipe.transforms.eval))
    dry_run(recipe, model, sample_images(data.train, 2, data.image_size, channels), data.classes, train_tf, eval_tf)

    channels_last = opts.channels_last if opts.channels_last is not None else run_device.type == "cuda"
    model.to(run_device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model = distributed.sync_batchnorm(model, dist, opts.sync_batchnorm)
    loss_fn = instantiate(recipe, "loss", ("loss",), recipe.loss, context={"num_classes": data.num_classes})
    optimizer = instantiate(recipe, "optimizer", ("optimizer",), recipe.optimizer, live=param_groups(model))

    batches = make_split_batches(recipe, data, channels, run_device, dist)
    steps_per_epoch = math.ceil(len(batches["train"]) / opts.accumulate)
    schedule = None
    if recipe.scheduler is not None:
        schedule = instantiate(recipe, "scheduler", ("scheduler",), recipe.scheduler, live=optimizer,
                               context={"epochs": opts.epochs, "steps_per_epoch": steps_per_epoch})
    metrics = tuple((spec.name, instantiate(recipe, "metric", ("metrics", i), spec,
                                            context={"num_classes": data.num_classes}))
                    for i, spec in enumerate(recipe.metrics))
    callbacks = tuple(instantiate(recipe, "callback", ("callbacks", i), spec)
                      for i, spec in enumerate(recipe.callbacks))
    monitor, mode = check_monitors(recipe, metrics, schedule, callbacks, has_val="val" in batches)

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
    pm = run_plugin_manager(recipe.plugins, callbacks)
    run = Run(recipe=recipe, pm=pm, device=run_device, precision=precision, channels_last=channels_last,
              data=data, context=context, model=model, optimizer=optimizer, schedule=schedule, loss_fn=loss_fn,
              train_transforms=train_tf, eval_transforms=eval_tf, metrics=metrics, callbacks=callbacks,
              batches=batches, scaler=scaler, monitor=monitor, mode=mode,
              run_dir=Path(run_dir) if run_dir is not None else None, dist=dist, step_model=step_model)
    if run.is_main:
        for plugins in pm.hook.cnnreg_run_plugins(run=run):
            for plugin in plugins or ():
                pm.register(plugin)
    if run.run_dir is not None and run.is_main:
        write_run_files(run)
    return run


def load_data(recipe: RecipeBase, fold: int | None = None) -> DataSource:
    """The dataset, with validation carved out, a subset taken, or a fold selected."""
    data = instantiate(recipe, "dataset", ("data",), recipe.data)
    options = recipe.data
    cv = recipe.cross_validation
    if fold is not None:
        if cv is None:
            raise RecipeError([recipe.problem(("cross_validation",), "a fold was asked for but the recipe has no "
                                              "cross_validation section")])
        folds = splits.kfold(data.train.labels, cv.folds, recipe.seed if cv.seed is None else cv.seed, cv.stratified)
        train_index, val_index = folds[fold]
        data = replace(data, train=data.train.select(train_index), val=data.train.select(val_index))
    elif data.val is None and options.val_fraction > 0:
        data = splits.with_validation(data, options.val_fraction, recipe.seed)
    if options.subset is not None:
        data = replace(data, train=splits.subset(data.train, options.subset, recipe.seed))
    if data.mean is None or data.std is None:
        mean, std = splits.channel_stats(data.train)
        data = replace(data, mean=tuple(mean), std=tuple(std))
    channels = options.channels or data.channels
    if channels != data.channels:
        data = replace(data, mean=_convert_stats(data.mean, channels), std=_convert_stats(data.std, channels))
    return data


def _convert_stats(stats: tuple[float, ...] | None, channels: int) -> tuple[float, ...] | None:
    if stats is None or len(stats) == channels:
        return stats
    if channels == 3:
        return tuple(stats) * 3
    return (sum(s * w for s, w in zip(stats, (0.299, 0.587, 0.114))),)


def data_context(data: DataSource | DatasetInfo, channels: int, model: nn.Module) -> DataContext:
    """What transforms may follow: the data's size and statistics, or the
    pretrained model's own preprocessing when it declares one."""
    config = getattr(model, "cnnreg_data_config", None) or {}
    input_size = config.get("input_size")
    if input_size is not None:
        input_size = tuple(input_size[-2:])
    mean = tuple(config["mean"]) if config.get("mean") else data.mean
    std = tuple(config["std"]) if config.get("std") else data.std
    if mean is not None and len(mean) != channels:
        mean, std = _convert_stats(mean, channels), _convert_stats(std, channels)
    return DataContext(image_size=data.image_size, channels=channels, num_classes=data.num_classes,
                       mean=mean, std=std, input_size=input_size,
                       interpolation=config.get("interpolation", "bilinear"), crop_pct=config.get("crop_pct"))


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The model's own parameter groups (``cnnreg_param_groups``), else one group.

    Frozen parameters are included: optimizers skip parameters without a
    gradient, so a backbone unfrozen later trains without a new optimizer.
    """
    groups = getattr(model, "cnnreg_param_groups", None)
    if callable(groups):
        return [dict(g) for g in groups()]
    return [{"params": list(model.parameters())}]


def dry_run(recipe: RecipeBase, model: nn.Module, images: torch.Tensor, classes: Sequence[str],
            train_tf: Sequence[Callable], eval_tf: Sequence[Callable]) -> None:
    """Push a uint8 batch through both transform pipelines and the model, on
    the CPU, and check the output width against the dataset's classes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for split, transforms in (("train", train_tf), ("eval", eval_tf)):
                x = images.float().div(255)
                for i, transform in enumerate(transforms):
                    try:
                        x = transform(x)
                    except (ValueError, UserError, RuntimeError, TypeError, IndexError) as exc:
                        raise RecipeError([recipe.problem(("transforms", split, i),
                                                          f"on a batch of {tuple(x.shape)}: {exc}")]) from None
                try:
                    logits = model(x)
                except Exception as exc:
                    raise RecipeError([recipe.problem(("model",), f"the model fails on the {split} batch of shape "
                                                      f"{tuple(x.shape)}: {type(exc).__name__}: {exc}")]) from None
                expected = (len(images), len(classes))
                if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
                    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    path = ("model", "num_classes") if "num_classes" in recipe.model.model_fields_set else ("model",)
                    shown = ", ".join(classes[:5]) + ("..." if len(classes) > 5 else "")
                    raise RecipeError([recipe.problem(path, f"the model outputs {shape} for a batch of {len(images)}, "
                                                      f"but the dataset has {len(classes)} classes ({shown}); "
                                                      f"expected {expected}")])
    finally:
        model.train(was_training)


def sample_images(split: ImageSplit, count: int, image_size: tuple[int, int], channels: int) -> torch.Tensor:
    """A few uint8 images of a split, as the batches would carry them."""
    count = min(count, len(split))
    batches = make_batches(split.select(torch.arange(count)), batch_size=count, shuffle=False, drop_last=False,
                           device=torch.device("cpu"), seed=0, image_size=image_size, channels=channels,
                           num_workers=0)
    images, _ = next(iter(batches))
    return images


def make_split_batches(recipe: RecipeBase, data: DataSource, channels: int, device: torch.device,
                       dist: distributed.DistInfo) -> dict[str, Any]:
    options = recipe.data
    eval_batch = options.eval_batch_size or 2 * options.batch_size
    common = dict(device=device, image_size=data.image_size, channels=channels, rank=dist.rank,
                  world_size=dist.world_size, num_workers=options.num_workers, seed=recipe.seed,
                  num_classes=data.num_classes)
    batches = {"train": make_batches(data.train, batch_size=options.batch_size, shuffle=options.shuffle,
                                     drop_last=options.drop_last, name="train", **common)}
    for name in ("val", "test"):
        split = data.split(name)
        if split is not None and len(split):
            # exact, uneven shards: evaluation must count every sample once
            batches[name] = make_batches(split, batch_size=eval_batch, shuffle=False, drop_last=False, name=name,
                                         even_shards=False, **common)
    return batches


def check_monitors(recipe: RecipeBase, metrics: Sequence[tuple[str, Metric]], schedule: Schedule | None,
                   callbacks: Sequence[object], has_val: bool) -> tuple[str, str]:
    """Every metric a recipe monitors must be one the run reports."""
    splits_seen = ["train", "val"] if has_val else ["train"]
    names = {"lr", "epoch_seconds"} | {f"{s}_loss" for s in splits_seen}
    names |= {f"{s}_{n}" for s in splits_seen for _, metric in metrics for n in metric.names}
    problems = []

    def check(name: str | None, path: tuple) -> None:
        if name is not None and name not in names:
            import difflib
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            no_val = "" if has_val else " (this run has no validation split)"
            problems.append(recipe.problem(path, f"no metric called {name!r}{no_val}{hint}; "
                                           f"this run reports: {', '.join(sorted(names))}"))

    check(recipe.trainer.monitor, ("trainer", "monitor"))
    if schedule is not None:
        check(schedule.monitor, ("scheduler", "monitor"))
    callback_monitor = None
    for i, callback in enumerate(callbacks):
        name = getattr(callback, "monitor", None)
        if isinstance(name, str):
            check(name, ("callbacks", i, "monitor"))
            if getattr(callback, "chooses_best", False):
                callback_monitor = callback_monitor or name
    if problems:
        raise RecipeError(problems)
    default = ("val_accuracy" if has_val else "train_accuracy") if any(
        "accuracy" in m.names for _, m in metrics) else ("val_loss" if has_val else "train_loss")
    monitor = recipe.trainer.monitor or callback_monitor or default
    return monitor, recipe.trainer.mode or infer_mode(monitor)


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


def new_run_dir(recipe: RecipeBase, fold: int | None = None) -> Path:
    root = recipe.output_dir or Path.cwd() / "runs"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{recipe.name}-{stamp}" + (f"-fold{fold + 1}" if fold is not None else "")
    for n in range(1, 1000):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"could not create a run directory under {root}")


def write_run_files(run: Run) -> None:
    """The resolved recipe (re-runnable, resumable) and the environment it ran in."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    recipe = run.recipe.to_json()
    checkpoint.atomic_write_text(run.run_dir / "recipe.json", json.dumps(recipe, indent=2) + "\n")
    plugins = {name: str(run.recipe.plugins.origin(name)) for name, _ in run.recipe.plugins.list_name_plugin()}
    info = {
        "recipe": recipe,
        "created": datetime.now().isoformat(timespec="seconds"),
        "seed": run.recipe.seed,
        "device": str(run.device),
        "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type,
        "precision": run.precision,
        "channels_last": run.channels_last,
        "world_size": run.dist.world_size,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn":
                     torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                     "cnnreg": _version()},
        "plugins": plugins,
        "broken_plugins": [str(b) for b in run.recipe.catalog.broken],
        "data": {"classes": list(run.data.classes), "image_size": list(run.data.image_size),
                 "channels": run.context.channels, "mean": run.context.mean, "std": run.context.std,
                 "splits": {name: len(b.split) if hasattr(b, "split") else b.num_samples
                            for name, b in run.batches.items()},
                 "skipped_files": [list(s) for s in run.data.skipped]},
    }
    checkpoint.atomic_write_text(run.run_dir / "run.json", json.dumps(info, indent=2, default=str) + "\n")


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("cnnreg-framework")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- the step ----------------------------------------------------------------------------------


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
        return {"loss_sum": self.loss_sum, "count": self.count, "confusion": self.confusion, "extra": self.extra}

    def load(self, state: dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.count.copy_(state["count"])
        self.confusion.copy_(state["confusion"])
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


def prepare(run: Run, images: torch.Tensor, transforms: Sequence[Callable]) -> torch.Tensor:
    """uint8 batch -> float in [0, 1] -> the recipe's transforms -> the model's memory format."""
    x = images.float().div_(255)
    for transform in transforms:
        x = transform(x)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


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


def train_epoch(run: Run, epoch: int, tallies: Tallies, skip_batches: int, stop: StopFlag,
                timing: Timing) -> float:
    """One pass over the training split; returns its wall time in seconds."""
    opts = run.recipe.trainer
    model = run.step_model or run.model
    batches = run.batches["train"]
    batches.set_epoch(epoch, start_batch=skip_batches)  # resuming mid-epoch: the same order, from there
    run.model.train()
    total = len(batches)
    reader = LossReader(run.device)
    start = last_report = time.perf_counter()
    seen = skip_batches
    skip_nan = opts.on_nan == "skip"
    clip_params = [p for g in run.optimizer.param_groups for p in g["params"]]
    for index, (images, targets) in enumerate(batches, start=skip_batches):
        x = prepare(run, images, run.train_transforms)
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
    model = run.step_model or run.model
    batches = run.batches[split]
    tallies = Tallies(run.data.num_classes, run.metrics, run.device)
    run.model.eval()
    start = time.perf_counter()
    with torch.inference_mode(), autocast(run.device, run.precision):
        for images, targets in batches:
            logits = model(prepare(run, images, run.eval_transforms))
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
    except NonFiniteLoss as exc:
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


def write_summary(run: Run, result: FitResult) -> None:
    best, last = result.best, result.last
    summary = {
        "name": run.recipe.name,
        "stopped": result.stopped,
        "epochs_run": len(result.records),
        "monitor": result.monitor,
        "mode": result.mode,
        "best_epoch": result.best_epoch,
        "best": dict(best.metrics) if best else None,
        "last": dict(last.metrics) if last else None,
        "train_seconds": round(result.train_seconds, 3),
        "compile_seconds": round(result.compile_seconds, 3),
        "classes": list(run.data.classes),
        "per_class": {split: {k: list(v) for k, v in ev.per_class.items()}
                      for split, ev in (last.evals.items() if last else [])},
    }
    checkpoint.atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


# -- training state (resume) -------------------------------------------------------------------


def training_state(run: Run, epoch: int, step_in_epoch: int = 0, tallies: Tallies | None = None,
                   history: Sequence[EpochRecord] = ()) -> dict[str, Any]:
    """Everything needed to continue exactly where training is now.

    :param epoch: the last completed epoch.
    :param step_in_epoch: batches of epoch ``epoch + 1`` already run (interrupted mid-epoch).
    """
    return {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "model": checkpoint.unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.scheduler.state_dict() if run.schedule else None,
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "rng": rng_state(),  # rank 0's: every rank restores it on resume (they start from one seed too)
        "world_size": run.dist.world_size,
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in run.callbacks],
        "partial": tallies.state() if (tallies is not None and step_in_epoch) else None,
        "history": [record_to_json(r) for r in history],
    }


def save_training_state(run: Run, epoch: int, step_in_epoch: int = 0, tallies: Tallies | None = None,
                        history: Sequence[EpochRecord] = ()) -> Path | None:
    """Write ``last.pt`` (atomically) and return its path; None without a run directory."""
    if run.run_dir is None or not run.is_main:
        return None
    path = run.run_dir / checkpoint.LAST
    checkpoint.save_state(training_state(run, epoch, step_in_epoch, tallies, history), path)
    return path


def restore_training_state(run: Run, state: dict[str, Any]) -> tuple[int, int, dict | None, list[EpochRecord]]:
    """Load a training state into the run; returns (start epoch, batches to skip, partial tallies, history)."""
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"checkpoint format {state.get('format')!r} is not one this cnnreg reads ({STATE_FORMAT})")
    checkpoint.unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.schedule is not None and state.get("scheduler") is not None:
        run.schedule.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler") is not None:
        run.scaler.load_state_dict(state["scaler"])
    for callback, saved in zip(run.callbacks, state.get("callbacks", [])):
        if saved is not None and hasattr(callback, "load_state_dict"):
            callback.load_state_dict(saved)
    step_in_epoch = state.get("step_in_epoch", 0)
    saved_world = state.get("world_size", 1)
    if step_in_epoch and saved_world != run.dist.world_size:
        # the position is counted in per-rank batches, which another world size cuts differently
        raise UserError(f"this checkpoint was saved mid-epoch by {saved_world} process(es); resume it with "
                        f"{saved_world} (now {run.dist.world_size}), or from an end-of-epoch checkpoint")
    set_rng_state(state["rng"])
    history = [record_from_json(r) for r in state.get("history", [])]
    partial = state.get("partial")
    if partial is not None and not run.is_main:
        partial = None  # the saved tallies are rank 0's; loaded on every rank, the all-reduce would repeat them
    if partial is not None:
        partial = {k: (v.to(run.device) if isinstance(v, torch.Tensor) else
                       [t.to(run.device) if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list) else v)
                   for k, v in partial.items()}
    return state["epoch"] + 1, step_in_epoch, partial, history


def record_to_json(record: EpochRecord) -> dict[str, Any]:
    return {"epoch": record.epoch, "epochs": record.epochs, "metrics": dict(record.metrics),
            "train_seconds": record.train_seconds, "seconds": record.seconds,
            "images_per_second": record.images_per_second,
            "evals": {k: {"metrics": dict(v.metrics), "per_class": {n: list(c) for n, c in v.per_class.items()},
                          "confusion": [list(r) for r in v.confusion], "classes": list(v.classes)}
                      for k, v in record.evals.items()}}


def record_from_json(data: dict[str, Any]) -> EpochRecord:
    evals = {k: EvalResult(split=k, metrics=v["metrics"], per_class={n: tuple(c) for n, c in v["per_class"].items()},
                           confusion=tuple(tuple(r) for r in v["confusion"]), classes=tuple(v["classes"]))
             for k, v in data.get("evals", {}).items()}
    return EpochRecord(epoch=data["epoch"], epochs=data["epochs"], metrics=data["metrics"], evals=evals,
                       train_seconds=data["train_seconds"], seconds=data["seconds"],
                       images_per_second=data["images_per_second"])


# -- predict -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictor:
    """What classifying new images takes: the model, the eval transforms and
    the data's shape and class names (no dataset needed)."""

    model: nn.Module
    transforms: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    device: torch.device
    precision: str
    channels_last: bool


def predictor(run: Run) -> Predictor:
    return Predictor(model=run.model, transforms=run.eval_transforms, classes=run.data.classes,
                     image_size=run.data.image_size, channels=run.context.channels, device=run.device,
                     precision=run.precision, channels_last=run.channels_last)


def predict(run: Run | Predictor, images: Sequence[Any], top_k: int = 1) -> list[Prediction]:
    """Classify images (paths, PIL images or uint8 ``[C, H, W]`` tensors) with the
    run's eval transforms; each answer lists the ``top_k`` classes and confidences."""
    from cnnreg.imagefiles import BadImage, decode_image

    p = run if isinstance(run, Predictor) else predictor(run)
    top_k = max(1, min(top_k, len(p.classes)))
    batch, sources = [], []
    for item in images:
        if isinstance(item, torch.Tensor):
            tensor = item if item.dtype == torch.uint8 else (item.clamp(0, 1) * 255).round().to(torch.uint8)
            tensor = splits.convert_channels(tensor.unsqueeze(0), p.channels)[0]
            if tuple(tensor.shape[-2:]) != p.image_size:
                tensor = nn.functional.interpolate(tensor[None].float(), size=p.image_size, mode="bilinear",
                                                   antialias=True, align_corners=False).round().clamp(0, 255)[0].to(torch.uint8)
            batch.append(tensor)
            sources.append("<tensor>")
            continue
        if hasattr(item, "convert") and hasattr(item, "save"):  # a PIL image
            import io
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            buffer.seek(0)
            item, source = buffer, "<image>"
        else:
            source = str(item)
        try:
            array = decode_image(item, size=p.image_size, channels=p.channels)
        except BadImage as exc:
            raise UserError(f"cannot read {source}: {exc.reason}") from None
        batch.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        sources.append(source)
    x = torch.stack(batch).to(p.device)
    p.model.eval()
    with torch.inference_mode(), autocast(p.device, p.precision):
        x = x.float().div_(255)
        for transform in p.transforms:
            x = transform(x)
        if p.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probabilities = torch.softmax(p.model(x).float(), dim=1)
    confidences, indices = probabilities.topk(top_k, dim=1)
    return [Prediction(source=s, classes=tuple(p.classes[i] for i in idx), indices=tuple(idx),
                       confidences=tuple(conf))
            for s, idx, conf in zip(sources, indices.cpu().tolist(), confidences.cpu().tolist())]
