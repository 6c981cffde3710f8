"""Batched augmentations under torchvision's names (the ``transforms`` plugin).

The engine hands each transform a float batch ``[B, C, H, W]`` in [0, 1] on
the run's device. Every random transform here draws its parameters **per
sample** (torchvision v2 applied to a batch tensor shares one draw across the
whole batch), from torch's generator on the batch's device, so
``torch.manual_seed`` makes a run repeatable. Nothing reads a tensor back to
the host: the per-batch path has no ``.item()`` and no Python branch on a
tensor value. Shape checks use ``x.shape`` only, so errors such as a crop
larger than the image surface on the engine's dry run with a fake batch.

A random transform is a frozen dataclass with ``draw(x) -> params`` (tensors
on ``x.device``, one row per sample) and ``apply(x, params)``; calling it is
``apply(x, draw(x))``. The split lets the tests apply torchvision's per-image
functional op with the drawn parameters and compare. Deterministic transforms
(resize, center_crop, normalize) are plain callables.

Parameters and their meaning follow torchvision's classes of the same names.
Annotations are evaluated at import (no ``from __future__ import
annotations``) so the signatures are ready for the registry's schemas.
"""

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from cnnreg.core.data import DataContext
from cnnreg import hookimpl
from cnnreg_plugins import _batched_ops as ops
from cnnreg_plugins._params import fill_values as _fill_values, value_range as _range

Probability = Annotated[float, Field(ge=0, le=1)]
Pixels = Annotated[int, Field(ge=1)]
Size = Pixels | tuple[Pixels, Pixels]
Padding = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
HueShift = Annotated[float, Field(ge=-0.5, le=0.5)]
Interpolation = Literal["nearest", "bilinear", "bicubic"]
PaddingMode = Literal["constant", "edge", "reflect", "symmetric"]
Fill = float | list[float]


class _Random:
    """``t(x) = t.apply(x, t.draw(x))`` for the random transforms below."""

    def draw(self, x: Tensor) -> object:
        raise NotImplementedError

    def apply(self, x: Tensor, params: object) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, self.draw(x))


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# -- flips ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chosen:
    """Which samples a random transform applies to: bool ``[B]``."""

    chosen: Tensor


@dataclass(frozen=True)
class RandomFlip(_Random):
    p: float
    dim: int  # -1 flips left-right, -2 top-bottom

    def draw(self, x: Tensor) -> Chosen:
        return Chosen(torch.rand(x.shape[0], device=x.device) < self.p)

    def apply(self, x: Tensor, params: Chosen) -> Tensor:
        return torch.where(params.chosen.view(-1, 1, 1, 1), x.flip(self.dim), x)


def random_horizontal_flip(p: Probability = 0.5) -> RandomFlip:
    """Mirror each image left-right with probability p (torchvision RandomHorizontalFlip).

    Args:
        p: probability that an image is flipped.
    """
    return RandomFlip(p=p, dim=-1)


def random_vertical_flip(p: Probability = 0.5) -> RandomFlip:
    """Flip each image upside down with probability p (torchvision RandomVerticalFlip).

    Args:
        p: probability that an image is flipped.
    """
    return RandomFlip(p=p, dim=-2)


# -- random crop ---------------------------------------------------------------------


@dataclass(frozen=True)
class Offsets:
    """Top-left corner of each sample's crop in the padded image: int64 ``[B]`` each."""

    top: Tensor
    left: Tensor


