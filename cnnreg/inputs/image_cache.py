"""The on-disk cache of an image folder: decoded images, and every file's header.

:func:`decode_cached` decodes a listing's files through a cache keyed by
the files' content (relative paths, sizes, modification times) and the
decode options; :func:`probe_listing` keeps the headers beside it, keyed by
the files alone. Both are written atomically as safetensors (never pickle),
and a cache that cannot be written costs time, never the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from cnnreg.core import progress
from cnnreg.core.errors import UserError
from cnnreg.inputs.imagefiles import (CACHE_FORMAT, BadImagePolicy, DecodedImages, Fit, FolderListing, Headers,
                                      decode_all, probe_files)

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cnnreg``, else ``~/.cache/cnnreg``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnnreg"


def files_digest(listing: FolderListing) -> str:
    """A digest of a listing's files: their paths relative to the folder, sizes
    and modification times, and the class names.

    An edited, added, removed or renamed file gives another digest; the
    folder's own location is not part of it, so a moved copy still hits.
    Costs one ``stat`` a file (about 2.5 us).
    """
    digest = hashlib.sha256(json.dumps({"classes": listing.classes}).encode())
    prefix = len(str(listing.folder)) + 1
    for path in listing.files:
        st = os.stat(path)
        digest.update(f"\n{path[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def cache_key(listing: FolderListing, *, size, channels, fit: Fit = "stretch", files: str | None = None) -> str:
    """A digest of what the decoded tensor depends on: the files (see
    :func:`files_digest`, or give it as ``files``) and the decode options."""
    header = {"format": CACHE_FORMAT, "size": size, "channels": channels, "fit": fit,
              "files": files or files_digest(listing)}
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def save_cached(path: Path, decoded: DecodedImages, folder: Path) -> None:
    """Write ``decoded`` to ``path`` atomically (see :func:`save_atomically`)."""
    skipped = [[Path(p).relative_to(folder).as_posix(), reason] for p, reason in decoded.skipped]
    save_atomically(path, {"images": decoded.images.contiguous(), "kept": decoded.kept},
                    {"skipped": json.dumps(skipped), "format": str(CACHE_FORMAT)})


def save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: temp file, fsync, rename.

    A reader never sees a half-written file: it sees the old one, or none,
    or the whole new one.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors import SafetensorError

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # a full disk, say: an OSError to the callers, like every other write
            raise OSError(f"{e}") from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def probe_listing(listing: FolderListing, *, cache_dir: Path | None, files: str | None = None) -> Headers:
    """:func:`probe_files` of a listing, through the cache when ``cache_dir`` is set.

    The headers are kept beside the decoded images, keyed by the files
    alone (:func:`files_digest`): a second run reads no file of an unchanged folder.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "imagefolder" / f"headers-{files or files_digest(listing)}.safetensors"
        cached = _load_headers(path, listing)
        if cached is not None:
            return cached
    headers = probe_files(listing.files, description=f"reading the image headers of {listing.folder.name}")
    if path is not None:
        bad = [[i, Path(p).relative_to(listing.folder).as_posix(), reason] for i, p, reason in headers.bad]
        try:
            save_atomically(path, {"sizes": headers.sizes, "gray": headers.gray},
                            {"bad": json.dumps(bad), "format": str(CACHE_FORMAT)})
        except OSError as e:  # a read-only or full disk costs time, not the run
            warnings.warn(f"could not write the image cache {path}: {e}", stacklevel=2)
    return headers


