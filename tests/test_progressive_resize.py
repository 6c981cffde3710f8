"""progressive_resize: the size per epoch follows the schedule, the pixels are torch's antialiased resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cnnreg
from cnnreg_plugins.progressive_resize import progressive_resize

from conftest import tiny_recipe


def test_the_size_of_each_epoch_follows_the_linear_schedule():
    resize = progressive_resize(start_fraction=0.5, end_epoch=5, size_multiple=4)
    x = torch.rand(2, 3, 40, 24)
    # by hand: fraction 0.5 + 0.5 * (e - 1) / 4 -> 0.5, 0.625, 0.75, 0.875, then 1;
    # 40 * f = 20, 25, 30, 35 -> multiples of 4: 20, 24, 32 (7.5 rounds to 8), 36; 24 * f = 12, 15, 18, 21 -> 12, 16, 16, 20
    expected = {1: (20, 12), 2: (24, 16), 3: (32, 16), 4: (36, 20), 5: (40, 24), 9: (40, 24)}
    for epoch, size in expected.items():
        assert tuple(resize(x, index=torch.arange(2), epoch=epoch).shape[-2:]) == size


def test_the_docstring_count_of_distinct_sizes():
    resize = progressive_resize(start_fraction=0.5, end_epoch=8, size_multiple=8)
    sizes = {resize.size((32, 32), epoch) for epoch in range(1, 12)}
    assert sizes == {(16, 16), (24, 24), (32, 32)}


def test_the_batch_is_torch_antialiased_bilinear_resize():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = progressive_resize(start_fraction=0.5, end_epoch=4)(x, index=torch.arange(4), epoch=1)
    assert torch.equal(out, F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True))


def test_outside_training_the_batch_is_untouched():
    x = torch.rand(2, 3, 32, 32)
    resize = progressive_resize(start_fraction=0.25, end_epoch=4)
    assert resize(x) is x and resize(x, index=torch.arange(2), epoch=0) is x


def test_a_recipe_trains_on_growing_images_and_evaluates_at_full_size(tmp_path):
    transforms = {"train": [{"name": "normalize"}, {"name": "progressive_resize", "start_fraction": 0.75,
                                                     "end_epoch": 3, "size_multiple": 4}],
                  "eval": [{"name": "normalize"}]}
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=4, transforms=transforms))
    run = cnnreg.build(recipe, output=False)
    seen = []
    forward = run.model.forward

    def spy(x):
        seen.append((run.model.training, tuple(x.shape[-2:])))
        return forward(x)

    run.model.forward = spy
    result = cnnreg.fit(run)
    train_sizes = [size for training, size in seen if training]
    eval_sizes = {size for training, size in seen if not training}
    per_epoch = len(train_sizes) // 4
    # 12x12 images: epoch 1 at 0.75 -> 9 -> a multiple of 4: 8; epoch 2 at 0.875 -> 10.5 -> 12; then full
    assert [train_sizes[i * per_epoch] for i in range(4)] == [(8, 8), (12, 12), (12, 12), (12, 12)]
    assert eval_sizes == {(12, 12)}
    assert result.records[-1].metrics["train_loss"] < result.records[0].metrics["train_loss"]
