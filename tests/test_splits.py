"""cnnreg.inputs.splits: stratified, seeded splitting, subsets, k-fold, statistics, channels."""

from __future__ import annotations

import itertools
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms.v2 import functional as TF

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


def test_stratified_split_gives_what_small_classes_must_keep_to_the_others():
    # 12 of 16 with one kept per class: the three 2-image classes can give one each (their quota
    # is 1.5), so the 10-image class gives 9, not its quota of 7.5
    labels = torch.tensor([0, 0, 1, 1, 2, 2] + [3] * 10)
    kept, drawn = stratified_split(labels, 12, seed=0, min_keep=1)
    assert torch.bincount(labels[drawn]).tolist() == [1, 1, 1, 9]
    assert torch.bincount(labels[kept]).tolist() == [1, 1, 1, 1]


def test_stratified_split_rounds_by_the_largest_remainder():
    # 2 of [0, 0, 1]: quotas 1.33 and 0.67, so the second class's larger remainder gets the leftover
    kept, drawn = stratified_split(torch.tensor([0, 0, 1]), 2, seed=0, min_keep=0)
    assert torch.bincount(torch.tensor([0, 0, 1])[drawn]).tolist() == [1, 1]


def test_stratified_split_keeps_one_image_per_class_by_default():
    # of [0, 0, 1] only one class-0 image can go: each class keeps one
    kept, drawn = stratified_split(torch.tensor([0, 0, 1]), 3, seed=0)
    assert len(drawn) == 1 and sorted(kept.tolist() + drawn.tolist()) == [0, 1, 2]
    assert drawn.tolist() in ([0], [1])


def test_stratified_split_of_one_or_no_sample():
    kept, drawn = stratified_split(torch.tensor([4]), 1, seed=0, min_keep=0)
    assert kept.tolist() == [] and drawn.tolist() == [0]
    for part in stratified_split(torch.tensor([], dtype=torch.int64), 3, seed=0):
        assert part.dtype == torch.int64 and part.shape == (0,)  # still index tensors


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


@pytest.mark.parametrize("singles, shown", [
    (5, "'c1', 'c2', 'c3', 'c4', 'c5'"),
    (6, "'c1', 'c2', 'c3', 'c4', 'c5' and 1 more"),  # five named, then a count
])
def test_with_validation_names_the_classes_left_out_of_validation(singles, shown):
    source = source_of([0] * 30 + list(range(1, singles + 1)))
    with pytest.warns(UserWarning) as caught:
        with_validation(source, 0.2, seed=0)
    (warning,) = caught.list
    assert str(warning.message) == (f"no validation image for class {shown}: too few training images for a 0.2 share "
                                    "(each class keeps at least one for training)")
    assert Path(warning.filename).name != "splits.py"  # the caller's line, not cnnreg's


def test_with_validation_cannot_carve_from_single_images():
    with pytest.raises(UserError, match=r"^cannot carve a validation split of 0.5 from 3 training images: every class "
                                        r"has a single image, which stays in training; add images or give a val/ split$"):
        with_validation(source_of([0, 1, 2]), 0.5, seed=0)


def test_with_validation_takes_at_least_one_image():
    with pytest.warns(UserWarning, match="'c1'"):  # the one image is class 0's: c1 has none
        out = with_validation(source_of([0] * 15 + [1] * 15), 0.01, seed=0)  # 0.3 images rounds to 0
    assert len(out.val) == 1 and len(out.train) == 29


def test_with_validation_takes_from_a_two_image_class():
    # half of 22: the 2-image class gives one (it keeps the other), silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = with_validation(source_of([0] * 20 + [1] * 2), 0.5, seed=0)
    assert torch.bincount(out.val.labels).tolist() == [10, 1]


def test_with_validation_does_not_miss_classes_train_never_had():
    # class c2 has no training image at all (say, only test images): nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = with_validation(source_of([0] * 10 + [1] * 10, classes=3), 0.2, seed=0)
    assert torch.bincount(out.val.labels, minlength=3).tolist() == [2, 2, 0]


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_with_validation_rejects_bad_fractions_saying_the_range(fraction):
    with pytest.raises(ValueError, match=rf"^the validation fraction must be in \[0, 1\), not {fraction}$"):
        with_validation(source_of([0, 1] * 5), fraction, seed=0)


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


