"""Augmentation policies, random affine and Gaussian blur, batched (the ``augment_policies`` plugin).

RandAugment, TrivialAugmentWide and AutoAugment follow torchvision's classes:
the same op list, magnitude bins and ranges (``augmentation_space``), signed
magnitudes and AutoAugment's learned policies, on float batches in [0, 1] as
torchvision v2 defines each op for float tensors. Unlike torchvision, which
draws once per call (once per batch), every image draws its own ops, magnitudes
and signs, from torch's generator on the batch's device.

Batching: an image takes exactly one op per slot, so a slot runs each op
*group* once on the whole batch and each image keeps its own group's result
(``torch.where`` on a per-sample mask). The five geometric ops are one
per-sample affine matrix, so one ``grid_sample``; brightness, colour and
contrast are one blend with a per-sample target; the rest are cheap
elementwise or per-channel passes (equalize: one 256-bin histogram per
channel). Selecting samples by index instead would read the masks back to the
host every batch; running every group on every image costs about seven cheap
passes per slot, with no host synchronisation. Groups a policy never uses are
skipped (that is known on the host, from the policy alone).

As in ``transforms``: random transforms are frozen dataclasses with
``draw(x) -> params`` and ``apply(x, params)``, so tests apply torchvision's
op per image with the drawn parameters.
"""

import functools
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from cnnreg import hookimpl
from cnnreg_plugins import _batched_ops as ops
from cnnreg_plugins._params import fill_values as _fill_values, value_range as _range

Fill = float | list[float]
GeometricInterpolation = Literal["nearest", "bilinear"]
NonNegative = Annotated[float, Field(ge=0)]
Bins = Annotated[int, Field(ge=2)]

# torchvision's op names; RandAugment and TrivialAugmentWide draw from the first 14,
# AutoAugment's policies name Invert too. An op's index here is its id in the draws.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP = {name: k for k, name in enumerate(OPS)}
_SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                     "Brightness", "Color", "Contrast", "Sharpness"})
Space = dict[str, tuple[Tensor | None, bool]]


def augmentation_space(kind: str, num_bins: int, height: int, width: int) -> Space:
    """torchvision's ``_augmentation_space``: each op's magnitude per bin (None for
    ops without one) and whether it is signed; ``kind`` is rand_augment,
    trivial_augment_wide or auto_augment (whose space has Invert, not Identity)."""
    def lin(high: float) -> Tensor:
        return torch.linspace(0.0, high, num_bins)

    wide = kind == "trivial_augment_wide"
    bins = torch.arange(num_bins)
    magnitudes = {
        "ShearX": lin(0.99 if wide else 0.3),
        "ShearY": lin(0.99 if wide else 0.3),
        "TranslateX": lin(32.0 if wide else 150.0 / 331.0 * width),
        "TranslateY": lin(32.0 if wide else 150.0 / 331.0 * height),
        "Rotate": lin(135.0 if wide else 30.0),
        "Brightness": lin(0.99 if wide else 0.9),
        "Color": lin(0.99 if wide else 0.9),
        "Contrast": lin(0.99 if wide else 0.9),
        "Sharpness": lin(0.99 if wide else 0.9),
        # 8 bits down to 2 (wide) or 4, in equal steps rounded to whole bits
        "Posterize": (8 - (bins / ((num_bins - 1) / (6 if wide else 4)))).round().int(),
        "Solarize": torch.linspace(1.0, 0.0, num_bins),  # the threshold: from 1 (almost nothing) to 0 (all)
    }
    names = OPS[1:] if kind == "auto_augment" else OPS[:-1]
    return {name: (magnitudes.get(name), name in _SIGNED) for name in names}


