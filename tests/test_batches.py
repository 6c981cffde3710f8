"""cnnreg.inputs.batches: one iterator over in-memory and file splits, seeded, sharded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnreg.inputs.batches import make_batches
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
    shapes = []
    for images, labels in batches:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.device.type == "cpu" and labels.device.type == "cpu"
        assert torch.equal(labels, images[:, 0, 0, 0].long() % 3)  # labels stay with their images
        shapes.append(tuple(images.shape))
    assert shapes == [(4, 3, 4, 4), (4, 3, 4, 4), (2, 3, 4, 4)]


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


def test_resuming_mid_epoch_yields_the_rest_of_that_epoch():
    split = numbered_split(30)
    batches = make_batches(split, batch_size=4, shuffle=True, device="cpu", seed=0)
    batches.set_epoch(3)
    whole = epoch_indices(batches)
    batches.set_epoch(3, start_batch=5)
    assert epoch_indices(batches) == whole[20:]
    with pytest.raises(ValueError):
        batches.set_epoch(3, start_batch=99)


def test_without_shuffle_batches_follow_the_split_and_are_views():
    split = numbered_split(10)
    batches = make_batches(split, batch_size=3, shuffle=False, device="cpu")
    assert epoch_indices(batches) == list(range(10))
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


def test_uneven_shards_cover_every_sample_exactly_once():
    split = numbered_split(10)
    shards = [
        epoch_indices(make_batches(split, batch_size=3, shuffle=False, device="cpu", rank=r, world_size=3, even_shards=False))
        for r in range(3)
    ]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert sorted(len(s) for s in shards) == [3, 3, 4]


def test_channels_are_converted_per_batch_and_sizes_resized():
    gray = numbered_split(6, channels=1)
    images, _ = next(iter(make_batches(gray, batch_size=6, shuffle=False, device="cpu", channels=3)))
    assert images.shape == (6, 3, 4, 4) and torch.equal(images[:, 0], images[:, 2])
    rgb = numbered_split(6, channels=3)
    images, _ = next(iter(make_batches(rgb, batch_size=6, shuffle=False, device="cpu", channels=1, image_size=(8, 8))))
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0, 0, 0], torch.arange(6, dtype=torch.uint8))  # uniform images stay uniform


def test_labels_out_of_range_are_named_once_with_the_split():
    split = ImageSplit(labels=torch.tensor([0, 1, 5, 2]), images=torch.zeros(4, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"val split.*\[0, 3\).*sample 2 has label 5"):
        make_batches(split, batch_size=2, shuffle=False, device="cpu", num_classes=3, name="val")
    negative = ImageSplit(labels=torch.tensor([0, -1]), images=torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(UserError, match="label -1"):
        make_batches(negative, batch_size=2, shuffle=False, device="cpu", num_classes=3)


def test_bad_arguments_are_errors():
    split = numbered_split(4)
    with pytest.raises(ValueError):
        make_batches(split, batch_size=0, shuffle=False, device="cpu")
    with pytest.raises(ValueError):
        make_batches(split, batch_size=2, shuffle=False, device="cpu", rank=2, world_size=2)
    with pytest.raises(UserError, match="empty"):
        make_batches(split.select(torch.tensor([], dtype=torch.long)), batch_size=2, shuffle=False, device="cpu")


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
    assert len(from_files) == len(from_memory) == 3 and from_files.num_samples == 12
    for epoch in (1, 2):
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
    images, labels = next(iter(make_batches(files, batch_size=3, shuffle=False, device="cuda", image_size=(6, 5), num_workers=1)))
    assert images.is_cuda and labels.is_cuda
