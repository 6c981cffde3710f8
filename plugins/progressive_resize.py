"""Progressive resizing: train on smaller images first, growing to the full size.

As Composer's ProgressiveResizing (mode "resize") and fastai's progressive
resizing: early epochs, which learn coarse features, run on downscaled
batches and so cost less; the size grows linearly from ``start_fraction``
of the batch's size in epoch 1 to the full size at ``end_epoch``, and stays
full after. It is a training transform that asks for the epoch (the
``uses_sample_index`` protocol of :mod:`cnnreg.inputs.prepare`); outside
training (epoch 0: evaluation, prediction, the dry run) it leaves batches
as they are, so evaluation always sees the full size.

With ``trainer.compile`` every distinct size is one more compilation: at
most ``end_epoch`` sizes, fewer once ``size_multiple`` rounds neighbours
together (e.g. 32x32 images from 0.5 over 8 epochs with multiple 8: 16, 24
and 32, three compilations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from cnnreg import hookimpl


def scaled_side(side: int, fraction: float, multiple: int) -> int:
    """``side * fraction`` rounded to a multiple of ``multiple``, at least one multiple and at most ``side``."""
    rounded = int(round(side * fraction / multiple)) * multiple
    return min(side, max(multiple, rounded))


@dataclass(frozen=True)
class ProgressiveResize:
    start_fraction: float
    end_epoch: int
    size_multiple: int
    uses_sample_index: ClassVar[bool] = True  # the engine passes index= and epoch=

    def fraction(self, epoch: int) -> float:
        """Share of the full size in ``epoch`` (from 1); 1 from end_epoch on and outside training."""
        if epoch < 1 or epoch >= self.end_epoch:
            return 1.0
        return self.start_fraction + (1.0 - self.start_fraction) * (epoch - 1) / (self.end_epoch - 1)

    def size(self, full: tuple[int, int], epoch: int) -> tuple[int, int]:
        fraction = self.fraction(epoch)
        if fraction == 1.0:
            return full
        return (scaled_side(full[0], fraction, self.size_multiple), scaled_side(full[1], fraction, self.size_multiple))

    def __call__(self, x: Tensor, index: Tensor | None = None, epoch: int = 0) -> Tensor:
        full = (x.shape[-2], x.shape[-1])
        size = self.size(full, epoch)
        if size == full:
            return x
        # antialias: a plain bilinear downscale by 2 or more aliases fine detail
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def progressive_resize(
    start_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5,
    end_epoch: Annotated[int, Field(ge=2)] = 10,
    size_multiple: Annotated[int, Field(ge=1)] = 8,
) -> ProgressiveResize:
    """Resize training batches from start_fraction of their size up to the full size by end_epoch.

    Bilinear with antialiasing (torch's F.interpolate) on the device, per
    batch; the size of epoch e < end_epoch is
    ``start_fraction + (1 - start_fraction) * (e - 1) / (end_epoch - 1)``
    of the full one, each side rounded to a multiple of size_multiple. For
    training transforms; evaluation sees the full size. Each distinct size
    is one torch.compile recompilation (see the module's notes).

    Args:
        start_fraction: share of the full size in epoch 1, in (0, 1].
        end_epoch: first epoch at the full size, >= 2.
        size_multiple: each side is rounded to a multiple of this (fewer sizes, fewer recompilations).
    """
    return ProgressiveResize(float(start_fraction), int(end_epoch), int(size_multiple))


@hookimpl
def cnnreg_transforms() -> dict:
    return {"progressive_resize": progressive_resize}
