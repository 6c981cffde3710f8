"""The parts a record-speed CIFAR-10 run is assembled from, each usable on its own:
sample-aware transforms (the alternating flip), test-time augmentation, moving
averages of the weights, bf16 weights with fp32 batch norm, data-dependent
initialisation and the per-step hook."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import cnnreg
from cnnreg.assemble import checks as assembly
from cnnreg.core import stops
from cnnreg.inputs.batches import make_batches
from cnnreg.core.data import ImageSplit
from cnnreg.core.errors import RecipeError
from cnnreg.inputs.prepare import merge_views, prepare_batch, view_weights
from cnnreg.plugin.hookspecs import hookimpl
from cnnreg_plugins.alternating_flip import alternating_horizontal_flip, starts_flipped
from cnnreg_plugins.tta import tta
from cnnreg_plugins.weight_averaging import ema, lookahead

from conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


# -- views and their merging ---------------------------------------------------------------


def test_tta_views_are_the_image_its_mirror_and_one_pixel_shifts_weighted_half_and_quarters():
    x = torch.rand(2, 3, 8, 8)
    views = tta(flip=True, translate=1)(x)
    assert views.shape == (12, 3, 8, 8)
    v = views.unflatten(0, (6, 2))
    assert torch.equal(v[0], x) and torch.equal(v[1], x.flip(-1))
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    assert torch.equal(v[2], padded[..., :8, :8]) and torch.equal(v[4], padded[..., 2:, 2:])
    assert torch.equal(v[3], v[2].flip(-1)) and torch.equal(v[5], v[4].flip(-1))
    weights = tta(flip=True, translate=1).view_weights
    assert weights == (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)
    assert tta(flip=True).view_weights == (0.5, 0.5)


def test_merged_logits_are_the_weighted_average_of_the_views():
    logits = torch.randn(3 * 4, 5)
    weights = (0.5, 0.25, 0.25)
    expected = sum(w * logits[i * 4:(i + 1) * 4] for i, w in enumerate(weights))
    assert torch.allclose(merge_views(logits, weights), expected)
    assert merge_views(logits, None) is logits


def test_views_of_two_expanding_transforms_multiply():
    first, second = tta(flip=True), tta(flip=False, translate=1)
    weights = view_weights([first, lambda x: x, second])
    assert len(weights) == 6 and math.isclose(sum(weights), 1.0)
    # the second's views are the outer index: its first (weight 0.5) covers the first two
    assert weights[:2] == (0.25, 0.25)


def test_tta_that_makes_no_view_is_refused():
    with pytest.raises(ValueError, match=r"^tta with flip false and translate 0 makes no extra view: enable one"):
        tta(flip=False, translate=0)


def test_tta_by_default_is_the_image_and_its_mirror():
    # the documented default: flip on, no shifts -- two views, half the weight each
    x = torch.rand(3, 2, 4, 5)
    default = tta()
    assert default.view_weights == (0.5, 0.5)
    assert torch.equal(default(x), torch.cat([x, x.flip(-1)]))


def test_tta_shifts_non_square_images_by_translate_pixels_each_way():
    # 6x9 images and t=2: a swapped height/width or a wrong offset shows
    x = torch.rand(2, 3, 6, 9)
    views = tta(flip=False, translate=2)(x).unflatten(0, (3, 2))
    padded = nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")  # torch's reflect padding, as documented
    assert torch.equal(views[0], x)
    assert torch.equal(views[1], padded[:, :, 0:6, 0:9])  # content moved down-right: the up-left shift
    assert torch.equal(views[2], padded[:, :, 4:10, 4:13])
    # the interior of a shifted view is the image moved by exactly 2 pixels on both axes
    assert torch.equal(views[1][..., 2:, 2:], x[..., :-2, :-2]) and torch.equal(views[2][..., :-2, :-2], x[..., 2:, 2:])


@pytest.mark.parametrize("translate", [6, 7])
def test_tta_translate_as_large_as_the_image_is_refused_naming_both_sizes(translate):
    # reflect padding needs a shift smaller than the shorter side (6 of 6x9); 5 still works
    x = torch.rand(1, 3, 6, 9)
    assert tta(flip=False, translate=5)(x).shape == (3, 3, 6, 9)
    with pytest.raises(ValueError, match=rf"^tta translate {translate} must be smaller than the images \(6x9\)"):
        tta(flip=False, translate=translate)(x)


# -- the alternating flip --------------------------------------------------------------------


def test_alternating_flip_shows_every_image_mirrored_exactly_every_other_epoch():
    flip = alternating_horizontal_flip(seed=3)
    index = torch.arange(4000)
    first, second, third = (flip.flipped(index, epoch) for epoch in (1, 2, 3))
    assert torch.equal(first, ~second) and torch.equal(first, third)
    assert 0.45 < first.float().mean() < 0.55
    # neighbouring indices are not in lockstep (a poor hash would alternate)
    assert 0.4 < (first[1:] == first[:-1]).float().mean() < 0.6
    assert not torch.equal(first, alternating_horizontal_flip(seed=4).flipped(index, 1))
    x = torch.rand(4, 3, 5, 5)
    out = flip(x, index=index[:4], epoch=1)
    for i in range(4):
        assert torch.equal(out[i], x[i].flip(-1) if first[i] else x[i])


def test_odd_epochs_flip_the_images_that_start_flipped_and_even_epochs_the_others():
    flip = alternating_horizontal_flip(seed=5)
    index = torch.arange(1000)
    first = starts_flipped(index, 5)  # documented: whether an image is flipped in odd epochs
    for epoch in (1, 3, 5):
        assert torch.equal(flip.flipped(index, epoch), first)
    for epoch in (2, 4, 6):
        assert torch.equal(flip.flipped(index, epoch), ~first)


def test_which_images_flip_depends_on_the_index_value_not_its_dtype():
    # a caller's int32 indices flip the same images as the engine's int64 ones (large indices: no overflow)
    index = torch.arange(0, 3_000_000, 997)
    assert torch.equal(starts_flipped(index.to(torch.int32), 2), starts_flipped(index, 2))


def test_different_flip_seeds_choose_nearly_independent_halves():
    # "a fair coin per index and seed": two seeds agree on about half the images, not most or few
    index = torch.arange(50_000)
    flips = [starts_flipped(index, seed) for seed in range(10)]
    for a in range(10):
        assert 0.45 < flips[a].float().mean() < 0.55
        for b in range(a):
            agreement = (flips[a] == flips[b]).float().mean().item()
            assert 0.35 < agreement < 0.65, (a, b, agreement)


def test_without_sample_indices_the_flip_is_a_fair_random_one():
    # a preview of the augmentations has no indices: each image mirrored or not, at random
    torch.manual_seed(0)
    x = torch.rand(200, 3, 4, 5)  # batch 200, 3 channels: a mix-up of the two sizes shows
    out = alternating_horizontal_flip()(x)
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(200)]
    assert all(m or torch.equal(out[i], x[i]) for i, m in enumerate(mirrored))
    assert 60 < sum(mirrored) < 140


def test_the_flip_seed_defaults_to_what_the_recipe_schema_documents():
    # editors show recipe.schema.json's defaults: a recipe without a seed flips what they promise
    schema = json.loads((REPO / "recipes" / "recipe.schema.json").read_text())
    documented = schema["$defs"]["TransformAlternatingHorizontalFlip"]["properties"]["seed"]["default"]
    assert alternating_horizontal_flip().seed == documented
    index = torch.arange(100)
    assert torch.equal(alternating_horizontal_flip().flipped(index, 1), starts_flipped(index, documented))


def test_batches_carry_each_samples_index_in_its_split(tmp_path):
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    split = ImageSplit(images=images, labels=torch.arange(20) % 3)
    for shuffle in (False, True):
        batches = make_batches(split, batch_size=6, shuffle=shuffle, device="cpu", seed=1)
        batches.set_epoch(2)
        seen = []
        for batch, labels, index in batches.indexed():
            assert torch.equal(batch[:, 0, 0, 0].long(), index) and torch.equal(labels, index % 3)
            seen += index.tolist()
        assert sorted(seen) == list(range(20))


class IndexRecorder:
    """A transform that asks for sample indices and writes down what it gets."""

    uses_sample_index = True

    def __init__(self):
        self.calls: list[tuple[int, list[int] | None]] = []

    def __call__(self, x, index=None, epoch=0):
        self.calls.append((epoch, None if index is None else index.tolist()))
        return x


class RecorderPlugin:
    def __init__(self):
        self.recorder = IndexRecorder()

    @hookimpl
    def cnnreg_transforms(self):
        return {"record_index": lambda: self.recorder}


def test_training_hands_sample_aware_transforms_each_samples_index_and_the_epoch(tmp_path):
    plugin = RecorderPlugin()
    recipe = tiny_recipe(tmp_path, trainer__epochs=2, transforms={"train": [{"name": "record_index"}],
                                                                  "eval": []})
    cnnreg.fit(cnnreg.build(cnnreg.load_recipe(recipe, extra=[plugin])))
    training = [(epoch, index) for epoch, index in plugin.recorder.calls if epoch > 0]
    for epoch in (1, 2):
        indices = [i for e, index in training if e == epoch for i in index]
        assert sorted(indices) == list(range(192))  # every training image once, by its index


# -- test-time augmentation in evaluation and prediction -------------------------------------


def test_tta_evaluates_every_image_once_and_changes_the_logits_not_the_count(tmp_path):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=3)))
    cnnreg.fit(run)
    plain = cnnreg.evaluate(run, "test")
    with_tta = cnnreg.evaluate(dataclasses.replace(run, eval_transforms=run.eval_transforms + (tta(translate=1),)), "test")
    assert sum(with_tta.per_class["support"]) == sum(plain.per_class["support"]) == 48
    assert with_tta.metrics["accuracy"] > 0.6
    assert with_tta.metrics["loss"] != plain.metrics["loss"]


def test_a_batch_larger_than_the_training_split_with_drop_last_is_refused_before_training(tmp_path):
    recipe = tiny_recipe(tmp_path, data__batch_size=256, data__drop_last=True)
    with pytest.raises(RecipeError, match=r"data\.batch_size: the training split has 192 images, fewer than one "
                                          r"batch of 256 with drop_last.*lower data\.batch_size"):
        cnnreg.build(cnnreg.load_recipe(recipe), output=False)


def test_tta_in_training_transforms_is_refused_with_where_it_belongs(tmp_path):
    recipe = tiny_recipe(tmp_path, transforms={"train": [{"name": "tta"}], "eval": []})
    with pytest.raises(RecipeError, match=r"transforms\.train\[0\].*move it to transforms\.eval"):
        cnnreg.build(cnnreg.load_recipe(recipe), output=False)


def test_predict_with_tta_gives_one_answer_per_image(tmp_path):
    recipe = tiny_recipe(tmp_path, trainer__epochs=3,
                         transforms={"train": [{"name": "normalize"}],
                                     "eval": [{"name": "normalize"}, {"name": "tta", "translate": 1}]})
    run = cnnreg.build(cnnreg.load_recipe(recipe))
    cnnreg.fit(run)
    images = run.data.train.images[:5]
    answers = cnnreg.predict(run, list(images))
    assert len(answers) == 5 and all(0 < a.confidences[0] <= 1 for a in answers)
    right = sum(a.indices[0] == int(label) for a, label in zip(answers, run.data.train.labels[:5]))
    assert right >= 3


# -- moving averages of the weights ----------------------------------------------------------


def _fake_run(model):
    return SimpleNamespace(model=model)


def test_ema_moves_the_average_by_one_minus_decay_and_swaps_it_in_for_evaluation():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = ema(decay=0.75)
    run = _fake_run(model)
    average.cnnreg_fit_start(run=run, start_epoch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(4.0)
        model[1].running_mean.add_(8.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    average.cnnreg_optimizer_step(run=run, epoch=1, step=1, total_steps=10)
    assert torch.allclose(average.average[0], before["0.weight"] + 1.0)  # 0.25 of the way to +4
    assert torch.equal(model[0].weight, trained["0.weight"])  # ema leaves the training weights alone

    average.cnnreg_evaluate_start(run=run, split="val")
    assert torch.allclose(model[0].weight, before["0.weight"] + 1.0)
    assert torch.allclose(model[1].running_mean, before["1.running_mean"] + 2.0)
    average.cnnreg_epoch_start(run=run, epoch=2)
    assert torch.equal(model[0].weight, trained["0.weight"])
    assert model[1].num_batches_tracked.dtype == torch.int64  # integer buffers are left out


def test_lookahead_resets_the_weights_to_the_slow_copy_on_its_steps_only():
    model = nn.Linear(2, 2)
    slow = lookahead(decay=0.5, every=2, ramp_power=0.0)
    run = _fake_run(model)
    slow.cnnreg_fit_start(run=run, start_epoch=1)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    slow.cnnreg_optimizer_step(run=run, epoch=1, step=1, total_steps=4)  # not its step
    assert torch.equal(model.weight, start + 2.0)
    slow.cnnreg_optimizer_step(run=run, epoch=1, step=2, total_steps=4)
    assert torch.allclose(model.weight, start + 1.0) and torch.equal(slow.average[0], model.weight)
    assert slow.decay_at(2, 4) == 0.5
    assert lookahead().decay_at(5, 10) == pytest.approx(0.95**5 * 0.5**3)


def test_ema_with_eval_with_average_false_validates_the_training_weights_and_ends_with_the_average():
    model = nn.Linear(2, 3)
    average = ema(decay=0.5, eval_with_average=False)
    run = _fake_run(model)
    average.cnnreg_fit_start(run=run, start_epoch=1)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    average.cnnreg_optimizer_step(run=run, epoch=1, step=1, total_steps=4)
    average.cnnreg_evaluate_start(run=run, split="val")
    assert torch.equal(model.weight, start + 2.0) and not average.swapped  # the training weights
    average.cnnreg_fit_end(run=run, result=None)
    assert torch.allclose(model.weight, start + 1.0)  # half-way: decay 0.5


def test_the_default_ema_moves_a_thousandth_of_the_way_every_step():
    # documented: decay 0.999, every optimizer step
    model = nn.Linear(2, 3)
    average = ema()
    run = _fake_run(model)
    average.cnnreg_fit_start(run=run, start_epoch=1)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.cnnreg_optimizer_step(run=run, epoch=1, step=1, total_steps=100)
    assert torch.allclose(average.average[0], start + 0.001, atol=1e-6)


def test_the_default_lookahead_resets_the_weights_every_fifth_step():
    # airbench's defaults: every 5 steps, decay 0.95**5 at the end of training
    model = nn.Linear(2, 3)
    slow = lookahead()
    run = _fake_run(model)
    slow.cnnreg_fit_start(run=run, start_epoch=1)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for step in range(1, 5):
        slow.cnnreg_optimizer_step(run=run, epoch=1, step=step, total_steps=5)
        assert torch.equal(model.weight, start + 1.0)
    slow.cnnreg_optimizer_step(run=run, epoch=1, step=5, total_steps=5)  # the last step: the full decay
    assert torch.allclose(model.weight, start + (1 - 0.95**5))


def test_a_ramped_decay_is_reached_in_full_on_a_one_step_run():
    # step 1 of 1 is the end of training: (1/1) ** power
    assert lookahead(decay=0.8, every=1, ramp_power=3.0).decay_at(1, 1) == pytest.approx(0.8)
    assert lookahead(decay=0.8, every=1, ramp_power=3.0).decay_at(1, 2) == pytest.approx(0.8 * 0.5**3)


def test_a_swapped_in_average_survives_saving_and_loading(tmp_path):
    model = nn.Linear(2, 3)
    run = _fake_run(model)
    average = ema(decay=0.5)
    average.cnnreg_fit_start(run=run, start_epoch=1)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    average.cnnreg_optimizer_step(run=run, epoch=1, step=1, total_steps=4)
    average.cnnreg_evaluate_start(run=run, split="val")  # the model holds the average (start + 1)
    torch.save(average.state_dict(), tmp_path / "state.pt")  # as last.pt keeps it

    restored = ema(decay=0.5)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert restored.swapped
    restored.cnnreg_fit_start(run=run, start_epoch=2)
    restored.cnnreg_epoch_start(run=run, epoch=2)  # swaps the training weights back in
    assert torch.equal(model.weight, start + 2.0) and not restored.swapped
    assert torch.allclose(restored.average[0], start + 1.0)


def test_lookahead_with_no_decay_changes_nothing(tmp_path):
    changes = dict(trainer__epochs=2, trainer__deterministic=True)
    plain = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "a", **changes)))
    cnnreg.fit(plain)
    slow = cnnreg.build(cnnreg.load_recipe(tiny_recipe(
        tmp_path / "b", **changes, callbacks=[{"name": "lookahead", "decay": 0.0, "every": 1}])))
    cnnreg.fit(slow)
    for key, value in plain.model.state_dict().items():
        assert torch.allclose(value.float(), slow.model.state_dict()[key].float(), atol=1e-6), key


class InterruptAfterEpoch:
    def __init__(self, epoch):
        self.epoch = epoch

    @hookimpl
    def cnnreg_epoch_end(self, run, record):
        if record.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_run_with_an_ema_resumes_to_the_same_weights_and_ends_holding_the_average(tmp_path):
    changes = dict(trainer__epochs=3, trainer__deterministic=True,
                   callbacks=[{"name": "ema", "decay": 0.9}, {"name": "checkpoint"}])
    straight = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "a", **changes)))
    result = cnnreg.fit(straight)
    # The model ends holding the average, which is what validation reported
    # (the training weights are in the callback while it is swapped in).
    ema_callback = straight.callbacks[0]
    training_weights = ema_callback.average
    held = [t for t in straight.model.state_dict().values() if t.is_floating_point()]
    assert ema_callback.swapped and not all(torch.equal(a, m) for a, m in zip(training_weights, held))
    assert cnnreg.evaluate(straight, "val").metrics["accuracy"] == result.records[-1].metrics["val_accuracy"]

    interrupted = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "b", **changes),
                                                  extra=[InterruptAfterEpoch(2)]))
    with pytest.raises(stops.Interrupted):
        cnnreg.fit(interrupted)
    resumed = cnnreg.build(cnnreg.load_recipe(interrupted.run_dir / "recipe.json"), run_dir=interrupted.run_dir)
    cnnreg.fit(resumed, resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


# -- bf16 weights with fp32 batch norm ------------------------------------------------------


def test_bf16_true_keeps_weights_in_bf16_and_batch_norm_in_fp32_and_trains(tmp_path):
    recipe = tiny_recipe(tmp_path, trainer__epochs=5, trainer__precision="bf16-true",
                         model={"name": "simple_cnn", "widths": [8, 8, 8], "batch_norm": True})
    run = cnnreg.build(cnnreg.load_recipe(recipe))
    convs = [m for m in run.model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in run.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and norms
    assert all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(m.weight.dtype == torch.float32 and m.running_var.dtype == torch.float32 for m in norms)
    cnnreg.fit(run)
    assert cnnreg.evaluate(run, "test").metrics["accuracy"] > 0.6
    assert all(m.running_var.dtype == torch.float32 for m in norms)
    answer = cnnreg.predict(run, [run.data.test.images[0]])[0]
    assert 0 < answer.confidences[0] <= 1


# -- data-dependent initialisation and the per-step hook -----------------------------------


def test_build_initialises_a_model_from_training_images_as_evaluation_sees_them(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "whitening_cnn", "widths": [8, 8, 8]}))
    run = cnnreg.build(recipe, output=False)
    images = assembly.sample_images(run.data.train, run.model.cnnreg_init_images, run.data.image_size, 3)
    expected = torch.nn.Conv2d(3, 24, 2)
    model = run.model
    saved = model.whiten.weight.detach().clone()
    with torch.no_grad():
        model.whiten.weight.copy_(expected.weight)
    model.cnnreg_init_from_data(prepare_batch(images, run.eval_transforms, channels_last=False))
    assert torch.allclose(model.whiten.weight, saved)
    assert not torch.allclose(saved, expected.weight)


class StepCounter:
    def __init__(self):
        self.steps: list[tuple[int, int, int]] = []

    @hookimpl
    def cnnreg_optimizer_step(self, run, epoch, step, total_steps):
        self.steps.append((epoch, step, total_steps))


def test_the_step_hook_counts_optimizer_steps_across_epochs_with_accumulation(tmp_path):
    counter = StepCounter()
    recipe = tiny_recipe(tmp_path, trainer__epochs=2, trainer__accumulate=2)
    cnnreg.fit(cnnreg.build(cnnreg.load_recipe(recipe, extra=[counter])))
    per_epoch = math.ceil(math.ceil(192 / 32) / 2)
    assert [s for _, s, _ in counter.steps] == list(range(1, 2 * per_epoch + 1))
    assert {t for _, _, t in counter.steps} == {2 * per_epoch}
    assert [e for e, _, _ in counter.steps] == [1] * per_epoch + [2] * per_epoch


# -- the speedrun recipe, shrunk to run on the CPU ------------------------------------------


def test_the_speedrun_recipe_trains_on_the_cpu_when_shrunk(tmp_path):
    raw = json.loads((REPO / "recipes" / "cifar10-speedrun.json").read_text())
    raw.update(data={"name": "synthetic", "num_classes": 4, "image_size": 16, "train_size": 512, "val_size": 0,
                     "test_size": 128, "batch_size": 64, "drop_last": True},
               output_dir=str(tmp_path / "runs"))
    raw["model"]["widths"] = [16, 32, 32]
    raw["trainer"].update(epochs=4, compile="off", precision="fp32", progress="off")
    for spec in raw["transforms"]["train"] + raw["transforms"]["eval"]:
        spec.pop("mean", None), spec.pop("std", None)
    raw["transforms"]["train"][2]["size"] = 16
    raw["optimizer"]["lr"] = 0.2  # the recipe's rate is for batch 1024
    run = cnnreg.build(cnnreg.load_recipe(raw))
    assert len(run.optimizer.param_groups) == 3  # whiten bias, bias/norm (64x), the rest
    cnnreg.fit(run)
    assert cnnreg.evaluate(run, "test").metrics["accuracy"] > 0.5  # four classes: chance is 1/4


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_bf16_true_run_with_tta_exports_in_fp32_with_one_answer_per_image(tmp_path, fmt, capsys):
    from cnnreg.cli import main

    recipe = tiny_recipe(tmp_path, trainer__epochs=1, trainer__precision="bf16-true",
                         model={"name": "simple_cnn", "widths": [8, 8, 8], "batch_norm": True},
                         transforms={"train": [{"name": "normalize"}],
                                     "eval": [{"name": "normalize"}, {"name": "tta", "translate": 1}]},
                         callbacks=[{"name": "checkpoint"}])
    run = cnnreg.build(cnnreg.load_recipe(recipe))
    cnnreg.fit(run)
    output = tmp_path / f"model.{fmt}"
    assert main(["export", str(run.run_dir), "--format", fmt, "-o", str(output)]) == 0
    assert "outputs match the model" in capsys.readouterr().out
    if fmt == "pt2":
        logits = torch.export.load(str(output)).module()(torch.rand(5, 3, 12, 12))
        assert logits.shape == (5, 3) and logits.dtype == torch.float32
