"""The datasets plugin, on tiny files in the real formats written into tmp_path."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cnnreg.inputs import image_cache, imagefiles
from cnnreg.inputs.batches import make_batches
from cnnreg.core.errors import UserError
from cnnreg.plugin.manager import plugin_manager
from cnnreg.plugin.catalog import build_catalog
from cnnreg_plugins.datasets import cifar10, cifar100, fashion_mnist, imagefolder, kmnist, mnist, synthetic

from _datafiles import (
    CIFAR10_CLASSES,
    write_cifar,
    write_image,
    write_image_folder,
    write_mnist,
    write_not_an_image_file,
    write_truncated_file,
    write_zero_byte_file,
)


def test_every_dataset_is_registered_with_a_readable_schema():
    catalog = build_catalog(plugin_manager())
    found = catalog.keys("dataset")
    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist", "kmnist", "imagefolder", "synthetic"):
        assert name in found
        assert found[name].summary
        assert all(p.description for p in found[name].params())


# -- CIFAR ------------------------------------------------------------------------------------
#
# torchvision's CIFAR10 checks every file against the MD5 of the real
# release, which tiny test files cannot match. The plugin checks the MD5s
# itself, once, when `verify` is true (the default), then lets torchvision
# parse the files with its checksums switched off; the tests load their tiny
# files with verify=False, through torchvision's own unpickling and
# reshaping, and check separately that verify=True rejects them by name.


def test_cifar10_loads_torchvisions_pickled_batches(tmp_path):
    written = write_cifar(tmp_path, train_per_class=3, test_per_class=2)
    source = cifar10(root=tmp_path, verify=False)
    assert source.classes == CIFAR10_CLASSES
    assert source.image_size == (32, 32) and source.channels == 3
    assert source.val is None and source.test is not None
    for split, (images, labels) in ((source.train, written["train"]), (source.test, written["test"])):
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert torch.equal(split.images, torch.from_numpy(images))
        assert torch.equal(split.labels, torch.from_numpy(labels).long())
    assert source.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert len(source.std) == 3


def test_cifar100_loads_fine_labels(tmp_path):
    written = write_cifar(tmp_path, hundred=True, train_per_class=1, test_per_class=1)
    source = cifar100(root=tmp_path, verify=False)
    assert len(source.classes) == 100 and source.classes[7] == "class_07"
    assert torch.equal(source.train.labels, torch.from_numpy(written["train"][1]).long())
    assert len(source.test) == 100


def test_cifar_verify_rejects_files_that_are_not_the_release(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(UserError, match=r"checksums: data_batch_1, .*test_batch, batches.meta.*\"verify\": false"):
        cifar10(root=tmp_path)


def test_cifar_missing_files_say_which_where_and_how_to_download(tmp_path):
    with pytest.raises(UserError) as info:
        cifar10(root=tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message and "batches.meta" in message
    assert '"download": true' in message
    assert "\n" not in message  # the engine shows the first line only
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match=r"archive .*cifar-10-python.tar.gz is there"):
        cifar10(root=tmp_path / "data")


def test_cifar_damaged_pickle_is_a_user_error(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="cannot read the CIFAR-10 files"):
        cifar10(root=tmp_path, verify=False)


# -- MNIST family -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loads_idx_files_gzipped_or_not(tmp_path, gz):
    written = write_mnist(tmp_path, train=20, test=7, gz=gz)
    before = sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir())
    source = mnist(root=tmp_path)
    assert source.channels == 1 and source.image_size == (28, 28) and len(source.classes) == 10
    assert source.train.images.shape == (20, 1, 28, 28) and source.test.images.shape == (7, 1, 28, 28)
    assert torch.equal(source.train.images[:, 0], torch.from_numpy(written["train"][0]))
    assert torch.equal(source.test.labels, torch.from_numpy(written["test"][1]))
    assert source.train.labels.dtype == torch.int64
    assert source.mean == (0.1307,) and source.val is None
    # nothing is unpacked into the user's folder
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == before


def test_fashion_mnist_and_kmnist_read_their_own_folders(tmp_path):
    write_mnist(tmp_path, name="FashionMNIST", train=10, test=10)
    write_mnist(tmp_path, name="KMNIST", train=10, test=10, seed=1)
    fashion, kuzushiji = fashion_mnist(root=tmp_path), kmnist(root=tmp_path)
    assert fashion.classes[0] == "T-shirt/top" and kuzushiji.classes[0] == "o"
    assert not torch.equal(fashion.train.images, kuzushiji.train.images)
    with pytest.raises(UserError, match="MNIST files missing"):
        mnist(root=tmp_path)


def test_mnist_also_finds_a_lowercase_folder(tmp_path):
    write_mnist(tmp_path, train=10, test=10)
    (tmp_path / "MNIST").rename(tmp_path / "mnist")
    assert len(mnist(root=tmp_path).train) == 10


def test_mnist_missing_files_are_listed_with_the_folder(tmp_path):
    write_mnist(tmp_path, train=10, test=10)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "MNIST" / "raw" / name).unlink()
    with pytest.raises(UserError) as info:
        mnist(root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and '"download": true' in message
    assert "t10k-images-idx3-ubyte.gz" in message and "train-images" not in message


def test_mnist_damaged_idx_file_is_a_user_error(tmp_path):
    write_mnist(tmp_path, train=10, test=10, gz=False)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03short")
    with pytest.raises(UserError, match="cannot read the MNIST idx files"):
        mnist(root=tmp_path)


# -- imagefolder ------------------------------------------------------------------------------------


def load(root, **kwargs):
    kwargs.setdefault("cache", False)
    return imagefolder(root=root, **kwargs)


def test_imagefolder_reads_png_and_jpeg_class_folders(tmp_path):
    written = write_image_folder(tmp_path, ("zebra", "ant", "moth"), per_class=4, size=(6, 7))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_image(tmp_path / "ant" / ".hidden.png", size=(6, 7))
    (tmp_path / "ant" / "notes.txt").write_text("not an image, not counted")
    source = load(tmp_path)
    assert source.classes == ("ant", "moth", "zebra")
    assert source.image_size == (6, 7) and source.channels == 3
    assert source.train.images.shape == (12, 3, 6, 7)
    assert source.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert source.val is None and source.test is None and source.skipped == ()
    png = [p for p in written["ant"] if p.suffix == ".png"][0]
    exact = np.array(Image.open(png).convert("RGB"))  # PNG: lossless, so the same pixels
    assert torch.equal(source.train.images[sorted(written["ant"]).index(png)], torch.from_numpy(exact).permute(2, 0, 1))
    assert len(source.mean) == 3 and all(0 < s < 1 for s in source.std)


def test_imagefolder_train_val_test_layout(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 1)):
        write_image_folder(tmp_path / split, ("a", "b"), per_class=n, seed=len(split))
    source = load(tmp_path)
    assert (len(source.train), len(source.val), len(source.test)) == (8, 4, 2)
    assert source.test.labels.tolist() == [0, 1]


def test_imagefolder_splits_must_share_class_folders(tmp_path):
    write_image_folder(tmp_path / "train", ("a", "b"))
    write_image_folder(tmp_path / "val", ("a", "c"))
    with pytest.raises(UserError, match=r"val/ differ.*lacks 'b'.*has 'c'"):
        load(tmp_path)


def test_imagefolder_test_fraction_is_stratified_and_seeded(tmp_path):
    write_image_folder(tmp_path, {"a": 10, "b": 5}, size=(4, 4))
    source = load(tmp_path, test_fraction=0.4, seed=1)
    assert torch.bincount(source.test.labels).tolist() == [4, 2]
    assert torch.bincount(source.train.labels).tolist() == [6, 3]
    again = load(tmp_path, test_fraction=0.4, seed=1)
    assert torch.equal(again.test.images, source.test.images)
    other = load(tmp_path, test_fraction=0.4, seed=2)
    assert not torch.equal(other.test.images, source.test.images)


def test_imagefolder_test_fraction_needs_a_folder_without_test(tmp_path):
    write_image_folder(tmp_path / "train", ("a", "b"), per_class=4)
    assert len(load(tmp_path, test_fraction=0.5).test) == 4
    write_image_folder(tmp_path / "test", ("a", "b"), per_class=1)
    with pytest.raises(UserError, match="has a test/ folder"):
        load(tmp_path, test_fraction=0.5)


def test_imagefolder_resizes_large_jpeg_photos(tmp_path):
    write_image(tmp_path / "a" / "photo.jpg", size=(240, 320), quality=95)
    write_image(tmp_path / "b" / "photo.jpg", size=(300, 200), seed=1, quality=95)
    source = load(tmp_path, size=(12, 16))
    assert source.train.images.shape == (2, 3, 12, 16)
    # a flat-coloured photo keeps its colour through the reduced decode
    write_image(tmp_path / "c" / "flat.jpg", np.full((400, 400, 3), (200, 40, 90), np.uint8), quality=95)
    flat = load(tmp_path, size=8).train.images[2].float()
    assert flat.mean((1, 2)).tolist() == pytest.approx([200, 40, 90], abs=3)


def test_imagefolder_turns_exif_rotated_photos_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    write_image(tmp_path / "a" / "phone.jpg", size=(4, 8), exif=exif)  # stored 4 high, 8 wide
    write_image(tmp_path / "b" / "upright.png", size=(8, 4))
    source = load(tmp_path)  # no size: the two agree once the photo is turned
    assert source.image_size == (8, 4)


def test_imagefolder_skips_bad_images_and_lists_them(tmp_path):
    write_image_folder(tmp_path, ("a", "b"), per_class=3)
    bad = [
        write_truncated_file(tmp_path / "a" / "cut off.jpg"),
        write_zero_byte_file(tmp_path / "b" / "empty.png"),
        write_not_an_image_file(tmp_path / "b" / "text.jpeg"),
    ]
    with pytest.warns(UserWarning, match="skipping 3 unreadable"):
        source = load(tmp_path)
    assert len(source.train) == 6
    assert sorted(path for path, _ in source.skipped) == sorted(str(p) for p in bad)
    assert all(reason for _, reason in source.skipped)
    with pytest.raises(UserError, match=r"cannot read image .*cut off.jpg.*\"bad_images\": \"skip\""):
        load(tmp_path, bad_images="fail")


def test_imagefolder_class_whose_images_are_all_bad_is_an_error(tmp_path):
    write_image_folder(tmp_path, ("a",), per_class=2)
    write_zero_byte_file(tmp_path / "b" / "1.png")
    with pytest.raises(UserError, match="every image of class 'b'"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(tmp_path)


def test_imagefolder_empty_class_folder_errors_in_train_and_warns_in_val(tmp_path):
    write_image_folder(tmp_path / "one", ("a", "b"))
    (tmp_path / "one" / "c").mkdir()
    with pytest.raises(UserError, match="class folders without images.*'c'"):
        load(tmp_path / "one")
    write_image_folder(tmp_path / "two" / "train", ("a", "b"))
    write_image_folder(tmp_path / "two" / "val", ("a",))
    (tmp_path / "two" / "val" / "b").mkdir()
    with pytest.warns(UserWarning, match="val split .* no images of 'b'"):
        source = load(tmp_path / "two")
    assert source.val.labels.tolist() == [0, 0, 0]


def test_imagefolder_without_images_or_folders_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "1.png")
    with pytest.raises(UserError, match="no class folders"):
        load(tmp_path / "flat")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"no images found .*\.jpg"):
        load(tmp_path / "empty")
    (tmp_path / "odd" / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no train/ folder"):
        load(tmp_path / "odd")


def test_imagefolder_mixed_sizes_need_size(tmp_path):
    write_image(tmp_path / "a" / "small.png", size=(8, 8))
    write_image(tmp_path / "b" / "wide.png", size=(8, 12))
    with pytest.raises(UserError, match=r'differ in size.*set "size"'):
        load(tmp_path)
    source = load(tmp_path, size=[5, 6])
    assert source.train.images.shape == (2, 3, 5, 6) and source.image_size == (5, 6)
    assert load(tmp_path, size=4).image_size == (4, 4)


def test_imagefolder_modes_become_rgb_or_gray(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    write_image(tmp_path / "g" / "l.png", gray, mode="L")
    write_image(tmp_path / "g" / "sixteen.png", gray, mode="I;16")
    write_image(tmp_path / "g" / "la.png", gray, mode="LA")
    write_image(tmp_path / "g" / "bilevel.png", gray, mode="1")
    only_gray = load(tmp_path)
    assert only_gray.channels == 1 and only_gray.train.images.shape == (4, 1, 8, 8)
    l, sixteen = only_gray.train.images[1, 0], only_gray.train.images[3, 0]  # sorted: bilevel, l, la, sixteen
    assert torch.equal(l, torch.from_numpy(gray))
    assert torch.equal(sixteen, torch.from_numpy(gray))  # 16-bit scaled to 8, not clipped to white
    write_image(tmp_path / "c" / "rgba.png", mode="RGBA")
    write_image(tmp_path / "c" / "palette.png", mode="P")
    write_image(tmp_path / "c" / "cmyk.jpg", mode="CMYK")
    write_image(tmp_path / "c" / "with spaces.jpeg")
    mixed = load(tmp_path)
    assert mixed.channels == 3 and mixed.train.images.shape == (8, 3, 8, 8) and mixed.skipped == ()
    l_rgb = mixed.train.images[4 + 1]  # class c's four, then g's: bilevel, l, ...
    assert all(torch.equal(l_rgb[c], torch.from_numpy(gray)) for c in range(3))  # replicated, like Pillow
    assert load(tmp_path, channels=1).train.images.shape == (8, 1, 8, 8)
    assert load(tmp_path / "g" / "..", channels=3).channels == 3


def test_imagefolder_too_big_for_memory_lists_files_for_batches(tmp_path):
    write_image_folder(tmp_path / "train", ("a", "b"), per_class=3, size=(6, 6))
    write_image_folder(tmp_path / "val", ("a", "b"), per_class=1, size=(6, 6), seed=5)
    source = load(tmp_path, max_memory_gb=0)
    assert not source.train.in_memory and len(source.train.files) == 6
    assert all(isinstance(p, Path) and p.exists() for p in source.train.files)
    assert source.image_size == (6, 6) and source.channels == 3 and source.val is not None
    assert len(source.mean) == 3
    in_memory = load(tmp_path)
    batches = make_batches(source.train, batch_size=6, shuffle=False, device="cpu", image_size=source.image_size,
                           channels=source.channels, num_workers=0)
    images, labels = next(iter(batches))
    assert torch.equal(images, in_memory.train.images) and torch.equal(labels, in_memory.train.labels)


def test_imagefolder_too_big_with_mixed_sizes_needs_size(tmp_path):
    write_image(tmp_path / "a" / "1.png", size=(6, 6))
    write_image(tmp_path / "b" / "1.png", size=(7, 6))
    with pytest.raises(UserError, match='set "size"'):
        load(tmp_path, max_memory_gb=0)
    assert load(tmp_path, max_memory_gb=0, size=5).image_size == (5, 5)


# -- the decoded-image cache ----------------------------------------------------------------------


def test_cache_second_load_does_not_decode(tmp_path):
    root, cache = tmp_path / "images", tmp_path / "cache"
    written = write_image_folder(root, ("a", "b"), per_class=2, size=(5, 5))
    first = imagefolder(root=root, cache=True, cache_dir=cache)
    files = sorted((cache / "imagefolder").iterdir())
    # the decoded images, and every file's header (so a second run reads no file at all)
    assert len(files) == 2 and all(f.suffix == ".safetensors" for f in files)
    assert sum(f.name.startswith("headers-") for f in files) == 1
    # Overwrite every image with garbage of the same length and restore its
    # time stamps: decoding now would skip them all, so equal tensors prove
    # the second load came from the cache.
    for path in (p for paths in written.values() for p in paths):
        st = path.stat()
        path.write_bytes(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = imagefolder(root=root, cache=True, cache_dir=cache)
    assert torch.equal(second.train.images, first.train.images) and second.skipped == ()
    # a changed file changes the key: everything is decoded again (and the garbage skipped)
    write_image(written["a"][0], size=(5, 5), seed=98)
    write_image(written["b"][0], size=(5, 5), seed=99)
    with pytest.warns(UserWarning, match="skipping 2 unreadable"):
        third = imagefolder(root=root, cache=True, cache_dir=cache)
    assert third.train.labels.tolist() == [0, 1]


def test_cache_is_keyed_by_options_and_survives_a_damaged_file(tmp_path):
    root, cache = tmp_path / "images", tmp_path / "cache"
    write_image_folder(root, ("a", "b"), per_class=2, size=(5, 5))
    imagefolder(root=root, cache_dir=cache)
    imagefolder(root=root, cache_dir=cache, size=3)
    stored = sorted((cache / "imagefolder").iterdir())
    assert len(stored) == 3  # the headers, and the images at each size
    assert not [p for p in stored if p.name.startswith(".tmp")]  # no temp files left behind
    for path in stored:
        path.write_bytes(path.read_bytes()[:100])  # truncated: unusable
    with pytest.warns(UserWarning) as said:
        again = imagefolder(root=root, cache_dir=cache)
    assert again.train.images.shape == (4, 3, 5, 5)
    messages = [str(w.message) for w in said]
    assert any(re.search(r"the image cache .*headers-.*safetensors is damaged .*reading every header again", m)
               for m in messages), messages
    assert any(re.search(r"the image cache .*safetensors is damaged .*decoding the images again and rewriting it", m)
               for m in messages), messages
    assert imagefiles_cache_is_whole(cache)  # rewritten: a third load warns about nothing


def imagefiles_cache_is_whole(cache: Path) -> bool:
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        imagefolder(root=cache.parent / "images", cache_dir=cache)
    return True


def test_cache_remembers_skipped_files(tmp_path):
    root, cache = tmp_path / "images", tmp_path / "cache"
    write_image_folder(root, ("a", "b"), per_class=2)
    write_zero_byte_file(root / "a" / "zero.png")
    with pytest.warns(UserWarning):
        first = imagefolder(root=root, cache_dir=cache)
    with pytest.warns(UserWarning):
        second = imagefolder(root=root, cache_dir=cache)
    assert second.skipped == first.skipped and len(second.skipped) == 1
    with pytest.raises(UserError, match="zero.png"):  # "fail" does not accept a cache with skipped files
        imagefolder(root=root, cache_dir=cache, bad_images="fail")


def test_cache_dir_defaults_to_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image_cache.default_cache_dir() == tmp_path / "xdg" / "cnnreg"
    write_image_folder(tmp_path / "images", ("a", "b"), per_class=1)
    imagefolder(root=tmp_path / "images")
    assert len(list((tmp_path / "xdg" / "cnnreg" / "imagefolder").iterdir())) == 2  # headers and images


def test_parallel_decoding_equals_decoding_in_process(tmp_path):
    written = write_image_folder(tmp_path, ("a", "b", "c"), per_class=6, size=(5, 4))
    write_zero_byte_file(tmp_path / "b" / "zz.png")
    listing = imagefiles.list_class_folders(tmp_path)
    serial = imagefiles.decode_all(listing.files, size=None, channels=None, workers=1)
    parallel = imagefiles.decode_all(listing.files, size=None, channels=None, workers=2, chunk_size=4)
    assert torch.equal(serial.images, parallel.images) and torch.equal(serial.kept, parallel.kept)
    assert serial.skipped == parallel.skipped and len(serial.skipped) == 1
    assert len(serial.images) == sum(len(v) for v in written.values())


# -- synthetic ----------------------------------------------------------------------------------------


def test_synthetic_shapes_splits_and_determinism():
    source = synthetic(num_classes=5, image_size=12, train_size=50, val_size=20, test_size=10, seed=3)
    assert source.train.images.shape == (50, 3, 12, 12) and source.train.images.dtype == torch.uint8
    assert (len(source.val), len(source.test)) == (20, 10)
    assert len(source.classes) == len(set(source.classes)) == 5
    assert torch.bincount(source.train.labels).tolist() == [10] * 5
    assert source.image_size == (12, 12) and source.channels == 3 and len(source.mean) == 3
    again = synthetic(num_classes=5, image_size=12, train_size=50, val_size=20, test_size=10, seed=3)
    assert torch.equal(again.train.images, source.train.images) and torch.equal(again.test.labels, source.test.labels)
    other = synthetic(num_classes=5, image_size=12, train_size=50, val_size=20, test_size=10, seed=4)
    assert not torch.equal(other.train.images, source.train.images)
    assert not torch.equal(source.val.images[:10], source.test.images)


@pytest.mark.parametrize("sizes", [dict(train_size=50, val_size=20, test_size=10), dict(train_size=7, val_size=0, test_size=3),
                                   dict(train_size=9, val_size=4, test_size=0)])
def test_synthetic_is_described_as_it_is_drawn_without_drawing_it(sizes):
    """validate describes the data: the splits, sizes, labels and classes the run will draw."""
    params = dict(num_classes=6, image_size=10, channels=1, seed=11, **sizes)
    source = synthetic(**params)
    info = synthetic.cnnreg_describe(**params)
    drawn = {name: split for name, split in (("train", source.train), ("val", source.val), ("test", source.test)) if split}
    assert info.splits == tuple(drawn) and info.split_sizes == {k: len(v) for k, v in drawn.items()}
    for name, split in drawn.items():
        assert torch.equal(info.labels[name], split.labels)
    assert (info.classes, info.image_size, info.channels) == (source.classes, source.image_size, source.channels)
    assert info.mean is None  # the statistics come from the images: the run computes them
    with pytest.raises(ValueError, match="synthetic needs num_classes >= 2"):
        synthetic.cnnreg_describe(num_classes=1)


def test_synthetic_extremes():
    tiny = synthetic(num_classes=2, image_size=8, channels=1, train_size=4, val_size=0, test_size=0)
    assert tiny.train.images.shape == (4, 1, 8, 8) and tiny.val is None and tiny.test is None
    many = synthetic(num_classes=150, image_size=9, train_size=300, val_size=0, test_size=0)
    assert len(set(many.classes)) == 150 and set(many.train.labels.tolist()) == set(range(150))
    with pytest.raises(ValueError):
        synthetic(num_classes=1)


def test_synthetic_is_learnable_but_not_from_mean_colour():
    """A small CNN learns it in a few epochs; the mean colour of an image does not tell its class."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine
    try:
        source = synthetic(num_classes=6, image_size=16, train_size=1200, val_size=300, test_size=0, seed=0)
        colour = source.train.images.float().mean((2, 3))
        centroids = torch.stack([colour[source.train.labels == c].mean(0) for c in range(6)])
        val_colour = source.val.images.float().mean((2, 3))
        by_colour = (torch.cdist(val_colour, centroids).argmin(1) == source.val.labels).float().mean().item()

        torch.manual_seed(0)
        mean, std = torch.tensor(source.mean).view(1, 3, 1, 1), torch.tensor(source.std).view(1, 3, 1, 1)
        x, y = (source.train.images / 255 - mean) / std, source.train.labels
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
            nn.Flatten(), nn.Linear(32, 6),
        )
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(4):
            for index in torch.randperm(len(x)).split(32):
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            by_cnn = (model((source.val.images / 255 - mean) / std).argmax(1) == source.val.labels).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    chance = 1 / 6
    assert by_colour < 0.4
    assert by_cnn > 0.45 and by_cnn > by_colour + 0.15, (by_cnn, by_colour, chance)


