"""Batch mixing (mixup, cutmix, timm's switch) against timm's ``Mixup``, the losses on soft
targets against hand-written formulas, and mixing in whole runs: training, determinism,
resume, and the recipe errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data import mixup as timm_mixup

import cnnreg
from cnnreg.core.data import DataContext
from cnnreg.core.errors import RecipeError
from cnnreg.core.stops import Interrupted
from cnnreg.engine import step, tallies
from cnnreg_plugins import losses
from cnnreg_plugins.batch_mixing import MixParams, cutmix, cutmix_boxes, mixup, mixup_cutmix

from conftest import tiny_recipe
from test_engine import InterruptAt, final_weights

CLASSES = 5


def context(num_classes: int = CLASSES) -> DataContext:
    return DataContext(image_size=(12, 10), channels=3, num_classes=num_classes)


def batch(size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 3, 12, 10, generator=generator)
    return x, torch.randint(0, CLASSES, (size,), generator=generator)


def params(lam, cut, boxes=None) -> MixParams:
    """MixParams from timm's per-sample lambdas and boxes (yl, yh, xl, xh); no box when not cut."""
    n = len(lam)
    boxes = boxes or [(0, 0, 0, 0)] * n
    column = [torch.tensor([b[k] for b in boxes], dtype=torch.int64) for k in range(4)]
    return MixParams(torch.tensor(lam, dtype=torch.float32), torch.tensor(cut), *column)


# -- (a) against timm ----------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.13, 0.5, 0.77, 0.999, 1.0])
def test_cutmix_boxes_and_corrected_lambda_are_timms(lam, monkeypatch):
    lam = float(np.float32(lam))  # the value our float32 draw would hold
    height, width = 12, 10
    for cy in (0, 3, 11):
        for cx in (0, 5, 9):
            centres = iter([cy, cx])
            monkeypatch.setattr(timm_mixup.np.random, "randint", lambda *a, **k: next(centres))
            (yl, yh, xl, xh), corrected = timm_mixup.cutmix_bbox_and_lam((3, height, width), lam, correct_lam=True)
            monkeypatch.undo()
            box = cutmix_boxes(torch.tensor([lam]), torch.tensor([cy]), torch.tensor([cx]), height, width)
            assert [int(t) for t in box] == [yl, yh, xl, xh]
            area = (int(box[1]) - int(box[0])) * (int(box[3]) - int(box[2]))
            assert 1 - area / (height * width) == pytest.approx(corrected, abs=1e-12)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_batch_mode_images_and_soft_targets_are_timms_for_timms_draw(kind):
    x, y = batch()
    mixer = Mixup(mixup_alpha=1.0 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0,
                  label_smoothing=0.1, num_classes=CLASSES)
    np.random.seed(3)  # timm draws from numpy: replay its draw to learn the lambda and box it used
    lam, use_cutmix = mixer._params_per_batch()
    box = [(0, 0, 0, 0)]
    if use_cutmix:
        box_t, lam = timm_mixup.cutmix_bbox_and_lam(x.shape, lam, correct_lam=True)
        box = [tuple(int(v) for v in box_t)]
    assert 0 < lam < 1 and use_cutmix == (kind == "cutmix")
    np.random.seed(3)
    expected_x, expected_y = mixer(x.clone(), y)

    ours = (mixup if kind == "mixup" else cutmix)(smoothing=0.1, context=context())
    drawn = params([lam] * len(x), [use_cutmix] * len(x), box * len(x))
    torch.testing.assert_close(ours.apply(x, drawn), expected_x)
    torch.testing.assert_close(ours.mix_targets(y, drawn), expected_y)


def test_elem_mode_with_both_kinds_is_timms_for_timms_draws():
    x, y = batch(size=8, seed=1)
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5, mode="elem",
                  label_smoothing=0.1, num_classes=CLASSES)
    np.random.seed(7)  # replay timm's per-sample draws, boxes drawn in its loop order
    lam, use_cutmix = mixer._params_per_elem(len(x))
    lam, boxes = [float(v) for v in lam], [(0, 0, 0, 0)] * len(x)
    for i in range(len(x)):
        if lam[i] != 1.0 and use_cutmix[i]:
            box, lam[i] = timm_mixup.cutmix_bbox_and_lam(x[i].shape, lam[i], correct_lam=True)
            boxes[i] = tuple(int(v) for v in box)
    cut = [bool(c) and lam[i] != 1.0 for i, c in enumerate(use_cutmix)]
    assert any(cut) and not all(cut)  # this seed exercises both kinds
    np.random.seed(7)
    expected_x, expected_y = mixer(x.clone(), y)

    ours = mixup_cutmix(mode="elem", smoothing=0.1, context=context())
    drawn = params(lam, cut, boxes)
    torch.testing.assert_close(ours.apply(x, drawn), expected_x)
    torch.testing.assert_close(ours.mix_targets(y, drawn), expected_y)