def test_subset_rounds_a_tiny_fraction_up_to_one_image():
    # 100 * 0.004 rounds to 0 images: a quick run still gets one
    assert len(subset(memory_split([0] * 50 + [1] * 50), 0.004, seed=0)) == 1


@pytest.mark.parametrize("amount", [5, 5 / 6])
def test_subset_may_take_every_image_of_a_class(amount):
    # 5 of 6 images: class 0's quota is 5 * 2/6 = 1.67, the larger remainder, so it
    # gets both its images (a subset, unlike a validation split, keeps none behind)
    part = subset(memory_split([0, 0, 1, 1, 1, 1]), amount, seed=0)
    assert torch.bincount(part.labels).tolist() == [2, 3]


@pytest.mark.parametrize("bad, says", [
    (0.0, r"subset fraction must be in \(0, 1\], not 0.0; use an integer for a count"),
    (1.5, r"subset fraction must be in \(0, 1\], not 1.5; use an integer"),
    (0, r"subset count must be at least 1, not 0"),
    (-3, r"subset count must be at least 1, not -3"),
    (True, r"a subset is a fraction in \(0, 1\] or a count >= 1, not True"),
    ("half", r"a subset is a fraction in \(0, 1\] or a count >= 1, not 'half'"),
])
def test_subset_rejects_bad_amounts_saying_what_is_allowed(bad, says):
    with pytest.raises(ValueError, match=says):
        subset(memory_split([0, 1] * 4), bad, seed=0)


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
        with pytest.raises(ValueError, match=rf"k-fold needs 2 <= folds <= number of samples \(10\), not {bad}"):
            kfold(labels, bad, seed=0)


@pytest.mark.parametrize("folds", [2, 7])  # the least, and one sample per fold
def test_kfold_takes_from_two_folds_to_one_per_sample(folds):
    labels = torch.tensor([0, 1] * 3 + [1])
    validated = sorted(i for _, val in kfold(labels, folds, seed=0, stratified=False) for i in val.tolist())
    assert validated == list(range(7))


def test_kfold_names_the_classes_smaller_than_the_folds_where_the_call_is():
    # class 1 is absent, class 2 has one sample, class 3 exactly as many as folds: only 2 is too small
    labels = torch.tensor([0] * 9 + [2] + [3] * 3)
    with pytest.warns(UserWarning) as caught:
        kfold(labels, 3, seed=0)
    (warning,) = caught.list
    assert str(warning.message) == "classes [2] have fewer samples than folds (3): some folds validate none of them"
    assert Path(warning.filename).name != "splits.py"  # the caller's line, not cnnreg's
    with pytest.warns(UserWarning, match=re.escape("classes [1, 2, 3, 4, 5] have fewer")):  # the first five
        kfold(torch.tensor([0] * 10 + [1, 2, 3, 4, 5, 6, 7]), 3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfold(torch.tensor([0] * 3 + [1] * 4), 3, seed=0)  # every class fills the folds: no warning


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
    (tmp_path / "bad.png").write_bytes(b"broken")
    # the unreadable file first: the ones after it still count
    files = (tmp_path / "bad.png",) + tuple(tmp_path / f"{i}.png" for i in range(5))
    split = ImageSplit(labels=torch.zeros(6, dtype=torch.int64), files=files)
    mean, std = channel_stats(split)
    x = np.stack(arrays).astype(np.float64) / 255
    assert mean == pytest.approx(x.mean((0, 1, 2)).tolist(), abs=1e-4)
    assert std == pytest.approx(x.std((0, 1, 2)).tolist(), abs=1e-4)


def float_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """The reference: mean and (population) std per channel of uint8 ``[N, C, H, W]``, in float64."""
    x = x.double() / 255
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3), unbiased=False).tolist()


def test_a_channel_that_never_varies_has_a_std_of_exactly_zero():
    # e.g. a gray scan stored as RGB, or a constant alpha-like channel: normalising must see 0, not 0.0001
    images = torch.tensor([48, 100, 200], dtype=torch.uint8).view(1, 3, 1, 1).expand(40, 3, 5, 5)
    mean, std = channel_stats(ImageSplit(labels=torch.zeros(40, dtype=torch.int64), images=images))
    assert mean == (round(48 / 255, 4), round(100 / 255, 4), round(200 / 255, 4))
    assert std == (0.0, 0.0, 0.0)


