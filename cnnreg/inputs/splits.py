"""Splitting, subsetting and summarising data: pure, stratified, seeded.

Every function here returns new values (indices, splits, sources) and draws
its randomness from a CPU ``torch.Generator`` seeded by its ``seed``
argument, so the same call gives the same answer on every machine and run.

Stratified means each class is split in proportion to its size (largest
remainder rounding, so the totals are exact): a 10 % validation split of a
set with a rare class still holds that class, when it can.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from cnnreg.core.data import DataSource, ImageSplit
from cnnreg.core.errors import UserError


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _allocate(counts: list[int], total: int, caps: list[int]) -> list[int]:
    """Share ``total`` among classes in proportion to ``counts``, at most ``caps[i]`` each.

    Largest-remainder apportionment in integers: every class gets the floor
    of its quota, then the leftover goes one by one to the largest remainders
    (ties to the lower class index), skipping classes at their cap.
    """
    n = sum(counts)
    if n == 0 or total <= 0:
        return [0] * len(counts)
    take = [min(c * total // n, cap) for c, cap in zip(counts, caps)]
    remainders = sorted(range(len(counts)), key=lambda i: (-((counts[i] * total) % n), i))
    left = total - sum(take)
    while left > 0:
        progressed = False
        for i in remainders:
            if left == 0:
                break
            if take[i] < caps[i]:
                take[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return take


def stratified_split(labels: torch.Tensor, count: int, seed: int, *, min_keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw about ``count`` samples, stratified by label; the rest stays.

    :param labels: int64 ``[N]`` class indices (>= 0).
    :param count: how many to draw in total.
    :param min_keep: samples each class keeps at least (so a class with a
        single image stays in the training split rather than moving out).
    :returns: ``(kept, drawn)``, sorted index tensors; ``drawn`` may be
        shorter than ``count`` when ``min_keep`` leaves too few to draw.
    """
    labels = labels.to(torch.int64).cpu()
    n = len(labels)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    counts = torch.bincount(labels).tolist()
    take = torch.tensor(_allocate(counts, min(count, n), [max(0, c - min_keep) for c in counts]), dtype=torch.int64)
    # A random order within each class: shuffle, then a stable sort by label.
    perm = torch.randperm(n, generator=_generator(seed))
    order = perm[torch.sort(labels[perm], stable=True).indices]
    grouped = labels[order]
    starts = torch.cumsum(torch.tensor(counts), 0) - torch.tensor(counts)
    rank = torch.arange(n) - starts[grouped]
    is_drawn = rank < take[grouped]
    return order[~is_drawn].sort().values, order[is_drawn].sort().values


def with_validation(source: DataSource, fraction: float, seed: int) -> DataSource:
    """Carve a stratified validation split of ``fraction`` out of ``source.train``.

    Returns ``source`` unchanged when it already has a validation split or
    when ``fraction`` is 0. Every class keeps at least one training image: a
    class too small to give one to validation (a single image, or so few that
    its share rounds to zero) is named in a warning, and validation then
    lacks that class.

    :raises UserError: when no image at all can be spared for validation.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1), not {fraction}")
    if fraction == 0 or source.val is not None:
        return source
    train = source.train
    count = max(1, round(len(train) * fraction))
    kept, drawn = stratified_split(train.labels, count, seed, min_keep=1)
    if len(drawn) == 0:
        raise UserError(
            f"cannot carve a validation split of {fraction:g} from {len(train)} training images: "
            "every class has a single image, which stays in training; add images or give a val/ split"
        )
    counts = torch.bincount(train.labels, minlength=source.num_classes)
    in_val = torch.bincount(train.labels[drawn], minlength=source.num_classes)
    missing = [source.classes[i] for i in ((counts > 0) & (in_val == 0)).nonzero().flatten().tolist()]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warnings.warn(
            f"no validation image for class {shown}: too few training images for a {fraction:g} share "
            "(each class keeps at least one for training)",
            stacklevel=2,
        )
    return replace(source, train=train.select(kept), val=train.select(drawn))


def subset(split: ImageSplit, amount: float | int, seed: int) -> ImageSplit:
    """A stratified random part of ``split``, for quick runs.

    :param amount: a fraction in (0, 1] (a float: ``0.1``, or ``1.0`` for
        everything) or a number of samples (an int: ``1`` means one image).
    """
    n = len(split)
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ValueError(f"a subset is a fraction in (0, 1] or a count >= 1, not {amount!r}")
    if isinstance(amount, float):
        if not 0 < amount <= 1:
            raise ValueError(f"a subset fraction must be in (0, 1], not {amount}; use an integer for a count")
        count = max(1, round(n * amount))
    else:
        if amount < 1:
            raise ValueError(f"a subset count must be at least 1, not {amount}")
        count = min(amount, n)
    if count >= n:
        return split
    _, drawn = stratified_split(split.labels, count, seed, min_keep=0)
    return split.select(drawn)


def kfold(labels: torch.Tensor, folds: int, seed: int, stratified: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``folds`` (train_index, val_index) pairs; each sample is validated exactly once.

    Samples are shuffled (within each class, when stratified) and dealt to
    the folds in turn, so fold sizes differ by at most one and so does each
    class's share of every fold.
    """
    labels = labels.to(torch.int64).cpu()
    n = len(labels)
    if not 2 <= folds <= n:
        raise ValueError(f"k-fold needs 2 <= folds <= number of samples ({n}), not {folds}")
    perm = torch.randperm(n, generator=_generator(seed))
    if stratified:
        perm = perm[torch.sort(labels[perm], stable=True).indices]
        counts = torch.bincount(labels)
        small = ((counts > 0) & (counts < folds)).nonzero().flatten().tolist()
        if small:
            warnings.warn(
                f"classes {small[:5]} have fewer samples than folds ({folds}): some folds validate none of them",
                stacklevel=2,
            )
    fold_of = torch.empty(n, dtype=torch.int64)
    fold_of[perm] = torch.arange(n) % folds
    return [((fold_of != f).nonzero().flatten(), (fold_of == f).nonzero().flatten()) for f in range(folds)]