def test_draws_follow_the_probabilities_and_the_boxes_fix_lambda():
    x = torch.rand(4000, 1, 12, 10)
    torch.manual_seed(0)
    drawn = mixup_cutmix(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25, mode="elem",
                         context=context()).draw(x)
    mixed = drawn.lam < 1
    assert mixed.float().mean().item() == pytest.approx(0.6, abs=0.03)
    assert drawn.cut[mixed].float().mean().item() == pytest.approx(0.25, abs=0.03)
    area = ((drawn.bottom - drawn.top) * (drawn.right - drawn.left)).float()
    assert (area[~mixed] == 0).all()  # a cut whose box rounds to nothing leaves lambda at 1
    blended = mixed & ~drawn.cut
    assert drawn.lam[blended].mean().item() == pytest.approx(0.5, abs=0.03)  # Beta(1, 1) is uniform
    torch.testing.assert_close(drawn.lam[drawn.cut], 1 - area[drawn.cut] / 120)
    assert (area[~drawn.cut] == 0).all()
    # batch mode: one draw shared by every sample
    shared = cutmix(context=context()).draw(x[:8])
    assert shared.cut.all() and (shared.lam == shared.lam[0]).all() and (shared.top == shared.top[0]).all()


def test_mix_pairs_each_image_with_the_reversed_batch_and_composes_soft_targets():
    x, y = batch(size=5)
    mixing = mixup(alpha=0.4, context=context())
    torch.manual_seed(1)
    mixed, soft = mixing.mix(x, y)
    lam = soft[torch.arange(5), y].clone()  # own class weight (the partner may share it)
    own_differs = y != y.flip(0)
    expected = x * lam.view(-1, 1, 1, 1) + x.flip(0) * (1 - lam.view(-1, 1, 1, 1))
    torch.testing.assert_close(mixed[own_differs], expected[own_differs])
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    # a second mixing transform mixes the soft targets again, without smoothing them twice
    twice = cutmix(smoothing=0.3, context=context())
    drawn = params([0.25] * 5, [True] * 5, [(0, 6, 0, 5)] * 5)
    torch.testing.assert_close(twice.mix_targets(soft, drawn), soft * 0.25 + soft.flip(0) * 0.75)


# -- (b) losses on soft targets ----------------------------------------------------------------


WEIGHTS = [1.0, 2.0, 0.5, 3.0, 1.5]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weight", [None, WEIGHTS], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name", ["cross_entropy", "bce_with_logits"])
def test_one_hot_soft_targets_give_the_loss_of_their_indices(name, smoothing, weight):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, CLASSES, generator=generator)
    y = torch.randint(0, CLASSES, (8,), generator=generator)
    loss = getattr(losses, name)(label_smoothing=smoothing, weight=weight, num_classes=CLASSES)
    torch.testing.assert_close(loss(logits, F.one_hot(y, CLASSES).float()), loss(logits, y))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_of_soft_targets_is_the_hand_written_formula(smoothing):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, CLASSES, generator=generator)
    p = torch.softmax(torch.randn(8, CLASSES, generator=generator), 1)
    smoothed = p * (1 - smoothing) + smoothing / CLASSES
    log_q = torch.log(torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True))
    plain = losses.cross_entropy(label_smoothing=smoothing, num_classes=CLASSES)
    torch.testing.assert_close(plain(logits, p), -(smoothed * log_q).sum(1).mean())
    w = torch.tensor(WEIGHTS)
    weighted = losses.cross_entropy(label_smoothing=smoothing, weight=WEIGHTS, num_classes=CLASSES)
    torch.testing.assert_close(weighted(logits, p), -(w * smoothed * log_q).sum() / (w * p).sum())
    bce = losses.bce_with_logits(label_smoothing=smoothing, num_classes=CLASSES)
    sig = torch.sigmoid(logits)
    torch.testing.assert_close(bce(logits, p), -(smoothed * sig.log() + (1 - smoothed) * (1 - sig).log()).mean())


