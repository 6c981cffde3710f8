"""cnnreg.inputs.splits: stratified, seeded splitting, subsets, k-fold, statistics, channels."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnreg.core.data import DataSource, ImageSplit
from cnnreg.core.errors import UserError
from cnnreg.inputs.splits import channel_stats, convert_channels, kfold, stratified_split, subset, with_validation

from _datafiles import write_image


def memory_split(labels: list[int], size: int = 2, channels: int = 3, seed: int = 0) -> ImageSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), channels, size, size), dtype=torch.uint8, generator=g)
    return ImageSplit(labels=torch.tensor(labels, dtype=torch.int64), images=images)


def source_of(labels: list[int], classes: int | None = None) -> DataSource:
    classes = classes or max(labels) + 1
    return DataSource(train=memory_split(labels), classes=tuple(f"c{i}" for i in range(classes)), image_size=(2, 2), channels=3)


# -- stratified_split -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_stratified_split_is_a_partition_with_proportional_classes(counts, fraction, seed):
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    want = round(len(labels) * fraction)
    kept, drawn = stratified_split(labels, want, seed, min_keep=0)
    assert torch.equal(torch.cat([kept, drawn]).sort().values, torch.arange(len(labels)))
    assert len(drawn) == want
    for c, n in enumerate(counts):
        got = int((labels[drawn] == c).sum())
        # each class gets its quota, rounded down or up
        assert n * want // len(labels) <= got <= -(-n * want // len(labels))


def test_stratified_split_keeps_min_keep_per_class_and_is_deterministic():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 1)
    kept, drawn = stratified_split(labels, 12, seed=3, min_keep=1)
    assert torch.bincount(labels[kept], minlength=3).tolist() == [1, 1, 1]
    again = stratified_split(labels, 12, seed=3, min_keep=1)
    assert torch.equal(kept, again[0]) and torch.equal(drawn, again[1])
    other = stratified_split(torch.tensor([0] * 50 + [1] * 50), 30, seed=4)[1]
    assert not torch.equal(other, stratified_split(torch.tensor([0] * 50 + [1] * 50), 30, seed=5)[1])


# -- with_validation ---------------------------------------------------------------------


def test_with_validation_carves_a_stratified_fraction_from_train():
    source = source_of([0] * 60 + [1] * 30 + [2] * 10)
    out = with_validation(source, 0.2, seed=0)
    assert out.val is not None and len(out.val) == 20 and len(out.train) == 80
    assert torch.bincount(out.val.labels).tolist() == [12, 6, 2]
    # the images travel with their labels
    index = [i for i in range(100)]
    rows = {tuple(source.train.images[i].flatten().tolist()): int(source.train.labels[i]) for i in index}
    for image, label in zip(out.val.images, out.val.labels):
        assert rows[tuple(image.flatten().tolist())] == int(label)
    assert torch.equal(with_validation(source, 0.2, seed=0).val.labels, out.val.labels)
    assert not torch.equal(with_validation(source, 0.2, seed=1).val.images, out.val.images)


def test_with_validation_leaves_sources_with_val_or_fraction_zero_alone():
    source = source_of([0, 1] * 10)
    assert with_validation(source, 0.0, seed=0) is source
    has_val = DataSource(train=source.train, val=memory_split([0, 1]), classes=source.classes, image_size=(2, 2), channels=3)
    assert with_validation(has_val, 0.3, seed=0) is has_val


def test_with_validation_keeps_a_single_image_class_in_train_and_says_so():
    source = source_of([0] * 20 + [1])
    with pytest.warns(UserWarning, match="'c1'"):
        out = with_validation(source, 0.5, seed=0)
    assert (out.train.labels == 1).sum() == 1
    assert (out.val.labels == 1).sum() == 0


def test_with_validation_cannot_carve_from_single_images():
    with pytest.raises(UserError, match="single image"):
        with_validation(source_of([0, 1, 2]), 0.5, seed=0)


def test_with_validation_rejects_bad_fractions():
    with pytest.raises(ValueError):
        with_validation(source_of([0, 1] * 5), 1.0, seed=0)


# -- subset ----------------------------------------------------------------------------------


def test_subset_by_fraction_and_by_count_is_stratified():
    split = memory_split([0] * 80 + [1] * 20)
    part = subset(split, 0.25, seed=0)
    assert torch.bincount(part.labels).tolist() == [20, 5]
    counted = subset(split, 10, seed=0)
    assert torch.bincount(counted.labels).tolist() == [8, 2]
    assert len(subset(split, 1, seed=0)) == 1
    assert subset(split, 1.0, seed=0) is split
    assert subset(split, 1000, seed=0) is split


def test_subset_rejects_bad_amounts():
    split = memory_split([0, 1] * 4)
    for bad in (0.0, 1.5, 0, -3, True, "half"):
        with pytest.raises(ValueError):
            subset(split, bad, seed=0)


def test_subset_of_a_file_split_selects_paths(tmp_path):
    files = tuple(tmp_path / f"{i}.png" for i in range(10))
    split = ImageSplit(labels=torch.tensor([0] * 5 + [1] * 5), files=files)
    part = subset(split, 4, seed=0)
    assert len(part.files) == 4 and set(part.files) <= set(files)
    assert torch.bincount(part.labels).tolist() == [2, 2]
    for path, label in zip(part.files, part.labels):
        assert files.index(path) // 5 == int(label)


# -- kfold -------------------------------------------------------------------------------------


def test_kfold_validates_every_sample_exactly_once_with_balanced_classes():
    labels = torch.tensor([0] * 23 + [1] * 11 + [2] * 6)
    folds = kfold(labels, 5, seed=0)
    assert len(folds) == 5
    seen = torch.cat([val for _, val in folds]).sort().values
    assert torch.equal(seen, torch.arange(len(labels)))
    for train, val in folds:
        assert not set(train.tolist()) & set(val.tolist())
        assert len(train) + len(val) == len(labels)
        assert len(val) in (8,)  # 40 / 5
    per_class = torch.stack([torch.bincount(labels[val], minlength=3) for _, val in folds])
    assert (per_class.max(0).values - per_class.min(0).values).le(1).all()
    again = kfold(labels, 5, seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, again))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(folds, kfold(labels, 5, seed=1)))


def test_kfold_unstratified_and_bad_fold_counts():
    labels = torch.tensor([0] * 9 + [1])
    folds = kfold(labels, 3, seed=0, stratified=False)
    assert sorted(len(v) for _, v in folds) == [3, 3, 4]
    assert torch.equal(torch.cat([v for _, v in folds]).sort().values, torch.arange(10))
    for bad in (1, 11):
        with pytest.raises(ValueError):
            kfold(labels, bad, seed=0)
    with pytest.warns(UserWarning, match="fewer samples than folds"):
        kfold(labels, 3, seed=0)


# -- channel_stats -----------------------------------------------------------------------------


def test_channel_stats_of_an_in_memory_split_match_a_float_computation():
    split = memory_split([0] * 30, size=5)
    mean, std = channel_stats(split)
    x = split.images.double() / 255
    assert mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-4)
    assert std == pytest.approx(x.std((0, 2, 3), unbiased=False).tolist(), abs=1e-4)
    gray_mean, _ = channel_stats(split, channels=1)
    assert len(gray_mean) == 1


def test_channel_stats_of_a_file_split_decode_the_files(tmp_path):
    arrays = [write_image(tmp_path / f"{i}.png", size=(4, 6), seed=i) for i in range(5)]
    write_image(tmp_path / "bad.png", size=(4, 6))
    (tmp_path / "bad.png").write_bytes(b"broken")
    files = tuple(tmp_path / f"{i}.png" for i in range(5)) + (tmp_path / "bad.png",)
    split = ImageSplit(labels=torch.zeros(6, dtype=torch.int64), files=files)
    mean, std = channel_stats(split)
    x = np.stack(arrays).astype(np.float64) / 255
    assert mean == pytest.approx(x.mean((0, 1, 2)).tolist(), abs=1e-4)
    assert std == pytest.approx(x.std((0, 1, 2)).tolist(), abs=1e-4)


def test_channel_stats_of_an_empty_split_is_an_error():
    with pytest.raises(UserError):
        channel_stats(memory_split([]))


# -- convert_channels --------------------------------------------------------------------------


def test_rgb_to_gray_equals_pillows_L_exactly():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    got = convert_channels(torch.from_numpy(rgb).permute(2, 0, 1)[None], 1)
    assert got.dtype == torch.uint8 and got.shape == (1, 1, 7, 9)
    assert np.array_equal(got[0, 0].numpy(), want)


def test_gray_to_rgb_replicates_and_float_luma_weights():
    gray = torch.randint(0, 256, (2, 1, 3, 3), dtype=torch.uint8)
    rgb = convert_channels(gray, 3)
    assert rgb.shape == (2, 3, 3, 3) and all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))
    assert convert_channels(gray, 1) is gray
    x = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert convert_channels(x, 1).item() == pytest.approx(0.299)
    with pytest.raises(ValueError):
        convert_channels(torch.zeros(1, 2, 2, 2), 3)
