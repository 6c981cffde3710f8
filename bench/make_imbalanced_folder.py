"""Make a class-imbalanced copy of an image-folder dataset, for the class-imbalance checks.

The first half of the classes (in sorted order) keep every training image;
each class of the second half keeps ``1 / --ratio`` of them, drawn at random
(seeded). ``test/`` is kept whole, so its accuracy is also the balanced
accuracy (the mean of the per-class recalls) when the source's test split
has equally many images per class, as CIFAR-10's has. Files are symbolic
links to the source, so the copy costs no disk.

    python bench/make_imbalanced_folder.py /tmp/cifar10-jpg/cifar10-jpg /tmp/cifar10-imb --ratio 10
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path


def make(source: Path, dest: Path, ratio: int, seed: int = 0) -> dict[str, int]:
    """Write the links; returns the training images kept per class."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    rare = set(classes[len(classes) // 2:])
    kept: dict[str, int] = {}
    for split in ("train", "test"):
        for name in classes:
            files = sorted(p.name for p in (source / split / name).iterdir())
            if split == "train" and name in rare:
                files = sorted(rng.sample(files, max(1, len(files) // ratio)))
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for file in files:
                link = folder / file
                if not link.exists():
                    os.symlink((source / split / name / file).resolve(), link)
            if split == "train":
                kept[name] = len(files)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a folder with train/ and test/ folders of class folders")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--ratio", type=int, default=10, help="how many times fewer images the rare classes keep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make(args.source, args.dest, args.ratio, args.seed))


if __name__ == "__main__":
    main()
