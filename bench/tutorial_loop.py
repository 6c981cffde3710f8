"""The tutorial's own training loop against cnnreg, on the same data and GPU.

    python bench/tutorial_loop.py --data /tmp/cifar10-jpg --epochs 3

(a) tutorial: a torchvision-style dataset over uint8 arrays -> PIL -> flip,
    crop(32, padding 4), ToTensor, Normalize; DataLoader(batch 128, 4 workers,
    pin_memory); fp32; Adam(1e-3, weight decay 1e-4); ReduceLROnPlateau.
(b) cnnreg: recipes/cifar10-tutorial-cnn.json with the same model and
    hyperparameters through build/fit (bf16, channels_last, fused Adam,
    batched GPU augmentation), validation and checkpoint included.
(c) hand-written: a plain loop on cnnreg's data path (GPU-resident batches,
    the same batched transforms, bf16, channels_last, fused Adam), so the
    difference between (b) and (c) is the framework's own overhead.
Every variant trains the same epochs from the same initial weights and is
then evaluated on the test split. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import cnnreg  # noqa: E402
from _common import Stopwatch, data_overrides  # noqa: E402
from cnnreg.inputs.batches import make_batches  # noqa: E402
from cnnreg.core.data import DataContext  # noqa: E402
from cnnreg_plugins.datasets import imagefolder  # noqa: E402
from cnnreg_plugins.transforms import normalize, random_crop, random_horizontal_flip  # noqa: E402
from cnnreg_plugins.tutorial_models import tutorial_cnn  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
RECIPE = Path(__file__).parent.parent / "recipes" / "cifar10-tutorial-cnn.json"


class ArrayDataset(torch.utils.data.Dataset):
    """The tutorial's dataset: uint8 HWC arrays, a PIL image per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def tutorial(source, epochs: int, device) -> dict:
    import torchvision.transforms as T

    train_tf = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4), T.ToTensor(), T.Normalize(MEAN, STD)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    hwc = lambda split: split.images.permute(0, 2, 3, 1).contiguous().numpy()  # noqa: E731
    train = torch.utils.data.DataLoader(ArrayDataset(hwc(source.train), source.train.labels.numpy(), train_tf),
                                        batch_size=128, shuffle=True, num_workers=4, pin_memory=True)
    test = torch.utils.data.DataLoader(ArrayDataset(hwc(source.test), source.test.labels.numpy(), test_tf),
                                       batch_size=256, num_workers=4, pin_memory=True)
    torch.manual_seed(0)
    model = tutorial_cnn(num_classes=10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
    criterion = nn.CrossEntropyLoss()
    epoch_seconds = []
    for _ in range(epochs):
        with Stopwatch() as clock:
            model.train()
            for x, y in train:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
            accuracy, test_loss = _evaluate(model, test, device)
            scheduler.step(test_loss)
        epoch_seconds.append(clock.seconds)
    return {"variant": "(a) tutorial loop", "epoch_seconds": epoch_seconds, "test_accuracy": accuracy,
            "images": len(train.dataset)}


def _evaluate(model, loader, device):
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
    return correct / total, loss_sum / total


def with_cnnreg(data: Path, epochs: int, output_dir: Path) -> dict:
    raw = json.loads(RECIPE.read_text())
    overrides = {**data_overrides(raw["data"], data), "trainer.epochs": epochs, "output_dir": str(output_dir),
                 "trainer.progress": "off"}
    recipe = cnnreg.load_recipe(RECIPE, overrides=overrides)
    run = cnnreg.build(recipe)
    result = cnnreg.fit(run)
    accuracy = cnnreg.evaluate(run, "test").metrics["accuracy"]
    return {"variant": "(b) cnnreg", "epoch_seconds": [r.seconds for r in result.records], "test_accuracy": accuracy,
            "images": run.batches["train"].num_samples, "compile_seconds": result.compile_seconds}


def hand_written(source, epochs: int, device) -> dict:
    context = DataContext(image_size=(32, 32), channels=3, num_classes=10, mean=MEAN, std=STD)
    flip, crop, norm = random_horizontal_flip(), random_crop(32, padding=4), normalize(context=context)
    batches = make_batches(source.train, batch_size=128, shuffle=True, drop_last=False, device=device, seed=0,
                           image_size=(32, 32), channels=3)
    test = make_batches(source.test, batch_size=256, shuffle=False, drop_last=False, device=device, seed=0,
                        image_size=(32, 32), channels=3)
    torch.manual_seed(0)
    model = tutorial_cnn(num_classes=10).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
    epoch_seconds = []
    for epoch in range(1, epochs + 1):
        with Stopwatch() as clock:
            model.train()
            batches.set_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for images, y in batches:
                x = norm(crop(flip(images.float().div_(255)))).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(x)
                    loss = nn.functional.cross_entropy(logits, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
            model.eval()
            test_correct = torch.zeros((), device=device, dtype=torch.long)
            test_loss = torch.zeros((), device=device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                for images, y in test:
                    logits = model(norm(images.float().div_(255)).contiguous(memory_format=torch.channels_last))
                    test_loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
                    test_correct += (logits.argmax(1) == y).sum()
            scheduler.step(test_loss.item() / len(source.test))
        epoch_seconds.append(clock.seconds)
    return {"variant": "(c) hand-written, cnnreg data path", "epoch_seconds": epoch_seconds,
            "test_accuracy": test_correct.item() / len(source.test), "images": batches.num_samples}


def table(rows: list[dict]) -> str:
    reference = rows[0]
    steady = lambda r: float(np.median(r["epoch_seconds"][1:] or r["epoch_seconds"]))  # noqa: E731
    lines = [f"{'variant':38s} {'images/s':>10s} {'s/epoch':>8s} {'first epoch':>11s} {'test acc':>9s} {'speed-up':>9s}"]
    for r in rows:
        ips = r["images"] / steady(r)
        lines.append(f"{r['variant']:38s} {ips:10,.0f} {steady(r):8.2f} {r['epoch_seconds'][0]:11.2f} "
                     f"{r['test_accuracy']:9.4f} {steady(reference) / steady(r):8.2f}x")
    b = next((r for r in rows if r["variant"].startswith("(b)")), None)
    c = next((r for r in rows if r["variant"].startswith("(c)")), None)
    if b and c:
        lines.append(f"framework overhead, (b) vs (c) steady-state epoch: {100 * (steady(b) / steady(c) - 1):+.1f}% "
                     "(b also evaluates a validation split and writes checkpoints)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 as an image folder (train/, test/)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tutorial-epochs", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path("runs-bench"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    source = imagefolder(args.data)
    rows = [tutorial(source, args.tutorial_epochs, device), with_cnnreg(args.data, args.epochs, args.output_dir),
            hand_written(source, args.epochs, device)]
    print(table(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
