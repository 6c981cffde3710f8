"""cnnreg.inputs.batches: one iterator over in-memory and file splits, seeded, sharded."""

from __future__ import annotations

import inspect
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import cnnreg.inputs.batches as batches_module
from cnnreg.inputs.batches import check_labels, make_batches, samples_per_rank, train_batches
from cnnreg.inputs.imagefiles import BadImage, decode_image
from cnnreg.core.data import ImageSplit
from cnnreg.core.errors import UserError

from _datafiles import write_image, write_not_an_image_file


def numbered_split(n: int, classes: int = 3, channels: int = 3, size: int = 4) -> ImageSplit:
    """Image i holds the value i (mod 256) in every pixel, so batches reveal their indices."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, channels, size, size).contiguous()
    return ImageSplit(labels=torch.arange(n) % classes, images=images)


def epoch_indices(batches) -> list[int]:
    return [int(v) for images, _ in batches for v in images[:, 0, 0, 0]]


def test_batches_are_uint8_on_the_device_with_int64_labels():
    split = numbered_split(10)
    batches = make_batches(split, batch_size=4, shuffle=True, device="cpu", seed=0)
    assert len(batches) == 3 and batches.num_samples == 10 and batches.batch_size == 4
    assert batches.split is split  # the split they come from, for the engine
    shapes = []
    for images, labels in batches:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.device.type == "cpu" and labels.device.type == "cpu"
        assert torch.equal(labels, images[:, 0, 0, 0].long() % 3)  # labels stay with their images
        shapes.append(tuple(images.shape))
    assert shapes == [(4, 3, 4, 4), (4, 3, 4, 4), (2, 3, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_labels_of_any_integer_type_come_as_int64(dtype):
    split = ImageSplit(labels=torch.tensor([2, 0, 1], dtype=dtype), images=torch.zeros(3, 1, 2, 3, dtype=torch.uint8))
    for shuffle in (False, True):
        (_, labels), = list(make_batches(split, batch_size=3, shuffle=shuffle, device="cpu"))
        assert labels.dtype == torch.int64 and sorted(labels.tolist()) == [0, 1, 2]


def test_a_split_of_one_image_is_one_batch():
    for shuffle in (False, True):
        (images, labels), = list(make_batches(numbered_split(1), batch_size=4, shuffle=shuffle, device="cpu"))
        assert images.shape == (1, 3, 4, 4) and labels.tolist() == [0]


def test_an_epoch_larger_than_one_gather_is_whole_and_resumes_across_gathers():
    # ~8 MiB are gathered at once: 3 x 64 x 64 images in batches of 64 make 10 batches a gather, so
    # 23 batches take three; labels are the sample indices, image i holds i % 256
    n = 64 * 22 + 5
    split = ImageSplit(labels=torch.arange(n),
                       images=(torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 64, 64))
    batches = make_batches(split, batch_size=64, shuffle=True, device="cpu", seed=0)
    batches.set_epoch(1)
    got = list(batches)
    assert [len(labels) for _, labels in got] == [64] * 22 + [5]
    order = [i for _, labels in got for i in labels.tolist()]
    assert sorted(order) == list(range(n))
    assert all(torch.equal(images[:, 0, 0, 0], (labels % 256).to(torch.uint8)) for images, labels in got)
    for start in (9, 10, 11, 21):  # before, at and after the gathers' edges
        batches.set_epoch(1, start_batch=start)
        assert [i for _, labels in batches for i in labels.tolist()] == order[start * 64:]


def test_an_epoch_visits_every_sample_once_in_a_seeded_order_per_epoch():
    split = numbered_split(50)
    batches = make_batches(split, batch_size=8, shuffle=True, device="cpu", seed=1)
    batches.set_epoch(1)
    first = epoch_indices(batches)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    batches.set_epoch(2)
    second = epoch_indices(batches)
    assert sorted(second) == list(range(50)) and second != first
    # a new loader (a resumed run) sees the same order for the same (seed, epoch)
    resumed = make_batches(split, batch_size=8, shuffle=True, device="cpu", seed=1)
    resumed.set_epoch(2)
    assert epoch_indices(resumed) == second
    other_seed = make_batches(split, batch_size=8, shuffle=True, device="cpu", seed=2)
    other_seed.set_epoch(2)
    assert epoch_indices(other_seed) != second


def test_every_epoch_of_a_long_run_has_an_order_of_its_own():
    batches = make_batches(numbered_split(20), batch_size=20, shuffle=True, device="cpu", seed=0)
    orders = set()
    for epoch in range(1, 201):
        batches.set_epoch(epoch)
        orders.add(tuple(epoch_indices(batches)))
    assert len(orders) == 200  # no epoch repeats another's order


def test_the_default_seed_is_zero():
    split = numbered_split(30)
    default = make_batches(split, batch_size=4, shuffle=True, device="cpu")
    zero = make_batches(split, batch_size=4, shuffle=True, device="cpu", seed=0)
    for batches in (default, zero):
        batches.set_epoch(1)
    assert epoch_indices(default) == epoch_indices(zero)


def test_resuming_mid_epoch_yields_the_rest_of_that_epoch():
    split = numbered_split(30)
    batches = make_batches(split, batch_size=4, shuffle=True, device="cpu", seed=0)
    batches.set_epoch(3)
    whole = epoch_indices(batches)
    batches.set_epoch(3, start_batch=5)
    assert epoch_indices(batches) == whole[20:]
    batches.set_epoch(3, start_batch=8)  # interrupted after the last batch: nothing is left
    assert epoch_indices(batches) == []
    for bad in (9, -1):
        with pytest.raises(ValueError, match=rf"start_batch must be in \[0, 8\], not {bad}"):
            batches.set_epoch(3, start_batch=bad)


def test_without_shuffle_batches_follow_the_split_and_are_views():
    split = numbered_split(10)
    batches = make_batches(split, batch_size=3, shuffle=False, device="cpu")
    assert epoch_indices(batches) == list(range(10))
    batches.set_epoch(1, start_batch=2)  # resumed: from sample 6 on
    assert epoch_indices(batches) == [6, 7, 8, 9]
    batches.set_epoch(2)
    images, _ = next(iter(batches))
    assert images.data_ptr() == split.images.data_ptr()  # no copy


def test_drop_last_leaves_out_the_short_batch():
    batches = make_batches(numbered_split(10), batch_size=4, shuffle=True, drop_last=True, device="cpu")
    assert len(batches) == 2 and batches.num_samples == 8
    assert [len(labels) for _, labels in batches] == [4, 4]


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (5, 2), (2, 3)])
def test_shards_are_disjoint_equal_and_cover_the_epoch(n, world):
    split = numbered_split(n)
    shards = []
    for rank in range(world):
        batches = make_batches(split, batch_size=2, shuffle=True, device="cpu", seed=7, rank=rank, world_size=world)
        batches.set_epoch(4)
        shards.append(epoch_indices(batches))
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)
    assert len({len(make_batches(split, batch_size=2, shuffle=True, device="cpu", rank=r, world_size=world))
                for r in range(world)}) == 1  # same number of steps everywhere
    together = [i for s in shards for i in s]
    assert set(together) == set(range(n))
    # only the padding (wrapping around) repeats samples
    assert len(together) - len(set(together)) == per_rank * world - n


def test_drop_last_shards_are_disjoint_without_padding():
    split = numbered_split(11)
    shards = []
    for rank in range(3):
        batches = make_batches(split, batch_size=2, shuffle=True, drop_last=True, device="cpu", rank=rank, world_size=3)
        shards.append(epoch_indices(batches))
    together = [i for s in shards for i in s]
    assert len(together) == len(set(together)) == 6  # 3 samples per rank -> one batch of 2 each


def test_drop_last_shards_need_a_sample_per_rank():
    # 3 samples on 2 ranks: one each, the third left out
    shards = [epoch_indices(make_batches(numbered_split(3), batch_size=1, shuffle=True, drop_last=True, device="cpu",
                                         rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [1, 1] and shards[0] != shards[1]
    with pytest.raises(UserError, match="1 samples cannot be shared among 2 ranks with drop_last"):
        make_batches(numbered_split(1), batch_size=1, shuffle=True, drop_last=True, device="cpu", rank=0, world_size=2)


def test_uneven_shards_with_more_ranks_than_samples_leave_a_rank_without_any():
    shards = [epoch_indices(make_batches(numbered_split(2), batch_size=2, shuffle=False, device="cpu", rank=r,
                                         world_size=3, even_shards=False)) for r in range(3)]
    assert shards == [[0], [1], []]


@pytest.mark.parametrize("n, batch_size, drop_last, world_size", [
    (10, 3, False, 1), (10, 3, True, 1), (10, 3, False, 3), (10, 3, True, 3), (11, 2, True, 2), (5, 4, False, 2),
])
def test_train_batches_is_the_length_of_the_ranks_batches(n, batch_size, drop_last, world_size):
    # per rank: ceil(n / world) samples padded, or n // world with drop_last; then batches of them
    samples = n // world_size if drop_last else -(-n // world_size)
    want = samples // batch_size if drop_last else -(-samples // batch_size)
    assert train_batches(n, batch_size, drop_last, world_size) == want
    for rank in range(world_size):
        batches = make_batches(numbered_split(n), batch_size=batch_size, shuffle=True, drop_last=drop_last,
                               device="cpu", rank=rank, world_size=world_size)
        assert len(batches) == want == len(list(batches))
    if world_size == 1:
        assert train_batches(n, batch_size, drop_last) == want  # one rank unless told


def test_samples_per_rank_by_sharding():
    assert samples_per_rank(10) == 10  # one rank unless told
    assert samples_per_rank(10, 3) == 4  # padded by wrapping, unless told
    assert samples_per_rank(10, 3, True) == 3
    assert [samples_per_rank(10, 3, False, False, rank) for rank in range(3)] == [4, 3, 3]
    assert samples_per_rank(10, 3, False, False) == 4  # rank 0 unless told
    assert samples_per_rank(10, 3, rank=2) == 4  # padded for every rank


def test_uneven_shards_cover_every_sample_exactly_once():
    split = numbered_split(10)
    shards = [
        epoch_indices(make_batches(split, batch_size=3, shuffle=False, device="cpu", rank=r, world_size=3, even_shards=False))
        for r in range(3)
    ]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    for rank, want in enumerate([4, 3, 3]):  # samples rank, rank + 3, ...: batches of 3
        batches = make_batches(split, batch_size=3, shuffle=False, device="cpu", rank=rank, world_size=3,
                               even_shards=False)
        assert batches.num_samples == want and len(batches) == len(list(batches)) == -(-want // 3)


def test_channels_are_converted_per_batch_and_sizes_resized():
    gray = numbered_split(6, channels=1)
    images, _ = next(iter(make_batches(gray, batch_size=6, shuffle=False, device="cpu", channels=3)))
    assert images.shape == (6, 3, 4, 4) and torch.equal(images[:, 0], images[:, 2])
    rgb = numbered_split(6, channels=3)
    images, _ = next(iter(make_batches(rgb, batch_size=6, shuffle=False, device="cpu", channels=1, image_size=(8, 8))))
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0, 0, 0], torch.arange(6, dtype=torch.uint8))  # uniform images stay uniform


@pytest.mark.parametrize("have, want", [((9, 14), (4, 5)), ((3, 5), (7, 11))])  # down (antialiasing shows), up
def test_in_memory_images_are_resized_like_pillows_bilinear(have, want):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, *have), dtype=torch.uint8, generator=g)
    split = ImageSplit(labels=torch.tensor([0, 1, 2]), images=images)
    got, _ = next(iter(make_batches(split, batch_size=3, shuffle=False, device="cpu", image_size=want)))
    assert got.shape == (3, 3, *want) and got.dtype == torch.uint8
    for image, resized in zip(images, got):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(want[::-1], Image.BILINEAR)
        reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        # torch's antialiased bilinear kernel follows Pillow's to within one level
        assert (resized.int() - reference.int()).abs().max() <= 1


def test_labels_out_of_range_are_named_once_with_the_split():
    split = ImageSplit(labels=torch.tensor([0, 1, 5, 2]), images=torch.zeros(4, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"val split.*\[0, 3\).*sample 2 has label 5.*"
                                        r"; the dataset's classes and its labels disagree"):
        make_batches(split, batch_size=2, shuffle=False, device="cpu", num_classes=3, name="val")
    negative = ImageSplit(labels=torch.tensor([0, -1]), images=torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(UserError, match="label -1"):
        make_batches(negative, batch_size=2, shuffle=False, device="cpu", num_classes=3)


@pytest.mark.parametrize("labels", [[3], [0, 1, 2, 3]])  # num_classes itself is out; so is a lone sample's label
def test_the_first_label_at_or_past_num_classes_is_named(labels):
    split = ImageSplit(labels=torch.tensor(labels), images=torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(UserError, match=rf"train split.*\[0, 3\).*sample {len(labels) - 1} has label 3 "
                                        rf"\(1 of {len(labels)} labels are out of range\)"):
        make_batches(split, batch_size=2, shuffle=False, device="cpu", num_classes=3)


def test_labels_must_be_integers_and_the_split_is_named():
    floats = torch.tensor([0.0, 1.0])
    with pytest.raises(UserError, match=r"labels of the val split must be integer class indices, not torch\.float32"):
        check_labels(floats, 2, "val")
    with pytest.raises(UserError, match=r"labels of the train split"):  # the default name
        check_labels(torch.tensor([0, 2]), 2)


@pytest.mark.parametrize("kwargs, error, says", [
    (dict(batch_size=0), ValueError, r"batch_size must be at least 1, not 0"),
    (dict(rank=2, world_size=2), ValueError, r"rank must be in \[0, 2\), not 2"),
    (dict(rank=-1, world_size=2), ValueError, r"rank must be in \[0, 2\), not -1"),
    (dict(channels=2), ValueError, r"channels must be 1 or 3, not 2"),
])
def test_bad_arguments_are_errors_that_name_them(kwargs, error, says):
    with pytest.raises(error, match=says):
        make_batches(numbered_split(4), **{"batch_size": 2, "shuffle": False, "device": "cpu", **kwargs})


def test_an_empty_split_is_named():
    empty = numbered_split(4).select(torch.tensor([], dtype=torch.long))
    with pytest.raises(UserError, match="the train split is empty"):  # "train" unless told
        make_batches(empty, batch_size=2, shuffle=False, device="cpu")
    with pytest.raises(UserError, match="the test split is empty"):
        make_batches(empty, batch_size=2, shuffle=False, device="cpu", name="test")


# -- file splits -------------------------------------------------------------------------------


def file_split(tmp_path, n: int = 12, size=(6, 5)) -> tuple[ImageSplit, list[np.ndarray]]:
    arrays = [write_image(tmp_path / f"img {i:02d}.png", size=size, seed=i) for i in range(n)]
    files = tuple(tmp_path / f"img {i:02d}.png" for i in range(n))
    return ImageSplit(labels=torch.arange(n) % 3, files=files), arrays


@pytest.mark.parametrize("workers", [0, 2])
def test_file_batches_decode_in_the_same_seeded_order_as_memory_batches(tmp_path, workers):
    split, arrays = file_split(tmp_path)
    memory = ImageSplit(labels=split.labels, images=torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous())
    kwargs = dict(batch_size=5, shuffle=True, device="cpu", seed=3, image_size=(6, 5), channels=3)
    from_files = make_batches(split, num_workers=workers, **kwargs)
    from_memory = make_batches(memory, **kwargs)
    assert from_files.split is split and from_memory.split is memory
    assert len(from_files) == len(from_memory) == 3 and from_files.num_samples == 12
    for epoch in (None, 1, 2):  # None: before any set_epoch, both start at epoch 0
        if epoch is not None:
            from_files.set_epoch(epoch)
            from_memory.set_epoch(epoch)
        got = list(from_files)
        want = list(from_memory)
        assert len(got) == 3
        for (gi, gl), (wi, wl) in zip(got, want):
            assert gi.dtype == torch.uint8 and gl.dtype == torch.int64
            assert torch.equal(gi, wi) and torch.equal(gl, wl)


def test_file_batches_resize_convert_and_shard(tmp_path):
    split, _ = file_split(tmp_path, n=7)
    seen = []
    for rank in range(2):
        batches = make_batches(split, batch_size=2, shuffle=True, device="cpu", image_size=(4, 4), channels=1,
                               num_workers=0, rank=rank, world_size=2)
        batches.set_epoch(1)
        for images, labels in batches:
            assert images.shape[1:] == (1, 4, 4)
            seen.extend(labels.tolist())
    assert len(seen) == 8  # 7 samples padded to 2 x 4


def test_file_batches_resume_mid_epoch(tmp_path):
    split, _ = file_split(tmp_path, n=9)
    batches = make_batches(split, batch_size=2, shuffle=True, device="cpu", image_size=(6, 5), num_workers=0)
    batches.set_epoch(2)
    whole = [labels for _, labels in batches]
    batches.set_epoch(2, start_batch=3)
    assert len(batches.loader) == 2  # the DataLoader itself knows what is left (e.g. for a progress bar over it)
    rest = [labels for _, labels in batches]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))


def test_an_unreadable_file_is_left_out_of_its_batch_or_fails(tmp_path):
    split, _ = file_split(tmp_path, n=4)
    bad = write_not_an_image_file(tmp_path / "broken.jpg")
    split = ImageSplit(labels=torch.tensor([0, 1, 2, 0, 1]), files=split.files + (bad,))
    batches = make_batches(split, batch_size=5, shuffle=False, device="cpu", image_size=(6, 5), num_workers=0)
    with pytest.warns(UserWarning, match="broken.jpg"):
        (images, labels), = list(batches)
    assert len(images) == 4 and labels.tolist() == [0, 1, 2, 0]
    assert [p for p, _ in batches.skipped] == [str(bad)]
    failing = make_batches(split, batch_size=5, shuffle=False, device="cpu", image_size=(6, 5), num_workers=0,
                           bad_images="fail")
    with pytest.raises(UserError, match="broken.jpg"):
        list(failing)


def test_file_batches_drop_the_last_short_batch(tmp_path):
    split, _ = file_split(tmp_path, n=7)
    batches = make_batches(split, batch_size=3, shuffle=True, drop_last=True, device="cpu", image_size=(6, 5),
                           num_workers=0)
    assert len(batches) == 2 and batches.num_samples == 6
    batches.set_epoch(1)
    assert [len(labels) for _, labels in batches] == [3, 3]


def test_file_batches_crop_to_fit_like_torchvision_resize_then_center_crop(tmp_path):
    array = write_image(tmp_path / "wide.png", size=(6, 10), seed=1)
    split = ImageSplit(labels=torch.tensor([0]), files=(tmp_path / "wide.png",))
    batches = make_batches(split, batch_size=1, shuffle=False, device="cpu", image_size=(4, 4), fit="crop",
                           num_workers=0)
    (images, _), = list(batches)
    # Resize(shorter side = 4) then CenterCrop(4): the middle of the wide image, not all of it squeezed
    image = torch.from_numpy(array).permute(2, 0, 1)
    want = TF.center_crop(TF.resize(image, 4, antialias=True), [4, 4])
    assert torch.equal(images[0], want)


def test_a_batch_of_only_unreadable_files_does_not_end_the_epoch(tmp_path):
    good, _ = file_split(tmp_path, n=3)
    bad = tuple(write_not_an_image_file(tmp_path / f"broken{i}.jpg") for i in range(2))
    split = ImageSplit(labels=torch.tensor([0, 0, 0, 1, 2]), files=bad + good.files)
    batches = make_batches(split, batch_size=2, shuffle=False, device="cpu", image_size=(6, 5), num_workers=0)
    with pytest.warns(UserWarning, match="broken"):
        labels = [label for _, batch in batches for label in batch.tolist()]
    assert labels == [0, 1, 2]  # the first batch was all unreadable; the two after it still come


def test_a_skipped_file_is_listed_and_warned_about_with_its_reason_outside_cnnreg(tmp_path):
    good, _ = file_split(tmp_path, n=2)
    bad = write_not_an_image_file(tmp_path / "broken.jpg")
    with pytest.raises(BadImage) as decoded:
        decode_image(bad, size=(6, 5))
    reason = decoded.value.reason
    assert reason  # the reference: what the decoder itself says is wrong
    split = ImageSplit(labels=torch.tensor([0, 1, 2]), files=good.files + (bad,))
    batches = make_batches(split, batch_size=3, shuffle=False, device="cpu", image_size=(6, 5), num_workers=0)
    with pytest.warns(UserWarning) as caught:
        for _ in batches.indexed():  # as the engine iterates them
            pass
    assert batches.skipped == [(str(bad), reason)]
    (warning,) = caught.list
    assert str(warning.message) == f"skipped unreadable image {bad}: {reason}"
    # the warning points at the code iterating the batches, not inside this module (exactly which
    # frame cannot be asserted: mutation testing wraps every function in one more)
    assert Path(warning.filename).name != "batches.py"


def test_failing_on_an_unreadable_file_names_it_and_the_setting_that_skips_it(tmp_path):
    bad = write_not_an_image_file(tmp_path / "broken.jpg")
    split = ImageSplit(labels=torch.tensor([0]), files=(bad,))
    batches = make_batches(split, batch_size=1, shuffle=False, device="cpu", image_size=(6, 5), num_workers=0,
                           bad_images="fail")
    with pytest.raises(UserError, match=r'cannot read image .*broken\.jpg: .*; remove or replace the file, '
                                        r'or set "bad_images": "skip" to leave such files out'):
        list(batches)


def test_file_batches_on_the_cpu_warn_about_nothing(tmp_path):
    # e.g. no "pin_memory is set but no accelerator is found" from the DataLoader
    split, _ = file_split(tmp_path, n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for workers in (0, 1):
            batches = make_batches(split, batch_size=2, shuffle=True, device="cpu", image_size=(6, 5),
                                   num_workers=workers)
            assert sum(len(labels) for _, labels in batches) == 4


# A stand-in for code drawing random numbers in a DataLoader worker: each "image"
# carries what the worker saw -- Python's and numpy's first draw, torch's seed and
# the process id -- as the 32 bytes of a 4 x 8 gray image.
PROBE_SIZE = (4, 8)


def probe_decode(path, size, channels, fit):
    seen = np.array([random.random(), np.random.random()]).tobytes() + np.array([torch.initial_seed(), os.getpid()],
                                                                                 dtype=np.uint64).tobytes()
    return np.frombuffer(seen, dtype=np.uint8).reshape(*size, channels).copy()


def probe_epoch(batches, epoch: int) -> list[tuple[float, float, int, int]]:
    batches.set_epoch(epoch)
    seen = []
    for images, _ in batches:
        for image in images.numpy():
            python, numpy = np.frombuffer(image.tobytes()[:16], dtype=np.float64)
            seed, pid = np.frombuffer(image.tobytes()[16:], dtype=np.uint64)
            seen.append((float(python), float(numpy), int(seed), int(pid)))
    return seen


def probe_batches(tmp_path, monkeypatch, **kwargs):
    monkeypatch.setattr(batches_module, "decode_image", probe_decode)  # workers are forked: they see it
    files = tuple(tmp_path / f"{i}.png" for i in range(3))
    split = ImageSplit(labels=torch.tensor([0, 1, 0]), files=files)
    return make_batches(split, batch_size=1, shuffle=False, device="cpu", image_size=PROBE_SIZE, channels=1, **kwargs)


def test_workers_seed_python_and_numpy_like_torch_and_from_the_run_seed(tmp_path, monkeypatch):
    first_seen = {}
    for seed, global_seed in ((5, 1), (5, 2), (6, 1), (7, 1)):
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)  # the main process's generator must not matter
            (python, numpy, worker_seed, _), *_ = probe_epoch(probe_batches(tmp_path, monkeypatch, seed=seed,
                                                                              num_workers=1), 1)
        # the worker's first draws are those of generators seeded with torch's seed (mod 2**32)
        assert python == random.Random(worker_seed % 2**32).random()
        assert numpy == np.random.RandomState(worker_seed % 2**32).random_sample()
        first_seen.setdefault(seed, set()).add((python, numpy, worker_seed))
    assert all(len(seen) == 1 for seen in first_seen.values())  # the same run seed, the same draws
    assert len(set.union(*first_seen.values())) == 3  # and another seed, others


def test_workers_persist_and_read_ahead_as_the_signature_says_by_default(tmp_path, monkeypatch):
    defaults = inspect.signature(make_batches).parameters
    batches = probe_batches(tmp_path, monkeypatch, num_workers=1)
    assert batches.loader.prefetch_factor == defaults["prefetch_factor"].default
    assert defaults["persistent_workers"].default is True
    first, second = ({pid for *_, pid in probe_epoch(batches, epoch)} for epoch in (1, 2))
    assert first == second  # the same worker both epochs


def test_workers_decode_in_this_process_or_persist_between_epochs_as_asked(tmp_path, monkeypatch):
    here = os.getpid()
    inline = probe_batches(tmp_path, monkeypatch, num_workers=0)
    assert {pid for *_, pid in probe_epoch(inline, 1)} == {here}  # num_workers=0: no worker processes
    for persistent in (True, False):
        batches = probe_batches(tmp_path, monkeypatch, num_workers=1, persistent_workers=persistent,
                                prefetch_factor=3)
        assert batches.loader.prefetch_factor == 3  # the user's read-ahead reaches the DataLoader
        first, second = ({pid for *_, pid in probe_epoch(batches, epoch)} for epoch in (1, 2))
        assert len(first) == len(second) == 1 and here not in first | second
        assert (first == second) is persistent


def test_file_batches_use_the_cores_shared_among_the_ranks_by_default(tmp_path):
    split, _ = file_split(tmp_path, n=4)
    cores = len(os.sched_getaffinity(0))
    for world_size, want in ((1, cores), (64, 1)):  # more ranks than cores: still one worker each
        batches = make_batches(split, batch_size=2, shuffle=False, device="cpu", image_size=(6, 5),
                               world_size=world_size, persistent_workers=False)
        assert batches.loader.num_workers == max(want, 1)


def test_file_splits_need_an_image_size(tmp_path):
    split, _ = file_split(tmp_path, n=2)
    with pytest.raises(ValueError, match="image_size"):
        make_batches(split, batch_size=2, shuffle=False, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_live_on_the_gpu(tmp_path):
    split = numbered_split(20)
    batches = make_batches(split, batch_size=8, shuffle=True, device="cuda", seed=0, channels=1)
    batches.set_epoch(1)
    got = list(batches)
    assert all(images.is_cuda and labels.is_cuda for images, labels in got)
    cpu = make_batches(split, batch_size=8, shuffle=True, device="cpu", seed=0, channels=1)
    cpu.set_epoch(1)
    assert all(torch.equal(a.cpu(), b) for (a, _), (b, _) in zip(got, cpu))
    files, _ = file_split(tmp_path, n=6)
    file_batches = make_batches(files, batch_size=3, shuffle=False, device="cuda", image_size=(6, 5), num_workers=1)
    images, labels, index = next(file_batches.indexed())
    assert images.is_cuda and labels.is_cuda and index.is_cuda  # the engine hands index to transforms on x's device