# torchvision's AutoAugment policies: (op, probability, magnitude bin of 10) twice.
_P = tuple[tuple[str, float, int | None], tuple[str, float, int | None]]
POLICIES: dict[str, tuple[_P, ...]] = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)), (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


@functools.lru_cache(maxsize=64)
def _tables(kind: str, num_bins: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The space as device tensors indexed by op id: magnitudes ``[len(OPS), num_bins]``
    (0 for ops without one) and signed ``[len(OPS)]``. Built once per image size:
    a host -> device copy every batch would make the host wait on CUDA."""
    space = augmentation_space(kind, num_bins, height, width)
    magnitudes = torch.zeros(len(OPS), num_bins)
    signed = torch.zeros(len(OPS), dtype=torch.bool)
    for name, (values, is_signed) in space.items():
        if values is not None:
            magnitudes[OP[name]] = values.float()
        signed[OP[name]] = is_signed
    return magnitudes.to(device), signed.to(device)


@dataclass(frozen=True)
class OpDraws:
    """Each sample's op id per slot (int64 ``[B, slots]``, Identity when skipped) and its
    signed magnitude (float32 ``[B, slots]``), as torchvision passes them to its op."""

    op: Tensor
    magnitude: Tensor


def _signed(magnitude: Tensor, op: Tensor, signed: Tensor) -> Tensor:
    """torchvision's sign rule: a signed op's magnitude is negated with probability 1/2."""
    flip = signed[op] & (torch.rand(op.shape, device=op.device) <= 0.5)
    return torch.where(flip, -magnitude, magnitude)


_GEOMETRIC = frozenset(OP[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))
_BLEND = {OP["Brightness"]: ops.BRIGHTNESS, OP["Color"]: ops.SATURATION, OP["Contrast"]: ops.CONTRAST}


def _is(op: Tensor, ids: frozenset[int] | set[int]) -> Tensor:
    hit = torch.zeros_like(op, dtype=torch.bool)
    for k in ids:
        hit |= op == k
    return hit


def _mask(hit: Tensor) -> Tensor:
    return hit.view(-1, 1, 1, 1)


def apply_op(x: Tensor, op: Tensor, magnitude: Tensor, interpolation: str, fill: Tensor | float,
             used: frozenset[int]) -> Tensor:
    """Op ``op[b]`` with magnitude ``magnitude[b]`` on each sample (torchvision's
    ``_apply_image_or_video_transform``), running each op group in ``used`` once on the batch."""
    out = x
    height, width = x.shape[-2:]
    if used & _GEOMETRIC:
        zero = torch.zeros_like(magnitude)
        # shears: torchvision shears by atan(m) in degrees about the top-left corner
        shear = torch.rad2deg(torch.atan(magnitude))
        shear_x = torch.where(op == OP["ShearX"], shear, zero)
        shear_y = torch.where(op == OP["ShearY"], shear, zero)
        tx = torch.where(op == OP["TranslateX"], magnitude.trunc(), zero)  # int(m), as torchvision
        ty = torch.where(op == OP["TranslateY"], magnitude.trunc(), zero)
        angle = torch.where(op == OP["Rotate"], -magnitude, zero)  # rotate's inverse map turns by -angle
        is_shear = _is(op, {OP["ShearX"], OP["ShearY"]})
        # The centre, in pixels from the image centre: the top-left corner for shears, else
        # the image centre; both matrices are [B, 2, 3], cheap next to the warp.
        corner = ops.inverse_affine_matrix(angle, (tx, ty), torch.ones_like(zero), (shear_x, shear_y),
                                           (-width * 0.5, -height * 0.5))
        middle = ops.inverse_affine_matrix(angle, (tx, ty), torch.ones_like(zero), (shear_x, shear_y), (0.0, 0.0))
        matrix = torch.where(is_shear.view(-1, 1, 1), corner, middle)
        out = torch.where(_mask(_is(op, _GEOMETRIC)), ops.affine(x, matrix, interpolation, fill), out)
    blend = used & set(_BLEND)
    if blend:
        code = torch.zeros_like(op)
        for k, c in _BLEND.items():
            code = torch.where(op == k, c, code)
        out = torch.where(_mask(_is(op, blend)), ops.blend_towards(x, code, 1.0 + magnitude), out)
    if OP["Sharpness"] in used:
        out = torch.where(_mask(op == OP["Sharpness"]), ops.adjust_sharpness(x, 1.0 + magnitude), out)
    if OP["Posterize"] in used:
        out = torch.where(_mask(op == OP["Posterize"]), ops.posterize(x, magnitude.clamp(0, 8)), out)
    if OP["Solarize"] in used:
        out = torch.where(_mask(op == OP["Solarize"]), ops.solarize(x, magnitude), out)
    if OP["AutoContrast"] in used:
        out = torch.where(_mask(op == OP["AutoContrast"]), ops.autocontrast(x), out)
    if OP["Equalize"] in used:
        out = torch.where(_mask(op == OP["Equalize"]), ops.equalize(x), out)
    if OP["Invert"] in used:
        out = torch.where(_mask(op == OP["Invert"]), 1.0 - x, out)
    return ops.keep_memory_format(out, x)


def _fill(fill: Fill) -> float | tuple[float, ...]:
    return float(fill) if isinstance(fill, (int, float)) else tuple(float(v) for v in fill)


@dataclass(frozen=True)
class _Policy:
    """Shared by the three policies: apply each slot's ops in turn."""

    interpolation: str
    fill: float | tuple[float, ...]

    name = "policy"
    used: frozenset[int] = frozenset(range(len(OPS) - 1))

    def draw(self, x: Tensor) -> OpDraws:
        raise NotImplementedError

    def apply(self, x: Tensor, params: OpDraws) -> Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"{self.name} needs 1- or 3-channel images, not {x.shape[1]} channels")
        fill = _fill_values(self.fill, x, self.name)
        for slot in range(params.op.shape[1]):
            x = apply_op(x, params.op[:, slot], params.magnitude[:, slot], self.interpolation, fill, self.used)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, self.draw(x))


