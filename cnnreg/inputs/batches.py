"""Batches for the engine, behind one iterator, from memory or from files.

:func:`make_batches` returns a :class:`Batches`: ``len()`` batches per epoch,
``set_epoch(epoch)`` before each epoch, and iteration yielding
``(images, labels)``: uint8 ``[B, C, H, W]`` and int64 ``[B]``, on the run's
device, with ``C`` and ``H, W`` as asked.

* A split held in memory is moved to the device once, as uint8 (a quarter of
  float32). Each epoch draws one permutation on the CPU from ``(seed,
  epoch)`` alone -- so a resumed run sees the same order without any saved
  loader state -- and moves it to the device; a batch is then an
  ``index_select`` by a slice of it. Nothing in the loop reads a value back
  from the device.
* A split of files goes through a ``torch.utils.data.DataLoader`` whose
  workers decode and resize each image; its sampler draws the very same
  permutation and shards, and batches reach the device with
  ``non_blocking=True`` from pinned memory.
* ``sampler="balanced"`` draws the epoch's samples with replacement instead,
  each with probability proportional to 1 / (its class's count), as
  ``WeightedRandomSampler`` does: the same generator seed per epoch, so the
  same order on resume and on every rank, sharded as below.
* With ``world_size > 1`` each rank takes every ``world_size``-th index of the
  epoch's permutation from ``rank`` on, like ``DistributedSampler``: shards
  are disjoint, and the permutation is padded by wrapping around (or cut,
  with ``drop_last``) so every rank runs the same number of steps.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Iterator, Literal, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from cnnreg.core.balance import sample_weights
from cnnreg.core.data import ImageSplit
from cnnreg.core.errors import UserError
from cnnreg.inputs.imagefiles import BadImage, decode_image, default_workers
from cnnreg.inputs.splits import convert_channels


class Batches(Protocol):
    """What the engine iterates over, once per epoch."""

    #: samples this rank yields per epoch (with padding, before any unreadable file is left out)
    num_samples: int
    #: samples per batch (the last may be smaller unless drop_last)
    batch_size: int
    #: the split the batches come from
    split: ImageSplit

    def __len__(self) -> int:
        """Batches per epoch."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch whose order the next iteration follows.

        ``start_batch`` > 0 resumes an interrupted epoch: the next iteration
        yields the same batches as a whole epoch would from that one on,
        without preparing (or decoding) the ones before it.
        """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images uint8 [B, C, H, W], labels int64 [B])`` on the device."""

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """As iteration, plus each sample's int64 index in the split, on the device."""


def make_batches(
    split: ImageSplit,
    *,
    batch_size: int,
    shuffle: bool,
    device: torch.device | str,
    seed: int = 0,
    drop_last: bool = False,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    num_classes: int | None = None,
    name: str = "train",
    rank: int = 0,
    world_size: int = 1,
    even_shards: bool = True,
    num_workers: int | None = None,
    prefetch_factor: int = 4,
    persistent_workers: bool = True,
    bad_images: Literal["skip", "fail"] = "skip",
    fit: Literal["stretch", "crop"] = "stretch",
    sampler: Literal["shuffle", "balanced"] = "shuffle",
) -> Batches:
    """Batches of ``split`` for one rank, on ``device``.

    :param batch_size: samples per batch (per rank).
    :param shuffle: a new order every epoch (from ``seed`` and the epoch);
        otherwise the split's own order.
    :param drop_last: leave out the last, smaller batch (and, across ranks,
        the samples that do not divide evenly).
    :param image_size: ``(H, W)`` of the batches. Files are decoded at it
        (required for file splits); in-memory images of another size are
        resized on the device (bilinear, antialiased).
    :param channels: 1 or 3; in-memory images with other channels are
        converted per batch on the device (1 -> 3 replicated, 3 -> 1 luma),
        so the split stays compact; files are decoded straight to it.
        ``None`` keeps the images' own (file splits: 3).
    :param num_classes: labels must lie in ``[0, num_classes)``; checked once,
        here, and named with ``name`` in the error.
    :param rank: this process's rank; ``world_size``: how many ranks.
    :param even_shards: pad by wrapping so every rank gets as many samples
        (and steps); ``False`` gives disjoint shards covering every sample
        exactly once, of sizes that differ by at most one (for evaluation).
    :param num_workers: DataLoader worker processes for file splits;
        ``None``: the usable cores divided among the ranks.
    :param prefetch_factor: batches each worker prepares ahead.
    :param persistent_workers: keep the workers between epochs.
    :param bad_images: file splits: ``"skip"`` leaves an unreadable file out of
        its batch (with a warning, listed in ``.skipped``); ``"fail"`` raises.
    :param fit: file splits: how a file meets ``image_size`` (see
        :func:`cnnreg.inputs.imagefiles.decode_image`).
    :param sampler: ``"shuffle"`` (a permutation, or the split's order without
        ``shuffle``); ``"balanced"``: ``len(split)`` samples drawn with
        replacement, each class equally likely (``shuffle`` is then moot).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), not {rank}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if sampler not in ("shuffle", "balanced"):
        raise ValueError(f'sampler must be "shuffle" or "balanced", not {sampler!r}')
    if len(split) == 0:
        raise UserError(f"the {name} split is empty")
    check_labels(split.labels, num_classes, name)
    weights = sample_weights(split.labels, num_classes) if sampler == "balanced" else None
    order = _Order(len(split), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                   drop_last=drop_last, even_shards=even_shards, weights=weights)
    device = torch.device(device)
    if split.images is not None:
        return TensorBatches(split, order=order, batch_size=batch_size, drop_last=drop_last, device=device,
                             image_size=image_size, channels=channels)
    if image_size is None:
        raise ValueError(f"the {name} split is a list of files: give image_size to decode them at")
    if num_workers is None:
        num_workers = max(1, default_workers() // world_size)
    return FileBatches(split, order=order, batch_size=batch_size, drop_last=drop_last, device=device,
                       image_size=image_size, channels=channels or 3, bad_images=bad_images,
                       num_workers=num_workers, prefetch_factor=prefetch_factor,
                       persistent_workers=persistent_workers, seed=seed, fit=fit)


def check_labels(labels: torch.Tensor, num_classes: int | None, name: str = "train") -> None:
    """Labels must be int64 class indices in ``[0, num_classes)``: say which one is not.

    Runs once per split (it reads values back from the device), never per batch.
    """
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise UserError(f"labels of the {name} split must be integer class indices, not {labels.dtype}")
    if num_classes is None or len(labels) == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        first = int(bad[0])
        raise UserError(
            f"labels of the {name} split must be class indices in [0, {num_classes}): sample {first} has "
            f"label {int(labels[first])} ({len(bad)} of {len(labels)} labels are out of range); "
            "the dataset's classes and its labels disagree"
        )


# -- the order of an epoch -----------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """One generator seed per (seed, epoch), distinct for small values of both."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63)