def test_channel_stats_to_gray_are_those_of_pillows_L():
    split = memory_split([0] * 6, size=5)
    gray = [np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").convert("L")) for image in split.images]
    mean, std = channel_stats(split, channels=1)
    want_mean, want_std = float_stats(torch.from_numpy(np.stack(gray))[:, None])
    assert mean == pytest.approx(want_mean, abs=1e-4) and std == pytest.approx(want_std, abs=1e-4)


def test_channel_stats_of_a_sample_are_those_of_that_many_images_drawn_by_the_seed():
    # image i is uniform, 10 * i in channel 0 and 10 * i + 5 in channel 1: any 3 of them tell apart
    values = torch.arange(20) * 10
    images = torch.stack([values, values + 5], 1).to(torch.uint8).view(20, 2, 1, 1).expand(20, 2, 2, 3)
    split = ImageSplit(labels=torch.zeros(20, dtype=torch.int64), images=images.contiguous())
    drawn = {seed: channel_stats(split, sample=3, seed=seed) for seed in range(4)}
    possible = {}
    for three in itertools.combinations(range(20), 3):
        mean, std = float_stats(split.images[list(three)])
        possible[three] = (tuple(round(v, 4) for v in mean), tuple(round(v, 4) for v in std))
    for stats in drawn.values():
        assert stats in possible.values()
    assert len(set(drawn.values())) > 1  # another seed, other images
    assert channel_stats(split, sample=3, seed=2) == drawn[2]
    assert channel_stats(split, sample=3) == drawn[0]  # the documented default seed, 0


def test_channel_stats_sample_4096_images_by_default():
    # 2048 white and 2049 black pixels: all 4097 give a mean of 0.4999; 4096 of them 0.4998 or 0.5
    images = torch.cat([torch.full((2048,), 255), torch.zeros(2049)]).to(torch.uint8).view(-1, 1, 1, 1)
    split = ImageSplit(labels=torch.zeros(len(images), dtype=torch.int64), images=images)
    (mean,), _ = channel_stats(split)
    assert mean in (round(2047 / 4096, 4), round(2048 / 4096, 4))
    assert channel_stats(split, sample=len(images))[0] == (round(2048 / 4097, 4),)  # the positive control


def test_channel_stats_of_more_images_than_one_chunk_count_each_image_once():
    # over 2 chunks of 1024: the images at the chunk edges (values 0 and 1) neither missed nor twice
    images = (torch.arange(2100) % 256).to(torch.uint8).view(-1, 1, 1, 1)
    split = ImageSplit(labels=torch.zeros(2100, dtype=torch.int64), images=images)
    mean, std = channel_stats(split)
    want_mean, want_std = float_stats(images)
    assert mean == pytest.approx(want_mean, abs=1e-4) and std == pytest.approx(want_std, abs=1e-4)


@pytest.mark.parametrize("fit", ["stretch", "crop"])
def test_channel_stats_decode_files_at_the_size_and_fit_asked(tmp_path, fit):
    arrays = [write_image(tmp_path / f"{i}.png", size=(6, 10), seed=i) for i in range(3)]
    split = ImageSplit(labels=torch.zeros(3, dtype=torch.int64), files=tuple(tmp_path / f"{i}.png" for i in range(3)))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if fit == "crop":  # torchvision's Resize(shorter side) then CenterCrop
        want = TF.center_crop(TF.resize(images, 3, antialias=True), [3, 4])
    else:
        want = TF.resize(images, [3, 4], antialias=True)
    mean, std = channel_stats(split, size=(3, 4), fit=fit)
    want_mean, want_std = float_stats(want)
    assert mean == pytest.approx(want_mean, abs=1e-4) and std == pytest.approx(want_std, abs=1e-4)
    other = "crop" if fit == "stretch" else "stretch"
    assert channel_stats(split, size=(3, 4), fit=other) != (mean, std)  # the positive control


def test_channel_stats_of_gray_files_have_three_channels_unless_asked(tmp_path):
    arrays = [write_image(tmp_path / f"{i}.png", mode="L", size=(4, 6), seed=i) for i in range(3)]
    split = ImageSplit(labels=torch.zeros(3, dtype=torch.int64), files=tuple(tmp_path / f"{i}.png" for i in range(3)))
    want_mean, want_std = float_stats(torch.from_numpy(np.stack(arrays))[:, None])
    mean, std = channel_stats(split)
    assert mean == pytest.approx(want_mean * 3, abs=1e-4) and std == pytest.approx(want_std * 3, abs=1e-4)
    mean, std = channel_stats(split, channels=1)
    assert mean == pytest.approx(want_mean, abs=1e-4) and std == pytest.approx(want_std, abs=1e-4)


def test_channel_stats_decode_at_most_256_files_chosen_by_the_seed(tmp_path):
    # 257 one-pixel files of values i % 256: the stats of any 256 of them differ from those of all 257
    values = [i % 256 for i in range(257)]
    files = []
    for i, value in enumerate(values):
        write_image(tmp_path / f"{i}.png", np.full((1, 1), value, dtype=np.uint8), mode="L")
        files.append(tmp_path / f"{i}.png")
    split = ImageSplit(labels=torch.zeros(257, dtype=torch.int64), files=tuple(files))

    def rounded(kept):
        x = np.array(kept) / 255
        return (round(x.mean(), 4),), (round(x.std(), 4),)

    all_but_one = {rounded(values[:k] + values[k + 1:]) for k in range(257)}
    assert rounded(values) not in all_but_one  # the positive control
    for seed in (0, 1):
        with torch.random.fork_rng():
            torch.manual_seed(100 + seed)  # the global generator must not matter
            first = channel_stats(split, channels=1, seed=seed)
        assert first in all_but_one
        assert channel_stats(split, channels=1, seed=seed) == first  # the seed's choice, again


def test_channel_stats_of_an_empty_split_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"^cannot compute the channel mean and std of an empty split"):
        channel_stats(memory_split([]))
    (tmp_path / "bad.png").write_bytes(b"broken")
    unreadable = ImageSplit(labels=torch.zeros(1, dtype=torch.int64), files=(tmp_path / "bad.png",))
    with pytest.raises(UserError, match=r"\(or one without a readable image\)$"):
        channel_stats(unreadable)


