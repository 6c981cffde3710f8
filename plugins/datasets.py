"""Built-in datasets (the ``datasets`` plugin).

* ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``kmnist``: read
  by torchvision's own dataset classes from torchvision's folder layout, and
  handed over as one uint8 tensor per split (no per-image PIL objects).
  They come with train and test splits; the engine carves validation out of
  train (``val_fraction``).
* ``imagefolder``: a folder of class folders (or ``train/``, ``val/``,
  ``test/`` folders of them), decoded once in parallel into memory, through
  an on-disk cache, or -- when too big for memory -- listed for DataLoader
  workers to decode while training.
* ``synthetic``: coloured shapes drawn procedurally, for the offline
  quickstart and the tests.

Annotations are evaluated at import (no ``from __future__ import
annotations``) so the registry reads the signatures as they are.
"""

import gzip
import math
import pickle
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field

from cnnreg.core import progress
from cnnreg.core.data import DatasetInfo, DataSource, ImageSplit, describes
from cnnreg.core.errors import Unavailable, UserError
from cnnreg import hookimpl
from cnnreg.inputs.splits import channel_stats, convert_channels
from cnnreg_plugins._download import fetch
from cnnreg_plugins._image_folder import imagefolder

# Per-channel mean and std of each training set (the values the literature uses).
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
}


# -- describing without loading (cnnreg validate) --------------------------------------------

_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split())


def _fixed(name: str, classes: tuple[str, ...] | Callable[[], tuple[str, ...]], size: int, channels: int, train: int, test: int, files):
    """A describe for a dataset whose shape and classes are fixed: it reads
    nothing, and says when the files are not there yet.

    :param files: ``files(root) -> (folder, present)``.
    """

    def describe(root: Path, download: bool = False, **_: object) -> DatasetInfo:
        folder, present = files(Path(root).expanduser().absolute())
        names = classes() if callable(classes) else classes
        unchecked = () if present else (
            f"the files are not in {folder} yet: "
            + ("download is true, so the run fetches them when it starts" if download
               else 'the run stops unless they are put there, or "download" is set to true'),)
        return DatasetInfo(classes=names, image_size=(size, size), channels=channels,
                           mean=_STATS[name][0], std=_STATS[name][1], split_sizes={"train": train, "test": test},
                           unchecked=unchecked)

    return describe


def _tv(name: str):
    """A torchvision dataset class, imported when first needed: importing torchvision
    costs a second (its models import torch._dynamo), which describing the synthetic
    data for `cnnreg validate` need not pay."""
    from torchvision import datasets

    return getattr(datasets, name)


def _cifar_files(name: str):
    def files(root: Path) -> tuple[Path, bool]:
        cls = _tv(name)
        folder = root / cls.base_folder
        names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return folder, all((folder / n).is_file() for n in names)
    return files


def _idx_files(name: str):
    def files(root: Path) -> tuple[Path, bool]:
        folder, found = _find_idx_files(_tv(name), root)
        return folder, found is not None
    return files


# -- CIFAR -----------------------------------------------------------------------------


@describes(_fixed("cifar10", _CIFAR10_CLASSES, 32, 3, 50_000, 10_000, _cifar_files("CIFAR10")))
def cifar10(root: Path, download: bool = False, verify: bool = True) -> DataSource:
    """CIFAR-10: 60,000 32x32 colour images of 10 classes (50,000 train, 10,000 test).

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py/``, as torchvision lays it out.
        download: fetch the files (163 MB) when they are missing, or extract
            ``cifar-10-python.tar.gz`` when it is already in ``root``.
        verify: check the files against torchvision's MD5 checksums (about
            0.3 s); false only checks that they exist.
    """
    return _cifar(_tv("CIFAR10"), "CIFAR-10", "163 MB", root, download, verify, *_STATS["cifar10"])


