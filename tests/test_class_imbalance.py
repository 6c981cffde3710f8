"""Class imbalance: balanced class weights, the focal loss, the class-balanced sampler.

References are independent of the code: sklearn's ``compute_class_weight``
(or its formula written out here), torch's weighted ``F.cross_entropy``, the
focal loss written per sample in plain Python, and counts of drawn labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cnnreg
from cnnreg.core.data import DatasetInfo, DataSource, ImageSplit
from cnnreg.core.errors import RecipeError
from cnnreg.inputs.batches import make_batches
from cnnreg_plugins import losses
from cnnreg_plugins.losses import bce_with_logits, cross_entropy, focal, nll

from conftest import tiny_recipe

CLASSES = ("common", "middling", "rare")


def sklearn_balanced(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """sklearn's compute_class_weight("balanced"), or its documented formula when sklearn is absent."""
    try:
        from sklearn.utils.class_weight import compute_class_weight
    except ImportError:
        counts = np.array([(labels == c).sum() for c in range(num_classes)], dtype=float)
        return len(labels) / (num_classes * counts)
    return compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)


def lopsided_labels(counts: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((c,), i, dtype=torch.int64) for i, c in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


# -- balanced class weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [cross_entropy, nll])
def test_balanced_weights_are_sklearns_and_the_loss_is_torchs_weighted_cross_entropy(factory):
    labels = lopsided_labels((50, 20, 5))
    counts = tuple(int((labels == c).sum()) for c in range(3))
    expected = torch.tensor(sklearn_balanced(labels.numpy(), 3), dtype=torch.float32)
    loss = factory(weight="balanced", num_classes=3, class_counts=counts)
    assert loss.weights.values == pytest.approx(expected.tolist())
    logits = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    targets = labels[:32]
    assert torch.allclose(loss(logits, targets), F.cross_entropy(logits, targets, weight=expected))


def test_balanced_bce_weights_each_class_column_by_sklearns_weight():
    counts = (30, 6, 4)
    expected = torch.tensor(sklearn_balanced(lopsided_labels(counts).numpy(), 3), dtype=torch.float32)
    logits, targets = torch.randn(8, 3, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])
    want = F.binary_cross_entropy_with_logits(logits, F.one_hot(targets, 3).float(), weight=expected)
    assert torch.allclose(bce_with_logits(weight="balanced", num_classes=3, class_counts=counts)(logits, targets), want)


def test_a_class_without_training_images_under_balanced_is_named():
    with pytest.raises(ValueError, match=r"index 1 has no training images.*list"):
        cross_entropy(weight="balanced", num_classes=3, class_counts=(4, 0, 2))


# -- focal -------------------------------------------------------------------------------------------------


def fixed_batch():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-2.0, 3.0, 0.0], [1.0, 1.0, -4.0]])
    return logits, torch.tensor([0, 2, 1, 1])


def focal_by_hand(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha=None) -> float:
    terms, weights = [], []
    for row, t in zip(logits.tolist(), targets.tolist()):
        p_t = math.exp(row[t]) / sum(math.exp(v) for v in row)
        a = 1.0 if alpha is None else alpha[t]
        terms.append(-a * (1 - p_t) ** gamma * math.log(p_t))
        weights.append(a)
    return sum(terms) / sum(weights)


def test_focal_with_gamma_zero_is_cross_entropy_and_with_alpha_weighted_cross_entropy():
    logits, targets = fixed_batch()
    assert torch.allclose(focal(gamma=0.0)(logits, targets), F.cross_entropy(logits, targets))
    alpha = [0.2, 1.0, 3.0]
    assert torch.allclose(focal(gamma=0.0, alpha=alpha, num_classes=3)(logits, targets),
                          F.cross_entropy(logits, targets, weight=torch.tensor(alpha)))


def test_focal_with_gamma_two_matches_the_paper_by_hand():
    logits, targets = fixed_batch()
    assert focal()(logits, targets).item() == pytest.approx(focal_by_hand(logits, targets, 2.0), rel=1e-5)
    assert focal(alpha=0.25)(logits, targets).item() == pytest.approx(0.25 * focal_by_hand(logits, targets, 2.0),
                                                                      rel=1e-5)
    alpha = [0.5, 2.0, 1.0]
    assert focal(alpha=alpha, num_classes=3)(logits, targets).item() == pytest.approx(
        focal_by_hand(logits, targets, 2.0, alpha), rel=1e-5)
    balanced = sklearn_balanced(lopsided_labels((9, 3, 3)).numpy(), 3).tolist()
    assert focal(alpha="balanced", num_classes=3, class_counts=(9, 3, 3))(logits, targets).item() == pytest.approx(
        focal_by_hand(logits, targets, 2.0, balanced), rel=1e-5)
    # the focusing term: easy examples count less than under cross entropy
    assert focal()(logits, targets) < F.cross_entropy(logits, targets)


