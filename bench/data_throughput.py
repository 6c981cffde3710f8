"""How fast cnnreg's data path produces augmented CIFAR-10 batches on the device.

    python bench/data_throughput.py --data /tmp/cifar10-jpg

An epoch of random flip + random crop (32, padding 4) + normalize, from the
GPU-resident uint8 training split, per-sample random draws; reported as
images per second after a warm-up epoch, for two batch sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import Stopwatch  # noqa: E402
from cnnreg.inputs.batches import make_batches  # noqa: E402
from cnnreg_plugins.datasets import imagefolder  # noqa: E402
from cnnreg_plugins.transforms import normalize, random_crop, random_horizontal_flip  # noqa: E402
from cnnreg.core.data import DataContext  # noqa: E402


def measure(data: Path, batch_sizes=(128, 512), epochs: int = 3) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with Stopwatch() as load:
        source = imagefolder(data)
    context = DataContext(image_size=source.image_size, channels=source.channels, num_classes=source.num_classes,
                          mean=source.mean, std=source.std)
    transforms = [random_horizontal_flip(), random_crop(32, padding=4), normalize(context=context)]
    rows = []
    for batch_size in batch_sizes:
        batches = make_batches(source.train, batch_size=batch_size, shuffle=True, drop_last=False, device=device,
                               seed=0, image_size=source.image_size, channels=source.channels)
        checksum = torch.zeros((), device=device)
        for epoch in range(epochs + 1):  # epoch 0 warms up (allocations, caches)
            batches.set_epoch(epoch)
            with Stopwatch() as clock:
                for images, labels in batches:
                    x = images.float().div_(255)
                    for t in transforms:
                        x = t(x)
                    checksum += x[0, 0, 0, 0]  # keep the work observable, without a sync
            if epoch == 0:
                continue
            rows.append({"batch_size": batch_size, "epoch": epoch, "images": batches.num_samples,
                         "seconds": clock.seconds, "images_per_second": batches.num_samples / clock.seconds})
    best = {b: max(r["images_per_second"] for r in rows if r["batch_size"] == b) for b in batch_sizes}
    print(f"data load (decode or cache): {load.seconds:.1f}s, device {device}")
    for b, ips in best.items():
        print(f"flip + crop(pad 4) + normalize, batch {b}: {ips:,.0f} images/s (best of {epochs} epochs)")
    return [{"load_seconds": load.seconds, "device": str(device)}, *rows]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 as an image folder (train/, test/)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.data, epochs=args.epochs)))
