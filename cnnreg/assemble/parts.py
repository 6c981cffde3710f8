"""The one assembly of a run's parts, shared by ``cnnreg run``, ``cnnreg validate`` and the predictor.

:func:`assemble` makes, in this order, and checks as it goes: the data (or
its description, for validate), the model, the size the images are
stored at, the transforms, a dry run of both pipelines through the model,
the loss, the optimizer and its schedule, the metrics, the callbacks and
the metric the run monitors. ``run`` and ``validate`` differ in one
switch: whether the data is loaded (a dataset that can describe itself is
only described for validate) -- every check is the same code, so a recipe
that validates is a recipe whose run gets past its set-up.

What a recipe leaves out is chosen here from the model and the data (the
stored image size of a folder of mixed sizes, the transforms of a recipe
without any), written into the recipe the run records, and returned as
:class:`Choice` records for the run header and run.json.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cnnreg.core import progress

from cnnreg.inputs import splits
from cnnreg.inputs.batches import check_labels, make_batches, train_batches
from cnnreg.assemble.instantiate import component_kwargs, instantiate
from cnnreg.core.data import DataContext, DatasetInfo, DataSource, ImageSplit
from cnnreg.core.errors import RecipeError, Unavailable, Unchecked, UserError
from cnnreg.inputs.prepare import apply_transform, merge_views, view_weights
from cnnreg.config.recipe import Recipe
from cnnreg.core.records import Choice, Metric, Schedule, infer_mode
from cnnreg.runs.directory import runs_root

#: The longer side of a folder's median image size, for a model that declares no preprocessing.
MEDIAN_SIZE_CAP = 256
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
             place: Callable[[nn.Module, DataSource | None, Sequence[Callable]], nn.Module] | None = None) -> Parts:
    """Make and check every part of a run.

    :param load: load the data (``run``); otherwise describe it when the
        dataset can, and list what is absent instead of failing (``validate``).
    :param fold: the k-fold cross-validation fold to train on.
    :param world_size: processes the training split is shared among.
    :param place: called with the checked model (and the data and eval
        transforms) before the optimizer is made: the run moves it to its
        device and precision there, so the optimizer sees the final parameters.
    :raises RecipeError: every problem, located in the recipe.
    """
    unchecked: list[Unchecked] = []
    choices: list[Choice] = []
    with progress.reporting(recipe.trainer.progress):
        info, data, absent = _describe(recipe, fold, load, unchecked)
        check_data(recipe, info, absent=absent)
        channels = recipe.data.channels or info.channels
        model = _model(recipe, info.num_classes, channels, unchecked=None if load else unchecked)
        if absent:
            info = replace(info, image_size=_stand_in_size(recipe, model))
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
    batches = _train_batch_count(recipe, info, data, fold, world_size, absent)
    loss_fn = instantiate(recipe, "loss", ("loss",), recipe.loss, context={"num_classes": info.num_classes})
    optimizer = instantiate(recipe, "optimizer", ("optimizer",), recipe.optimizer, live=param_groups(model))
    schedule = None
    if recipe.scheduler is not None:
        schedule = instantiate(recipe, "scheduler", ("scheduler",), recipe.scheduler, live=optimizer,
                               context={"epochs": opts.epochs,
                                        "steps_per_epoch": max(1, math.ceil(batches / opts.accumulate))})
    metrics = tuple((spec.name, instantiate(recipe, "metric", ("metrics", i), spec,
                                            context={"num_classes": info.num_classes}))
                    for i, spec in enumerate(recipe.metrics))
    callbacks = tuple(instantiate(recipe, "callback", ("callbacks", i), spec) for i, spec in enumerate(recipe.callbacks))
    has_val = "val" in info.splits or recipe.data.val_fraction > 0 or fold is not None or (
        recipe.cross_validation is not None)
    monitor, mode = check_monitors(recipe, metrics, schedule, callbacks, has_val=has_val)
    return Parts(recipe=recipe, data=data, info=info, channels=channels, model=model, context=context,
                 train_transforms=train_tf, eval_transforms=eval_tf, loss_fn=loss_fn, optimizer=optimizer,
                 schedule=schedule, metrics=metrics, callbacks=callbacks, monitor=monitor, mode=mode,
                 train_batches=batches, choices=tuple(choices), unchecked=tuple(unchecked),
                 warnings=info.warnings, data_absent=absent)


def model_and_eval_transforms(recipe: Recipe, info: DatasetInfo) -> tuple[nn.Module, tuple]:
    """The model and eval transforms of a finished run, from what it recorded (the predictor's part)."""
    model = _model(recipe, info.num_classes, info.channels)
    # The statistics the run normalised with were recorded; use them, not a recomputation.
    context = replace(data_context(info, info.channels, model), mean=info.mean, std=info.std)
    return model, _transforms(recipe, context, "eval")


def _model(recipe: Recipe, num_classes: int, channels: int, unchecked: list[Unchecked] | None = None) -> nn.Module:
    return instantiate(recipe, "model", ("model",), recipe.model, unchecked=unchecked,
                       context={"num_classes": num_classes, "in_channels": channels})


def _transforms(recipe: Recipe, context: DataContext, split: str) -> tuple[Callable[..., torch.Tensor], ...]:
    specs = recipe.transforms.train if split == "train" else recipe.transforms.eval
    return tuple(instantiate(recipe, "transform", ("transforms", split, i), spec, data_context=context)
                 for i, spec in enumerate(specs))


# -- the data -------------------------------------------------------------------------------------


def _describe(recipe: Recipe, fold: int | None, load: bool,
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


def _stand_in_size(recipe: Recipe, model: nn.Module) -> tuple[int, int]:
    """The stand-in batch's size: ``data.size`` when declared, else what the
    model's preprocessing resizes to, else the largest size a transform
    names (so every crop fits), else 64x64."""
    size = getattr(recipe.data, "size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else tuple(size)
    resize = _resize_size(getattr(model, "cnnreg_data_config", None) or {})
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
        data = replace(data, mean=_convert_stats(data.mean, channels), std=_convert_stats(data.std, channels))
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


def check_data(recipe: Recipe, info: DatasetInfo, *, absent: bool = False) -> None:
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
    """Every split's labels are class indices: a plugin's off-by-one is named before anything uses them."""
    problems = []
    for name in ("train", "val", "test"):
        split = data.split(name)
        if split is not None:
            try:
                check_labels(split.labels, data.num_classes, name)
            except UserError as exc:
                problems.append(recipe.problem(("data",), f"{recipe.data.name}: {exc}"))
    if problems:
        raise RecipeError(problems)


def _train_batch_count(recipe: Recipe, info: DatasetInfo, data: DataSource | None, fold: int | None,
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
    if info.labels is not None and "train" in info.labels:
        if fold is None and recipe.cross_validation is not None:
            fold = 0
        carved = carve(recipe, DataSource(
            train=_labels_only(info.labels["train"]), val=_labels_only(info.labels.get("val")),
            test=_labels_only(info.labels.get("test")), classes=info.classes, image_size=info.image_size,
            channels=info.channels), fold)
        return len(carved.train)
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


def _labels_only(labels: torch.Tensor | None) -> ImageSplit | None:
    # zero-sized images: a split :func:`carve` can select from, which holds nothing but its labels
    if labels is None or len(labels) == 0:
        return None
    return ImageSplit(labels=labels, images=torch.empty((len(labels), 0, 0, 0), dtype=torch.uint8))


def _convert_stats(stats: tuple[float, ...] | None, channels: int) -> tuple[float, ...] | None:
    if stats is None or len(stats) == channels:
        return stats
    if channels == 3:
        return tuple(stats) * 3
    return (sum(s * w for s, w in zip(stats, (0.299, 0.587, 0.114))),)


# -- what a recipe leaves out -------------------------------------------------------------------


def _resize_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """The size a model's evaluation resizes to before its centre crop: input / crop_pct (timm's rule)."""
    if not config.get("input_size") or not config.get("crop_pct"):
        return None
    height, width = config["input_size"][-2:]
    return math.floor(height / config["crop_pct"]), math.floor(width / config["crop_pct"])


def storage_choice(recipe: Recipe, info: DatasetInfo, model: nn.Module) -> tuple[Choice, dict[str, Any]] | None:
    """The size to store a dataset's images at, when the recipe leaves it to the run.

    Only for a dataset with a ``size`` parameter the recipe leaves out:

    * a model that declares its preprocessing (a pretrained backbone): the
      size its evaluation resizes to before the centre crop (256 for a 224
      input at crop_pct 0.875) -- for images of mixed sizes (short side
      resized, centre cut), and for images of one size larger than that
      (resized, the aspect ratio kept);
    * otherwise, for images of mixed sizes: their median height and width,
      scaled so the longer side is at most :data:`MEDIAN_SIZE_CAP`, rounded
      to a multiple of 8; images of one size keep it.

    :returns: the choice and the recipe values it sets, or ``None``.
    """
    component = recipe.component("dataset", recipe.data)
    params = {p.name for p in component.params()}
    if "size" not in params or getattr(recipe.data, "size", None) is not None:
        return None
    config = getattr(model, "cnnreg_data_config", None) or {}
    resize = _resize_size(config)
    height, width = info.image_size
    name = getattr(recipe.model, "arch", None) or recipe.model.name  # type: ignore[attr-defined]
    if resize is not None:
        crop = "x".join(str(v) for v in config["input_size"][-2:])
        follows = (f"{name}'s preprocessing resizes to {resize[0]}x{resize[1]} before its {crop} centre crop "
                   f"(crop_pct {config['crop_pct']:g})")
        if info.mixed_sizes:
            size, why = resize, f"the images differ in size; {follows}: each image's shorter side is resized and its centre cut"
        elif min(height, width) > max(resize):
            short = max(resize)
            size = (short, round(width * short / height)) if height <= width else (round(height * short / width), short)
            why = f"the images ({height}x{width}) are larger than {name} uses; {follows}: resized, the aspect ratio kept"
        else:
            return None
    elif info.mixed_sizes:
        scale = min(1.0, MEDIAN_SIZE_CAP / max(height, width))
        size = tuple(max(8, int(v * scale / 8 + 0.5) * 8) for v in (height, width))  # halves round up
        why = (f"the images differ in size and {name} declares no preprocessing: their median size {height}x{width}, "
               f"the longer side at most {MEDIAN_SIZE_CAP}, a multiple of 8; each image's shorter side is resized "
               "and its centre cut")
    else:
        return None
    values: dict[str, Any] = {"data.size": list(size)}
    if "fit" in params and getattr(recipe.data, "fit", "stretch") == "stretch" and "fit" not in recipe.data.model_fields_set:
        values["data.fit"] = "crop"
    override = "set data.size" + (" (and data.fit)" if "data.fit" in values else "") + " to choose"
    return Choice("data.size", list(size), why, override), values


def default_transforms(recipe: Recipe, context: DataContext, model: nn.Module, *,
                       known_stats: bool) -> Choice | None:
    """The transforms of a recipe that has none: the model's own pipeline, else normalisation.

    A model that declares its preprocessing gets timm's pipeline for it --
    train: random resized crop to its input size, horizontal flip,
    normalize with its mean and std; eval: resize to input / crop_pct,
    centre crop, normalize. Any other model: normalize with the dataset's
    mean and std, in both. ``None`` when the transforms plugin is not there.
    """
    have = recipe.catalog.keys("transform")
    stats = {"mean": list(context.mean), "std": list(context.std)} if known_stats and context.mean else {}
    normalize = {"name": "normalize", **stats}
    config = getattr(model, "cnnreg_data_config", None) or {}
    resize = _resize_size(config)
    name = getattr(recipe.model, "arch", None) or recipe.model.name  # type: ignore[attr-defined]
    if context.input_size is not None and resize is not None:
        needed = ("random_resized_crop", "random_horizontal_flip", "resize", "center_crop", "normalize")
        if not all(n in have for n in needed):
            return None
        crop = list(context.input_size)
        interpolation = {"interpolation": context.interpolation} if context.interpolation in (
            "nearest", "bilinear", "bicubic") else {}
        value = {"train": [{"name": "random_resized_crop", "size": crop, **interpolation},
                           {"name": "random_horizontal_flip"}, normalize],
                 "eval": [{"name": "resize", "size": resize[0] if resize[0] == resize[1] else list(resize),
                           **interpolation}, {"name": "center_crop", "size": crop}, normalize]}
        reason = (f"the recipe has no transforms: {name}'s own preprocessing, from its data config as timm's "
                  f"create_transform builds it (train: random resized crop to {crop[0]}x{crop[1]}, horizontal flip, "
                  f"normalize with its mean and std; eval: resize to {resize[0]}, centre crop, normalize)")
    else:
        if "normalize" not in have:
            return None
        value = {"train": [normalize], "eval": [dict(normalize)]}
        reason = "the recipe has no transforms: normalize with the training split's mean and std"
    return Choice("transforms", value, reason, "give a transforms section to choose")


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
    return DataContext(image_size=data.image_size, channels=channels, num_classes=len(data.classes),
                       mean=mean, std=std, input_size=input_size,
                       interpolation=config.get("interpolation", "bilinear"), crop_pct=config.get("crop_pct"))


# -- the model ----------------------------------------------------------------------------------


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
