"""warmup_steps: a linear warm-up per optimizer step before every schedule, checked against torch's own."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, MultiStepLR, ReduceLROnPlateau, StepLR

import cnnreg
from cnnreg.core.records import Schedule
from cnnreg_plugins.optim import cosine, exponential, multistep, reduce_on_plateau, sgd, step

from conftest import tiny_recipe

LR, START, SPE = 0.1, 0.2, 3  # rate, warm-up start factor, steps per epoch


def optimizer() -> torch.optim.Optimizer:
    return sgd([{"params": [nn.Parameter(torch.zeros(2))]}], lr=LR, momentum=0.9)


def reference(make) -> list[float]:
    """The rates of a torch scheduler on its own optimizer, stepped by hand: [0], then after each step()."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=LR)
    scheduler = make(opt)
    rates = []
    for _ in range(40):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


def drive(schedule: Schedule, epochs: int, start: int = 0, metric=lambda epoch: 1.0) -> list[float]:
    """The rate of every optimizer step, stepping the schedule as the engine does."""
    opt = schedule.scheduler.optimizer
    rates = []
    for epoch in range(start, epochs):
        for _ in range(SPE):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            if schedule.interval == "step":
                schedule.scheduler.step()
        if schedule.interval == "epoch":
            schedule.scheduler.step(*([metric(epoch)] if schedule.monitor else []))
    return rates


def ramp(steps: int) -> list[float]:
    return [LR * (START + (1 - START) * i / steps) for i in range(steps)]


W = 5  # ends in epoch 1 (steps 3-5): epoch 1's last step runs at the full rate, the epoch schedule goes on from 2
E0 = W // SPE

EPOCH_SCHEDULES = {
    # after the warm-up, the rate of each epoch e >= E0 is that of torch's scheduler at e, counted as documented
    "cosine": (lambda o: cosine(o, epochs=8, steps_per_epoch=SPE, warmup_steps=W, warmup_start_factor=START),
               lambda e: reference(lambda o: CosineAnnealingLR(o, T_max=8 - E0))[e - E0]),
    "step": (lambda o: step(o, epochs=8, steps_per_epoch=SPE, step_size=3, gamma=0.5, warmup_steps=W,
                            warmup_start_factor=START),
             lambda e: reference(lambda o: StepLR(o, step_size=3, gamma=0.5))[e]),
    "multistep": (lambda o: multistep(o, epochs=8, steps_per_epoch=SPE, milestones=[2, 5], gamma=0.1, warmup_steps=W,
                                      warmup_start_factor=START),
                  lambda e: reference(lambda o: MultiStepLR(o, milestones=[2, 5], gamma=0.1))[e]),
    "exponential": (lambda o: exponential(o, epochs=8, steps_per_epoch=SPE, gamma=0.7, warmup_steps=W,
                                          warmup_start_factor=START),
                    lambda e: reference(lambda o: ExponentialLR(o, gamma=0.7))[e - E0]),
}