@dataclass(frozen=True)
class RandomCrop(_Random):
    size: tuple[int, int]
    padding: tuple[int, int, int, int]  # left, top, right, bottom
    pad_if_needed: bool
    fill: float | tuple[float, ...]
    padding_mode: str

    def padding_for(self, x: Tensor) -> tuple[int, int, int, int]:
        """The padding used on ``x`` (left, top, right, bottom): torchvision's rule."""
        left, top, right, bottom = self.padding
        image_h, image_w = x.shape[-2:]
        height, width = image_h + top + bottom, image_w + left + right
        crop_h, crop_w = self.size
        if self.pad_if_needed:  # torchvision pads both sides by the whole shortfall
            if height < crop_h:
                top, bottom = top + crop_h - height, bottom + crop_h - height
            if width < crop_w:
                left, right = left + crop_w - width, right + crop_w - width
        elif height < crop_h or width < crop_w:
            padding = left if len(set(self.padding)) == 1 else list(self.padding)
            raise ValueError(f"random_crop size {crop_h}x{crop_w} is larger than the {image_h}x{image_w} "
                             f"image (after padding {padding}); lower size or add padding")
        if self.padding_mode == "reflect" and (max(top, bottom) >= image_h or max(left, right) >= image_w):
            raise ValueError(f"random_crop reflect padding must be smaller than the {image_h}x{image_w} image; "
                             f"lower padding or use padding_mode symmetric")
        return left, top, right, bottom

    def draw(self, x: Tensor) -> Offsets:
        left, top, right, bottom = self.padding_for(x)
        room_h = x.shape[-2] + top + bottom - self.size[0] + 1
        room_w = x.shape[-1] + left + right - self.size[1] + 1
        batch = x.shape[0]
        return Offsets(torch.randint(room_h, (batch,), device=x.device),
                       torch.randint(room_w, (batch,), device=x.device))

    def apply(self, x: Tensor, params: Offsets) -> Tensor:
        # Pad the batch once, then take every sample's crop in one gather.
        padded = ops.pad(x, *self.padding_for(x), self.padding_mode, _fill_values(self.fill, x, "random_crop"))
        rows = params.top[:, None] + torch.arange(self.size[0], device=x.device)
        cols = params.left[:, None] + torch.arange(self.size[1], device=x.device)
        return ops.gather_pixels(padded, rows, cols)


def random_crop(
    size: Size,
    padding: Padding | tuple[Padding, Padding] | tuple[Padding, Padding, Padding, Padding] | None = None,
    pad_if_needed: bool = False,
    fill: Fill = 0.0,
    padding_mode: PaddingMode = "constant",
) -> RandomCrop:
    """Crop each image at a random place, after optional padding (torchvision RandomCrop).

    The batch is padded once and every sample's crop is taken in one gather
    with per-sample offsets, no loop over samples.

    Args:
        size: output size, an int for a square or [height, width].
        padding: pixels added before cropping: one int for every side,
            [left/right, top/bottom], or [left, top, right, bottom].
        pad_if_needed: pad an image smaller than size (both sides, by the shortfall) instead of failing.
        fill: value of the padding in "constant" mode, one number or one per channel.
        padding_mode: constant, edge (repeat the border pixel), reflect (mirror without
            repeating it) or symmetric (mirror repeating it).
    """
    if padding is None:
        sides = (0, 0, 0, 0)
    elif isinstance(padding, int):
        sides = (padding,) * 4
    elif len(padding) == 2:
        sides = (padding[0], padding[1], padding[0], padding[1])
    elif len(padding) == 4:
        sides = tuple(padding)
    else:
        raise ValueError(f"padding has {len(padding)} values; give 1, 2 ([left/right, top/bottom]) "
                         f"or 4 ([left, top, right, bottom])")
    fill = fill if isinstance(fill, (int, float)) else tuple(fill)
    return RandomCrop(_pair(size), sides, pad_if_needed, fill, padding_mode)


# -- random resized crop ---------------------------------------------------------------