# -- convert_channels --------------------------------------------------------------------------


def test_rgb_to_gray_equals_pillows_L_exactly():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    got = convert_channels(torch.from_numpy(rgb).permute(2, 0, 1)[None], 1)
    assert got.dtype == torch.uint8 and got.shape == (1, 1, 7, 9)
    assert np.array_equal(got[0, 0].numpy(), want)


def test_rgb_to_gray_equals_pillows_L_across_the_colour_cube():
    # every red and green with blue in steps of 8, as one 2048 x 1024 image: off-by-one weights or
    # rounding change only colours whose weighted sum sits right at a rounding edge
    v = torch.arange(2**21, dtype=torch.int32)
    rgb = torch.stack([v >> 13, (v >> 5) & 255, (v & 31) * 8]).to(torch.uint8).view(1, 3, 2048, 1024)
    want = np.asarray(Image.fromarray(rgb[0].permute(1, 2, 0).numpy(), "RGB").convert("L"))
    assert np.array_equal(convert_channels(rgb, 1)[0, 0].numpy(), want)


def test_gray_to_rgb_replicates_and_float_luma_weights():
    gray = torch.randint(0, 256, (2, 1, 3, 3), dtype=torch.uint8)
    rgb = convert_channels(gray, 3)
    assert rgb.shape == (2, 3, 3, 3) and all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))
    assert convert_channels(gray, 1) is gray
    x = torch.rand(2, 3, 4, 5)
    want = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # ITU-R 601-2 luma
    assert torch.allclose(convert_channels(x, 1), want)


@pytest.mark.parametrize("have, want", [(2, 3), (2, 1), (4, 1), (4, 3), (3, 2)])
def test_other_channel_conversions_are_refused_naming_both_counts(have, want):
    with pytest.raises(ValueError, match=rf"cannot convert images with {have} channels to {want}: only 1 <-> 3"):
        convert_channels(torch.zeros(1, have, 2, 2, dtype=torch.uint8), want)
