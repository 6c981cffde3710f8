"""The ``imagefolder`` dataset: a user's own folder of class folders.

Loading and describing share one plan (:func:`plan_folder`): the listing,
every file's header, and every check that needs no decoding (class folders,
empty and single classes, unreadable files, sizes, colour). ``cnnreg
validate`` describes the folder with it and ``cnnreg run`` loads it with
it, so both give the same verdict on the same folder.

Annotations are evaluated at import (no ``from __future__ import
annotations``) so the registry reads the signature as it is.
"""

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from cnnreg.inputs import image_cache, imagefiles
from cnnreg.core.data import DatasetInfo, DataSource, ImageSplit, describes
from cnnreg.core.errors import Unavailable, UserError
from cnnreg.inputs.splits import channel_stats, convert_channels, stratified_split

Pixels = Annotated[int, Field(ge=1)]
SPLITS = ("train", "val", "test")
SHOWN_BAD = 3  # unreadable files named in a warning


@dataclass(frozen=True)
class FolderPlan:
    """What a folder of class folders holds, from its listing and every file's header.

    :param root: the folder.
    :param listings: the listing of each split present.
    :param headers: the headers of each split's files.
    :param digests: each split's :func:`~cnnreg.inputs.image_cache.files_digest`, when caching.
    :param channels: 1 when every readable image is grayscale, else 3 (or the recipe's).
    :param common_size: ``(H, W)`` when every readable image has it, else ``None``.
    :param median_size: the median height and width of the readable images.
    :param warnings: what a run says about the folder before training.
    """

    root: Path
    listings: dict[str, imagefiles.FolderListing]
    headers: dict[str, imagefiles.Headers]
    digests: dict[str, str]
    channels: int
    common_size: tuple[int, int] | None
    median_size: tuple[int, int]
    warnings: tuple[str, ...]

    def readable(self, split: str) -> int:
        return int(self.headers[split].good.sum())

    @property
    def bad(self) -> list[tuple[str, str]]:
        return [(path, reason) for name in self.headers for _, path, reason in self.headers[name].bad]


def plan_folder(root: Path, channels: int | None, test_fraction: float, bad_images: str,
                cache_dir: Path | None) -> FolderPlan:
    """List ``root``, read every header, and check everything that needs no decoding.

    :param cache_dir: where headers (and decoded images) are cached; ``None`` for no cache.
    :raises Unavailable: ``root`` does not exist.
    :raises UserError: anything that would stop the run: no class folders,
        splits with other class folders, an empty class folder in train, a
        run directory inside, no readable image of a class, an unreadable
        file with ``bad_images`` "fail".
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise Unavailable(f"image folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"image folder {root} is not a folder; give the folder that holds the class folders")
    listings = _list_splits(root)
    train = listings["train"]
    if test_fraction > 0 and "test" in listings:
        raise UserError(f"{root} has a test/ folder: test_fraction holds out a test split only where there is none")
    if sum(len(listing.files) for listing in listings.values()) == 0:
        raise UserError(f"no images found under {root}: expected class folders holding files ending in "
                        f"{', '.join(imagefiles.IMG_EXTENSIONS)} (any case)")
    run_dirs = [d for listing in listings.values() for d in listing.run_dirs]
    if run_dirs:
        raise UserError(f"{root} holds cnnreg run directories ({_names(run_dirs, 2)}): their plots and files would "
                        "be read as images of a class; move them out of the data folder, and write runs "
                        "elsewhere (output_dir, or --output-dir)")
    if train.empty_classes:
        raise UserError(f"class folders without images in {train.folder}: {_names(train.empty_classes)}; each class "
                        "folder becomes a model output, so remove the empty ones (or add images)")
    notes = [f"the {name} split of {root} has no images of {_names(listing.empty_classes)}"
             for name, listing in listings.items() if name != "train" and listing.empty_classes]
    notes += [f"{len(listing.loose)} image file{'s' if len(listing.loose) != 1 else ''} directly in "
              f"{listing.folder} ({_names(listing.loose, 3)}) belong to no class folder and are left out; "
              "move each into the folder of its class"
              for listing in listings.values() if listing.loose]

    digests = {name: image_cache.files_digest(listing) for name, listing in listings.items()} if cache_dir else {}
    headers = {name: image_cache.probe_listing(listing, cache_dir=cache_dir, files=digests.get(name))
               for name, listing in listings.items()}
    bad = [b for name in listings for b in headers[name].bad]
    if bad and bad_images == "fail":
        _, path, reason = bad[0]
        raise UserError(f"cannot read image {path}: {reason}; remove or replace the file, "
                        'or set "bad_images": "skip" to leave such files out')
    readable = torch.bincount(train.labels[headers["train"].good], minlength=len(train.classes))
    lost = (readable == 0).nonzero().flatten().tolist()
    if lost:
        raise UserError(f"every image of class {_names([train.classes[i] for i in lost])} in {train.folder} is "
                        f"unreadable (first: {_first_bad(headers['train'], train, lost[0])}); fix or remove them")
    if bad:
        shown = "; ".join(f"{path} ({reason})" for _, path, reason in bad[:SHOWN_BAD])
        more = f"; and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
        notes.insert(0, f"skipping {len(bad)} unreadable image file{'s' if len(bad) != 1 else ''} "
                        f"under {root}: {shown}{more}")

    sizes = torch.cat([h.sizes[h.good] for h in headers.values()])
    gray = torch.cat([h.gray[h.good] for h in headers.values()])
    distinct = torch.unique(sizes, dim=0)
    common = tuple(distinct[0].tolist()) if len(distinct) == 1 else None
    median = tuple(int(v) for v in sizes.median(dim=0).values.tolist())
    found_channels = channels or (1 if bool(gray.all()) else 3)
    return FolderPlan(root, listings, headers, digests, found_channels, common, median, tuple(notes))


def _first_bad(headers: imagefiles.Headers, listing: imagefiles.FolderListing, label: int) -> str:
    return next(f"{path}: {reason}" for i, path, reason in headers.bad if int(listing.labels[i]) == label)


def _cache_dir(cache: bool, cache_dir: Path | None) -> Path | None:
    if not cache:
        return None
    return Path(cache_dir).expanduser() if cache_dir is not None else image_cache.default_cache_dir()


def describe_imagefolder(root: Path, size=None, channels=None, test_fraction: float = 0.0, seed: int = 0,
                         bad_images: str = "skip", cache: bool = True, cache_dir: Path | None = None,
                         **_: object) -> DatasetInfo:
    """The folder's classes, sizes and split sizes from its plan; nothing is decoded."""
    plan = plan_folder(root, channels, test_fraction, bad_images, _cache_dir(cache, cache_dir))
    pair = _pair(size)
    labels = {name: listing.labels[plan.headers[name].good] for name, listing in plan.listings.items()
              if plan.readable(name)}
    if "test" not in labels and test_fraction > 0:  # as the loaded folder is split
        kept, held = stratified_split(labels["train"], max(1, round(len(labels["train"]) * test_fraction)), seed)
        labels.update(train=labels["train"][kept], test=labels["train"][held])
    return DatasetInfo(classes=plan.listings["train"].classes,
                       image_size=pair or plan.common_size or plan.median_size,
                       channels=plan.channels, splits=tuple(labels),
                       mixed_sizes=pair is None and plan.common_size is None,
                       split_sizes={name: len(split) for name, split in labels.items()}, labels=labels,
                       warnings=plan.warnings, scanned=(("root", plan.root),))