@dataclass(frozen=True)
class Boxes:
    """One box per sample: int64 ``[B]`` each."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


@dataclass(frozen=True)
class RandomResizedCrop(_Random):
    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: str
    antialias: bool
    attempts: int = 10  # as torchvision

    def draw(self, x: Tensor) -> Boxes:
        """torchvision's box rule, all attempts at once: the first of 10 random
        (area, aspect) boxes that fits, else the centred box of the nearest allowed aspect."""
        batch, (height, width), device = x.shape[0], x.shape[-2:], x.device
        box_w, box_h = ops.candidate_boxes(batch, height * width, self.scale, self.ratio, self.attempts, device)
        fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
        found = fits.any(dim=1)
        # The fallback depends only on the image shape: computed on the host.
        if width / height < self.ratio[0]:
            fallback_h, fallback_w = round(width / self.ratio[0]), width
        elif width / height > self.ratio[1]:
            fallback_h, fallback_w = height, round(height * self.ratio[1])
        else:
            fallback_h, fallback_w = height, width
        box_h = torch.where(found, ops.first_fit(box_h, fits), fallback_h).long()
        box_w = torch.where(found, ops.first_fit(box_w, fits), fallback_w).long()
        top = torch.where(found, ops.random_below(height - box_h + 1, batch), (height - fallback_h) // 2)
        left = torch.where(found, ops.random_below(width - box_w + 1, batch), (width - fallback_w) // 2)
        return Boxes(top, left, box_h, box_w)

    def apply(self, x: Tensor, params: Boxes) -> Tensor:
        return ops.resized_crop(x, params.top, params.left, params.height, params.width,
                                self.size, self.interpolation, self.antialias)


def _interpolation(interpolation: str | None, context: DataContext | None) -> str:
    chosen = interpolation or (context.interpolation if context is not None else None) or "bilinear"
    if chosen not in ("nearest", "bilinear", "bicubic"):
        raise ValueError(f"interpolation {chosen!r} is not supported; use nearest, bilinear or bicubic")
    return chosen


def random_resized_crop(
    size: Size | None = None,
    scale: tuple[Fraction, Fraction] = (0.08, 1.0),
    ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3),
    interpolation: Interpolation | None = None,
    antialias: bool = True,
    *,
    context: DataContext,
) -> RandomResizedCrop:
    """Crop a random area and aspect of each image and resize it (torchvision RandomResizedCrop).

    Boxes are drawn per sample with torchvision's rule (10 attempts, then the
    centre crop). Resampling is two batched matrix products with per-sample
    weights that are ATen's interpolation weights, so each image matches
    torchvision's resized_crop to float rounding (about 1e-6), antialiasing included.

    Args:
        size: output size, an int for a square or [height, width]; default the
            model's pretrained input size, else the dataset's image size.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.
        interpolation: nearest, bilinear or bicubic; default the model's pretrained one, else bilinear.
        antialias: low-pass filter when shrinking (bilinear and bicubic), as torchvision does by default.
    """
    _range(scale, "scale")
    _range(ratio, "ratio")
    target = size if size is not None else (context.input_size or context.image_size)
    return RandomResizedCrop(_pair(target), tuple(scale), tuple(ratio), _interpolation(interpolation, context), antialias)


# -- random rotation -------------------------------------------------------------------


@dataclass(frozen=True)
class Angles:
    """Rotation of each sample in degrees, counter-clockwise: float32 ``[B]``."""

    degrees: Tensor


@dataclass(frozen=True)
class RandomRotation(_Random):
    degrees: tuple[float, float]
    interpolation: str
    center: tuple[float, float] | None
    fill: float | tuple[float, ...]

    def draw(self, x: Tensor) -> Angles:
        return Angles(torch.empty(x.shape[0], device=x.device).uniform_(*self.degrees))

    def apply(self, x: Tensor, params: Angles) -> Tensor:
        fill = _fill_values(self.fill, x, "random_rotation")
        return ops.rotate(x, params.degrees, self.center, self.interpolation, fill)


def random_rotation(
    degrees: NonNegative | tuple[float, float],
    interpolation: Literal["nearest", "bilinear"] = "nearest",
    expand: bool = False,
    center: tuple[float, float] | None = None,
    fill: Fill = 0.0,
) -> RandomRotation:
    """Rotate each image by a random angle (torchvision RandomRotation).

    Uses torchvision's sampling grid and fill rule with one grid_sample for the
    batch: results match torchvision's rotate to float rounding.

    Args:
        degrees: angles are drawn uniformly from [-degrees, degrees], or from [min, max].
        interpolation: nearest or bilinear.
        expand: must be false: every image of a batch keeps its size.
        center: centre of rotation (x, y) in pixels from the top-left corner; default the image centre.
        fill: value of the area outside the rotated image, one number or one per channel.
    """
    if expand:
        raise ValueError("random_rotation cannot expand: the images of a batch must keep one size; "
                         "set expand to false (and follow with a resize if needed)")
    fill = fill if isinstance(fill, (int, float)) else tuple(fill)
    return RandomRotation(_range(degrees, "degrees"), interpolation, None if center is None else tuple(center), fill)


# -- colour ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JitterParams:
    """Factors per sample ``[B, 4]`` (brightness, contrast, saturation, hue; an op that is
    off holds its identity) and the order of the active ops per sample ``[B, n]``."""

    factors: Tensor
    order: Tensor


@dataclass(frozen=True)
class ColorJitter(_Random):
    ranges: tuple[tuple[float, float] | None, ...]  # brightness, contrast, saturation, hue; None when off

    @property
    def active(self) -> tuple[int, ...]:
        return tuple(k for k, r in enumerate(self.ranges) if r is not None)

    def draw(self, x: Tensor) -> JitterParams:
        batch = x.shape[0]
        identity = (1.0, 1.0, 1.0, 0.0)
        factors = torch.stack([
            torch.full((batch,), identity[k], device=x.device) if r is None
            else torch.empty(batch, device=x.device).uniform_(*r)
            for k, r in enumerate(self.ranges)
        ], dim=1)
        # A uniformly random order of the active ops for each sample: sort random
        # keys, with the keys of the ops that are off pushed past every active one.
        keys = torch.rand(batch, 4, device=x.device)
        for k, r in enumerate(self.ranges):
            if r is None:
                keys[:, k] = 2.0
        return JitterParams(factors, keys.argsort(dim=1)[:, : len(self.active)])

    def apply(self, x: Tensor, params: JitterParams) -> Tensor:
        """Each sample's ops in its own order, without running every op in every slot.

        Brightness, contrast and saturation are one clamped blend with a
        per-sample target (``ops.blend_towards``), so a slot of the order costs
        one blend whichever op each sample has there. Hue, the expensive one,
        runs once: first the slots before each sample's hue (later slots get
        the identity factor), then hue, then the slots after it.
        """
        channels = x.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"color_jitter needs 1- or 3-channel images, not {channels} channels")
        order, slots = params.order, params.order.shape[1]
        factor = params.factors.gather(1, order)  # [B, slots]: the factor of each slot's op
        if channels == 1:  # saturation and hue leave gray images alone, as in torchvision
            factor = torch.where(order >= ops.SATURATION, 1.0, factor)
        if ops.HUE not in self.active or channels == 1:
            for slot in range(slots):
                x = ops.blend_towards(x, order[:, slot], factor[:, slot])
            return x
        layout = x
        hue_slot = (order == ops.HUE).to(torch.uint8).argmax(dim=1, keepdim=True)
        slot_index = torch.arange(slots, device=x.device)
        before = torch.where(slot_index < hue_slot, factor, 1.0)
        after = torch.where(slot_index > hue_slot, factor, 1.0)
        for slot in range(slots - 1):  # the last slot is never before the hue
            x = ops.blend_towards(x, order[:, slot], before[:, slot])
        x = ops.adjust_hue(x, params.factors[:, ops.HUE])
        for slot in range(1, slots):  # nor the first after it
            x = ops.blend_towards(x, order[:, slot], after[:, slot])
        return ops.keep_memory_format(x, like=layout)


def _jitter_range(
    value: float | tuple[float, float], name: str, center: float, bound: tuple[float, float]
) -> tuple[float, float] | None:
    """torchvision ColorJitter's rule: a number v means [center - v, center + v] (clipped at 0
    except for hue); a range must lie within ``bound``; the identity range means off."""
    if isinstance(value, (int, float)):
        low, high = center - value, center + value
        if name != "hue":
            low = max(low, 0.0)
    else:
        low, high = float(value[0]), float(value[1])
    if not bound[0] <= low <= high <= bound[1]:
        raise ValueError(f"color_jitter {name} range [{low}, {high}] must be [min, max] within {list(bound)}")
    return None if low == high == center else (low, high)


def color_jitter(
    brightness: NonNegative | tuple[NonNegative, NonNegative] = 0.0,
    contrast: NonNegative | tuple[NonNegative, NonNegative] = 0.0,
    saturation: NonNegative | tuple[NonNegative, NonNegative] = 0.0,
    hue: Annotated[float, Field(ge=0, le=0.5)] | tuple[HueShift, HueShift] = 0.0,
) -> ColorJitter:
    """Randomly change brightness, contrast, saturation and hue (torchvision ColorJitter).

    Factors and the order of the four adjustments are drawn per sample
    (torchvision draws one order per call, which on a batch means per batch).
    On 1-channel images saturation and hue do nothing, as in torchvision.

    Args:
        brightness: factor range [min, max], or b for [max(0, 1 - b), 1 + b].
        contrast: factor range [min, max], or c for [max(0, 1 - c), 1 + c].
        saturation: factor range [min, max], or s for [max(0, 1 - s), 1 + s].
        hue: hue shift range [min, max] in turns within [-0.5, 0.5], or h for [-h, h].
    """
    infinite = (0.0, float("inf"))
    return ColorJitter((
        _jitter_range(brightness, "brightness", 1.0, infinite),
        _jitter_range(contrast, "contrast", 1.0, infinite),
        _jitter_range(saturation, "saturation", 1.0, infinite),
        _jitter_range(hue, "hue", 0.0, (-0.5, 0.5)),
    ))


@dataclass(frozen=True)
class RandomGrayscale(_Random):
    p: float

    def draw(self, x: Tensor) -> Chosen:
        return Chosen(torch.rand(x.shape[0], device=x.device) < self.p)

    def apply(self, x: Tensor, params: Chosen) -> Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"random_grayscale needs 1- or 3-channel images, not {x.shape[1]} channels")
        return torch.where(params.chosen.view(-1, 1, 1, 1), ops.grayscale(x).expand_as(x), x)


def random_grayscale(p: Probability = 0.1) -> RandomGrayscale:
    """Turn each image gray with probability p, keeping its channels (torchvision RandomGrayscale).

    Args:
        p: probability that an image turns gray.
    """
    return RandomGrayscale(p=p)


# -- random erasing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Erasure:
    """Which samples are erased, where (int64 ``[B]`` each), and the values
    written: ``[1, C, 1, 1]`` for a constant, ``[B, C, H, W]`` noise for "random"."""

    chosen: Tensor
    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    value: Tensor


@dataclass(frozen=True)
class RandomErasing(_Random):
    p: float
    scale: tuple[float, float]
    ratio: tuple[float, float]
    value: tuple[float, ...] | None  # None: normal noise
    attempts: int = 10  # as torchvision

    def draw(self, x: Tensor) -> Erasure:
        """torchvision's rule, all attempts at once: the first of 10 random boxes strictly
        smaller than the image; a sample whose attempts all fail is left alone."""
        batch, channels, height, width = x.shape
        if self.value is not None and len(self.value) not in (1, channels):
            raise ValueError(f"random_erasing value has {len(self.value)} values but the images have {channels} "
                             f"channels; give one value, one per channel, or \"random\"")
        box_h, box_w = ops.candidate_boxes(batch, height * width, self.scale, self.ratio, self.attempts, x.device)
        fits = (box_h < height) & (box_w < width)
        chosen = (torch.rand(batch, device=x.device) < self.p) & fits.any(dim=1)
        box_h, box_w = ops.first_fit(box_h, fits).long(), ops.first_fit(box_w, fits).long()
        # A failed sample's box is clamped to a valid one; it is not chosen anyway.
        box_h, box_w = box_h.clamp(max=height - 1), box_w.clamp(max=width - 1)
        top = ops.random_below(height - box_h + 1, batch)
        left = ops.random_below(width - box_w + 1, batch)
        if self.value is None:
            # Drawn in the logical [B, C, H, W] order so a sample's noise does not depend
            # on the memory layout, then laid out like x so the result keeps x's layout.
            value = ops.keep_memory_format(torch.randn(x.shape, device=x.device, dtype=x.dtype), like=x)
        else:
            value = ops.channel_constant(self.value, like=x)
        return Erasure(chosen, top, left, box_h, box_w, value)

    def apply(self, x: Tensor, params: Erasure) -> Tensor:
        rows = torch.arange(x.shape[-2], device=x.device)[None, :]
        cols = torch.arange(x.shape[-1], device=x.device)[None, :]
        in_rows = (rows >= params.top[:, None]) & (rows < (params.top + params.height)[:, None])
        in_cols = (cols >= params.left[:, None]) & (cols < (params.left + params.width)[:, None])
        erase = params.chosen.view(-1, 1, 1, 1) & in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return torch.where(erase, params.value.to(x.dtype), x)


def random_erasing(
    p: Probability = 0.5,
    scale: tuple[Fraction, Fraction] = (0.02, 0.33),
    ratio: tuple[PositiveFloat, PositiveFloat] = (0.3, 3.3),
    value: float | list[float] | Literal["random"] = 0.0,
) -> RandomErasing:
    """Blank a random rectangle of each image with probability p (torchvision RandomErasing).

    Args:
        p: probability that an image gets a rectangle erased.
        scale: range of the rectangle's area as a fraction of the image's.
        ratio: range of the rectangle's aspect ratio (height / width), drawn log-uniformly.
        value: what to write: one number, one per channel, or "random" for standard normal noise.
    """
    _range(scale, "scale")
    _range(ratio, "ratio")
    values = None if value == "random" else (float(value),) if isinstance(value, (int, float)) else tuple(value)
    return RandomErasing(p, tuple(scale), tuple(ratio), values)


# -- deterministic -----------------------------------------------------------------------


@dataclass(frozen=True)
class Resize:
    size: int | tuple[int, int]  # an int sets the shorter side, as in torchvision
    interpolation: str
    antialias: bool

    def __call__(self, x: Tensor) -> Tensor:
        size = [self.size] if isinstance(self.size, int) else list(self.size)
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF  # at use: importing torchvision costs a second

        return TF.resize(x, size, interpolation=InterpolationMode(self.interpolation), antialias=self.antialias)


def resize(
    size: Size | None = None,
    interpolation: Interpolation | None = None,
    antialias: bool = True,
    *,
    context: DataContext,
) -> Resize:
    """Resize every image (torchvision Resize).

    With no size and a pretrained model that gives its crop fraction, this is
    the model's evaluation resize, to input_size / crop_pct (timm's: shorter
    side when the input is square), so `resize` then `center_crop` is timm's
    evaluation preprocessing. A pretrained model without a crop fraction: its
    input size. No pretrained model: the dataset's image size.

    Args:
        size: an int sets the shorter side (keeping the aspect ratio), [height, width] sets both.
        interpolation: nearest, bilinear or bicubic; default the model's pretrained one, else bilinear.
        antialias: low-pass filter when shrinking (bilinear and bicubic).
    """
    if size is not None:
        target = size if isinstance(size, int) else _pair(size)
    elif context.input_size is not None and context.crop_pct is not None:
        scaled = tuple(math.floor(s / context.crop_pct) for s in context.input_size)
        if scaled[0] == scaled[1]:
            target = scaled[0]
        else:  # timm's ResizeKeepRatio: cover the scaled size, keeping the images' aspect
            ratio = min(context.image_size[0] / scaled[0], context.image_size[1] / scaled[1])
            target = (round(context.image_size[0] / ratio), round(context.image_size[1] / ratio))
    else:
        target = _pair(context.input_size or context.image_size)
    return Resize(target, _interpolation(interpolation, context), antialias)


@dataclass(frozen=True)
class CenterCrop:
    size: tuple[int, int]

    def __call__(self, x: Tensor) -> Tensor:
        # A crop larger than the image pads it with zeros first, as torchvision's center_crop does.
        from torchvision.transforms.v2 import functional as TF

        return TF.center_crop(x, list(self.size))


def center_crop(size: Size | None = None, *, context: DataContext) -> CenterCrop:
    """Cut the central part of every image (torchvision CenterCrop); a size larger than
    the image pads it with zeros, as torchvision does.

    Args:
        size: an int for a square or [height, width]; default the model's
            pretrained input size, else the dataset's image size.
    """
    return CenterCrop(_pair(size if size is not None else (context.input_size or context.image_size)))


@dataclass(frozen=True)
class Normalize:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: Tensor) -> Tensor:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, x.shape[1]):
                raise ValueError(f"normalize {name} has {len(values)} values but the images have {x.shape[1]} "
                                 f"channels; give one value per channel")
        return x.sub(ops.channel_constant(self.mean, like=x)).div_(ops.channel_constant(self.std, like=x))


def normalize(
    mean: list[float] | None = None,
    std: list[PositiveFloat] | None = None,
    *,
    context: DataContext,
) -> Normalize:
    """Subtract a per-channel mean and divide by a per-channel standard deviation (torchvision Normalize).

    Args:
        mean: one value per channel, on the [0, 1] scale; default the pretrained
            model's mean, else the dataset's.
        std: one value per channel; default the pretrained model's, else the dataset's.
    """
    mean = mean if mean is not None else context.mean
    std = std if std is not None else context.std
    if mean is None or std is None:
        missing = " and ".join(name for name, v in (("mean", mean), ("std", std)) if v is None)
        raise ValueError(f"normalize has no {missing}: neither the dataset nor the model provides them; "
                         f"set them in the recipe, e.g. \"mean\": [0.5, 0.5, 0.5], \"std\": [0.25, 0.25, 0.25]")
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize std must be positive, got {list(std)}")
    return Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std))


@hookimpl
def cnnreg_transforms() -> dict:
    return {
        "random_horizontal_flip": random_horizontal_flip,
        "random_vertical_flip": random_vertical_flip,
        "random_crop": random_crop,
        "random_resized_crop": random_resized_crop,
        "random_rotation": random_rotation,
        "color_jitter": color_jitter,
        "random_grayscale": random_grayscale,
        "random_erasing": random_erasing,
        "resize": resize,
        "center_crop": center_crop,
        "normalize": normalize,
    }
