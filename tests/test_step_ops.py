"""The training step dispatches few more operations than a hand-written one.

On a GPU at small batches a step is bound by kernel launches, one per aten
operation, so the framework's own work per step (loss guard, tallies,
bookkeeping) must stay small beside the model's. This counts, on the CPU,
every aten operation dispatched per step (forward, backward and optimizer
included) for cnnreg's step and for the minimal loop a user would write
with the same model, the same transform objects and the same optimizer
(uint8 -> float, transforms, forward, cross-entropy, backward, step,
zero_grad), on the same batches.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cnnreg
from cnnreg.engine import step
from cnnreg.engine.tallies import Tallies

from conftest import tiny_recipe

STEPS = 20  # an epoch's once-only work (settling the tallies) spread over its steps, as in a real epoch
MAX_OVERHEAD = 0.10  # the bound: at most 10% more operations than the minimal step


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _run(tmp_path, model: dict, optimizer: dict, **trainer):
    recipe = cnnreg.load_recipe(tiny_recipe(
        tmp_path, data__train_size=8 * STEPS, data__image_size=32, data__batch_size=8, data__num_classes=10,
        model=model, optimizer=optimizer,
        transforms={"train": [{"name": "random_horizontal_flip"}, {"name": "random_crop", "size": 32, "padding": 4},
                              {"name": "normalize"}],
                    "eval": [{"name": "normalize"}]},
        trainer={"epochs": 1, "progress": "off", **trainer}))
    return cnnreg.build(recipe, output=False)


def cnnreg_ops(run, monkeypatch) -> Counter[str]:
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", math.inf)  # progress polls are timed: none in the count
    tallies = Tallies(run.data.num_classes, run.metrics, run.device)
    guard = step.LossGuard(run.recipe.trainer.divergence, run.device)
    counter = CountOps()
    with counter:
        step.train_epoch(run, 1, tallies, 0, step.Signals(), step.Timing(measure_first=False), guard)
    return counter.ops


def minimal_ops(run) -> Counter[str]:
    """The loop of the PyTorch tutorials, with the run's own model, transforms and optimizer."""
    model, optimizer = run.model, run.optimizer
    model.train()
    counter = CountOps()
    with counter:
        for images, targets in run.batches["train"]:
            x = images.float().div_(255)
            for transform in run.train_transforms:
                x = transform(x)
            loss = F.cross_entropy(model(x), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return counter.ops


@pytest.mark.parametrize("model, optimizer", [
    ({"name": "tutorial_cnn"}, {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4}),
    ({"name": "simple_cnn"}, {"name": "sgd", "lr": 0.01, "momentum": 0.9}),
], ids=["tutorial_cnn-adam", "simple_cnn-sgd"])
def test_the_step_dispatches_at_most_ten_percent_more_operations_than_a_hand_written_one(tmp_path, monkeypatch, model,
                                                                                        optimizer):
    ours = cnnreg_ops(_run(tmp_path / "a", model, optimizer), monkeypatch)
    theirs = minimal_ops(_run(tmp_path / "b", model, optimizer))
    n_ours, n_theirs = sum(ours.values()) / STEPS, sum(theirs.values()) / STEPS
    assert n_theirs > 50, "the counter must see the model's operations (positive control)"
    extra = {op: (ours[op] - theirs[op]) / STEPS for op in ours if ours[op] > theirs[op]}
    assert n_ours <= (1 + MAX_OVERHEAD) * n_theirs, (
        f"{n_ours:.0f} operations per step against {n_theirs:.0f} hand-written; the extra ones: "
        + ", ".join(f"{op} {n:+.1f}" for op, n in sorted(extra.items(), key=lambda kv: -kv[1])))
