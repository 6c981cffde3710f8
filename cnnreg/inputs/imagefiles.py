"""Finding, decoding and caching the images of a folder of class folders.

The image-folder dataset and the DataLoader path of :mod:`cnnreg.inputs.batches`
share these pieces:

* :func:`list_class_folders` lists ``class_name/**/image`` files the way
  torchvision's ``ImageFolder`` does (sorted class names, torchvision's
  ``IMG_EXTENSIONS``, case-insensitive), except that hidden folders and files
  (``.ipynb_checkpoints``, ``._photo.jpg`` from macOS) are left out.
* :func:`probe_files` reads every file's header (size, colour) in worker
  processes, and finds the files that would fail to decode (cut short,
  empty, not images) without decoding the sound ones.
* :func:`decode_image` turns one file into a uint8 ``[H, W, C]`` array with
  Pillow, whatever its mode (palette, alpha, CMYK, 16-bit, bilevel); a file
  Pillow cannot read raises :class:`BadImage` with the reason.
* :func:`decode_all` decodes many files in worker processes into one
  preallocated uint8 ``[N, C, H, W]`` tensor, skipping or failing on bad files.
The on-disk cache of decoded images and headers is :mod:`cnnreg.inputs.image_cache`.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from cnnreg.core import progress
from cnnreg.core.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS, written out: importing torchvision costs a
# second (its models import torch._dynamo), which `cnnreg validate` need not pay
# (tests/test_own_folders.py checks the two stay equal).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BadImagePolicy = Literal["skip", "fail"]
Fit = Literal["stretch", "crop"]

#: Bump when the cached layout or the decoding changes, so old caches miss.
CACHE_FORMAT = 2

# Modes that carry no colour: decoded to one channel ("L") when the dataset's
# channels are chosen automatically.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class BadImage(Exception):
    """A file with an image extension that cannot be decoded."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# -- listing ---------------------------------------------------------------------


@dataclass(frozen=True)
class FolderListing:
    """The images of one folder of class folders.

    :param folder: the folder that holds the class folders.
    :param classes: class folder names, sorted (index order).
    :param files: the path of every image file (strings: a CIFAR-sized
        folder lists ten times faster without a ``Path`` per file), class by
        class, each class's files sorted.
    :param labels: int64 ``[N]``, the class index of each file.
    :param empty_classes: class folders without a single image file.
    :param run_dirs: folders inside that hold a cnnreg run (``run.json`` and
        ``recipe.json``): a run's plots would be read as images of a class.
    :param loose: image files directly in ``folder``, in no class folder (left out).
    """

    folder: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: torch.Tensor
    empty_classes: tuple[str, ...]
    run_dirs: tuple[str, ...] = ()
    loose: tuple[str, ...] = ()


def is_image_file(name: str) -> bool:
    """Whether ``name`` ends in one of torchvision's image extensions (any case)."""
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def list_class_folders(folder: Path) -> FolderListing:
    """List the image files of ``folder/<class>/**``.

    :raises UserError: when ``folder`` holds no class folder at all.
    """
    folder = Path(folder)
    with os.scandir(folder) as entries:
        here = [(e.name, e.is_dir()) for e in entries if not e.name.startswith(".")]
    classes = sorted(name for name, is_dir in here if is_dir)
    loose = sorted(name for name, is_dir in here if not is_dir and is_image_file(name))
    if not classes:
        raise UserError(
            f"{folder} has no class folders: an image folder holds one folder per class "
            f"(e.g. {folder}/cat/1.jpg, {folder}/dog/2.jpg)"
        )
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    run_dirs: list[str] = []
    with progress.step(f"listing {folder}", total=len(classes), unit="class folders") as advance:
        for index, name in enumerate(classes):
            found = _walk_images(os.path.join(folder, name), run_dirs)
            if not found:
                empty.append(name)
            files.extend(found)
            labels.extend([index] * len(found))
            advance(1)
    return FolderListing(
        folder=folder,
        classes=tuple(classes),
        files=tuple(files),
        labels=torch.tensor(labels, dtype=torch.int64),
        empty_classes=tuple(empty),
        run_dirs=tuple(sorted(run_dirs)),
        loose=tuple(loose),
    )