@dataclass(frozen=True)
class RandAugment(_Policy):
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31
    name = "rand_augment"

    def draw(self, x: Tensor) -> OpDraws:
        magnitudes, signed = _tables(self.name, self.num_magnitude_bins, *x.shape[-2:], x.device)
        op = torch.randint(len(OPS) - 1, (x.shape[0], self.num_ops), device=x.device)
        return OpDraws(op, _signed(magnitudes[op, self.magnitude], op, signed))


@dataclass(frozen=True)
class TrivialAugmentWide(_Policy):
    num_magnitude_bins: int = 31
    name = "trivial_augment_wide"

    def draw(self, x: Tensor) -> OpDraws:
        magnitudes, signed = _tables(self.name, self.num_magnitude_bins, *x.shape[-2:], x.device)
        op = torch.randint(len(OPS) - 1, (x.shape[0], 1), device=x.device)
        bins = torch.randint(self.num_magnitude_bins, (x.shape[0], 1), device=x.device)
        return OpDraws(op, _signed(magnitudes[op, bins], op, signed))


@functools.lru_cache(maxsize=16)
def _policy_tables(policy: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A policy as device tensors ``[n, 2]``: op ids, probabilities, magnitude bins (0 when none)."""
    rows = POLICIES[policy]
    op = torch.tensor([[OP[name] for name, _, _ in row] for row in rows])
    p = torch.tensor([[prob for _, prob, _ in row] for row in rows])
    bins = torch.tensor([[b or 0 for _, _, b in row] for row in rows])
    return op.to(device), p.to(device), bins.to(device)


@dataclass(frozen=True)
class AutoAugment(_Policy):
    policy: str = "imagenet"
    name = "auto_augment"

    def draw(self, x: Tensor) -> OpDraws:
        magnitudes, signed = _tables(self.name, 10, *x.shape[-2:], x.device)  # AutoAugment's 10 bins
        op_table, p_table, bin_table = _policy_tables(self.policy, x.device)
        row = torch.randint(len(POLICIES[self.policy]), (x.shape[0],), device=x.device)
        op, bins = op_table[row], bin_table[row]
        applied = torch.rand(op.shape, device=x.device) <= p_table[row]  # torchvision: rand <= p
        op = torch.where(applied, op, OP["Identity"])
        return OpDraws(op, _signed(magnitudes[op, bins], op, signed))


def rand_augment(
    num_ops: Annotated[int, Field(ge=0)] = 2,
    magnitude: Annotated[int, Field(ge=0)] = 9,
    num_magnitude_bins: Bins = 31,
    interpolation: GeometricInterpolation = "nearest",
    fill: Fill = 0.0,
) -> RandAugment:
    """RandAugment (torchvision RandAugment): num_ops random ops in turn, each at one magnitude.

    Each image draws its own ops (uniformly from torchvision's 14) and signs.

    Args:
        num_ops: ops applied one after the other to each image.
        magnitude: the magnitude bin, below num_magnitude_bins.
        num_magnitude_bins: bins each op's range is divided into.
        interpolation: nearest or bilinear, for the geometric ops.
        fill: value of the area a geometric op uncovers, one number or one per channel.
    """
    if magnitude >= num_magnitude_bins:
        raise ValueError(f"rand_augment magnitude {magnitude} must be below num_magnitude_bins "
                         f"({num_magnitude_bins}); lower magnitude or add bins")
    return RandAugment(interpolation, _fill(fill), num_ops=num_ops, magnitude=magnitude,
                       num_magnitude_bins=num_magnitude_bins)


def trivial_augment_wide(
    num_magnitude_bins: Bins = 31,
    interpolation: GeometricInterpolation = "nearest",
    fill: Fill = 0.0,
) -> TrivialAugmentWide:
    """TrivialAugment Wide (torchvision TrivialAugmentWide): one random op at a random magnitude.

    Args:
        num_magnitude_bins: bins each op's (wide) range is divided into.
        interpolation: nearest or bilinear, for the geometric ops.
        fill: value of the area a geometric op uncovers, one number or one per channel.
    """
    return TrivialAugmentWide(interpolation, _fill(fill), num_magnitude_bins=num_magnitude_bins)


def auto_augment(
    policy: Literal["imagenet", "cifar10", "svhn"] = "imagenet",
    interpolation: GeometricInterpolation = "nearest",
    fill: Fill = 0.0,
) -> AutoAugment:
    """AutoAugment (torchvision AutoAugment): one of the policy's 25 learned pairs of ops per image.

    Args:
        policy: the policy learned on imagenet, cifar10 or svhn.
        interpolation: nearest or bilinear, for the geometric ops.
        fill: value of the area a geometric op uncovers, one number or one per channel.
    """
    used = frozenset(OP[name] for row in POLICIES[policy] for name, _, _ in row) | {OP["Identity"]}
    return AutoAugment(interpolation, _fill(fill), policy=policy, used=used)


# -- random affine ----------------------------------------------------------------------


@dataclass(frozen=True)
class AffineParams:
    """Per sample, float32 ``[B]`` each: angle and shears in degrees, whole-pixel translations, scale."""

    angle: Tensor
    tx: Tensor
    ty: Tensor
    scale: Tensor
    shear_x: Tensor
    shear_y: Tensor


def _uniform(x: Tensor, low: float, high: float) -> Tensor:
    return torch.empty(x.shape[0], device=x.device).uniform_(low, high)


@dataclass(frozen=True)
class RandomAffine:
    degrees: tuple[float, float]
    translate: tuple[float, float] | None
    scale: tuple[float, float] | None
    shear: tuple[float, float, float, float] | None  # x range, y range
    interpolation: str
    fill: float | tuple[float, ...]
    center: tuple[float, float] | None

    def draw(self, x: Tensor) -> AffineParams:
        height, width = x.shape[-2:]
        zero = torch.zeros(x.shape[0], device=x.device)
        tx = ty = zero
        if self.translate is not None:  # torchvision: round(uniform(-max, max)) whole pixels
            max_dx, max_dy = self.translate[0] * width, self.translate[1] * height
            tx, ty = _uniform(x, -max_dx, max_dx).round(), _uniform(x, -max_dy, max_dy).round()
        scale = zero + 1.0 if self.scale is None else _uniform(x, *self.scale)
        shear_x = shear_y = zero
        if self.shear is not None:
            shear_x, shear_y = _uniform(x, *self.shear[:2]), _uniform(x, *self.shear[2:])
        return AffineParams(_uniform(x, *self.degrees), tx, ty, scale, shear_x, shear_y)

    def apply(self, x: Tensor, params: AffineParams) -> Tensor:
        height, width = x.shape[-2:]
        center = (0.0, 0.0) if self.center is None else (self.center[0] - width * 0.5, self.center[1] - height * 0.5)
        matrix = ops.inverse_affine_matrix(params.angle, (params.tx, params.ty), params.scale,
                                           (params.shear_x, params.shear_y), center)
        return ops.affine(x, matrix, self.interpolation, _fill_values(self.fill, x, "random_affine"))

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, self.draw(x))


def random_affine(
    degrees: NonNegative | tuple[float, float] = 0.0,
    translate: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] | None = None,
    scale: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = None,
    shear: NonNegative | tuple[float, float] | tuple[float, float, float, float] | None = None,
    interpolation: GeometricInterpolation = "nearest",
    fill: Fill = 0.0,
    center: tuple[float, float] | None = None,
) -> RandomAffine:
    """Rotate, translate, scale and shear each image at random (torchvision RandomAffine).

    Every sample draws its own parameters; one grid_sample warps the batch.

    Args:
        degrees: rotation drawn from [-degrees, degrees], or from [min, max].
        translate: largest shift as a fraction of [width, height]; drawn per axis and rounded to whole pixels.
        scale: scale range [min, max]; default no scaling.
        shear: x shear from [-shear, shear]; [min, max] for x only; [xmin, xmax, ymin, ymax] for both (degrees).
        interpolation: nearest or bilinear.
        fill: value of the uncovered area, one number or one per channel.
        center: centre (x, y) in pixels from the top-left corner; default the image centre.
    """
    if scale is not None:
        _range(tuple(scale), "scale")
    if shear is None:
        shears = None
    elif isinstance(shear, (int, float)) or len(shear) == 2:
        shears = (*_range(shear, "shear"), 0.0, 0.0)
    else:
        shears = (*_range(shear[:2], "shear x"), *_range(shear[2:], "shear y"))
    return RandomAffine(_range(degrees, "degrees"), None if translate is None else tuple(translate),
                        None if scale is None else tuple(scale), shears, interpolation, _fill(fill),
                        None if center is None else tuple(center))


# -- gaussian blur ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sigmas:
    """Each sample's blur standard deviation: float32 ``[B]``."""

    sigma: Tensor


@dataclass(frozen=True)
class GaussianBlur:
    kernel_size: tuple[int, int]  # x, y as torchvision
    sigma: tuple[float, float]

    def draw(self, x: Tensor) -> Sigmas:
        return Sigmas(_uniform(x, *self.sigma))

    def apply(self, x: Tensor, params: Sigmas) -> Tensor:
        kx, ky = self.kernel_size
        if kx // 2 >= x.shape[-1] or ky // 2 >= x.shape[-2]:
            raise ValueError(f"gaussian_blur kernel_size {kx}x{ky} needs images larger than half of it, not "
                             f"{x.shape[-2]}x{x.shape[-1]}; lower kernel_size")
        return ops.gaussian_blur(x, self.kernel_size, params.sigma)

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, self.draw(x))


OddSize = Annotated[int, Field(ge=1)]


def gaussian_blur(
    kernel_size: OddSize | tuple[OddSize, OddSize],
    sigma: Annotated[float, Field(gt=0)] | tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    = (0.1, 2.0),
) -> GaussianBlur:
    """Blur each image with a Gaussian of random width (torchvision GaussianBlur).

    Args:
        kernel_size: odd kernel size, one int or [x, y] (width first, as torchvision).
        sigma: standard deviation, fixed or drawn per image from [min, max].
    """
    sizes = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if any(k % 2 == 0 for k in sizes):
        raise ValueError(f"gaussian_blur kernel_size must be odd, got {list(sizes)}")
    sigmas = (float(sigma), float(sigma)) if isinstance(sigma, (int, float)) else (float(sigma[0]), float(sigma[1]))
    if sigmas[0] > sigmas[1]:
        raise ValueError(f"gaussian_blur sigma range {list(sigmas)} is empty; give it as [min, max]")
    return GaussianBlur(sizes, sigmas)


@hookimpl
def cnnreg_transforms() -> dict:
    return {
        "rand_augment": rand_augment,
        "trivial_augment_wide": trivial_augment_wide,
        "auto_augment": auto_augment,
        "random_affine": random_affine,
        "gaussian_blur": gaussian_blur,
    }
