"""Test-time augmentation: classify each image from several views and average.

The ``tta`` transform goes last in ``transforms.eval``. It returns the batch's
views stacked (``[V * B, C, H, W]``) and declares their weights in
``view_weights``; the engine merges the model's logits into one weighted
average per image (:func:`cnnreg.inputs.prepare.merge_views`), in evaluation and in
``cnnreg predict`` alike.

The views are those of the fastest CIFAR-10 trainings (airbench's
``tta_level``): the image and its mirror image, and with ``translate`` the
image shifted by that many pixels up-left and down-right (reflect padding),
each with its mirror too. The untranslated pair carries half the weight and
the two shifted pairs a quarter each, so a view the model was trained on
counts most. Logits, not probabilities, are averaged, as airbench does.
"""

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from cnnreg import hookimpl


@dataclass(frozen=True)
class TtaViews:
    flip: bool
    translate: int

    @property
    def view_weights(self) -> tuple[float, ...]:
        groups = (1.0,) if self.translate == 0 else (0.5, 0.25, 0.25)
        per_flip = (0.5, 0.5) if self.flip else (1.0,)
        return tuple(g * f for g in groups for f in per_flip)

    def __call__(self, x: Tensor) -> Tensor:
        views = [x]
        if self.translate:
            t = self.translate
            h, w = x.shape[-2:]
            if t >= min(h, w):
                raise ValueError(f"tta translate {t} must be smaller than the images ({h}x{w})")
            padded = F.pad(x, (t, t, t, t), mode="reflect")
            views += [padded[..., : h, : w], padded[..., 2 * t :, 2 * t :]]
        if self.flip:
            views = [v for view in views for v in (view, view.flip(-1))]
        return torch.cat(views)


def tta(flip: bool = True, translate: Annotated[int, Field(ge=0)] = 0) -> TtaViews:
    """Test-time augmentation: average the logits of the image, its mirror image and shifted copies.

    For ``transforms.eval`` only, last. Costs one forward pass per view:
    2 with flip, 6 with flip and translate.

    Args:
        flip: add each view's mirror image (left-right).
        translate: also shift by this many pixels up-left and down-right
            (reflect padding), with half the weight; 0: no shifts.
    """
    if not flip and translate == 0:
        raise ValueError("tta with flip false and translate 0 makes no extra view: enable one, or drop tta")
    return TtaViews(flip=bool(flip), translate=int(translate))


@hookimpl
def cnnreg_transforms() -> dict:
    return {"tta": tta}