def test_nll_refuses_soft_targets_with_the_fix():
    with pytest.raises(ValueError, match="nll takes class indices.*use cross_entropy"):
        losses.nll()(torch.randn(4, 3), torch.full((4, 3), 1 / 3))


# -- (c, d) whole runs ---------------------------------------------------------------------------


MIXING = {"train": [{"name": "random_horizontal_flip"}, {"name": "normalize"},
                    {"name": "mixup_cutmix", "mode": "elem"}],
          "eval": [{"name": "normalize"}]}


def test_a_run_with_mixup_trains_and_counts_train_accuracy_on_the_hard_labels(tmp_path, monkeypatch):
    seen = []
    original = tallies.Tallies.update_step

    def update_step(self, index, logits, targets, loss):  # the training pass's tallies
        seen.append((logits.detach().clone(), targets.clone()))
        original(self, index, logits, targets, loss)

    monkeypatch.setattr(tallies.Tallies, "update_step", update_step)
    recipe = tiny_recipe(tmp_path, trainer__epochs=4, metrics=[{"name": "accuracy"}],
                         transforms={"train": [{"name": "normalize"}, {"name": "mixup", "alpha": 0.4}],
                                     "eval": [{"name": "normalize"}]})
    result = cnnreg.fit(cnnreg.build(cnnreg.load_recipe(recipe)))
    first, last = result.records[0].metrics, result.records[-1].metrics
    assert last["train_loss"] < first["train_loss"]
    assert all(t.dtype == torch.int64 and t.ndim == 1 for _, t in seen)
    per_epoch = len(seen) // 4
    logits, targets = (torch.cat(part) for part in zip(*seen[-per_epoch:]))
    expected = (logits.argmax(1) == targets).float().mean().item()
    assert 0 <= last["train_accuracy"] <= 1
    assert last["train_accuracy"] == pytest.approx(expected)


def test_mixing_runs_repeat_and_resume_mid_epoch_to_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", 0.0)
    changes = dict(trainer__epochs=2, trainer__deterministic=True, transforms=MIXING)
    straight = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "a", **changes)))
    cnnreg.fit(straight)
    again = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "b", **changes)))
    cnnreg.fit(again)
    expected = final_weights(straight)
    assert all(torch.equal(expected[k], v) for k, v in final_weights(again).items())

    interrupted = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "c", **changes),
                                                  extra=[InterruptAt(epoch=2, step=3)]))
    with pytest.raises(Interrupted):
        cnnreg.fit(interrupted)
    resumed = cnnreg.build(cnnreg.load_recipe(interrupted.run_dir / "recipe.json"), run_dir=interrupted.run_dir)
    cnnreg.fit(resumed, resume=True)
    assert all(torch.equal(expected[k], v) for k, v in final_weights(resumed).items())


# -- (e) recipe errors -----------------------------------------------------------------------------


def _located(error: RecipeError, recipe_path, key: str) -> str:
    text = str(error)
    lines = recipe_path.read_text().splitlines()
    # the error points at the component's object: the line above its "name" (json.dumps, indent 2)
    line = next(i for i, text_line in enumerate(lines, 1) if key in text_line) - 1
    assert f"{recipe_path}:{line}" in text, text
    return text


@pytest.mark.parametrize("entry", ["validate", "build"])
def test_a_mixing_transform_in_eval_is_a_located_error(tmp_path, recipe_file, entry):
    recipe = tiny_recipe(tmp_path, transforms={"train": [{"name": "normalize"}],
                                               "eval": [{"name": "normalize"}, {"name": "cutmix"}]})
    path = recipe_file(recipe)
    with pytest.raises(RecipeError) as info:
        cnnreg.validate(path) if entry == "validate" else cnnreg.build(cnnreg.load_recipe(path))
    text = _located(info.value, path, '"cutmix"')
    assert "transforms.eval[1]" in text and "cutmix mixes training batches only; remove it from transforms.eval" in text


def test_a_loss_without_soft_targets_is_a_located_error(tmp_path, recipe_file):
    path = recipe_file(tiny_recipe(tmp_path, loss={"name": "nll"}, transforms=MIXING))
    with pytest.raises(RecipeError) as info:
        cnnreg.validate(path)
    text = _located(info.value, path, '"nll"')
    assert "nll takes class indices, but mixup_cutmix (transforms.train[2]) gives soft targets" in text
