"""The one assembly of a run's parts, shared by ``cnnreg run``, ``cnnreg validate`` and the predictor.

:func:`assemble` makes, in this order, and checks as it goes: the data (or
its description, for validate), the model, the size the images are
stored at, the transforms, a dry run of both pipelines through the model,
the loss, the optimizer and its schedule, the metrics, the callbacks and
the metric the run monitors. ``run`` and ``validate`` differ in one
switch: whether the data is loaded (a dataset that can describe itself is
only described for validate) -- every check is the same code, so a recipe
that validates is a recipe whose run gets past its set-up.

What a recipe leaves out is chosen from the model and the data (the stored
image size of a folder of mixed sizes, the transforms of a recipe without
any: :mod:`cnnreg.assemble.defaults`), written into the recipe the run
records, and returned as :class:`~cnnreg.core.records.Choice` records for
the run header and run.json. The data's description, loading and checks are
:mod:`cnnreg.assemble.data`; the dry run and the monitor check
:mod:`cnnreg.assemble.checks`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from cnnreg.assemble.checks import check_monitors, dry_run, fake_images, param_groups, sample_images
from cnnreg.assemble.data import (check_data, describe, describe_source, load_data, stand_in_size, train_batch_count,
                                   train_class_counts)
from cnnreg.assemble.defaults import data_context, default_transforms, storage_choice
from cnnreg.assemble.instantiate import component_kwargs, instantiate
from cnnreg.config.recipe import Recipe
from cnnreg.core import progress
from cnnreg.core.balance import balanced_weights
from cnnreg.core.data import DataContext, DatasetInfo, DataSource
from cnnreg.core.errors import RecipeError, Unchecked
from cnnreg.core.records import Choice, Metric, Schedule
from cnnreg.inputs.prepare import mixes_targets

#: Placeholder statistics for a dry run before the data's are known (validate).
_PLACEHOLDER_STATS = (0.5, 0.25)


@dataclass(frozen=True)
class Parts:
    """What :func:`assemble` made: everything a run is built from, before the device.

    :param recipe: the recipe with the assembly's choices written in.
    :param data: the loaded data (``None`` when only described).
    :param info: what the data is: classes, stored size, channels, statistics.
    :param train_batches: training batches per epoch (per process).
    :param unchecked: what could not be checked (validate: absent data, absent weights).
    :param warnings: what the run warns about before training (validate reports them).
    :param data_absent: the data is not here (validate): ``info`` is a stand-in.
    """

    recipe: Recipe
    data: DataSource | None
    info: DatasetInfo
    channels: int
    model: nn.Module
    context: DataContext
    train_transforms: tuple[Callable[..., torch.Tensor], ...]
    eval_transforms: tuple[Callable[..., torch.Tensor], ...]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    metrics: tuple[tuple[str, Metric], ...]
    callbacks: tuple[object, ...]
    monitor: str
    mode: str
    train_batches: int
    choices: tuple[Choice, ...] = ()
    unchecked: tuple[Unchecked, ...] = ()
    warnings: tuple[str, ...] = ()
    data_absent: bool = False


def assemble(recipe: Recipe, *, load: bool, fold: int | None = None, world_size: int = 1,
             place: Callable[[nn.Module, DataSource | None, Sequence[Callable]], nn.Module] | None = None,
             output: bool = True) -> Parts:
    """Make and check every part of a run.

    :param load: load the data (``run``); otherwise describe it when the
        dataset can, and list what is absent instead of failing (``validate``).
    :param fold: the k-fold cross-validation fold to train on.
    :param world_size: processes the training split is shared among.
    :param place: called with the checked model (and the data and eval
        transforms) before the optimizer is made: the run moves it to its
        device and precision there, so the optimizer sees the final parameters.
    :param output: the run will write a run directory: its output folder is checked.
    :raises RecipeError: every problem, located in the recipe.
    """
    unchecked: list[Unchecked] = []
    choices: list[Choice] = []
    with progress.reporting(recipe.trainer.progress):
        info, data, absent = describe(recipe, fold, load, unchecked)
        check_data(recipe, info, absent=absent, check_output=output)
        channels = recipe.data.channels or info.channels
        model = _model(recipe, info.num_classes, channels, unchecked=None if load else unchecked)
        if absent:
            info = replace(info, image_size=stand_in_size(recipe, model))
        elif (stored := storage_choice(recipe, info, model)) is not None:
            choice, values = stored
            choices.append(choice)
            recipe = recipe.updated(values)
            info = replace(info, image_size=tuple(choice.value), mixed_sizes=False)
        if load and data is None:
            data = load_data(recipe, fold)
        if data is not None:
            info = replace(describe_source(data), warnings=info.warnings)
    context = data_context(info, channels, model)
    known_stats = context.mean is not None and context.std is not None
    if not known_stats:  # validate, on data whose statistics are computed when it is loaded
        mean, std = _PLACEHOLDER_STATS
        context = replace(context, mean=(mean,) * channels, std=(std,) * channels)
    if "transforms" not in recipe.model_fields_set:
        defaults = default_transforms(recipe, context, model, known_stats=known_stats)
        if defaults is not None:
            choices.append(defaults)
            recipe = recipe.updated({"transforms": defaults.value})
    train_tf, eval_tf = _transforms(recipe, context, "train"), _transforms(recipe, context, "eval")
    images = (sample_images(data.train, 2, data.image_size, channels, data.fit) if data is not None
              else fake_images(2, channels, info.image_size))
    dry_run(recipe, model, images, info.classes, train_tf, eval_tf)
    if place is not None:
        model = place(model, data, eval_tf)

    opts = recipe.trainer
    batches = train_batch_count(recipe, info, data, fold, world_size, absent)
    counts = train_class_counts(recipe, info, data, fold, absent)
    if counts is not None:
        choices.extend(balanced_choices(recipe, counts, info.classes))
    loss_fn = instantiate(recipe, "loss", ("loss",), recipe.loss, unchecked=None if load else unchecked,
                          context={"num_classes": info.num_classes, "class_counts": counts})
    _check_soft_targets(recipe, train_tf, loss_fn)
    optimizer = instantiate(recipe, "optimizer", ("optimizer",), recipe.optimizer, live=param_groups(model))
    schedule = None
    if recipe.scheduler is not None:
        schedule = instantiate(recipe, "scheduler", ("scheduler",), recipe.scheduler, live=optimizer,
                               context={"epochs": opts.epochs,
                                        "steps_per_epoch": max(1, math.ceil(batches / opts.accumulate))})
    metrics = tuple((spec.name, instantiate(recipe, "metric", ("metrics", i), spec,
                                            context={"num_classes": info.num_classes}))
                    for i, spec in enumerate(recipe.metrics))
    callbacks = tuple(instantiate(recipe, "callback", ("callbacks", i), spec, context={"epochs": opts.epochs})
                      for i, spec in enumerate(recipe.callbacks))
    has_val = "val" in info.splits or recipe.data.val_fraction > 0 or fold is not None or (
        recipe.cross_validation is not None)
    monitor, mode = check_monitors(recipe, metrics, schedule, callbacks, has_val=has_val)
    return Parts(recipe=recipe, data=data, info=info, channels=channels, model=model, context=context,
                 train_transforms=train_tf, eval_transforms=eval_tf, loss_fn=loss_fn, optimizer=optimizer,
                 schedule=schedule, metrics=metrics, callbacks=callbacks, monitor=monitor, mode=mode,
                 train_batches=batches, choices=tuple(choices), unchecked=tuple(unchecked),
                 warnings=info.warnings, data_absent=absent)


def balanced_choices(recipe: Recipe, counts: tuple[int, ...], classes: Sequence[str]) -> list[Choice]:
    """The weights a loss parameter set to ``"balanced"`` (``weight``, focal's
    ``alpha``) comes to, for the run header and run.json: the loss computes the
    same from the ``class_counts`` it is given. A class without training
    images is an error here, where the class can be named."""
    found = []
    for param in ("weight", "alpha"):
        if getattr(recipe.loss, param, None) != "balanced":
            continue
        try:
            weights = balanced_weights(counts, classes, key=param)
        except ValueError as exc:
            raise RecipeError([recipe.problem(("loss", param), f"{recipe.loss.name}: {exc}")]) from None  # type: ignore[attr-defined]
        found.append(Choice(f"loss.{param}", [round(w, 6) for w in weights],
                            f"balanced: n / (classes x count) from the training split's images per class {list(counts)}",
                            f"give loss.{param} as a list to set the weights"))
    return found


def model_and_eval_transforms(recipe: Recipe, info: DatasetInfo) -> tuple[nn.Module, tuple]:
    """The model and eval transforms of a finished run, from what it recorded (the predictor's part)."""
    model = _model(recipe, info.num_classes, info.channels)
    # The statistics the run normalised with were recorded; use them, not a recomputation.
    context = replace(data_context(info, info.channels, model), mean=info.mean, std=info.std)
    return model, _transforms(recipe, context, "eval")


def _model(recipe: Recipe, num_classes: int, channels: int, unchecked: list[Unchecked] | None = None) -> nn.Module:
    context = {"num_classes": num_classes, "in_channels": channels}
    model = instantiate(recipe, "model", ("model",), recipe.model, unchecked=unchecked, context=context)
    if getattr(model, "cnnreg_weights_metadata", None) is None:
        # Weights files say how to rebuild the model without cnnreg (see checkpoint.save_weights);
        # a model that knows better (a timm or torchvision backbone) declares its own.
        model.cnnreg_weights_metadata = factory_metadata(recipe, context)
    return model


def factory_metadata(recipe: Recipe, context: dict[str, int]) -> dict[str, str]:
    """The model's factory as an import path and its arguments as JSON, the way
    the run called it: ``getattr(importlib.import_module(module), name)(**json.loads(params))``
    builds the model the weights fit. Empty for a factory that cannot be imported by name."""
    component = recipe.component("model", recipe.model)
    factory = component.factory
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or not name or "<" in name or "." in name:  # a lambda, a local or a method: no import path
        return {}
    params = component_kwargs(component, recipe.model, context)
    return {"model": recipe.model.name, "factory": f"{module}.{name}",  # type: ignore[attr-defined]
            "params": json.dumps(params, default=str, sort_keys=True)}


def _transforms(recipe: Recipe, context: DataContext, split: str) -> tuple[Callable[..., torch.Tensor], ...]:
    specs = recipe.transforms.train if split == "train" else recipe.transforms.eval
    made = tuple(instantiate(recipe, "transform", ("transforms", split, i), spec, data_context=context)
                 for i, spec in enumerate(specs))
    if split == "eval":  # evaluation has no labels to mix, and must see the images as they are
        mixing = [i for i, t in enumerate(made) if mixes_targets(t)]
        if mixing:
            raise RecipeError([recipe.problem(("transforms", "eval", i), f"{specs[i].name} mixes training batches "
                                              f"only; remove it from transforms.eval") for i in mixing])
    return made


def _check_soft_targets(recipe: Recipe, train_tf: Sequence[Callable], loss_fn: Callable) -> None:
    """Mixing transforms give the loss soft targets [B, C]: the loss must say it takes them."""
    mixing = [i for i, t in enumerate(train_tf) if mixes_targets(t)]
    if mixing and not getattr(loss_fn, "accepts_soft_targets", False):
        name = recipe.transforms.train[mixing[0]].name
        raise RecipeError([recipe.problem(("loss",), f"{recipe.loss.name} takes class indices, but {name} "
                                          f"(transforms.train[{mixing[0]}]) gives soft targets; use "
                                          f"cross_entropy or bce_with_logits, or remove {name}")])



