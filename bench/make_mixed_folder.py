"""Make a folder of photos of mixed sizes from the CIFAR-10 JPEG tree, as a user's own folder would be.

Each image is resized (bicubic) to a random width and a random height
between ``--min`` and ``--max`` pixels, drawn independently (so sizes and
aspect ratios both vary), and saved as a JPEG of quality 90 under
``OUT/train/<class>/`` and ``OUT/val/<class>/``. Seeded: the same arguments
give the same files.

    python bench/make_mixed_folder.py /tmp/data/cifar10-jpg /tmp/data/mixed --train 200 --val 100

The source is the unpacked ../shared/data/cifar10-jpg.tar.gz (``train/`` and
``test/`` folders of class folders); validation images come from its test split.
"""

from __future__ import annotations

import argparse
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image


def _convert(job: tuple[str, str, int, int]) -> None:
    source, target, width, height = job
    with Image.open(source) as im:
        im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(target, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the CIFAR-10 JPEG tree (train/ and test/)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=200, help="training images per class")
    parser.add_argument("--val", type=int, default=100, help="validation images per class (from test/)")
    parser.add_argument("--min", type=int, default=100)
    parser.add_argument("--max", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    jobs = []
    for split, source_split, count in (("train", "train", args.train), ("val", "test", args.val)):
        for class_dir in sorted(p for p in (args.source / source_split).iterdir() if p.is_dir()):
            target = args.out / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(class_dir.iterdir())[:count]:
                width, height = rng.randint(args.min, args.max), rng.randint(args.min, args.max)
                jobs.append((str(path), str(target / path.name), width, height))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_convert, jobs, chunksize=64))
    print(f"wrote {len(jobs)} images of {args.min}-{args.max} px to {args.out}")


if __name__ == "__main__":
    main()
