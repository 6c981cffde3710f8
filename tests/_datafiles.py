"""Tiny datasets in the real file formats, for tests (no network, no ../shared).

* :func:`write_cifar` writes the pickled batches torchvision's CIFAR10 /
  CIFAR100 read (``cifar-10-batches-py/`` or ``cifar-100-python/``).
* :func:`write_mnist` writes the four idx files (gzipped or not) under
  ``root/<Name>/raw`` as torchvision's MNIST family expects.
* :func:`write_image_folder` writes class folders of PNG and JPEG files;
  :func:`write_image` one file in any Pillow mode; the ``write_*_file``
  helpers the bad cases (truncated, zero bytes, not an image).

Every writer returns the arrays it wrote, so tests compare what the loader
gives with what went in. Pixel values are drawn from ``numpy``'s seeded
generator: the same arguments give the same files.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar(
    root: Path,
    *,
    hundred: bool = False,
    train_per_class: int = 2,
    test_per_class: int = 1,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a tiny CIFAR-10 (or CIFAR-100) in torchvision's pickled layout.

    CIFAR-10: ``data_batch_1..5`` (the train samples dealt among them),
    ``test_batch`` and ``batches.meta``; CIFAR-100: ``train``, ``test`` and
    ``meta`` with fine and coarse labels. Each batch is the dict the real
    files hold: ``data`` uint8 ``[N, 3072]`` (channel-major rows) and
    ``labels`` / ``fine_labels``.

    :returns: ``{"train": (images uint8 [N, 3, 32, 32], labels), "test": ...}``.
    """
    rng = np.random.default_rng(seed)
    classes = [f"class_{i:02d}" for i in range(100)] if hundred else list(CIFAR10_CLASSES)
    n = len(classes)

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.tile(np.arange(n), per_class)
        rng.shuffle(labels)
        return rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8), labels

    train, test = draw(train_per_class), draw(test_per_class)
    folder = Path(root) / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        key = "fine_labels" if hundred else "labels"
        entry = {"batch_label": name, key: labels.tolist(), "data": images.reshape(len(images), -1), "filenames": []}
        if hundred:
            entry["coarse_labels"] = (labels // 5).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    if hundred:
        dump("train", *train)
        dump("test", *test)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": classes, "coarse_label_names": [f"super_{i}" for i in range(20)]}, f)
    else:
        parts = np.array_split(np.arange(len(train[1])), 5)
        for i, part in enumerate(parts, start=1):
            dump(f"data_batch_{i}", train[0][part], train[1][part])
        dump("test_batch", *test)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": classes, "num_cases_per_batch": len(parts[0]), "num_vis": 3072}, f)
    return {"train": train, "test": test}


def _idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: zero, zero, type 0x08 (ubyte), number of dims; big-endian sizes; the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(
    root: Path,
    *,
    name: str = "MNIST",
    train: int = 30,
    test: int = 10,
    gz: bool = True,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four idx files of a tiny MNIST-like set under ``root/<name>/raw``.

    :param name: the torchvision class name: "MNIST", "FashionMNIST", "KMNIST".
    :param gz: gzip them (``*.gz``, as distributed) or not (as torchvision unpacks them).
    :returns: ``{"train": (images uint8 [N, 28, 28], labels), "test": ...}``.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if gz:
                (raw / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / f"{prefix}-{kind}").write_bytes(data)
        out[split] = (images, labels.astype(np.int64))
    return out


def write_image(path: Path, array: np.ndarray | None = None, *, mode: str = "RGB", size: tuple[int, int] = (8, 8), seed: int = 0, **save) -> np.ndarray:
    """Write one image file (format from the extension) and return its pixels.

    :param array: uint8 ``[H, W, 3]`` or ``[H, W]`` pixels; drawn at random when omitted.
    :param mode: the Pillow mode to save in: "RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16", "1".
    :param size: ``(height, width)`` of a random image.
    :returns: the RGB (or L) pixels as written, before any lossy compression.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        rng = np.random.default_rng(seed)
        shape = size if mode in ("L", "I;16", "1", "LA") else (*size, 3)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16) * 257)  # full 16-bit range
    elif array.ndim == 2:
        image = Image.fromarray(array, mode="L")
        if mode != "L":
            image = image.convert(mode)
    else:
        image = Image.fromarray(array, mode="RGB")
        if mode != "RGB":
            image = image.convert(mode)
    image.save(path, **save)
    return array


def write_image_folder(
    root: Path,
    classes: dict[str, int] | tuple[str, ...] = ("cat", "dog"),
    *,
    per_class: int = 3,
    size: tuple[int, int] = (8, 8),
    formats: tuple[str, ...] = ("png", "jpg"),
    mode: str = "RGB",
    seed: int = 0,
) -> dict[str, list[Path]]:
    """Write ``root/<class>/<n>.<ext>`` images, cycling through ``formats``.

    :param classes: class names, or ``{name: number of images}``.
    :returns: ``{class: [paths]}`` in the order written.
    """
    counts = classes if isinstance(classes, dict) else {name: per_class for name in classes}
    written: dict[str, list[Path]] = {}
    k = 0
    for name, count in counts.items():
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(count):
            ext = formats[k % len(formats)]
            path = Path(root) / name / f"{i:03d}.{ext}"
            write_image(path, mode=mode, size=size, seed=seed * 100_003 + k)
            written[name].append(path)
            k += 1
    return written


def write_truncated_file(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    """A JPEG cut in half: Pillow reads its header but not its pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def write_zero_byte_file(path: Path) -> Path:
    """An empty file with an image extension."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"")
    return Path(path)


def write_not_an_image_file(path: Path) -> Path:
    """Text saved under an image extension."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("this is a text file, not a picture\n")
    return Path(path)