@pytest.mark.parametrize("name", EPOCH_SCHEDULES)
def test_a_per_step_warmup_then_the_epoch_schedule(name):
    build, after = EPOCH_SCHEDULES[name]
    schedule = build(optimizer())
    assert schedule.interval == "step"  # the warm-up needs every step
    rates = drive(schedule, 8)
    assert rates[:W] == pytest.approx(ramp(W))
    expected = [after(s // SPE) for s in range(W, 8 * SPE)]
    assert rates[W:] == pytest.approx(expected)
    assert rates[W] == pytest.approx(LR)  # the warm-up ends at the full rate


STEP_SCHEDULES = {
    # interval "step": torch's scheduler in steps, from the end of the warm-up, to the same end
    "cosine": (lambda o: cosine(o, epochs=8, steps_per_epoch=SPE, interval="step", warmup_steps=W,
                                warmup_start_factor=START),
               lambda s: reference(lambda o: CosineAnnealingLR(o, T_max=8 * SPE - W))[s - W]),
    "exponential": (lambda o: exponential(o, epochs=8, steps_per_epoch=SPE, gamma=0.7, interval="step",
                                          warmup_steps=W, warmup_start_factor=START),
                    lambda s: reference(lambda o: ExponentialLR(o, gamma=0.7 ** (1 / SPE)))[s - W]),
    "step": (lambda o: step(o, epochs=8, steps_per_epoch=SPE, step_size=3, gamma=0.5, interval="step",
                            warmup_steps=W, warmup_start_factor=START),
             lambda s: reference(lambda o: StepLR(o, step_size=3 * SPE, gamma=0.5))[s]),
}


@pytest.mark.parametrize("name", STEP_SCHEDULES)
def test_a_per_step_warmup_then_the_per_step_schedule(name):
    build, after = STEP_SCHEDULES[name]
    rates = drive(build(optimizer()), 8)
    assert rates[:W] == pytest.approx(ramp(W))
    assert rates[W:] == pytest.approx([after(s) for s in range(W, 8 * SPE)])


def test_plateau_warms_up_per_step_and_then_watches_the_metric():
    losses = [5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # the warm-up epochs' losses must not count
    schedule = reduce_on_plateau(optimizer(), factor=0.5, patience=1, warmup_steps=W, warmup_start_factor=START)
    assert schedule.interval == "epoch" and schedule.monitor == "val_loss"
    rates = drive(schedule, 8, metric=lambda e: losses[e])
    assert rates[:W] == pytest.approx(ramp(W))
    # torch's ReduceLROnPlateau by hand, watching epochs 2 on (epochs 0 and 1 held warm-up steps)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=LR)
    plateau = ReduceLROnPlateau(opt, factor=0.5, patience=1)
    per_epoch = {0: LR, 1: LR}
    for epoch in range(2, 8):
        per_epoch[epoch] = opt.param_groups[0]["lr"]
        plateau.step(losses[epoch])
    assert rates[W:] == pytest.approx([per_epoch[s // SPE] for s in range(W, 8 * SPE)])
    assert min(rates) < LR * 0.5  # it did reduce


def checkpointed(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


RESUMABLE = {
    "step": lambda o: step(o, epochs=8, steps_per_epoch=SPE, step_size=3, gamma=0.5, warmup_steps=W),
    "cosine_steps": lambda o: cosine(o, epochs=8, steps_per_epoch=SPE, interval="step", warmup_steps=W),
    "plateau": lambda o: reduce_on_plateau(o, factor=0.5, patience=1, warmup_steps=W),
}


@pytest.mark.parametrize("name", RESUMABLE)
def test_resuming_mid_warmup_continues_the_same_rates(name):
    losses = [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    straight = drive(RESUMABLE[name](optimizer()), 8, metric=lambda e: losses[e])
    first = RESUMABLE[name](optimizer())
    before = drive(first, 1, metric=lambda e: losses[e])  # 3 of the 5 warm-up steps
    saved = checkpointed({"optimizer": first.scheduler.optimizer.state_dict(), "scheduler": first.scheduler.state_dict()})
    second = RESUMABLE[name](optimizer())
    second.scheduler.optimizer.load_state_dict(saved["optimizer"])
    second.scheduler.load_state_dict(saved["scheduler"])
    after = drive(second, 8, start=1, metric=lambda e: losses[e])
    assert before + after == pytest.approx(straight)


@pytest.mark.parametrize("build, message", [
    (lambda o: cosine(o, epochs=4, steps_per_epoch=SPE, warmup_epochs=1, warmup_steps=2), "both set"),
    (lambda o: reduce_on_plateau(o, warmup_epochs=1, warmup_steps=2), "both set"),
    (lambda o: step(o, epochs=8, steps_per_epoch=SPE, step_size=2, warmup_steps=2 * SPE), "must end before step_size"),
    (lambda o: cosine(o, epochs=2, steps_per_epoch=SPE, warmup_steps=-1), "warmup_steps must be >= 0"),
])
def test_bad_warmups_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build(optimizer())


def test_a_recipe_warms_up_per_step(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=3,
                                            scheduler={"name": "step", "step_size": 2, "gamma": 0.5, "warmup_steps": 4}))
    run = cnnreg.build(recipe, output=False)
    assert run.schedule.interval == "step"
    result = cnnreg.fit(run)  # 6 steps an epoch: warm-up in epoch 0, full rate in 1, halved in 2
    # a per-step schedule's logged rate is the one after the epoch's last step: epoch 1's is epoch 2's
    assert [r.metrics["lr"] for r in result.records] == pytest.approx([0.01, 0.005, 0.005])
    assert run.schedule.scheduler.last_epoch == 18