def _load_headers(path: Path, listing: FolderListing) -> Headers | None:
    def parse(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Headers:
        sizes, gray = tensors["sizes"], tensors["gray"]
        bad = tuple((int(i), str(listing.folder / p), str(reason)) for i, p, reason in json.loads(metadata["bad"]))
        if sizes.shape != (len(listing.files), 2) or gray.shape != (len(listing.files),):
            raise ValueError(f"it holds {len(sizes)} headers for {len(listing.files)} files")
        return Headers(sizes.to(torch.int64), gray.to(torch.bool), bad)

    return _load(path, parse, "reading every header again")


def _load(path: Path, parse: Callable[[dict[str, torch.Tensor], dict[str, str]], T], instead: str) -> T | None:
    """What ``parse(tensors, metadata)`` makes of the safetensors file at ``path``; ``None``
    when it is absent, or damaged (then rebuilt, and the run says so)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return parse(load_file(str(path)), metadata)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        _damaged(path, exc, instead)
        return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def load_cached(path: Path, folder: Path) -> DecodedImages | None:
    """The decoded images stored at ``path``, or ``None`` if absent or unusable."""

    def parse(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> DecodedImages:
        images, kept = tensors["images"], tensors["kept"]
        skipped = tuple((str(folder / p), reason) for p, reason in json.loads(metadata["skipped"]))
        if images.dtype != torch.uint8 or images.ndim != 4 or kept.shape != (len(images),):
            raise ValueError(f"it holds {images.dtype} images of shape {tuple(images.shape)}")
        return DecodedImages(images=images, kept=kept.to(torch.int64), skipped=skipped)

    return _load(path, parse, "decoding the images again")


def decode_cached(
    listing: FolderListing,
    *,
    size: tuple[int, int] | None,
    channels: int | None,
    bad_images: BadImagePolicy = "skip",
    cache_dir: Path | None,
    workers: int | None = None,
    fit: Fit = "stretch",
    known_bad: Sequence[tuple[int, str, str]] = (),
    files: str | None = None,
) -> tuple[DecodedImages, bool]:
    """Decode the listing's files, through the cache when ``cache_dir`` is set.

    :param known_bad: ``(index, path, reason)`` of files already known not to
        decode (from :func:`probe_files`): they are not tried again.
    :param files: the listing's :func:`files_digest`, when already computed.
    :returns: the decoded images and whether they came from the cache.
    """
    path = None
    if cache_dir is not None:
        key = cache_key(listing, size=size, channels=channels, fit=fit, files=files)
        path = Path(cache_dir) / "imagefolder" / f"{key}.safetensors"
        cached = load_cached(path, listing.folder)
        if cached is not None and (bad_images == "skip" or not cached.skipped):
            progress.note(f"image cache: read {len(cached.images):,} images of {listing.folder} "
                             f"({progress.size_text(path.stat().st_size)}) from {path}")
            return cached, True
    decoded = _decode_known_good(listing, size, channels, bad_images, workers, fit, known_bad)
    if path is not None:
        try:
            with progress.step(f"writing the image cache of {listing.folder.name}", unit=""):
                save_cached(path, decoded, listing.folder)
            progress.note(f"image cache: wrote {len(decoded.images):,} images of {listing.folder} "
                             f"({progress.size_text(path.stat().st_size)}) to {path}; "
                             "the next run with the same files and options reads them from there")
        except OSError as e:  # a read-only or full disk costs speed, not the run
            warnings.warn(f"could not write the image cache {path}: {e}", stacklevel=2)
    return decoded, False


def _decode_known_good(listing, size, channels, bad_images, workers, fit, known_bad) -> DecodedImages:
    """Decode the files not already known to be bad; the known ones join ``skipped`` in order."""
    bad = {index: (path, reason) for index, path, reason in known_bad}
    if bad and bad_images == "fail":
        path, reason = bad[min(bad)]
        raise UserError(f"cannot read image {path}: {reason}; remove or replace the file, "
                        'or set "bad_images": "skip" to leave such files out')
    good = [i for i in range(len(listing.files)) if i not in bad]
    if not good:
        path, reason = bad[min(bad)]
        raise UserError(f"none of the {len(bad)} image files under {listing.folder} can be read "
                        f"(first: {path}: {reason})")
    decoded = decode_all([listing.files[i] for i in good], size=size, channels=channels, bad_images=bad_images,
                         workers=workers, fit=fit, description=f"decoding the images of {listing.folder.name}")
    if not bad:
        return decoded
    kept = torch.tensor(good, dtype=torch.int64)[decoded.kept] if len(decoded.kept) else decoded.kept
    skipped = sorted([*((listing.files.index(p), p, r) for p, r in decoded.skipped),
                      *((i, p, r) for i, (p, r) in bad.items())])
    return DecodedImages(images=decoded.images, kept=kept, skipped=tuple((p, r) for _, p, r in skipped))


def _damaged(path: Path, exc: BaseException, instead: str) -> None:
    """A cache file that cannot be read is rebuilt (and overwritten), and the run says so."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    warnings.warn(f"the image cache {path} is damaged ({reason}); {instead} and rewriting it", stacklevel=3)