@describes(describe_imagefolder)
def imagefolder(
    root: Path,
    size: Pixels | tuple[Pixels, Pixels] | None = None,
    fit: Literal["stretch", "crop"] = "stretch",
    channels: Literal[1, 3] | None = None,
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    seed: Annotated[int, Field(ge=0)] = 0,
    bad_images: Literal["skip", "fail"] = "skip",
    max_memory_gb: Annotated[float, Field(ge=0)] = 4.0,
    cache: bool = True,
    cache_dir: Path | None = None,
) -> DataSource:
    """Images in class folders: ``root/<class>/*.jpg``, or ``root/train/<class>/...`` with optional val/ and test/.

    Class names are the folder names, sorted (as torchvision's ImageFolder
    does); hidden folders and files are left out. A folder without train/
    is one split, from which ``test_fraction`` is held out (stratified).
    An empty class folder in train is an error (the model would get an
    output for a class it never sees); in val/ or test/ it is a warning.
    Every file's header is read first (about 40 us a file), so sizes,
    colour and unreadable files are known before anything is decoded.

    Args:
        root: the folder of class folders, or of train/, val/ and test/ folders of class folders.
        size: store every image at this [height, width] (or square size). Left
            out, images of one size keep it; images of different sizes are
            stored at the size the model's preprocessing resizes to (a
            pretrained backbone's), else at their median size with the longer
            side at most 256 (rounded to a multiple of 8), fitted by "crop";
            the run header and run.json say which.
        fit: how an image meets size: "stretch" resizes to it exactly
            (torchvision's Resize((h, w))); "crop" keeps the aspect ratio,
            resizing the shorter side and cutting the centre (a pretrained
            model's evaluation resize and centre crop).
        channels: 1 (grayscale) or 3 (RGB); default 1 when every image is grayscale, else 3.
        test_fraction: hold out this stratified fraction of train as a test split, when there is no test/ folder.
        seed: seed of the test split's draw.
        bad_images: "skip" leaves unreadable files out (listed, with the reason, in the run's skipped files); "fail" stops at the first.
        max_memory_gb: decode the whole folder into memory (and onto the GPU) when
            its images take at most this many GiB as uint8; bigger folders are
            decoded by DataLoader workers during training.
        cache: keep the decoded images on disk, so the next run skips decoding.
        cache_dir: where the cache goes; default $XDG_CACHE_HOME/cnnreg or ~/.cache/cnnreg.
    """
    directory = _cache_dir(cache, cache_dir)
    plan = plan_folder(root, channels, test_fraction, bad_images, directory)
    size = _pair(size)
    if size is None and plan.common_size is None:
        (h, w) = plan.median_size
        raise UserError(f"the images under {plan.root} differ in size (their median is {h}x{w}, height x width); "
                        f'set "size" (e.g. {h} or [{h}, {w}]) to store every image at one size')
    stored = size or plan.common_size
    for text in plan.warnings:
        warnings.warn(text, stacklevel=2)
    total = sum(plan.readable(name) for name in plan.listings)
    if total * plan.channels * stored[0] * stored[1] <= max_memory_gb * 2**30:
        source = _decode_in_memory(plan, size, fit, channels, bad_images, directory)
    else:
        source = _file_source(plan, stored, fit)
    if source.test is None and test_fraction > 0:
        kept, held = stratified_split(source.train.labels, max(1, round(len(source.train) * test_fraction)), seed)
        source = replace(source, train=source.train.select(kept), test=source.train.select(held))
    mean, std = channel_stats(source.train, channels=source.channels, size=source.image_size, seed=seed,
                              fit=source.fit)
    return replace(source, mean=mean, std=std)


