"""The data of a run, as the assembly sees it: described or loaded, carved into splits, checked.

A dataset that can describe itself (``cnnreg.core.data.describes``) is
described first, by ``run`` and ``validate`` alike; only the run then loads
it. What stops a run (a single class, labels out of range, a split too small
for a batch, the output inside the data folder) is found here for both.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from cnnreg.assemble.defaults import convert_stats, resize_size
from cnnreg.assemble.instantiate import component_kwargs, instantiate
from cnnreg.core.balance import class_counts
from cnnreg.config.recipe import Recipe
from cnnreg.core.data import DatasetInfo, DataSource, ImageSplit
from cnnreg.core.errors import RecipeError, Unavailable, Unchecked, UserError
from cnnreg.inputs import splits
from cnnreg.inputs.batches import check_labels, train_batches
from cnnreg.runs.directory import output_problem, runs_root


def describe(recipe: Recipe, fold: int | None, load: bool,
              unchecked: list[Unchecked]) -> tuple[DatasetInfo, DataSource | None, bool]:
    """What the data is, without loading it when the dataset can say; the data itself otherwise.

    :returns: the description, the data when it was loaded, and whether the
        data is absent. Absent data stops a run; for validate (``load``
        false) it joins ``unchecked`` and a stand-in description (from what
        the recipe declares) lets everything else be checked.
    """
    component = recipe.component("dataset", recipe.data)
    describe = getattr(component.factory, "cnnreg_describe", None)
    try:
        if describe is None:
            data = load_data(recipe, fold, absent_ok=not load)
            return describe_source(data), data, False
        try:
            info = describe(**component_kwargs(component, recipe.data, {}))
        except Unavailable:
            raise
        except (UserError, ValueError, OSError) as exc:
            raise RecipeError([recipe.problem(("data",), f"{recipe.data.name}: {exc}")]) from None
    except Unavailable as exc:
        problem = recipe.problem(("data",), f"{recipe.data.name}: {exc}")
        if load:
            raise RecipeError([problem]) from None
        unchecked.append(Unchecked(problem, "a stand-in for its classes and images"))
        return _stand_in(recipe), None, True
    unchecked.extend(Unchecked(recipe.problem(("data",), f"{recipe.data.name}: {note}")) for note in info.unchecked)
    return info, None, False


def _stand_in(recipe: Recipe) -> DatasetInfo:
    """A description of absent data, from what the recipe declares: the
    model's ``num_classes`` when set, else two classes; ``data.channels`` or
    3; the size follows once the model is built (:func:`_stand_in_size`)."""
    classes = getattr(recipe.model, "num_classes", None) or 2
    return DatasetInfo(classes=tuple(f"class {i + 1}" for i in range(classes)), image_size=(64, 64),
                       channels=recipe.data.channels or 3, splits=("train",))


def stand_in_size(recipe: Recipe, model: nn.Module) -> tuple[int, int]:
    """The stand-in batch's size: ``data.size`` when declared, else what the
    model's preprocessing resizes to, else the largest size a transform
    names (so every crop fits), else 64x64."""
    size = getattr(recipe.data, "size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else tuple(size)
    resize = resize_size(getattr(model, "cnnreg_data_config", None) or {})
    if resize is not None:
        return resize
    sizes = []
    for spec in (*recipe.transforms.train, *recipe.transforms.eval):
        value = getattr(spec, "size", None)
        if isinstance(value, int):
            sizes.append((value, value))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            sizes.append(tuple(value))
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else (64, 64)


def describe_source(data: DataSource) -> DatasetInfo:
    """The description of loaded data."""
    present = {name: len(split) for name in ("train", "val", "test") if (split := data.split(name)) is not None}
    return DatasetInfo(classes=data.classes, image_size=data.image_size, channels=data.channels, mean=data.mean,
                       std=data.std, splits=tuple(present), split_sizes=present)


def load_data(recipe: Recipe, fold: int | None = None, *, absent_ok: bool = False) -> DataSource:
    """The dataset, with validation carved out, a subset taken, or a fold selected.

    :param absent_ok: let :class:`Unavailable` (and a plugin's
        ``FileNotFoundError``) through, for validate to list.
    """
    data = instantiate(recipe, "dataset", ("data",), recipe.data, absent_ok=absent_ok)
    _check_labels(recipe, data)  # before any split is carved by label
    data = carve(recipe, data, fold)
    options = recipe.data
    if data.mean is None or data.std is None:
        mean, std = splits.channel_stats(data.train, size=data.image_size, fit=data.fit)
        data = replace(data, mean=tuple(mean), std=tuple(std))
    channels = options.channels or data.channels
    if channels != data.channels:
        data = replace(data, mean=convert_stats(data.mean, channels), std=convert_stats(data.std, channels))
    return data


def carve(recipe: Recipe, data: DataSource, fold: int | None = None) -> DataSource:
    """The recipe's splits of the data: a k-fold fold, or a validation split carved
    from train when the data has none, then a subset of train.

    Only labels are read, so validate carves a description's labels with
    the same calls (the same counts, warnings and errors)."""
    options = recipe.data
    cv = recipe.cross_validation
    try:
        if fold is not None:
            if cv is None:
                raise RecipeError([recipe.problem(("cross_validation",), "a fold was asked for but the recipe has no "
                                                  "cross_validation section")])
            folds = splits.kfold(data.train.labels, cv.folds, recipe.seed if cv.seed is None else cv.seed,
                                 cv.stratified)
            train_index, val_index = folds[fold]
            data = replace(data, train=data.train.select(train_index), val=data.train.select(val_index))
        elif data.val is None and options.val_fraction > 0:
            data = splits.with_validation(data, options.val_fraction, recipe.seed)
        if options.subset is not None:
            data = replace(data, train=splits.subset(data.train, options.subset, recipe.seed))
    except (UserError, ValueError) as exc:
        if isinstance(exc, RecipeError):
            raise
        where = ("cross_validation", "folds") if fold is not None else ("data",)
        raise RecipeError([recipe.problem(where, str(exc))]) from None
    return data


def check_data(recipe: Recipe, info: DatasetInfo, *, absent: bool = False, check_output: bool = True) -> None:
    """What makes a dataset unfit to train a classifier on, whichever plugin made it."""
    problems = []
    where = next((("data", param) for param, _ in info.scanned), ("data",))
    if info.num_classes < 2 and not absent:
        shown = ", ".join(repr(c) for c in info.classes) or "none"
        problems.append(recipe.problem(where, (
            f"{recipe.data.name} has {info.num_classes} class{'' if info.num_classes == 1 else 'es'} ({shown}); a "
            "classifier needs at least two: with a single class every prediction is right and the run "
            "would report a meaningless 100%. Add a folder of images for each other class")))
    output = runs_root(recipe).absolute()
    if check_output and (reason := output_problem(output)) is not None:
        where = ("output_dir",) if recipe.output_dir is not None else ()
        problems.append(recipe.problem(where, f"run directories cannot be written under {output}: {reason}"
                                       + ("" if where else " (set output_dir, or --output-dir)")))
    for param, folder in info.scanned:
        folder = Path(folder).absolute()
        if output == folder or folder in output.parents:
            problems.append(recipe.problem(("data", param), (
                f"the run directories would be written inside the data folder {folder} (to {output}): the next "
                "listing would read their plots as images of a class; set output_dir (or --output-dir) "
                "to a folder outside it")))
    if problems:
        raise RecipeError(problems)


def _check_labels(recipe: Recipe, data: DataSource) -> None:
    """Every split's labels are class indices: a plugin's off-by-one is named, with the plugin,
    before anything (the validation carving, the confusion matrix) uses them."""
    problems = []
    component = recipe.component("dataset", recipe.data)
    for name in ("train", "val", "test"):
        split = data.split(name)
        if split is not None:
            try:
                check_labels(split.labels, data.num_classes, name)
            except UserError as exc:
                problems.append(recipe.problem(("data",), f"{recipe.data.name} (plugin {component.plugin!r}, "
                                                         f"{component.origin}) made bad labels: {exc}"))
    if problems:
        raise RecipeError(problems)


def train_batch_count(recipe: Recipe, info: DatasetInfo, data: DataSource | None, fold: int | None,
                       world_size: int, absent: bool) -> int:
    """Training batches per epoch; a split too small for one batch is an error (as it would be at the first epoch)."""
    options = recipe.data
    count = len(data.train) if data is not None else None if absent else _train_count(recipe, info, fold)
    if count is None:  # a description without split sizes: a stand-in for the schedule's length
        return max(1, round(1000 / options.batch_size))
    batches = train_batches(count, options.batch_size, options.drop_last, world_size)
    if batches == 0:
        per_rank = f" ({count // world_size} per process of {world_size})" if world_size > 1 else ""
        raise RecipeError([recipe.problem(("data", "batch_size"), (
            f"the training split has {count} images{per_rank}, fewer than one batch of {options.batch_size} "
            "with drop_last: no training step would run; lower data.batch_size or set data.drop_last false"))])
    return batches


def _train_count(recipe: Recipe, info: DatasetInfo, fold: int | None) -> int | None:
    """The training split's size after the recipe's carving, from a description.

    With the description's labels, by :func:`carve` itself (the first fold
    stands for a k-fold run); with split sizes only, by the same arithmetic.
    """
    labels = _carved_train_labels(recipe, info, fold)
    if labels is not None:
        return len(labels)
    sizes = info.split_sizes
    if not sizes or "train" not in sizes:
        return None
    n = sizes["train"]
    cv = recipe.cross_validation
    if fold is not None and cv is not None:
        n -= len(range(fold, n, cv.folds))
    elif cv is not None:
        n -= math.ceil(n / cv.folds)
    elif "val" not in sizes and recipe.data.val_fraction > 0:
        n -= max(1, round(n * recipe.data.val_fraction))
    subset = recipe.data.subset
    if isinstance(subset, float):
        n = max(1, round(n * subset))
    elif isinstance(subset, int):
        n = min(subset, n)
    return n


def train_class_counts(recipe: Recipe, info: DatasetInfo, data: DataSource | None, fold: int | None,
                       absent: bool) -> tuple[int, ...] | None:
    """Images per class in the split the run trains on (after the validation
    split, the fold and ``data.subset``): from the loaded data, or from a
    description's labels carved as the run carves them; ``None`` when unknown."""
    if data is not None:
        return class_counts(data.train.labels, data.num_classes)
    if absent:
        return None
    with warnings.catch_warnings():  # the same carving as train_batch_count's, which has warned already
        warnings.simplefilter("ignore")
        labels = _carved_train_labels(recipe, info, fold)
    return class_counts(labels, info.num_classes) if labels is not None else None


def _carved_train_labels(recipe: Recipe, info: DatasetInfo, fold: int | None) -> torch.Tensor | None:
    """The training labels after :func:`carve`, from a description's labels (the first fold stands for a k-fold run)."""
    if info.labels is None or "train" not in info.labels:
        return None
    if fold is None and recipe.cross_validation is not None:
        fold = 0
    carved = carve(recipe, DataSource(
        train=_labels_only(info.labels["train"]), val=_labels_only(info.labels.get("val")),
        test=_labels_only(info.labels.get("test")), classes=info.classes, image_size=info.image_size,
        channels=info.channels), fold)
    return carved.train.labels


def _labels_only(labels: torch.Tensor | None) -> ImageSplit | None:
    # zero-sized images: a split :func:`carve` can select from, which holds nothing but its labels
    if labels is None or len(labels) == 0:
        return None
    return ImageSplit(labels=labels, images=torch.empty((len(labels), 0, 0, 0), dtype=torch.uint8))