def test_focal_is_registered_and_refuses_bad_parameters():
    assert losses.cnnreg_losses()["focal"] is focal
    with pytest.raises(ValueError, match="gamma"):
        focal(gamma=-1)
    with pytest.raises(ValueError, match="alpha has 2 entries.*3 classes"):
        focal(alpha=[1.0, 2.0], num_classes=3)


# -- the balanced sampler ----------------------------------------------------------------------------------


def ten_to_one(n_common: int = 200, n_rare: int = 20) -> ImageSplit:
    labels = lopsided_labels((n_common, n_rare), seed=3)
    n = len(labels)
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageSplit(labels=labels, images=images)


def drawn(batches, epoch: int, start_batch: int = 0) -> list[int]:
    batches.set_epoch(epoch, start_batch)
    return [int(i) for _, _, index in batches.indexed() for i in index]


def balanced(split, **kwargs):
    return make_batches(split, **{"batch_size": 16, "shuffle": True, "device": "cpu", "seed": 5,
                                  "sampler": "balanced", **kwargs})


def test_the_balanced_sampler_draws_each_class_about_equally_often():
    split = ten_to_one()
    batches = balanced(split)
    assert batches.num_samples == len(split)  # an epoch draws as many samples as the split holds
    picks = torch.tensor([i for epoch in range(40) for i in drawn(batches, epoch)])
    rare_share = (split.labels[picks] == 1).double().mean().item()
    # 8800 draws of p = 1/2: the standard deviation is 0.0053; the plain shuffle gives 1/11
    assert abs(rare_share - 0.5) < 0.03
    assert len(set(picks.tolist())) == len(split)  # with replacement, yet every image is reached


def test_balanced_orders_differ_per_epoch_and_repeat_for_the_same_seed():
    split = ten_to_one()
    first, again = balanced(split), balanced(split)
    assert drawn(first, 0) != drawn(first, 1)
    assert drawn(first, 3) == drawn(again, 3)
    assert drawn(balanced(split, seed=6), 3) != drawn(first, 3)


def test_a_balanced_epoch_resumed_mid_way_continues_the_same_order():
    split = ten_to_one()
    whole = drawn(balanced(split), 2)
    assert drawn(balanced(split), 2, start_batch=5) == whole[5 * 16:]


@pytest.mark.parametrize("n_rare", [20, 21])  # 220 and 221 samples: the second pads rank 1 by wrapping
def test_the_rank_shards_of_a_balanced_epoch_interleave_to_the_single_process_draw(n_rare):
    split = ten_to_one(n_rare=n_rare)
    single = drawn(balanced(split), 4)
    shards = [drawn(balanced(split, rank=r, world_size=2), 4) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(split) / 2)
    padded = (single * 2)[: 2 * len(shards[0])]
    assert [i for pair in zip(*shards) for i in pair] == padded


def write_files(tmp_path: Path, split: ImageSplit) -> ImageSplit:
    files = []
    for i, value in enumerate(split.images[:, 0, 0, 0].tolist()):
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(np.full((2, 2, 3), value, dtype=np.uint8)).save(path)
        files.append(path)
    return ImageSplit(labels=split.labels, files=tuple(files))


def test_the_worker_path_draws_the_same_balanced_order_resumes_and_shards(tmp_path):
    split = ten_to_one(n_rare=21)
    files = write_files(tmp_path, split)
    kwargs = dict(image_size=(2, 2), channels=3, num_workers=0)
    memory_order = drawn(balanced(split), 1)
    from_files = balanced(files, **kwargs)
    assert drawn(from_files, 1) == memory_order
    from_files.set_epoch(1)
    images = torch.cat([images for images, _ in from_files])[:, 0, 0, 0]
    assert images.tolist() == split.images[torch.tensor(memory_order), 0, 0, 0].tolist()  # decoded in that order
    assert drawn(balanced(files, **kwargs), 1, start_batch=3) == memory_order[3 * 16:]
    shards = [drawn(balanced(files, rank=r, world_size=2, **kwargs), 1) for r in range(2)]
    assert [i for pair in zip(*shards) for i in pair] == (memory_order * 2)[: 2 * len(shards[0])]


# -- a recipe ----------------------------------------------------------------------------------------------

TRAIN_COUNTS, TEST_COUNTS = (96, 24, 8), (8, 8, 8)