# -- downloads, from a real HTTP server on localhost --------------------------------------------


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over HTTP on localhost; yields (folder, base URL)."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar_download_fetches_the_archive_with_progress_and_extracts_it(tmp_path, http_folder, monkeypatch, capsys):
    import tarfile

    from cnnreg.core import progress
    from torchvision import datasets as tvd

    served, url = http_folder
    written = write_cifar(tmp_path / "source", train_per_class=2, test_per_class=1)
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(tvd.CIFAR10, "url", url + archive.name)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", _md5(archive))
    monkeypatch.setattr(progress, "PLAIN_AFTER", 0.0)
    with progress.reporting("plain"):
        source = cifar10(root=tmp_path / "data", download=True, verify=False)
    assert torch.equal(source.train.labels, torch.as_tensor(written["train"][1]))
    err = capsys.readouterr().err
    assert re.search(r"downloading CIFAR-10: [\d.]+ kB, done in \d+\.\ds, [\d.]+ (kB|MB)/s", err), err
    assert "downloaded CIFAR-10: " in err and not list((tmp_path / "data").glob("*.part"))


def test_a_damaged_download_is_refused_and_leaves_nothing_behind(tmp_path, http_folder, monkeypatch):
    from torchvision import datasets as tvd

    served, url = http_folder
    (served / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    monkeypatch.setattr(tvd.CIFAR10, "url", url + "cifar-10-python.tar.gz")
    with pytest.raises(UserError, match=r"downloading CIFAR-10 from .* failed .*MD5.*without a network, put the files"):
        cifar10(root=tmp_path / "data", download=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_mnist_download_tries_the_next_mirror(tmp_path, http_folder, monkeypatch):
    from torchvision import datasets as tvd

    served, url = http_folder
    written = write_mnist(tmp_path / "source", train=20, test=10)
    (served / "second").mkdir()
    for path in (tmp_path / "source" / "MNIST" / "raw").iterdir():
        (served / "second" / path.name).write_bytes(path.read_bytes())
    resources = [(name, _md5(served / "second" / name)) for name, _ in tvd.MNIST.resources]
    monkeypatch.setattr(tvd.MNIST, "mirrors", [url + "first/", url + "second/"])  # the first answers 404
    monkeypatch.setattr(tvd.MNIST, "resources", resources)
    source = mnist(root=tmp_path / "data", download=True)
    assert torch.equal(source.test.labels, torch.as_tensor(written["test"][1]))
