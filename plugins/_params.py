"""Parameter helpers shared by the transform plugins (transforms, augment_policies)."""

from __future__ import annotations

from torch import Tensor

from cnnreg_plugins import _batched_ops as ops


def value_range(value: float | tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    """``v`` as ``(-v, v)``, or ``[min, max]`` as it is; an empty range is an error."""
    low, high = (-value, value) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))
    if low > high:
        raise ValueError(f"{name} range [{low}, {high}] is empty; give it as [min, max]")
    return low, high


def fill_values(fill: float | tuple[float, ...], x: Tensor, name: str) -> Tensor | float:
    """A fill as a number, or a ``[1, C, 1, 1]`` tensor for one value per channel."""
    if isinstance(fill, (int, float)):
        return float(fill)
    if len(fill) == 1:
        return float(fill[0])
    if len(fill) != x.shape[1]:
        raise ValueError(f"{name} fill has {len(fill)} values but the images have {x.shape[1]} channels; "
                         f"give one value, or one per channel")
    return ops.channel_constant(fill, like=x)