_RUN_FILES = {"run.json", "recipe.json"}  # what every cnnreg run directory holds


def _walk_images(folder: str, run_dirs: list[str]) -> list[str]:
    """Image files under ``folder``, sorted; links are followed, like
    torchvision's make_dataset. Folders that hold a cnnreg run join ``run_dirs``."""
    found: list[str] = []
    pending = [folder]
    while pending:
        here = pending.pop()
        names = set()
        with os.scandir(here) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(entry.path)
                elif is_image_file(entry.name):
                    found.append(entry.path)
                else:
                    names.add(entry.name)
        if _RUN_FILES <= names:
            run_dirs.append(here)
    found.sort()
    return found


# -- decoding one file -------------------------------------------------------------


def image_header(path: Path | str) -> tuple[tuple[int, int], bool]:
    """``((height, width), is_gray)`` read from the file's header only (cheap).

    :raises BadImage: when Pillow does not recognise the file, or when it
        would fail to decode: a JPEG or PNG whose end marker is missing
        (cut short) is decoded to be sure, as is every other format.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            if _exif_rotated(im):
                width, height = height, width
            gray = _is_gray(im)
            if not _ends_whole(im):
                im.load()  # raises for a file cut short
            return (height, width), gray
    except Exception as e:  # noqa: BLE001 - any failure of a third-party file is "bad image"
        raise BadImage(path, _reason(e)) from None


# The last bytes of a whole file: JPEG's end-of-image marker (which the
# entropy-coded data cannot contain: a 0xFF there is followed by 0x00 or a
# restart marker), PNG's IEND chunk. A file without it is decoded to see.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL = 4096  # bytes searched: some writers pad after the marker


def _ends_whole(im: Image.Image) -> bool:
    marker = _END_MARKERS.get(im.format or "")
    if marker is None or im.fp is None:
        return False
    im.fp.seek(0, os.SEEK_END)
    size = im.fp.tell()
    im.fp.seek(max(0, size - _TAIL))
    found = marker in im.fp.read(_TAIL)
    im.fp.seek(0)
    return found


@dataclass(frozen=True)
class Headers:
    """What the headers of a list of files say, in the list's order.

    :param sizes: int64 ``[N, 2]``, each file's (height, width), upright; -1 for a bad file.
    :param gray: bool ``[N]``, whether the file has no colour.
    :param bad: ``(index, path, reason)`` of each file that cannot be decoded.
    """

    sizes: torch.Tensor
    gray: torch.Tensor
    bad: tuple[tuple[int, str, str], ...]

    @property
    def good(self) -> torch.Tensor:
        """bool ``[N]``: the files that decode."""
        return self.sizes[:, 0] >= 0


def probe_files(files: Sequence[str | Path], *, workers: int | None = None, chunk_size: int = 512,
                description: str = "reading image headers") -> Headers:
    """Read the header of every file, in worker processes, with progress.

    About 40 us a file on one core (CIFAR-sized JPEGs): 100,000 files take
    seconds, so every file is read rather than a sample, and a size that
    differs or a file cut short is found before anything is decoded.
    """
    files = tuple(str(f) for f in files)
    jobs = [files[i : i + chunk_size] for i in range(0, len(files), chunk_size)]
    sizes = torch.full((len(files), 2), -1, dtype=torch.int64)
    gray = torch.zeros(len(files), dtype=torch.bool)
    bad: list[tuple[int, str, str]] = []
    index = 0
    with progress.step(description, total=len(files)) as advance:
        for job, results in zip(jobs, _map(_probe_chunk, jobs, workers)):
            for path, result in zip(job, results):
                if isinstance(result, str):
                    bad.append((index, path, result))
                else:
                    (sizes[index, 0], sizes[index, 1]), gray[index] = result
                index += 1
            advance(len(job))
    return Headers(sizes, gray, tuple(bad))


def _probe_chunk(paths: tuple[str, ...]) -> list[tuple[tuple[int, int], bool] | str]:
    results: list[tuple[tuple[int, int], bool] | str] = []
    for path in paths:
        try:
            results.append(image_header(path))
        except BadImage as bad:
            results.append(bad.reason)
    return results


def decode_image(
    path: Path | str,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    fit: Fit = "stretch",
) -> np.ndarray:
    """Decode one image file to uint8 ``[H, W, C]``.

    :param size: ``(height, width)`` to resize to (bilinear, antialiased), or
        ``None`` to keep the file's own size.
    :param channels: 1 (ITU-R 601-2 luma, like Pillow's "L"), 3 (RGB), or
        ``None``: 1 for images without colour, else 3.
    :param fit: "stretch" resizes to ``size`` exactly (torchvision's
        ``Resize((h, w))``); "crop" keeps the aspect ratio, resizing to cover
        ``size`` and cutting the centre (``Resize(short side)`` then
        ``CenterCrop``, as pretrained models' evaluation transforms do).
    :raises BadImage: unreadable, truncated, empty or not an image at all.
    """
    try:
        with Image.open(path) as im:
            # Photos from phones store their rotation in EXIF: show them upright,
            # as every image viewer does.
            orientation = _exif_orientation(im)
            if size is not None and im.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still
                # covers the target size: a 12-megapixel photo bound for 224x224
                # decodes several times faster.
                want = (size[0], size[1]) if orientation in (5, 6, 7, 8) else (size[1], size[0])
                im.draft(im.mode, want)
            im.load()  # decode now, so truncated files fail here
            if orientation in _UPRIGHT:  # (exif_transpose copies even an upright image)
                im = im.transpose(_UPRIGHT[orientation])
            im = _to_mode(im, channels)
            array = np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only ones
    except Exception as e:  # noqa: BLE001 - see image_header
        raise BadImage(path, _reason(e)) from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.size == 0:
        raise BadImage(path, "the image has no pixels")
    if size is not None and array.shape[:2] != tuple(size):
        array = _resize(array, size, fit)
    return array


def _resize(array: np.ndarray, size: tuple[int, int], fit: Fit) -> np.ndarray:
    """uint8 ``[H, W, C]`` at ``(height, width)``, by :func:`fit_image`.

    torch's uint8 antialiased bilinear kernel follows Pillow's bilinear
    resampling to within one level, faster: on CIFAR-10 JPEGs resized to
    100-400 px and bound for 224x224, one core, decoding and resizing took
    550 us a file this way against 935 us with Pillow's resize (most of it).
    """
    return fit_image(torch.from_numpy(array).permute(2, 0, 1), size, fit).permute(1, 2, 0).contiguous().numpy()


def fit_image(image: torch.Tensor, size: tuple[int, int], fit: Fit) -> torch.Tensor:
    """A uint8 ``[C, H, W]`` image at ``(height, width)``: stretched (torchvision's
    ``Resize((h, w))``), or covered and its centre cut (``Resize(shorter side)``
    then ``CenterCrop``), bilinear and antialiased."""
    from torchvision.transforms.v2 import functional as TF

    if fit == "crop":
        scale = max(size[0] / image.shape[-2], size[1] / image.shape[-1])
        # int(), as torchvision sizes the longer side; max() keeps float rounding from falling short
        cover = [max(size[0], int(image.shape[-2] * scale)), max(size[1], int(image.shape[-1] * scale))]
        return TF.center_crop(TF.resize(image, cover, antialias=True), list(size))
    return TF.resize(image, list(size), antialias=True)


def _is_gray(im: Image.Image) -> bool:
    if im.mode in _GRAY_MODES:
        return True
    if im.mode in ("P", "PA"):
        header = im.palette  # as read from the header: getpalette() would decode the pixels first
        if header is not None and header.mode == "RGB" and getattr(header, "rawmode", None) in (None, "RGB") \
                and isinstance(header.palette, (bytes, bytearray)):
            palette = list(header.palette)
        else:
            palette = im.getpalette() or []
        rgb = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
        return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())
    return False


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 upright), read from the header only.

    Pillow's ``getexif()`` decodes a whole PNG to look for an eXIf chunk
    after the pixels; here a PNG's orientation is the one in its header (as
    good as always where there is one), so probing and decoding agree.
    """
    try:
        if im.format == "PNG":
            data = im.info.get("exif")
            if not data:
                return 1
            exif = Image.Exif()
            exif.load(data)
            return int(exif.get(0x0112, 1))
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - broken EXIF: use the image as stored
        return 1


# Pillow's exif_transpose, by orientation.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _exif_rotated(im: Image.Image) -> bool:
    # EXIF orientations 5-8 swap width and height.
    return _exif_orientation(im) in (5, 6, 7, 8)


def _to_mode(im: Image.Image, channels: int | None) -> Image.Image:
    """Convert to "L" or "RGB"; 16- and 32-bit grayscale is scaled, not clipped."""
    if channels is None:
        channels = 1 if _is_gray(im) else 3
    if im.mode.startswith("I"):
        # Pillow's I;16 -> L clips at 255 (so 16-bit scans come out white);
        # scale 0..65535 to 0..255 instead. Mode "I" holding 8-bit values stays.
        values = np.asarray(im).astype(np.int64)
        if values.max(initial=0) > 255:
            values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        im = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids Pillow's warning on palette transparency
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    if "cannot identify image file" in text:
        return "not an image file Pillow can read (or an empty file)"
    return f"{type(error).__name__}: {text}"


# -- decoding many files -------------------------------------------------------------


@dataclass(frozen=True)
class DecodedImages:
    """The images of a list of files, decoded.

    :param images: uint8 ``[K, C, H, W]``, the files that could be read, in order.
    :param kept: int64 ``[K]``, the index of each decoded image in the file list.
    :param skipped: ``(path, reason)`` of each file left out.
    """

    images: torch.Tensor
    kept: torch.Tensor
    skipped: tuple[tuple[str, str], ...]


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def decode_all(
    files: Sequence[str | Path],
    *,
    size: tuple[int, int] | None,
    channels: int | None,
    bad_images: BadImagePolicy = "skip",
    workers: int | None = None,
    chunk_size: int = 256,
    fit: Fit = "stretch",
    description: str = "decoding images",
) -> DecodedImages:
    """Decode ``files`` into one uint8 ``[K, C, H, W]`` tensor, in parallel, with progress.

    Chunks of files are decoded in worker processes (the per-image Python
    work around Pillow holds the GIL: on CIFAR-sized JPEGs threads were
    slower than one thread, processes scaled: 50,000 in 1.4 s on 16 cores)
    and copied, in order, into one tensor allocated at the first image.

    :param size: ``(height, width)`` to resize to; ``None`` requires every
        image to have the same size.
    :param channels: 1, 3, or ``None``: 1 when every image is grayscale, else 3
        (grayscale images are then replicated to RGB, as Pillow does).
    :param bad_images: ``"skip"`` leaves unreadable files out (see
        :attr:`DecodedImages.skipped`); ``"fail"`` raises at the first one.
    :param workers: processes; ``None`` uses every core. Small lists are
        decoded in this process.
    :param fit: how an image of another size meets ``size`` (see :func:`decode_image`).
    :raises UserError: a bad file with ``"fail"``, sizes that differ with
        ``size=None``, or no readable image at all.
    """
    files = tuple(str(f) for f in files)
    out = _Assembler(len(files), bad_images=bad_images)
    jobs = [(files[i : i + chunk_size], size, channels, fit) for i in range(0, len(files), chunk_size)]
    with progress.step(description, total=len(files)) as advance:
        for job, results in zip(jobs, _map(_decode_chunk, jobs, workers)):
            out.add(job[0], results)
            advance(len(job[0]))
    return out.finish()


def _map(function, jobs: list, workers: int | None) -> Iterator:
    """``function`` over ``jobs`` in worker processes, results in order.

    One job, or one worker, runs in this process. fork starts workers in
    milliseconds and does not re-import the caller's __main__; the workers
    run Pillow, numpy and torch's CPU ops on one thread each (no CUDA).
    Python >= 3.12 warns about fork() in a process with threads (torch's
    pools): the children never touch their locks.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(jobs) <= 1:
        yield from map(function, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with warnings.catch_warnings(), ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                                        initializer=_one_thread) as pool:
        warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning)
        try:
            yield from pool.map(function, jobs)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _one_thread() -> None:
    # A worker's share of the cores is itself: torch's own threads (the
    # resize of a JPEG) would only fight the other workers for them.
    torch.set_num_threads(1)


def _decode_chunk(job: tuple[tuple[str, ...], tuple[int, int] | None, int | None, Fit]) -> list[np.ndarray | str]:
    """Decode one chunk (in a worker): an array per file, or the reason it failed."""
    paths, size, channels, fit = job
    results: list[np.ndarray | str] = []
    for path in paths:
        try:
            results.append(decode_image(path, size=size, channels=channels, fit=fit))
        except BadImage as bad:
            results.append(bad.reason)
    return results


class _Assembler:
    """Writes decoded arrays into a tensor allocated at the first good image."""

    def __init__(self, capacity: int, *, bad_images: BadImagePolicy):
        self.capacity = capacity
        self.bad_images = bad_images
        self.images: torch.Tensor | None = None
        self.first: str = ""
        self.kept: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        self.seen = 0

    def add(self, paths: Sequence[str], results: Sequence[np.ndarray | str]) -> None:
        for path, result in zip(paths, results):
            index = self.seen
            self.seen += 1
            if isinstance(result, str):
                if self.bad_images == "fail":
                    raise UserError(
                        f"cannot read image {path}: {result}; remove or replace the file, "
                        'or set "bad_images": "skip" to leave such files out'
                    )
                self.skipped.append((path, result))
                continue
            self._put(path, torch.from_numpy(result).permute(2, 0, 1))
            self.kept.append(index)

    def _put(self, path: str, image: torch.Tensor) -> None:
        c, h, w = image.shape
        if self.images is None:
            self.images = torch.empty((self.capacity, c, h, w), dtype=torch.uint8)
            self.first = path
        k, have_c, have_h, have_w = len(self.kept), *self.images.shape[1:]
        if (h, w) != (have_h, have_w):
            raise UserError(
                f"images differ in size: {self.first} is {have_h}x{have_w} (height x width) but "
                f'{path} is {h}x{w}; set "size" (e.g. {have_h} or [{have_h}, {have_w}]) to resize every image to one size'
            )
        if c > have_c:  # first colour image after grayscale ones: widen what we have
            wider = torch.empty((self.capacity, c, h, w), dtype=torch.uint8)
            wider[:k] = self.images[:k].expand(-1, c, -1, -1)
            self.images = wider
        self.images[k].copy_(image)  # broadcasts a grayscale image to RGB

    def finish(self) -> DecodedImages:
        if self.images is None:
            raise UserError(
                f"none of the {self.seen} image files could be read (first: "
                f"{self.skipped[0][0] if self.skipped else '-'}: {self.skipped[0][1] if self.skipped else '-'})"
            )
        k = len(self.kept)
        images = self.images[:k] if k == self.capacity else self.images[:k].clone()
        return DecodedImages(images=images, kept=torch.tensor(self.kept, dtype=torch.int64), skipped=tuple(self.skipped))
