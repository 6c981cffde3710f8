"""The DataLoader-worker path for folders bigger than memory, side by side with torchvision's.

Both decode the same JPEG/PNG files in the same number of worker
processes, resize each to the same size (Pillow, bilinear) and deliver
uint8 batches of the same size, shuffled:

* cnnreg: ``imagefolder`` with ``max_memory_gb`` 0 (the files stay on
  disk) and the run's own batches (``cnnreg.inputs.batches.make_batches``);
* torchvision: ``ImageFolder`` with ``Resize((h, w))`` + ``PILToTensor()``
  in a ``DataLoader`` (shuffle, the same workers and batch size).

Each loader runs ``--epochs`` epochs; the first is reported apart (worker
start-up, cold caches), the rest as the steady rate. Prints a table and
the ratio (cnnreg / torchvision; above 1 is faster).

    python bench/make_mixed_folder.py /tmp/data/cifar10-jpg /tmp/data/mixed-big --train 1000 --val 0
    python bench/large_folder.py /tmp/data/mixed-big/train --workers 2 --size 224
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def cnnreg_loader(root: Path, size: int, batch_size: int, workers: int):
    from cnnreg.inputs.batches import make_batches
    from cnnreg_plugins.datasets import imagefolder

    source = imagefolder(root=root, size=size, max_memory_gb=0, cache=False)
    assert not source.train.in_memory
    return make_batches(source.train, batch_size=batch_size, shuffle=True, device="cpu", image_size=source.image_size,
                        channels=source.channels, num_workers=workers)


def torchvision_loader(root: Path, size: int, batch_size: int, workers: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    folder = datasets.ImageFolder(str(root), transform=transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.PILToTensor()]))
    return DataLoader(folder, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def time_epochs(loader, epochs: int, set_epoch: bool) -> list[tuple[float, int]]:
    """(seconds, images) of each epoch."""
    out = []
    for epoch in range(1, epochs + 1):
        if set_epoch:
            loader.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for images, _labels in loader:
            assert images.dtype == torch.uint8
            count += len(images)
        out.append((time.perf_counter() - start, count))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a folder of class folders")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates; the workers decode
    rows = {}
    start = time.perf_counter()
    ours = cnnreg_loader(args.root, args.size, args.batch_size, args.workers)
    setup = time.perf_counter() - start
    rows["cnnreg"] = (setup, time_epochs(ours, args.epochs, set_epoch=True))
    del ours
    start = time.perf_counter()
    theirs = torchvision_loader(args.root, args.size, args.batch_size, args.workers)
    setup = time.perf_counter() - start
    rows["torchvision"] = (setup, time_epochs(theirs, args.epochs, set_epoch=False))

    print(f"{args.root}: {rows['cnnreg'][1][0][1]} images to {args.size}x{args.size}, batch {args.batch_size}, "
          f"{args.workers} workers, torch {torch.__version__}")
    print(f"{'loader':<12} {'set-up s':>9} {'epoch 1 img/s':>14} {'steady img/s':>13}")
    steady = {}
    for name, (setup, epochs) in rows.items():
        first = epochs[0][1] / epochs[0][0]
        rest = epochs[1:] or epochs
        steady[name] = sum(n for _, n in rest) / sum(s for s, _ in rest)
        print(f"{name:<12} {setup:>9.2f} {first:>14.0f} {steady[name]:>13.0f}")
    print(f"ratio cnnreg / torchvision (steady): {steady['cnnreg'] / steady['torchvision']:.2f}x")


if __name__ == "__main__":
    main()
