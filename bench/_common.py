"""Shared by the bench scripts: pointing a recipe at real data, timing on the GPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def data_overrides(recipe_data: dict[str, Any], data: Path) -> dict[str, Any]:
    """``--set`` style overrides that point a recipe's dataset at ``data``.

    A CIFAR recipe given an image folder (``train/`` and ``test/`` of class
    folders, like ../shared/data/cifar10-jpg.tar.gz unpacked) reads it through
    the imagefolder plugin; an MNIST recipe takes ``data`` as torchvision's root.
    """
    data = Path(data).resolve()
    name = recipe_data["name"]
    if name in ("cifar10", "cifar100") and (data / "train").is_dir():
        keep = {k: v for k, v in recipe_data.items() if k not in ("name", "root", "download", "verify")}
        return {"data": {"name": "imagefolder", "root": str(data), **keep}}
    return {"data.root": str(data), "data.download": False}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """Wall time of a block, synchronised with the GPU at both ends."""

    def __enter__(self) -> "Stopwatch":
        synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self.start
