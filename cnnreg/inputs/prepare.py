"""The forward path shared by training, evaluation and prediction.

A uint8 batch becomes the model's input here: scaled to [0, 1], passed
through the recipe's transforms, cast to the run's input dtype and memory
format. Two optional transform protocols are honoured:

* ``uses_sample_index = True``: the transform is called as
  ``t(x, index=..., epoch=...)`` with each sample's index in its split (an
  int64 tensor on the batch's device) and the epoch (from 1; 0 outside
  training), so it can treat the same image differently from epoch to epoch
  (e.g. the alternating flip). Without indices it gets ``index=None``.
* ``view_weights = (w0, w1, ...)``: the transform returns ``V`` views of the
  batch stacked view-major (``[V * B, ...]``, view ``v`` of sample ``b`` at
  ``v * B + b``); the model's logits are then merged by
  :func:`merge_views` into one weighted average per sample (test-time
  augmentation). Several such transforms compose: their views multiply.
* ``mixes_targets = True``: the transform mixes images of a training batch
  together (mixup, cutmix) and so must mix their labels the same way:
  :func:`prepare_training_batch` calls ``t.mix(x, targets) -> (x, soft)``
  with int64 class indices ``[B]`` or soft targets ``[B, C]`` (from an
  earlier mixing transform) and gets float32 soft targets ``[B, C]`` for the
  loss. Called as ``t(x)`` (previews, batch-norm updates) it mixes the images only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Transform = Callable[..., torch.Tensor]


def uses_sample_index(transform: Transform) -> bool:
    return bool(getattr(transform, "uses_sample_index", False))


def apply_transform(transform: Transform, x: torch.Tensor, index: torch.Tensor | None = None,
                    epoch: int = 0) -> torch.Tensor:
    """One transform, given the sample indices and epoch when it asks for them."""
    return transform(x, index=index, epoch=epoch) if uses_sample_index(transform) else transform(x)


def mixes_targets(transform: Transform) -> bool:
    return bool(getattr(transform, "mixes_targets", False))


def view_weights(transforms: Sequence[Transform]) -> tuple[float, ...] | None:
    """The weight of each view the transforms produce, in the batch's view-major order; None for one view."""
    weights: tuple[float, ...] | None = None
    for transform in transforms:
        own = getattr(transform, "view_weights", None)
        if own is None:
            continue
        own = tuple(float(w) for w in own)
        # A later transform expands every view of the earlier ones: its views are the outer index.
        weights = own if weights is None else tuple(a * b for a in own for b in weights)
    return weights


def prepare_batch(images: torch.Tensor, transforms: Sequence[Transform], *, channels_last: bool,
                  dtype: torch.dtype = torch.float32, index: torch.Tensor | None = None,
                  epoch: int = 0) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float in [0, 1] -> transforms -> ``dtype`` and memory format."""
    x = images.float().div_(255)
    for transform in transforms:
        x = apply_transform(transform, x, index, epoch)
    return _as_input(x, dtype, channels_last)


def prepare_training_batch(images: torch.Tensor, targets: torch.Tensor, transforms: Sequence[Transform], *,
                           channels_last: bool, dtype: torch.dtype = torch.float32,
                           index: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prepare_batch` for a training step, and the targets for its loss: ``targets``
    themselves, or the soft targets ``[B, C]`` of the mixing transforms among ``transforms``.

    Only the loss sees soft targets; the caller keeps ``targets`` for the metrics.
    """
    x = images.float().div_(255)
    for transform in transforms:
        if mixes_targets(transform):
            x, targets = transform.mix(x, targets)  # type: ignore[attr-defined]
        else:
            x = apply_transform(transform, x, index, epoch)
    return _as_input(x, dtype, channels_last), targets


def _as_input(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    if x.dtype != dtype:
        x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def merge_views(logits: torch.Tensor, weights: tuple[float, ...] | None) -> torch.Tensor:
    """``[V * B, K]`` logits of ``V`` views -> ``[B, K]``, their weighted average (in fp32).

    Python-number weights: no tensor is made per batch, so nothing waits for the host.
    """
    if weights is None:
        return logits
    views = logits.float().unflatten(0, (len(weights), -1)).unbind(0)
    merged = views[0] * weights[0]
    for weight, view in zip(weights[1:], views[1:]):
        merged = merged.add(view, alpha=weight)
    return merged