@describes(_fixed("cifar100", _CIFAR100_CLASSES, 32, 3, 50_000, 10_000, _cifar_files("CIFAR100")))
def cifar100(root: Path, download: bool = False, verify: bool = True) -> DataSource:
    """CIFAR-100: 60,000 32x32 colour images of 100 classes (50,000 train, 10,000 test).

    Args:
        root: folder that holds (or will hold) ``cifar-100-python/``, as torchvision lays it out.
        download: fetch the files (161 MB) when they are missing, or extract
            ``cifar-100-python.tar.gz`` when it is already in ``root``.
        verify: check the files against torchvision's MD5 checksums; false
            only checks that they exist.
    """
    return _cifar(_tv("CIFAR100"), "CIFAR-100", "161 MB", root, download, verify, *_STATS["cifar100"])


def _cifar(cls, title, weight, root, download, verify, mean, std) -> DataSource:
    from torchvision.datasets.utils import check_integrity, extract_archive

    root = Path(root).expanduser().absolute()
    folder = root / cls.base_folder
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    expected = dict(cls.train_list + cls.test_list) | {cls.meta["filename"]: cls.meta["md5"]}

    def problems() -> tuple[list[str], list[str]]:
        missing = [f for f in files if not (folder / f).is_file()]
        corrupt = [f for f in files if f not in missing and verify and not check_integrity(folder / f, expected[f])]
        return missing, corrupt

    missing, corrupt = problems()
    if (missing or corrupt) and download:
        try:
            archive = fetch(cls.url, root / cls.filename, md5=cls.tgz_md5, title=title)
            with progress.step(f"extracting {archive.name}", unit=""):
                extract_archive(str(archive), str(root))
        except Exception as e:  # noqa: BLE001 - network and archive errors of every kind
            raise UserError(
                f"downloading {title} from {cls.url} into {root} failed ({type(e).__name__}: {e}); "
                f"without a network, put the files of {cls.filename} into {folder}/"
            ) from None
        missing, corrupt = problems()
    if missing:
        archive = root / cls.filename
        hint = (
            f'the archive {archive} is there: set "download": true to extract it (nothing is fetched)'
            if archive.is_file()
            else f'set "download": true to fetch them ({weight}), or put the files of {cls.filename} '
            f"({cls.url}) there yourself"
        )
        raise Unavailable(f"{title} files missing in {folder}/: {', '.join(missing)}; {hint}")
    if corrupt:
        raise UserError(
            f"{title} files in {folder}/ do not match torchvision's checksums: {', '.join(corrupt)} "
            f'(damaged, or another version); delete them and set "download": true, or set "verify": false to use them as they are'
        )
    # Checked once above (torchvision would check every file again for each
    # split): the loader below keeps torchvision's parsing, minus the MD5s.
    unchecked = type(
        cls.__name__,
        (cls,),
        {
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )
    try:
        train, test = unchecked(str(root), train=True), unchecked(str(root), train=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(
            f"cannot read the {title} files in {folder}/ ({type(e).__name__}: {e}); "
            'delete them and set "download": true'
        ) from None
    return DataSource(
        train=_from_hwc(train.data, train.targets),
        test=_from_hwc(test.data, test.targets),
        classes=tuple(train.classes),
        image_size=(32, 32),
        channels=3,
        mean=mean,
        std=std,
    )


def _from_hwc(data, targets) -> ImageSplit:
    # torchvision keeps CIFAR as numpy [N, H, W, C]; one contiguous NCHW copy.
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(labels=torch.as_tensor(targets, dtype=torch.int64), images=images)


# -- MNIST and its relatives ----------------------------------------------------------


@describes(_fixed("mnist", lambda: tuple(_tv("MNIST").classes), 28, 1, 60_000, 10_000, _idx_files("MNIST")))
def mnist(root: Path, download: bool = False) -> DataSource:
    """MNIST: 70,000 28x28 grayscale handwritten digits (60,000 train, 10,000 test).

    Args:
        root: folder that holds (or will hold) ``MNIST/raw/`` with the four idx
            files, gzipped or not, as torchvision lays it out.
        download: fetch the files (12 MB) when they are missing.
    """
    return _mnist_like(_tv("MNIST"), "MNIST", root, download, *_STATS["mnist"])


@describes(_fixed("fashion_mnist", lambda: tuple(_tv("FashionMNIST").classes), 28, 1, 60_000, 10_000, _idx_files("FashionMNIST")))
def fashion_mnist(root: Path, download: bool = False) -> DataSource:
    """Fashion-MNIST: 70,000 28x28 grayscale clothing images of 10 classes.

    Args:
        root: folder that holds (or will hold) ``FashionMNIST/raw/`` with the
            four idx files, gzipped or not, as torchvision lays it out.
        download: fetch the files (30 MB) when they are missing.
    """
    return _mnist_like(_tv("FashionMNIST"), "Fashion-MNIST", root, download, *_STATS["fashion_mnist"])


@describes(_fixed("kmnist", lambda: tuple(_tv("KMNIST").classes), 28, 1, 60_000, 10_000, _idx_files("KMNIST")))
def kmnist(root: Path, download: bool = False) -> DataSource:
    """Kuzushiji-MNIST: 70,000 28x28 grayscale cursive Japanese characters of 10 classes.

    Args:
        root: folder that holds (or will hold) ``KMNIST/raw/`` with the four
            idx files, gzipped or not, as torchvision lays it out.
        download: fetch the files (20 MB) when they are missing.
    """
    return _mnist_like(_tv("KMNIST"), "KMNIST", root, download, *_STATS["kmnist"])


def _mnist_like(cls, title, root, download, mean, std) -> DataSource:
    root = Path(root).expanduser().absolute()
    folder, found = _find_idx_files(cls, root)
    if found is None and download:
        try:
            _fetch_idx_files(cls, title, root / cls.__name__ / "raw")
        except Exception as e:  # noqa: BLE001 - network and archive errors of every kind
            raise UserError(
                f"downloading {title} into {root / cls.__name__ / 'raw'} failed ({type(e).__name__}: {e}); "
                f"without a network, put the four idx files there ({', '.join(n for n, _ in cls.resources)})"
            ) from None
        folder, found = _find_idx_files(cls, root)
    if found is None:
        names = [name.removesuffix(".gz") for name, _ in cls.resources]
        missing = [f"{n}.gz" for n in names if not (folder / n).is_file() and not (folder / f"{n}.gz").is_file()]
        raise Unavailable(
            f"{title} files missing in {folder}/: {', '.join(missing)} (gzipped or not); "
            f'set "download": true to fetch them, or put them there yourself (from {cls.mirrors[0]})'
        )
    with tempfile.TemporaryDirectory(prefix="cnnreg-idx-") as tmp:
        # torchvision reads the unpacked idx files from its raw folder; unpack
        # gzipped ones into a temporary folder rather than into the user's.
        raw = folder
        if any(p.suffix == ".gz" for p in found.values()):
            raw = Path(tmp)
            for name, path in found.items():
                if path.suffix != ".gz":
                    shutil.copyfile(path, raw / name)
                    continue
                try:
                    with gzip.open(path, "rb") as src, open(raw / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (EOFError, OSError, zlib.error) as e:  # cut short, or not gzip at all
                    raise UserError(f"cannot read {path}: {type(e).__name__}: {e} (the file is cut short or "
                                    'damaged); delete it and set "download": true to fetch it again') from None
        here = type(cls.__name__, (cls,), {"raw_folder": property(lambda self: str(raw))})
        try:
            train, test = here(str(root), train=True), here(str(root), train=False)
        except (AssertionError, TypeError, ValueError, RuntimeError, OSError, EOFError) as e:
            raise UserError(
                f"cannot read the {title} idx files in {folder}/ ({type(e).__name__}: {e}); "
                'delete them and set "download": true'
            ) from None
    return DataSource(
        train=ImageSplit(labels=train.targets.to(torch.int64), images=train.data.unsqueeze(1).contiguous()),
        test=ImageSplit(labels=test.targets.to(torch.int64), images=test.data.unsqueeze(1).contiguous()),
        classes=tuple(cls.classes),
        image_size=tuple(train.data.shape[-2:]),
        channels=1,
        mean=mean,
        std=std,
    )


def _fetch_idx_files(cls, title: str, raw: Path) -> None:
    """The four gzipped idx files into torchvision's raw folder, each from the first mirror that has it."""
    for filename, md5 in cls.resources:
        errors = []
        for mirror in cls.mirrors:
            try:
                fetch(f"{mirror}{filename}", raw / filename, md5=md5, title=f"{title} {filename}")
                break
            except OSError as e:
                errors.append(f"{mirror}: {e}")
        else:
            raise OSError("; ".join(errors))


def _find_idx_files(cls, root: Path) -> tuple[Path, dict[str, Path] | None]:
    """The raw folder and its four idx files (gzipped or not), or torchvision's folder and ``None``.

    torchvision's place comes first; a lowercase folder name is accepted
    too, which is what a case-insensitive file system (macOS, Windows) finds.
    """
    names = [name.removesuffix(".gz") for name, _ in cls.resources]
    candidates = [root / cls.__name__ / "raw", root / cls.__name__.lower() / "raw"]
    for folder in candidates:
        found = {n: p for n in names for p in (folder / f"{n}.gz", folder / n) if p.is_file()}  # unpacked wins
        if len(found) == len(names):
            return folder, found
    return candidates[0], None


# -- synthetic ---------------------------------------------------------------------------

_SHAPES = ("circle", "square", "triangle", "cross", "ring", "flower", "frame", "ellipse", "bar", "hollow_triangle")
_HUE_NAMES = ("red", "orange", "yellow", "chartreuse", "green", "spring", "cyan", "azure", "blue", "violet", "magenta", "rose")


def _describe_synthetic(num_classes: int = 10, image_size: int = 32, channels: int = 3, train_size: int = 2000,
                        val_size: int = 500, test_size: int = 500, seed: int = 0, **_: object) -> DatasetInfo:
    """What :func:`synthetic` makes, without drawing an image: its labels are the first
    draw of each split's generator, so validation splits and folds are carved as the run
    carves them. The statistics come from the images, so they wait for the run."""
    _check_synthetic(num_classes, image_size, channels, train_size, val_size, test_size)
    n_shapes, n_colours = _synthetic_layout(num_classes)
    labels = {name: _synthetic_labels(count, num_classes, _split_generator(seed, index))
              for index, (name, count) in enumerate(_synthetic_splits(train_size, val_size, test_size)) if count}
    return DatasetInfo(classes=_synthetic_classes(num_classes, n_shapes, n_colours), image_size=(image_size, image_size),
                       channels=channels, splits=tuple(labels), split_sizes={k: len(v) for k, v in labels.items()},
                       labels=labels)


@describes(_describe_synthetic)
def synthetic(
    # Upper bounds keep a typo (an extra zero or three) a clear error, not an out-of-memory kill.
    num_classes: Annotated[int, Field(ge=2, le=1000)] = 10,
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32,
    channels: Literal[1, 3] = 3,
    train_size: Annotated[int, Field(ge=1, le=1_000_000)] = 2000,
    val_size: Annotated[int, Field(ge=0, le=1_000_000)] = 500,
    test_size: Annotated[int, Field(ge=0, le=1_000_000)] = 500,
    seed: Annotated[int, Field(ge=0)] = 0,
) -> DataSource:
    """Coloured shapes on noisy backgrounds, drawn on the fly: learnable offline data.

    A class is a combination of a shape and a colour. Several classes share
    each colour and each shape, so neither the mean colour nor the outline
    alone tells them apart. Position, size, rotation, shade, background and
    noise vary per image; the same seed gives the same images.

    Args:
        num_classes: number of classes (shape x colour combinations; colours get closer beyond about 100).
        image_size: height and width in pixels.
        channels: 3 for RGB, 1 for grayscale (the luma of the RGB images).
        train_size: images in the train split.
        val_size: images in the validation split (0 for none).
        test_size: images in the test split (0 for none).
        seed: seed of every random draw.
    """
    _check_synthetic(num_classes, image_size, channels, train_size, val_size, test_size)
    n_shapes, n_colours = _synthetic_layout(num_classes)
    splits = {}
    for index, (name, count) in enumerate(_synthetic_splits(train_size, val_size, test_size)):
        if count:
            labels, images = _draw_shapes(count, num_classes, n_shapes, n_colours, image_size,
                                          _split_generator(seed, index))
            splits[name] = ImageSplit(labels=labels, images=convert_channels(images, channels).contiguous())
    classes = _synthetic_classes(num_classes, n_shapes, n_colours)
    mean, std = channel_stats(splits["train"])
    return DataSource(
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        classes=classes,
        image_size=(image_size, image_size),
        channels=channels,
        mean=mean,
        std=std,
    )


def _check_synthetic(num_classes: int, image_size: int, channels: int, train_size: int, val_size: int,
                     test_size: int) -> None:
    if num_classes < 2 or image_size < 8 or channels not in (1, 3) or train_size < 1 or min(val_size, test_size) < 0:
        raise ValueError("synthetic needs num_classes >= 2, image_size >= 8, channels 1 or 3, train_size >= 1, sizes >= 0")


def _synthetic_splits(train_size: int, val_size: int, test_size: int) -> tuple[tuple[str, int], ...]:
    return (("train", train_size), ("val", val_size), ("test", test_size))


def _split_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)


def _synthetic_classes(num_classes: int, n_shapes: int, n_colours: int) -> tuple[str, ...]:
    return tuple(f"{_colour_name(c // n_shapes, n_colours)} {_SHAPES[c % n_shapes]}" for c in range(num_classes))


def _synthetic_labels(count: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """Balanced and shuffled: the first draw of a split's generator."""
    return (torch.arange(count) % num_classes)[torch.randperm(count, generator=g)]


def _synthetic_layout(num_classes: int) -> tuple[int, int]:
    # About as many shapes as colours: 10 classes -> 4 shapes x 3 colours.
    n_shapes = min(len(_SHAPES), max(2, math.ceil(math.sqrt(num_classes))))
    return n_shapes, math.ceil(num_classes / n_shapes)


def _colour_name(index: int, n_colours: int) -> str:
    if n_colours > len(_HUE_NAMES):
        return f"hue{round(360 * index / n_colours)}"
    return _HUE_NAMES[round(len(_HUE_NAMES) * index / n_colours) % len(_HUE_NAMES)]


def _draw_shapes(count, num_classes, n_shapes, n_colours, size, g) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` labels (balanced, shuffled) and uint8 RGB images ``[count, 3, size, size]``."""

    def uniform(lo, hi, *shape):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    labels = _synthetic_labels(count, num_classes, g)
    shape_of, colour_of = labels % n_shapes, labels // n_shapes
    # Per-image draws, made for the whole split first so they do not depend on chunking.
    centre = uniform(-0.3, 0.3, count, 2)
    scale = uniform(0.35, 0.6, count)
    angle = uniform(0, 2 * math.pi, count)
    hue = (colour_of.float() + uniform(-0.2, 0.2, count)) / n_colours
    fg = _hsv_to_rgb(hue, uniform(0.65, 1.0, count), uniform(0.6, 1.0, count))
    bg = _hsv_to_rgb(torch.rand(count, generator=g), uniform(0, 0.35, count), uniform(0.1, 0.9, count))
    tilt = uniform(-0.25, 0.25, count, 2)  # a lighting gradient across the background
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    images = torch.empty(count, 3, size, size, dtype=torch.uint8)
    # ~1 MB of floats per intermediate: enough to amortise the Python overhead,
    # small enough that the allocator reuses memory instead of faulting in new pages.
    chunk = max(1, 2**18 // (size * size))
    for start in range(0, count, chunk):
        i = slice(start, min(count, start + chunk))
        n = i.stop - i.start
        dx, dy = x - centre[i, 0, None, None], y - centre[i, 1, None, None]
        cos, sin = angle[i].cos()[:, None, None], angle[i].sin()[:, None, None]
        s = scale[i][:, None, None]
        u, v = (dx * cos + dy * sin) / s, (dy * cos - dx * sin) / s
        inside = torch.empty(n, size, size)
        for k in range(n_shapes):
            pick = (shape_of[i] == k).nonzero().flatten()
            if len(pick):
                inside[pick] = _SHAPE_FN[_SHAPES[k]](u[pick], v[pick])
        # `inside` is a distance to the edge in shape units: scale to pixels for a 1-pixel soft edge.
        alpha = (inside * s * (size / 2) + 0.5).clamp_(0, 1).unsqueeze(1)
        light = 1 + tilt[i, 0, None, None] * x + tilt[i, 1, None, None] * y
        pixels = torch.lerp(bg[i][:, :, None, None] * light.unsqueeze(1), fg[i][:, :, None, None], alpha)
        # Grain shared by the three channels: drawing random numbers is the
        # slowest step here, and per-channel noise adds nothing to learn.
        pixels += torch.randn(n, 1, size, size, generator=g).mul_(0.06)
        images[i] = pixels.mul_(255).add_(0.5).clamp_(0, 255)  # the uint8 cast truncates: rounds
    return labels, images


def _hsv_to_rgb(h, s, v) -> torch.Tensor:
    """``[N]`` hue (turns), saturation, value -> ``[N, 3]`` RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + (h % 1)[:, None] * 6) % 6
    return v[:, None] - (v * s)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _polygon(u, v, sides: int, apothem: float = 0.8):
    """Positive inside a regular polygon: the apothem minus the largest projection on an edge normal."""
    angles = torch.arange(sides) * (2 * math.pi / sides) + math.pi / 2
    projection = u[..., None] * angles.cos() + v[..., None] * angles.sin()
    return apothem - projection.amax(-1)


def _box(u, v, half_u: float, half_v: float):
    return torch.minimum(half_u - u.abs(), half_v - v.abs())


_SHAPE_FN = {
    "circle": lambda u, v: 0.9 - torch.hypot(u, v),
    "square": lambda u, v: _box(u, v, 0.75, 0.75),
    "triangle": lambda u, v: _polygon(u, v, 3, 0.5),
    "cross": lambda u, v: torch.maximum(_box(u, v, 0.95, 0.28), _box(u, v, 0.28, 0.95)),
    "ring": lambda u, v: torch.minimum(0.95 - torch.hypot(u, v), torch.hypot(u, v) - 0.55),
    "flower": lambda u, v: 0.6 + 0.35 * torch.cos(5 * torch.atan2(v, u)) - torch.hypot(u, v),
    "frame": lambda u, v: torch.minimum(_box(u, v, 0.85, 0.85), -_box(u, v, 0.45, 0.45)),
    "ellipse": lambda u, v: 0.6 - torch.hypot(u * 0.6, v * 1.4),
    "bar": lambda u, v: _box(u, v, 0.95, 0.3),
    "hollow_triangle": lambda u, v: torch.minimum(_polygon(u, v, 3, 0.55), -_polygon(u, v, 3, 0.22)),
}


@hookimpl
def cnnreg_datasets():
    return {
        "cifar10": cifar10,
        "cifar100": cifar100,
        "mnist": mnist,
        "fashion_mnist": fashion_mnist,
        "kmnist": kmnist,
        "imagefolder": imagefolder,
        "synthetic": synthetic,
    }
