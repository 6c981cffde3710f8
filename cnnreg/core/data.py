"""What a dataset plugin hands to the engine.

A dataset factory returns a :class:`DataSource`. Each split holds either the
whole split in memory as a uint8 tensor (MNIST, CIFAR, image folders that
fit: the engine moves it to the GPU once and batches it there) or a list of
files that DataLoader workers decode and resize to ``image_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])

#: How an image of another size is brought to the stored size.
Fit = Literal["stretch", "crop"]


@dataclass(frozen=True)
class ImageSplit:
    """One split: labels plus either in-memory images or image files.

    :param labels: int64 ``[N]`` class indices.
    :param images: uint8 ``[N, C, H, W]``, when the split is held in memory.
    :param files: paths of the N images, when they are decoded lazily.
    """

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.files is None):
            raise ValueError("an ImageSplit holds exactly one of images or files")
        n = len(self.images) if self.images is not None else len(self.files or ())
        if self.labels.ndim != 1 or len(self.labels) != n:
            raise ValueError(f"an ImageSplit needs one label per image: {n} images, labels of shape {tuple(self.labels.shape)}")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.ndim != 4):
            raise ValueError(f"in-memory images must be uint8 [N, C, H, W], not {self.images.dtype} {tuple(self.images.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def select(self, index: torch.Tensor) -> ImageSplit:
        """The samples at ``index`` (an int64 tensor), as a new split."""
        index = index.to(torch.long)
        if self.images is not None:
            return ImageSplit(labels=self.labels[index], images=self.images[index])
        files = self.files or ()
        return ImageSplit(labels=self.labels[index], files=tuple(files[i] for i in index.tolist()))


@dataclass(frozen=True)
class DataSource:
    """The splits a dataset has, and what the model and transforms need to know.

    :param train: the training split.
    :param classes: class names, index order.
    :param image_size: ``(H, W)`` of the images the batches carry.
    :param channels: 1 (grayscale) or 3 (RGB).
    :param val: a validation split, when the source defines one.
    :param test: a test split, when the source defines one.
    :param mean: per-channel mean in [0, 1], for ``normalize`` defaults.
    :param std: per-channel standard deviation in [0, 1].
    :param skipped: ``(path, reason)`` of every file left out as unreadable.
    :param fit: how files (file splits, and a prediction's images) are
        brought to ``image_size``: ``"stretch"`` resizes to it exactly,
        ``"crop"`` resizes to cover it and cuts the centre (the aspect
        ratio kept, as a pretrained model's evaluation resize and crop do).
    """

    train: ImageSplit
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    val: ImageSplit | None = None
    test: ImageSplit | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    skipped: tuple[tuple[str, str], ...] = field(default=())
    fit: Fit = "stretch"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> ImageSplit | None:
        """The split called ``name`` ("train", "val" or "test"), if there is one."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: use train, val or test")
        return getattr(self, name)


@dataclass(frozen=True)
class DataContext:
    """What a transform may need to know about the run's data and model.

    A factory parameter annotated ``DataContext`` is not part of the recipe:
    the engine passes this record, so a transform whose size or statistics
    the recipe leaves out can follow the dataset, or the pretrained model's
    own preprocessing when the model declares one (``cnnreg_data_config``).

    :param image_size: ``(H, W)`` of the batches as the data source makes them.
    :param channels: channels of those batches.
    :param num_classes: number of classes.
    :param mean: per-channel mean to normalise with: the model's pretrained
        mean when it has one, else the dataset's.
    :param std: per-channel standard deviation, chosen the same way.
    :param input_size: ``(H, W)`` the model was pretrained at, if it says.
    :param interpolation: the model's resize interpolation ("bilinear", "bicubic", "nearest").
    :param crop_pct: the model's evaluation centre-crop fraction, if it says.
    """

    image_size: tuple[int, int]
    channels: int
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, without loading it: enough to check a recipe.

    ``cnnreg validate`` dry-runs a recipe on a fake batch of this shape, so
    shipped recipes can be checked on a machine that has none of the data.
    """

    classes: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    splits: tuple[str, ...] = ("train", "test")
    #: the images differ in size; ``image_size`` is then their median
    #: (height and width apart), and the engine chooses the size to store them at
    mixed_sizes: bool = False
    #: images per split, when known without loading (steps per epoch follow from it)
    split_sizes: Mapping[str, int] | None = None
    #: each split's int64 labels, when known without loading: validation
    #: splits, subsets and folds are then carved exactly as the run carves them
    labels: Mapping[str, torch.Tensor] | None = None
    #: what could not be checked without loading, or because something is absent
    unchecked: tuple[str, ...] = ()
    #: what the run will warn about (unreadable files it will skip, ...)
    warnings: tuple[str, ...] = ()
    #: ``(parameter, folder)`` of each folder whose whole tree becomes data:
    #: the run's output must not go inside one
    scanned: tuple[tuple[str, Path], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def describes(describe: Callable[..., DatasetInfo]) -> Callable[[F], F]:
    """Attach a cheap ``describe`` to a dataset factory.

    ``describe`` takes the factory's parameters and returns a
    :class:`DatasetInfo` without reading the images (a fixed answer for
    CIFAR-10, the class folder names for an image folder).
    """

    def mark(factory: F) -> F:
        factory.cnnreg_describe = describe  # type: ignore[attr-defined]
        return factory

    return mark
