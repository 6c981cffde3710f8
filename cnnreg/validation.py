"""``cnnreg validate``: check a recipe in seconds, on the CPU, without its data.

Beyond the schema, a dry run builds the model and the transforms, pushes one
fake batch of the dataset's image shape through each pipeline and the model,
and checks the output width against the dataset's classes. Datasets that can
describe themselves (``cnnreg.data.describes``) are not loaded at all.
"""

from __future__ import annotations

import torch

from cnnreg.components import component_kwargs, instantiate
from cnnreg.data import DatasetInfo
from cnnreg.engine import check_monitors, data_context, dry_run, load_data, param_groups
from cnnreg.errors import RecipeError, UserError
from cnnreg.recipe import RecipeBase


def describe_data(recipe: RecipeBase) -> DatasetInfo:
    """The dataset's classes and shape, from its cheap describe when it has one."""
    component = recipe.component("dataset", recipe.data)
    describe = getattr(component.factory, "cnnreg_describe", None)
    if describe is None:
        data = load_data(recipe)
        present = tuple(name for name in ("train", "val", "test") if data.split(name) is not None)
        return DatasetInfo(data.classes, data.image_size, data.channels, data.mean, data.std, present)
    try:
        return describe(**component_kwargs(component, recipe.data, {}))
    except (UserError, ValueError, OSError) as exc:
        raise RecipeError([recipe.problem(("data",), f"{recipe.data.name}: {exc}")]) from None


def dry_run_recipe(recipe: RecipeBase) -> str:
    """Build the model and transforms on the CPU and run a fake batch; return a one-line report."""
    info = describe_data(recipe)
    channels = recipe.data.channels or info.channels
    model = instantiate(recipe, "model", ("model",), recipe.model,
                        context={"num_classes": info.num_classes, "in_channels": channels})
    context = data_context(info, channels, model)
    train_tf = [instantiate(recipe, "transform", ("transforms", "train", i), spec, data_context=context)
                for i, spec in enumerate(recipe.transforms.train)]
    eval_tf = [instantiate(recipe, "transform", ("transforms", "eval", i), spec, data_context=context)
               for i, spec in enumerate(recipe.transforms.eval)]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, channels, *info.image_size), dtype=torch.uint8, generator=generator)
    dry_run(recipe, model, images, info.classes, train_tf, eval_tf)
    instantiate(recipe, "loss", ("loss",), recipe.loss, context={"num_classes": info.num_classes})
    optimizer = instantiate(recipe, "optimizer", ("optimizer",), recipe.optimizer, live=param_groups(model))
    schedule = None
    if recipe.scheduler is not None:
        steps = max(1, round(1000 / recipe.data.batch_size))  # a stand-in: the real count needs the data
        schedule = instantiate(recipe, "scheduler", ("scheduler",), recipe.scheduler, live=optimizer,
                               context={"epochs": recipe.trainer.epochs, "steps_per_epoch": steps})
    metrics = [(spec.name, instantiate(recipe, "metric", ("metrics", i), spec, context={"num_classes": info.num_classes}))
               for i, spec in enumerate(recipe.metrics)]
    callbacks = [instantiate(recipe, "callback", ("callbacks", i), spec) for i, spec in enumerate(recipe.callbacks)]
    has_val = "val" in info.splits or recipe.data.val_fraction > 0 or recipe.cross_validation is not None
    check_monitors(recipe, metrics, schedule, callbacks, has_val=has_val)
    parameters = sum(p.numel() for p in model.parameters())
    return (f"{recipe.model.name} ({parameters / 1e6:.2f}M parameters) on {recipe.data.name} "
            f"({info.num_classes} classes, {channels}x{info.image_size[0]}x{info.image_size[1]})")
