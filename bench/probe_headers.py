"""How long reading every image header of a large folder takes (what `validate` and `run` do first).

Times, on one folder of class folders: the listing; the header probe of
every file (size, colour, and the end-marker check that finds files cut
short) in worker processes; and a second plan of the same folder, which
reads the headers from the cache instead of the files.

    python bench/probe_headers.py /tmp/data/cifar10-jpg/train --copies 2   # 100,000 files

``--copies N`` first builds a folder of N hard-linked copies of every file
under ``--scratch`` (so 50,000 CIFAR-10 JPEGs become 100,000 files without
using disk); the page cache is warm for both, as it is after a listing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def linked_copies(source: Path, target: Path, copies: int) -> Path:
    if target.exists():
        shutil.rmtree(target)
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        out = target / class_dir.name
        out.mkdir(parents=True)
        for path in class_dir.iterdir():
            for k in range(copies):
                os.link(path, out / f"{k}-{path.name}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "cnnreg-probe-bench")
    args = parser.parse_args()
    from cnnreg.inputs import imagefiles
    from cnnreg_plugins._image_folder import plan_folder

    root = linked_copies(args.root, args.scratch / "folder", args.copies) if args.copies > 1 else args.root
    cache = args.scratch / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    start = time.perf_counter()
    listing = imagefiles.list_class_folders(root)
    listed = time.perf_counter() - start
    probes = []
    for _ in range(2):  # the first pays for reading the files into the page cache
        start = time.perf_counter()
        headers = imagefiles.probe_files(listing.files)
        probes.append(time.perf_counter() - start)
    probed = probes[1]
    start = time.perf_counter()
    plan_folder(root, None, 0.0, "skip", cache)  # listing, digest, probe, cache write
    first = time.perf_counter() - start
    start = time.perf_counter()
    plan_folder(root, None, 0.0, "skip", cache)  # listing, digest, headers from the cache
    second = time.perf_counter() - start
    n = len(listing.files)
    print(f"{root}: {n:,} files, {len(headers.bad)} unreadable, {imagefiles.default_workers()} cores")
    print(f"listing            {listed:7.2f} s")
    print(f"header probe       {probes[0]:7.2f} s  (first pass)")
    print(f"header probe       {probed:7.2f} s  ({probed / n * 1e6:.0f} us a file, {n / probed:,.0f} files/s, warm)")
    print(f"plan, first        {first:7.2f} s  (listing + probe + writing the header cache)")
    print(f"plan, cached       {second:7.2f} s  (listing + one stat a file)")


if __name__ == "__main__":
    main()