class _Order:
    """Which sample indices one rank visits in an epoch, and in what order."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int, drop_last: bool, even_shards: bool,
                 weights: torch.Tensor | None = None):
        # weights: per-sample draw weights (the balanced sampler), drawn with replacement
        self.n, self.shuffle, self.seed, self.weights = n, shuffle, seed, weights
        self.rank, self.world_size, self.drop_last, self.even = rank, world_size, drop_last, even_shards
        self.per_rank = samples_per_rank(n, world_size, drop_last, even_shards, rank)
        if world_size > 1 and drop_last and self.per_rank == 0:
            raise UserError(f"{n} samples cannot be shared among {world_size} ranks with drop_last")

    @property
    def sequential(self) -> bool:
        """The order is simply 0..n-1 (no shuffling, one rank)."""
        return not self.shuffle and self.weights is None and self.world_size == 1

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's int64 indices for ``epoch``, on the CPU."""
        if self.weights is not None:
            # A draw, not a permutation: n samples with replacement, from the
            # epoch's seed alone, so resume and every rank see the same order.
            perm = torch.multinomial(self.weights, self.n, replacement=True,
                                     generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        elif self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        else:
            perm = torch.arange(self.n)
        if self.world_size == 1:
            return perm
        if self.drop_last:
            perm = perm[: self.per_rank * self.world_size]
        elif self.even:
            total = self.per_rank * self.world_size
            perm = perm.repeat(math.ceil(total / self.n))[:total]  # wrap around, as DistributedSampler pads
        return perm[self.rank :: self.world_size]


def samples_per_rank(n: int, world_size: int = 1, drop_last: bool = False, even_shards: bool = True,
                     rank: int = 0) -> int:
    """How many of ``n`` samples one rank visits per epoch."""
    if world_size == 1:
        return n
    if drop_last:
        return n // world_size
    if even_shards:
        return math.ceil(n / world_size)
    return len(range(rank, n, world_size))


def train_batches(n: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Training batches per epoch for ``n`` samples: what ``len()`` of their :class:`Batches` is."""
    return _batch_count(samples_per_rank(n, world_size, drop_last), batch_size, drop_last)


def _batch_count(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


# -- in memory ---------------------------------------------------------------------


class TensorBatches:
    """Batches of a split held on the device as uint8."""

    def __init__(self, split: ImageSplit, *, order: _Order, batch_size: int, drop_last: bool, device: torch.device,
                 image_size: tuple[int, int] | None, channels: int | None):
        assert split.images is not None
        self.split = split
        self.images = split.images.to(device)
        self.labels = split.labels.to(device=device, dtype=torch.int64)
        self.order, self.batch_size, self.drop_last, self.device = order, batch_size, drop_last, device
        self.image_size = tuple(image_size) if image_size is not None else None
        self.channels = channels
        self.steps = _batch_count(order.per_rank, batch_size, drop_last)
        self.num_samples = self.steps * batch_size if drop_last else order.per_rank
        batch_bytes = batch_size * self.images[0].numel()
        self.block = max(1, (8 << 20) // batch_bytes)  # batches gathered at once
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = int(epoch), _check_start(start_batch, self.steps)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.indexed():
            yield images, labels

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        if self.order.sequential:
            # The split's own order: batches are views, nothing is copied.
            positions = torch.arange(len(self.labels), device=self.device)
            for i in range(self.start, self.steps):
                part = slice(i * bs, (i + 1) * bs)
                yield self._finish(self.images[part]), self.labels[part], positions[part]
            return
        # Gather a block of batches (~8 MiB) at a time, then slice it. Measured
        # on CIFAR-10, per epoch -- CPU, batch 512: an index_select per batch
        # 0.87 s (each fresh 1.5 MB output faults in new pages), one gather of
        # the whole epoch 0.34 s (but it doubles the split's memory), 8 MiB
        # blocks 0.28 s; H100, batch 128: 29 ms, 19 ms and 20 ms.
        index = self.order.indices(self.epoch).to(self.device, non_blocking=True)
        for first in range(self.start, self.steps, self.block):
            last = min(self.steps, first + self.block)
            take = index[first * bs : last * bs]
            images, labels = self.images.index_select(0, take), self.labels.index_select(0, take)
            for start in range(0, len(take), bs):
                part = slice(start, start + bs)
                yield self._finish(images[part]), labels[part], take[part]

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels is not None:
            images = convert_channels(images, self.channels)
        if self.image_size is not None and tuple(images.shape[-2:]) != self.image_size:
            images = _resize(images, self.image_size)
        return images


def _check_start(start_batch: int, steps: int) -> int:
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch must be in [0, {steps}], not {start_batch}")
    return int(start_batch)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


# -- from files ----------------------------------------------------------------------


class _Bad:
    """A file a worker could not decode (kept picklable and small)."""

    __slots__ = ("path", "reason")

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


class ImageFiles(Dataset):
    """Decodes one file per item to uint8 ``[C, H, W]`` (in a DataLoader worker)."""

    def __init__(self, files: Sequence[Path], labels: torch.Tensor, *, image_size: tuple[int, int], channels: int,
                 fit: str = "stretch"):
        self.files = [str(f) for f in files]
        self.labels = labels.to(torch.int64).tolist()
        self.image_size, self.channels, self.fit = tuple(image_size), channels, fit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            array = decode_image(self.files[index], size=self.image_size, channels=self.channels, fit=self.fit)
        except BadImage as bad:
            return _Bad(bad.path, bad.reason)
        return torch.from_numpy(array).permute(2, 0, 1), self.labels[index], index


def _collate(samples: list) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                     tuple[tuple[str, str], ...]]:
    good = [s for s in samples if not isinstance(s, _Bad)]
    bad = tuple((s.path, s.reason) for s in samples if isinstance(s, _Bad))
    if not good:
        return None, None, None, bad
    # default_collate stacks straight into shared memory in a worker, so the
    # batch is not copied again on its way to the main process (measured: 7%
    # of the images/s of bench/large_folder.py on 2 cores).
    images = default_collate([image for image, _, _ in good])
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.int64)
    index = torch.tensor([i for _, _, i in good], dtype=torch.int64)
    return images, labels, index, bad


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; give Python's and
    # numpy's generators the same seed, so a plugin drawing from them is reproducible.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class _EpochSampler(Sampler[int]):
    """This rank's indices of the epoch, from sample ``skip`` on (the main process iterates it)."""

    def __init__(self, order: _Order):
        self.order = order
        self.epoch, self.skip = 0, 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.indices(self.epoch)[self.skip :].tolist())

    def __len__(self) -> int:
        return self.order.per_rank - self.skip


class FileBatches:
    """Batches decoded from image files by DataLoader workers."""

    def __init__(self, split: ImageSplit, *, order: _Order, batch_size: int, drop_last: bool, device: torch.device,
                 image_size: tuple[int, int], channels: int, bad_images: str, num_workers: int,
                 prefetch_factor: int, persistent_workers: bool, seed: int, fit: str = "stretch"):
        assert split.files is not None
        self.split, self.batch_size = split, batch_size
        self.device, self.bad_images, self.drop_last = device, bad_images, drop_last
        self.sampler = _EpochSampler(order)
        workers = max(0, int(num_workers))
        self.loader = DataLoader(
            ImageFiles(split.files, split.labels, image_size=image_size, channels=channels, fit=fit),
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=persistent_workers and workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(int(seed)),
        )
        self.steps = _batch_count(order.per_rank, batch_size, drop_last)
        self.num_samples = self.steps * batch_size if drop_last else order.per_rank
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch = int(epoch)
        self.sampler.skip = _check_start(start_batch, self.steps) * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.indexed():
            yield images, labels

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, index, bad in self.loader:
            if bad:
                self._bad(bad)
            if images is None:
                continue
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                   index.to(self.device, non_blocking=True))

    def _bad(self, bad: tuple[tuple[str, str], ...]) -> None:
        path, reason = bad[0]
        if self.bad_images == "fail":
            raise UserError(
                f"cannot read image {path}: {reason}; remove or replace the file, "
                'or set "bad_images": "skip" to leave such files out'
            )
        known = {p for p, _ in self.skipped}
        for path, reason in bad:
            if path not in known:
                self.skipped.append((path, reason))
                warnings.warn(f"skipped unreadable image {path}: {reason}", stacklevel=3)
