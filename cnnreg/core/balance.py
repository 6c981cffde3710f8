"""Class imbalance: per-class training counts and the weights that even them out.

Pure functions over counts, shared by the losses (``weight: "balanced"``),
the assembly (which records the weights it chose) and the balanced sampler,
so all three agree on one formula.
"""

from __future__ import annotations

from typing import Sequence

import torch


def class_counts(labels: torch.Tensor, num_classes: int) -> tuple[int, ...]:
    """Images per class in ``labels`` (int class indices), one entry per class, zeros included."""
    return tuple(int(c) for c in torch.bincount(labels.to(torch.int64).cpu(), minlength=num_classes)[:num_classes])


def balanced_weights(counts: Sequence[int], classes: Sequence[str] | None = None,
                     key: str = "weight") -> tuple[float, ...]:
    """sklearn's ``compute_class_weight("balanced")``: ``n_samples / (n_classes * count_c)``.

    A class seen as often as the average weighs 1; each weighted class then
    contributes the same total to the loss.

    :param counts: training images per class.
    :param classes: class names, to name a class without images.
    :param key: the recipe key, for the error.
    :raises ValueError: a class has no training images (its weight would be infinite).
    """
    counts = [int(c) for c in counts]
    empty = [i for i, c in enumerate(counts) if c <= 0]
    if empty:
        names = ", ".join(repr(classes[i]) if classes is not None and i < len(classes) else f"index {i}"
                          for i in empty)
        raise ValueError(
            f'{key} "balanced": class {names} has no training images, so its weight n / (classes * 0) would be '
            "infinite; give the weights as a list, add images of that class, or enlarge data.subset")
    total = sum(counts)
    return tuple(total / (len(counts) * c) for c in counts)


def sample_weights(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """float64 ``[N]``: each sample's draw weight 1 / (its class's count), as
    fastai's WeightedDL and the usual ``WeightedRandomSampler`` recipe use,
    so every class present is drawn equally often."""
    labels = labels.to(torch.int64).cpu()
    counts = torch.bincount(labels, minlength=num_classes or 0).to(torch.float64)
    return 1.0 / counts[labels]