def _pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"size must be a positive int or [height, width], not {size!r}")
    return pair


def _names(names, limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(str(n)) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _list_splits(root: Path) -> dict[str, imagefiles.FolderListing]:
    here = {p.name for p in root.iterdir() if p.is_dir()}
    if "train" not in here:
        if here & {"val", "test"}:
            raise UserError(f"{root} has {' and '.join(sorted(here & {'val', 'test'}))}/ but no train/ folder")
        return {"train": imagefiles.list_class_folders(root)}
    listings = {name: imagefiles.list_class_folders(root / name) for name in SPLITS if name in here}
    classes = listings["train"].classes
    for name, listing in listings.items():
        if listing.classes != classes:
            missing = sorted(set(classes) - set(listing.classes))
            extra = sorted(set(listing.classes) - set(classes))
            parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has {_names(extra)} which train/ lacks"] if extra else [])
            raise UserError(
                f"the class folders of {root}/{name}/ differ from those of train/: it {' and '.join(parts)}; "
                "every split needs the same class folders (an empty folder is fine for a class with no images there)"
            )
    return listings


def _decode_in_memory(plan: FolderPlan, size, fit, channels, bad_images, cache_dir) -> DataSource:
    splits: dict[str, ImageSplit] = {}
    skipped: list[tuple[str, str]] = []
    for name, listing in plan.listings.items():
        if not listing.files:
            continue
        decoded, _ = image_cache.decode_cached(listing, size=size, channels=channels, bad_images=bad_images,
                                              cache_dir=cache_dir, fit=fit, known_bad=plan.headers[name].bad,
                                              files=plan.digests.get(name))
        skipped.extend(decoded.skipped)
        splits[name] = ImageSplit(labels=listing.labels[decoded.kept], images=decoded.images)
    train = plan.listings["train"]
    if "train" not in splits:
        raise UserError(f"{train.folder} holds no images, only its other splits do")
    out_channels = max(split.images.shape[1] for split in splits.values())
    splits = {name: _widen(split, out_channels) for name, split in splits.items()}
    lost = (torch.bincount(splits["train"].labels, minlength=len(train.classes)) == 0).nonzero().flatten().tolist()
    if lost:  # files whose header read well but whose pixels did not
        raise UserError(f"every image of class {_names([train.classes[i] for i in lost])} in {train.folder} is "
                        "unreadable (see the skipped files); fix or remove them")
    known = {path for path, _ in plan.bad}
    late = [(path, reason) for path, reason in skipped if path not in known]
    if late:
        warnings.warn(f"skipped {len(late)} more unreadable image file(s) under {plan.root} whose headers read well "
                      f"(first: {late[0][0]}: {late[0][1]})", stacklevel=3)
    return DataSource(
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        classes=train.classes,
        image_size=tuple(splits["train"].images.shape[-2:]),
        channels=out_channels,
        skipped=tuple(skipped),
        fit=fit,
    )


def _widen(split: ImageSplit, channels: int) -> ImageSplit:
    # train all grayscale but a colour image in test: every split becomes RGB.
    if split.images is None or split.images.shape[1] == channels:
        return split
    return ImageSplit(labels=split.labels, images=convert_channels(split.images, channels).contiguous())


def _file_source(plan: FolderPlan, size: tuple[int, int], fit: str) -> DataSource:
    """Splits of the readable files, for DataLoader workers to decode at ``size`` while training."""
    splits = {}
    for name, listing in plan.listings.items():
        good = plan.headers[name].good.nonzero().flatten()
        if len(good):
            splits[name] = ImageSplit(labels=listing.labels[good],
                                      files=tuple(Path(listing.files[i]) for i in good.tolist()))
    return DataSource(
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        classes=plan.listings["train"].classes,
        image_size=size,
        channels=plan.channels,
        skipped=tuple(plan.bad),
        fit=fit,
    )
