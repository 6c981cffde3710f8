"""What a recipe leaves out, chosen from the model and the data.

The stored size of images of mixed sizes (:func:`storage_choice`), the
transforms of a recipe without any (:func:`default_transforms`), and what a
transform may follow (:func:`data_context`). Each choice is a
:class:`~cnnreg.core.records.Choice`: written into the resolved recipe,
shown in the run header, recorded in run.json.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from cnnreg.config.recipe import Recipe
from cnnreg.core.data import DataContext, DatasetInfo, DataSource
from cnnreg.core.records import Choice

#: The longer side of a folder's median image size, for a model that declares no preprocessing.
MEDIAN_SIZE_CAP = 256


def resize_size(config: dict[str, Any]) -> tuple[int, int] | None:
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
    resize = resize_size(config)
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
    resize = resize_size(config)
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
        mean, std = convert_stats(mean, channels), convert_stats(std, channels)
    if std is not None:
        # A channel that never varies (blank images, a constant band) has std 0:
        # dividing by it would make every input inf or NaN. Left unscaled instead.
        std = tuple(s if s > 0 else 1.0 for s in std)
    return DataContext(image_size=data.image_size, channels=channels, num_classes=len(data.classes),
                       mean=mean, std=std, input_size=input_size,
                       interpolation=config.get("interpolation", "bilinear"), crop_pct=config.get("crop_pct"))


def convert_stats(stats: tuple[float, ...] | None, channels: int) -> tuple[float, ...] | None:
    if stats is None or len(stats) == channels:
        return stats
    if channels == 3:
        return tuple(stats) * 3
    return (sum(s * w for s, w in zip(stats, (0.299, 0.587, 0.114))),)
