"""The dry run and the monitor check: a recipe's model and transforms on a batch, and the
metrics it watches, checked before any training."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cnnreg.config.recipe import Recipe
from cnnreg.core.data import ImageSplit
from cnnreg.core.errors import RecipeError, UserError
from cnnreg.core.records import Metric, Schedule, infer_mode
from cnnreg.inputs.batches import make_batches
from cnnreg.inputs.prepare import apply_transform, merge_views, view_weights


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The model's own parameter groups (``cnnreg_param_groups``), else one group.

    Frozen parameters are included: optimizers skip parameters without a
    gradient, so a backbone unfrozen later trains without a new optimizer.
    """
    groups = getattr(model, "cnnreg_param_groups", None)
    if callable(groups):
        return [dict(g) for g in groups()]
    return [{"params": list(model.parameters())}]


def fake_images(count: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A seeded uint8 batch of ``size``: the dry run's input when the data is not loaded."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, channels, *size), dtype=torch.uint8, generator=generator)


def sample_images(split: ImageSplit, count: int, image_size: tuple[int, int], channels: int,
                  fit: str = "stretch") -> torch.Tensor:
    """A few uint8 images of a split, as the batches would carry them."""
    count = min(count, len(split))
    batches = make_batches(split.select(torch.arange(count)), batch_size=count, shuffle=False, drop_last=False,
                           device=torch.device("cpu"), seed=0, image_size=image_size, channels=channels,
                           num_workers=0, fit=fit)  # type: ignore[arg-type]
    images, _ = next(iter(batches))
    return images


def dry_run(recipe: Recipe, model: nn.Module, images: torch.Tensor, classes: Sequence[str],
            train_tf: Sequence[Callable], eval_tf: Sequence[Callable]) -> None:
    """Push a uint8 batch through both transform pipelines and the model, on
    the CPU, and check the output width against the dataset's classes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for split, transforms in (("train", train_tf), ("eval", eval_tf)):
                x = images.float().div(255)
                index = torch.arange(len(images))
                for i, transform in enumerate(transforms):
                    if split == "train" and getattr(transform, "view_weights", None) is not None:
                        raise RecipeError([recipe.problem(("transforms", split, i),
                                                          "test-time augmentation makes several views of each "
                                                          "image for evaluation: move it to transforms.eval")])
                    try:
                        x = apply_transform(transform, x, index, epoch=0)
                    except (ValueError, UserError, RuntimeError, TypeError, IndexError) as exc:
                        raise RecipeError([recipe.problem(("transforms", split, i),
                                                          f"on a batch of {tuple(x.shape)}: {exc}")]) from None
                try:
                    logits = merge_views(model(x), view_weights(transforms))
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


# -- what the run monitors ------------------------------------------------------------------------


def check_monitors(recipe: Recipe, metrics: Sequence[tuple[str, Metric]], schedule: Schedule | None,
                   callbacks: Sequence[object], has_val: bool) -> tuple[str, str]:
    """Every metric a recipe monitors must be one the run reports."""
    splits_seen = ["train", "val"] if has_val else ["train"]
    names = {"lr", "epoch_seconds"} | {f"{s}_loss" for s in splits_seen}
    names |= {f"{s}_{n}" for s in splits_seen for _, metric in metrics for n in metric.names}
    problems = []

    def check(name: str | None, path: tuple) -> None:
        if name is not None and name not in names:
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
