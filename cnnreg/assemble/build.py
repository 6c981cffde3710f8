"""``build(recipe) -> Run``: the checked parts (:mod:`cnnreg.assemble.parts`) placed on the
run's device, with their batches, run directory and run-scoped plugin manager."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from cnnreg.assemble.checks import sample_images
from cnnreg.assemble.parts import assemble
from cnnreg.config.recipe import Recipe
from cnnreg.core import distributed
from cnnreg.core.data import DataSource
from cnnreg.core.device import apply_precision, configure_backends, resolve_device, resolve_precision, seed_everything
from cnnreg.core.run import Run
from cnnreg.inputs.batches import make_batches
from cnnreg.inputs.prepare import prepare_batch
from cnnreg.plugin.events import emit
from cnnreg.plugin.manager import PluginManager
from cnnreg.runs.directory import new_run_dir, write_run_files


def build(
    recipe: Recipe,
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

    parts = assemble(recipe, load=True, fold=fold, world_size=dist.world_size, place=place,
                     output=output and dist.rank == 0 and run_dir is None)
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
              dist=dist, step_model=step_model, choices=parts.choices,
              plugins={name: str(recipe.plugins.origin(name)) for name, _ in recipe.plugins.list_name_plugin()},
              broken_plugins=tuple(str(b) for b in recipe.catalog.broken),
              records_pending=run_dir is not None and (Path(run_dir) / "run.json").exists())
    if run.is_main:
        for plugins in emit(run, "cnnreg_run_plugins", run=run):
            for plugin in plugins:
                pm.register(plugin)
    if run.run_dir is not None and run.is_main and not run.records_pending:
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


def make_split_batches(recipe: Recipe, data: DataSource, channels: int, device: torch.device,
                       dist: distributed.DistInfo) -> dict[str, Any]:
    options = recipe.data
    eval_batch = options.eval_batch_size or 2 * options.batch_size
    common = dict(device=device, image_size=data.image_size, channels=channels, rank=dist.rank,
                  world_size=dist.world_size, num_workers=options.num_workers, seed=recipe.seed,
                  num_classes=data.num_classes, fit=data.fit)
    batches = {"train": make_batches(data.train, batch_size=options.batch_size, shuffle=options.shuffle,
                                     drop_last=options.drop_last, name="train", sampler=options.sampler, **common)}
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