def channel_stats(
    split: ImageSplit,
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    sample: int = 4096,
    seed: int = 0,
    fit: str = "stretch",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels, in [0, 1].

    Computed from a histogram of the uint8 values of up to ``sample`` images
    drawn at random (every image of a smaller split; 4096 CIFAR images pin
    the values to the third decimal): no float copy of the images is made.
    Files are decoded (at most 256 of them, at ``size`` when given, else at
    their own size; unreadable ones are passed over).

    :param channels: convert to 1 or 3 channels first (files: ``None`` means 3).
    :param size: ``(height, width)`` to decode files at.
    :param fit: how files meet ``size`` (see :func:`cnnreg.inputs.imagefiles.decode_image`).
    """
    histogram = None
    for chunk in _stat_chunks(split, channels=channels, size=size, sample=sample, seed=seed, fit=fit):
        counts = torch.stack([torch.bincount(chunk[:, c].reshape(-1), minlength=256) for c in range(chunk.shape[1])])
        histogram = counts if histogram is None else histogram + counts
    if histogram is None:
        raise UserError("cannot compute the channel mean and std of an empty split (or one without a readable image)")
    values = torch.arange(256, dtype=torch.float64) / 255
    pixels = histogram.sum(1).to(torch.float64)
    mean = (histogram * values).sum(1) / pixels
    std = ((histogram * values.square()).sum(1) / pixels - mean.square()).clamp_min(0).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _stat_chunks(split: ImageSplit, *, channels: int | None, size: tuple[int, int] | None, sample: int, seed: int,
                 fit: str):
    if split.images is not None:
        images = split.images
        if len(images) > sample:
            images = images[torch.randperm(len(images), generator=_generator(seed))[:sample].sort().values]
        for start in range(0, len(images), 1024):
            chunk = images[start : start + 1024]
            yield chunk if channels is None else convert_channels(chunk, channels)
        return
    from cnnreg.inputs.imagefiles import BadImage, decode_image

    files = split.files or ()
    pick = torch.randperm(len(files), generator=_generator(seed))[: min(sample, 256)].sort().values.tolist()
    for i in pick:
        try:
            array = decode_image(files[i], size=size, channels=channels or 3, fit=fit)
        except BadImage:
            continue
        yield torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert ``[B, C, H, W]`` images to ``channels`` channels, on their device.

    1 -> 3 replicates the channel (a view, no copy); 3 -> 1 is the ITU-R 601-2
    luma transform, computed for uint8 with Pillow's integer arithmetic so the
    result equals ``Image.convert("L")`` exactly. Anything else is an error.
    """
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
        if images.dtype == torch.uint8:
            # L = R*299/1000 + G*587/1000 + B*114/1000, in Pillow's 16-bit fixed point.
            luma = (r.to(torch.int32) * 19595 + g.to(torch.int32) * 38470 + b.to(torch.int32) * 7471 + 0x8000) >> 16
            return luma.to(torch.uint8)
        return r * 0.299 + g * 0.587 + b * 0.114
    raise ValueError(f"cannot convert images with {have} channels to {channels}: only 1 <-> 3 is supported")