def _lopsided_source(image_size: int) -> DataSource:
    def split(counts, seed):
        labels = lopsided_labels(counts, seed)
        images = torch.randint(0, 256, (len(labels), 3, image_size, image_size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(seed))
        # a class-coloured corner, so there is something to learn
        images[:, 0, :2, :2] = (labels * 100).to(torch.uint8).view(-1, 1, 1)
        return ImageSplit(labels=labels, images=images)

    return DataSource(train=split(TRAIN_COUNTS, 0), test=split(TEST_COUNTS, 1), classes=CLASSES,
                      image_size=(image_size, image_size), channels=3)


def _describe_labelled(image_size: int = 8) -> DatasetInfo:
    source = _lopsided_source(image_size)
    return DatasetInfo(classes=CLASSES, image_size=(image_size, image_size), channels=3,
                       splits=("train", "test"), labels={"train": source.train.labels, "test": source.test.labels})


def _describe_sizes(image_size: int = 8) -> DatasetInfo:
    return DatasetInfo(classes=CLASSES, image_size=(image_size, image_size), channels=3, splits=("train", "test"),
                       split_sizes={"train": sum(TRAIN_COUNTS), "test": sum(TEST_COUNTS)})


@cnnreg.describes(_describe_labelled)
def lopsided(image_size: int = 8) -> DataSource:
    """Three classes of 12:3:1 training images."""
    return _lopsided_source(image_size)


@cnnreg.describes(_describe_sizes)
def lopsided_sizes_only(image_size: int = 8) -> DataSource:
    """As lopsided, but described by its split sizes alone."""
    return _lopsided_source(image_size)


class LopsidedData:
    @cnnreg.hookimpl
    def cnnreg_datasets(self):
        return {"lopsided": lopsided, "lopsided_sizes_only": lopsided_sizes_only}


def lopsided_recipe(tmp_path: Path, dataset: str = "lopsided", **loss) -> dict:
    recipe = tiny_recipe(tmp_path, trainer__epochs=1)
    recipe["data"] = {"name": dataset, "batch_size": 16, "subset": 0.75, "sampler": "balanced"}
    recipe["transforms"] = {"train": [{"name": "normalize"}], "eval": [{"name": "normalize"}]}
    recipe["loss"] = {"name": "cross_entropy", "weight": "balanced", **loss}
    return recipe


def weight_choice(choices, key="loss.weight"):
    return next(c.value for c in choices if c.key == key)


def test_a_balanced_recipe_trains_with_the_weights_validate_reports(tmp_path):
    recipe = lopsided_recipe(tmp_path)
    checked = cnnreg.validate(recipe, extra=[LopsidedData()])
    run = cnnreg.build(cnnreg.load_recipe(recipe, extra=[LopsidedData()]))
    labels = run.data.train.labels.numpy()  # after the validation split and the 75% subset
    assert len(labels) < sum(TRAIN_COUNTS)
    expected = sklearn_balanced(labels, 3)
    assert weight_choice(run.choices) == pytest.approx(expected.tolist(), rel=1e-5)
    assert weight_choice(checked.choices) == weight_choice(run.choices)
    assert run.loss_fn.weights.values == pytest.approx(expected.tolist())
    batches = run.batches["train"]
    batches.set_epoch(0)
    drawn_labels = torch.cat([labels for _, labels in batches])
    assert len(drawn_labels) == len(labels)
    assert (drawn_labels == 2).sum() > 2 * (labels == 2).sum()  # the rare class drawn far more than its share
    assert cnnreg.fit(run).stopped == "completed"
    recorded = json.loads((run.run_dir / "run.json").read_text())["defaults"]
    assert weight_choice([SimpleNamespace(**d) for d in recorded]) == weight_choice(run.choices)


def test_validate_without_the_labels_says_the_balanced_weights_are_not_checked(tmp_path):
    checked = cnnreg.validate(lopsided_recipe(tmp_path, "lopsided_sizes_only"), extra=[LopsidedData()])
    assert not [c for c in checked.choices if c.key == "loss.weight"]
    notes = [str(u) for u in checked.unchecked]
    assert any("balanced" in note and "class counts" in note for note in notes), notes


def test_a_class_left_without_training_images_is_named_in_the_recipe_error(tmp_path):
    recipe = lopsided_recipe(tmp_path)
    recipe["data"]["subset"] = 3  # a stratified subset of 3 of 128+: the rare class gets none
    with pytest.raises(RecipeError, match=r"loss.*weight.*'rare' has no training images"):
        cnnreg.validate(recipe, extra=[LopsidedData()])


def test_balanced_sampling_cannot_be_combined_with_shuffle_off(tmp_path):
    recipe = lopsided_recipe(tmp_path)
    recipe["data"]["shuffle"] = False
    with pytest.raises(RecipeError, match="sampler.*balanced.*shuffle"):
        cnnreg.load_recipe(recipe, extra=[LopsidedData()])
