"""Optimizers and schedules: they build, step, scale groups and resume exactly."""

from __future__ import annotations

import inspect
import io
import math
import typing
import warnings

import pydantic
import pytest
import torch
from torch import nn

from cnnreg.core.records import Schedule
from cnnreg_plugins import optim
from cnnreg_plugins.optim import (
    adam,
    adamw,
    cosine,
    exponential,
    monitor_mode,
    multistep,
    onecycle,
    reduce_on_plateau,
    rmsprop,
    sgd,
    step,
    triangular,
)

OPTIMIZERS = {"sgd": sgd, "adam": adam, "adamw": adamw, "rmsprop": rmsprop}
SCHEDULERS = {
    "reduce_on_plateau": reduce_on_plateau,
    "cosine": cosine,
    "step": step,
    "multistep": multistep,
    "exponential": exponential,
    "onecycle": onecycle,
    "triangular": triangular,
}
FILLED = {"params", "optimizer", "epochs", "steps_per_epoch"}


def param_groups(model: nn.Module) -> list[dict]:
    """What the engine passes for a model without groups of its own."""
    return [{"params": list(model.parameters())}]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def normed_model() -> nn.Module:
    """Weights, biases and a norm's weight and bias: [0] and [1] a backbone, [3] a head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def ids(params) -> list[int]:
    return sorted(id(p) for p in params)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = x[:, :3].argmax(dim=1)  # learnable from x
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def sgd_on(model: nn.Module | None = None, lr: float = 0.1) -> torch.optim.Optimizer:
    return sgd(param_groups(model or tiny_model()), lr=lr, momentum=0.9)


def lr(optimizer: torch.optim.Optimizer, group: int = 0) -> float:
    return optimizer.param_groups[group]["lr"]


def run_schedule(schedule: Schedule, epochs: int, steps_per_epoch: int, metric=lambda epoch: 1.0) -> list[float]:
    """Drive a schedule as the engine does; the rate in force at every optimizer step."""
    optimizer = schedule.scheduler.optimizer
    seen = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            seen.append(lr(optimizer))
            optimizer.step()
            if schedule.interval == "step":
                schedule.scheduler.step()
        if schedule.interval == "epoch":
            if schedule.monitor is None:
                schedule.scheduler.step()
            else:
                schedule.scheduler.step(metric(epoch))
    return seen


def per_epoch(rates: list[float], steps_per_epoch: int) -> list[float]:
    return rates[::steps_per_epoch]


def schema(factory):
    """The recipe schema the registry builds: the signature less the filled-in names."""
    hints = typing.get_type_hints(factory, include_extras=True)
    fields = {
        name: (hints[name], ... if param.default is inspect.Parameter.empty else param.default)
        for name, param in inspect.signature(factory).parameters.items()
        if name not in FILLED
    }
    return pydantic.create_model(factory.__name__, __config__=pydantic.ConfigDict(extra="forbid"), **fields)


# -- registration and schemas ----------------------------------------------------


def test_the_plugin_registers_its_optimizers_and_schedulers():
    assert optim.cnnreg_optimizers() == {**OPTIMIZERS, "muon": optim.muon}
    assert optim.cnnreg_schedulers() == SCHEDULERS


@pytest.mark.parametrize("factory", [*OPTIMIZERS.values(), *SCHEDULERS.values()], ids=lambda f: f.__name__)
def test_every_option_is_documented_and_typed_for_the_schema(factory):
    doc = inspect.getdoc(factory)
    args = doc.split("Args:")[1]
    for name in inspect.signature(factory).parameters:
        assert f"{name}:" in args, name
    schema(factory)  # pydantic understands every annotation


@pytest.mark.parametrize(
    "factory, options",
    [
        (sgd, {"lr": 0}),
        (sgd, {"lr": -0.1}),
        (sgd, {"lr": 0.1, "momentum": 1.0}),
        (sgd, {"lr": 0.1, "weight_decay": -1e-4}),
        (adam, {"betas": [0.9, 1.0]}),
        (adamw, {"weight_decay": -0.01}),
        (rmsprop, {"momentum": -0.5}),
        (cosine, {"warmup_epochs": -1}),
        (reduce_on_plateau, {"factor": 1.0}),
        (reduce_on_plateau, {"mode": "up"}),
        (onecycle, {"pct_start": 1.0}),
        (sgd, {"lr": 0.1, "bias_norm_lr_mult": 0.0}),
        (adamw, {"bias_norm_weight_decay": -1e-4}),
        (triangular, {"start_factor": -0.1}),
        (triangular, {"peak": 1.5}),
        (triangular, {"end_factor": -0.07}),
    ],
)
def test_the_schema_refuses_out_of_range_values(factory, options):
    with pytest.raises(pydantic.ValidationError):
        schema(factory)(**options)


def test_triangular_factors_may_exceed_one():
    assert schema(triangular)(start_factor=2.0, end_factor=1.5, peak=1.0).start_factor == 2.0


def test_sgd_needs_a_learning_rate_in_recipes():
    with pytest.raises(pydantic.ValidationError, match="lr"):
        schema(sgd)()


# -- parameter groups --------------------------------------------------------------


def test_lr_mult_scales_each_groups_rate_and_stays_for_inspection():
    model = tiny_model()
    groups = [
        {"params": list(model[0].parameters()), "lr_mult": 0.1, "weight_decay": 0.0},
        {"params": list(model[2].parameters())},
    ]
    optimizer = adamw(groups, lr=1e-3, weight_decay=0.05)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    assert [g["lr_mult"] for g in optimizer.param_groups] == [0.1, 1.0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]
    assert "lr" not in groups[0]  # the caller's groups are not changed


def test_schedules_keep_the_groups_ratio():
    model = tiny_model()
    groups = [{"params": list(model[0].parameters()), "lr_mult": 0.1}, {"params": list(model[2].parameters())}]
    optimizer = sgd(groups, lr=0.1)
    schedule = cosine(optimizer, epochs=10, steps_per_epoch=1, warmup_epochs=2)
    run_schedule(schedule, 5, 1)
    assert lr(optimizer, 0) == pytest.approx(0.1 * lr(optimizer, 1))


def test_frozen_parameters_stay_put_until_unfrozen():
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    optimizer = adam(param_groups(model), lr=0.01)
    frozen = model[0].weight.clone()
    train_steps(model, optimizer, 3)
    assert torch.equal(model[0].weight, frozen)
    model[0].weight.requires_grad_(True)
    train_steps(model, optimizer, 1)
    assert not torch.equal(model[0].weight, frozen)


def test_a_plain_iterable_of_parameters_is_one_group():
    model = tiny_model()
    optimizer = sgd(model.parameters(), lr=0.1)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_biases_and_norms_get_their_own_rate_and_weight_decay(name):
    model = normed_model()
    optimizer = OPTIMIZERS[name](
        param_groups(model), lr=0.01, weight_decay=5e-4, bias_norm_lr_mult=64.0, bias_norm_weight_decay=5e-4 / 64
    )
    bias_norm, rest = optimizer.param_groups
    assert ids(bias_norm["params"]) == ids([model[0].bias, *model[1].parameters(), model[3].bias])
    assert ids(rest["params"]) == ids([model[0].weight, model[3].weight])
    assert (bias_norm["lr"], bias_norm["lr_mult"], bias_norm["weight_decay"]) == pytest.approx((0.64, 64.0, 5e-4 / 64))
    assert (rest["lr"], rest["lr_mult"], rest["weight_decay"]) == pytest.approx((0.01, 1.0, 5e-4))
    assert bias_norm["lr"] * bias_norm["weight_decay"] == pytest.approx(rest["lr"] * rest["weight_decay"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_by_default_the_groups_are_not_split(name):
    model = normed_model()
    groups = [{"params": list(model[:2].parameters()), "lr_mult": 0.1}, {"params": list(model[3].parameters())}]
    optimizer = OPTIMIZERS[name](groups, lr=0.01)
    assert len(optimizer.param_groups) == 2
    assert [ids(g["params"]) for g in optimizer.param_groups] == [ids(g["params"]) for g in groups]


def test_the_bias_norm_weight_decay_falls_back_to_the_groups_then_the_optimizers():
    model = normed_model()
    groups = [{"params": list(model[:2].parameters()), "weight_decay": 0.0}, {"params": list(model[3].parameters())}]
    optimizer = sgd(groups, lr=0.1, weight_decay=5e-4, bias_norm_lr_mult=2.0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.1, 0.2, 0.1])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0, 5e-4, 5e-4]


def test_a_bias_norm_weight_decay_alone_splits_but_keeps_the_rate():
    model = normed_model()
    optimizer = adamw(param_groups(model), lr=1e-3, weight_decay=0.05, bias_norm_weight_decay=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]


def test_the_bias_norm_share_of_a_scaled_group_multiplies_its_lr_mult():
    model = normed_model()
    groups = [{"params": list(model[:2].parameters()), "lr_mult": 0.1}, {"params": list(model[3].parameters())}]
    optimizer = sgd(groups, lr=0.1, momentum=0.9, bias_norm_lr_mult=64.0)
    assert [g["lr_mult"] for g in optimizer.param_groups] == pytest.approx([6.4, 0.1, 64.0, 1.0])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.64, 0.01, 6.4, 0.1])
    backbone_bias_norm = [model[0].bias, *model[1].parameters()]
    expected = [backbone_bias_norm, [model[0].weight], [model[3].bias], [model[3].weight]]
    assert [ids(g["params"]) for g in optimizer.param_groups] == [ids(params) for params in expected]
    assert groups[0]["lr_mult"] == 0.1 and len(groups[0]["params"]) == 4  # the caller's groups are not changed


def test_a_groups_own_lr_is_scaled_for_its_biases_and_norms():
    model = normed_model()
    optimizer = sgd([{"params": list(model.parameters()), "lr": 0.5}], lr=0.1, bias_norm_lr_mult=4.0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.0, 0.5])


def test_an_empty_part_is_left_out():
    model = normed_model()
    weights = [{"params": [model[0].weight, model[3].weight]}]
    norms = [{"params": list(model[1].parameters()), "lr_mult": 0.5}]
    assert [g["lr_mult"] for g in sgd(weights, lr=0.1, bias_norm_lr_mult=8.0).param_groups] == [1.0]
    assert [g["lr_mult"] for g in sgd(norms, lr=0.1, bias_norm_lr_mult=8.0).param_groups] == [4.0]


def test_schedules_scale_the_bias_norm_groups_alike():
    model = normed_model()
    groups = [{"params": list(model[:2].parameters()), "lr_mult": 0.1}, {"params": list(model[3].parameters())}]
    optimizer = sgd(groups, lr=0.1, bias_norm_lr_mult=64.0, bias_norm_weight_decay=0.0)
    schedule = cosine(optimizer, epochs=10, steps_per_epoch=1, warmup_epochs=2)
    for epochs in (1, 4):
        run_schedule(schedule, epochs, 1)
        rates = [g["lr"] for g in optimizer.param_groups]
        assert rates == pytest.approx([lr(optimizer, 3) * m for m in (6.4, 0.1, 64.0, 1.0)])
    assert lr(optimizer, 3) < 0.1


def test_frozen_biases_and_norms_stay_in_their_group_and_put():
    model = normed_model()
    model[0].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    optimizer = adamw(param_groups(model), lr=0.01, bias_norm_lr_mult=64.0, bias_norm_weight_decay=0.0)
    assert ids(optimizer.param_groups[0]["params"]) == ids([model[0].bias, *model[1].parameters(), model[3].bias])
    frozen = model[0].bias.clone(), model[1].weight.clone()
    losses = train_steps(model, optimizer, 10)
    assert torch.equal(model[0].bias, frozen[0]) and torch.equal(model[1].weight, frozen[1])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("options", [{"bias_norm_lr_mult": 0.0}, {"bias_norm_weight_decay": -0.1}])
def test_bad_bias_norm_options_are_clear_errors(options):
    with pytest.raises(ValueError, match="bias_norm"):
        sgd(param_groups(normed_model()), lr=0.1, **options)


@pytest.mark.parametrize("bad", [{"params": [], "lr_mult": -1.0}, {"params": [], "weight_decay": -0.1}, {"lr": 0.1}])
def test_malformed_groups_are_refused(bad):
    with pytest.raises(ValueError, match="parameter group 0"):
        sgd([bad], lr=0.1)


# -- optimizers --------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains(name):
    model = tiny_model()
    options = {"lr": 0.2} if name == "sgd" else {"lr": 0.01}
    losses = train_steps(model, OPTIMIZERS[name](param_groups(model), **options), 20)
    assert losses[-1] < losses[0] * 0.9


def test_options_reach_torch():
    model = tiny_model()
    defaults = sgd(param_groups(model), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4).defaults
    assert (defaults["momentum"], defaults["nesterov"], defaults["weight_decay"]) == (0.9, True, 5e-4)
    defaults = adam(param_groups(model), betas=(0.8, 0.99), eps=1e-6, amsgrad=True).defaults
    assert (defaults["lr"], defaults["betas"], defaults["eps"], defaults["amsgrad"]) == (1e-3, (0.8, 0.99), 1e-6, True)
    defaults = adamw(param_groups(model)).defaults
    assert (defaults["lr"], defaults["weight_decay"]) == (1e-3, 0.01)
    defaults = rmsprop(param_groups(model), alpha=0.9, momentum=0.5, centered=True).defaults
    assert (defaults["lr"], defaults["alpha"], defaults["momentum"], defaults["centered"]) == (1e-2, 0.9, 0.5, True)
    assert isinstance(adamw(param_groups(model)), torch.optim.AdamW)


@pytest.mark.parametrize("options", [{"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}])
def test_nesterov_without_momentum_is_a_clear_error(options):
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening 0"):
        sgd(param_groups(tiny_model()), lr=0.1, nesterov=True, **options)


@pytest.mark.parametrize(
    "factory, options", [(sgd, {"lr": 0.0}), (adam, {"lr": -1.0}), (sgd, {"lr": 0.1, "momentum": 1.0})]
)
def test_python_callers_get_clear_errors_too(factory, options):
    with pytest.raises(ValueError, match="lr|momentum"):
        factory(param_groups(tiny_model()), **options)


def test_on_the_cpu_torch_chooses_the_implementation():
    assert not sgd(param_groups(tiny_model()), lr=0.1).defaults.get("fused")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_on_cuda_the_fused_implementation_is_used_where_torch_has_one(name):
    model = tiny_model().cuda()
    optimizer = OPTIMIZERS[name](param_groups(model), lr=0.01)
    fusable = "fused" in inspect.signature(type(optimizer)).parameters
    assert bool(optimizer.defaults.get("fused")) == fusable
    x, y = torch.randn(16, 4, device="cuda"), torch.arange(16, device="cuda") % 3
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


# -- schedules -------------------------------------------------------------------


def test_cosine_reaches_eta_min_at_t_max_per_epoch():
    optimizer = sgd_on(lr=0.1)
    rates = per_epoch(run_schedule(cosine(optimizer, epochs=10, steps_per_epoch=3, eta_min=0.001), 11, 3), 3)
    expected = [0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(11)]
    assert rates == pytest.approx(expected)
    assert rates[10] == pytest.approx(0.001)


def test_cosine_per_step_changes_within_the_epoch():
    optimizer = sgd_on(lr=0.1)
    schedule = cosine(optimizer, epochs=4, steps_per_epoch=5, interval="step")
    assert schedule.interval == "step"
    rates = run_schedule(schedule, 4, 5)
    assert rates == pytest.approx([0.1 * (1 + math.cos(math.pi * s / 20)) / 2 for s in range(20)])
    assert lr(optimizer) == pytest.approx(0.0, abs=1e-12)


def test_warmup_starts_low_then_the_schedule_takes_over():
    optimizer = sgd_on(lr=0.1)
    schedule = cosine(optimizer, epochs=10, steps_per_epoch=2, warmup_epochs=4, warmup_start_factor=0.2)
    rates = per_epoch(run_schedule(schedule, 10, 2), 2) + [lr(optimizer)]
    assert rates[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    # The curve spans the epochs after the warm-up and still ends at epoch t_max.
    assert rates[4:] == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(7)])


def test_warmup_per_step_is_smooth():
    optimizer = sgd_on(lr=0.1)
    schedule = cosine(optimizer, epochs=4, steps_per_epoch=5, warmup_epochs=1, interval="step", warmup_start_factor=0.1)
    rates = run_schedule(schedule, 4, 5)
    assert rates[:6] == pytest.approx([0.01, 0.028, 0.046, 0.064, 0.082, 0.1])
    assert rates[6] < 0.1


def test_step_divides_every_step_size_epochs():
    optimizer = sgd_on(lr=0.1)
    rates = per_epoch(run_schedule(step(optimizer, epochs=7, steps_per_epoch=2, step_size=3, gamma=0.5), 7, 2), 2)
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_step_after_warmup_still_drops_at_multiples_of_step_size(interval):
    optimizer = sgd_on(lr=0.1)
    schedule = step(optimizer, epochs=9, steps_per_epoch=2, step_size=3, gamma=0.5, warmup_epochs=2, interval=interval)
    rates = per_epoch(run_schedule(schedule, 9, 2), 2)
    assert rates[2:] == pytest.approx([0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025])
    assert rates[0] < rates[1] < 0.1


@pytest.mark.parametrize("warmup", [0, 2])
def test_multistep_drops_at_its_milestones(warmup):
    optimizer = sgd_on(lr=0.1)
    schedule = multistep(optimizer, epochs=8, steps_per_epoch=1, milestones=[3, 5], gamma=0.1, warmup_epochs=warmup)
    rates = run_schedule(schedule, 8, 1)
    assert rates[warmup:] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001][warmup:])


def test_exponential_per_epoch_and_per_step_agree_at_epoch_ends():
    by_epoch = per_epoch(run_schedule(exponential(sgd_on(lr=0.1), epochs=5, steps_per_epoch=4, gamma=0.5), 5, 4), 4)
    by_step = run_schedule(exponential(sgd_on(lr=0.1), epochs=5, steps_per_epoch=4, gamma=0.5, interval="step"), 5, 4)
    assert by_epoch == pytest.approx([0.1 * 0.5**e for e in range(5)])
    assert by_step[::4] == pytest.approx(by_epoch)
    assert by_step[1] == pytest.approx(0.1 * 0.5**0.25)


def test_exponential_decays_from_the_full_rate_after_warmup():
    schedule = exponential(sgd_on(lr=0.1), epochs=6, steps_per_epoch=1, gamma=0.5, warmup_epochs=2)
    assert run_schedule(schedule, 6, 1)[2:] == pytest.approx([0.1, 0.05, 0.025, 0.0125])


def test_onecycle_peaks_at_max_lr_per_step_and_ends_far_below():
    model = tiny_model()
    groups = [{"params": list(model[0].parameters()), "lr_mult": 0.1}, {"params": list(model[2].parameters())}]
    optimizer = sgd(groups, lr=0.01, momentum=0.9)
    schedule = onecycle(optimizer, epochs=5, steps_per_epoch=4, max_lr=0.5, pct_start=0.25)
    assert schedule.interval == "step"
    peaks = [0.0, 0.0]
    rates = []
    for _ in range(20):  # exactly epochs * steps_per_epoch steps
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, optimizer.param_groups)]
        rates.append(lr(optimizer, 1))
        optimizer.step()
        schedule.scheduler.step()
    assert peaks == pytest.approx([0.05, 0.5])
    assert rates[0] == pytest.approx(0.5 / 25)
    assert rates.index(max(rates)) == 4  # pct_start * 20 steps - 1
    assert rates[-1] == pytest.approx(0.5 / 25 / 1e4)


def test_onecycle_peaks_at_the_optimizers_rate_by_default():
    optimizer = adam(param_groups(tiny_model()), lr=0.003)
    schedule = onecycle(optimizer, epochs=2, steps_per_epoch=5)
    assert max(run_schedule(schedule, 2, 5)) == pytest.approx(0.003)


def triangle(total: int, peak: int, start: float, end: float) -> list[float]:
    """The factor after each of steps 0..total, as airbench94's np.interp."""
    up = [start + (1 - start) * t / peak for t in range(peak)]
    return up + [1 + (end - 1) * (t - peak) / (total - peak) for t in range(peak, total + 1)]


def test_triangular_rises_to_the_peak_then_falls_per_step():
    optimizer = sgd_on(lr=0.1)
    schedule = triangular(optimizer, epochs=10, steps_per_epoch=10)
    assert (schedule.interval, schedule.monitor) == ("step", None)
    rates = run_schedule(schedule, 10, 10) + [lr(optimizer)]  # the rate at steps 0..100
    assert rates == pytest.approx([0.1 * f for f in triangle(100, 23, 0.2, 0.07)])
    assert (rates[0], rates[23], rates[100]) == pytest.approx((0.02, 0.1, 0.007))
    assert all(a < b for a, b in zip(rates[:23], rates[1:24]))
    assert all(a > b for a, b in zip(rates[23:], rates[24:]))


def test_triangular_with_peak_zero_is_a_linear_decay_and_may_end_at_zero():
    optimizer = sgd_on(lr=0.1)
    rates = run_schedule(triangular(optimizer, epochs=4, steps_per_epoch=5, peak=0.0, end_factor=0.0), 4, 5)
    assert rates + [lr(optimizer)] == pytest.approx([0.1 * (1 - t / 20) for t in range(21)], abs=1e-12)


def test_triangular_with_peak_one_ends_at_the_full_rate_and_stays_at_its_end():
    optimizer = sgd_on(lr=0.1)
    schedule = triangular(optimizer, epochs=2, steps_per_epoch=2, peak=1.0, start_factor=0.0)
    rates = run_schedule(schedule, 3, 2) + [lr(optimizer)]  # two steps past the end
    assert rates == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1], abs=1e-12)


def test_triangular_keeps_every_groups_lr_mult():
    model = normed_model()
    groups = [{"params": list(model[:2].parameters()), "lr_mult": 0.1}, {"params": list(model[3].parameters())}]
    optimizer = sgd(groups, lr=0.1, bias_norm_lr_mult=64.0)
    schedule = triangular(optimizer, epochs=3, steps_per_epoch=4, start_factor=0.5, peak=0.25, end_factor=0.1)
    factors = triangle(12, 3, 0.5, 0.1)
    for t in range(13):
        expected = [0.1 * mult * factors[t] for mult in (6.4, 0.1, 64, 1)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
        optimizer.step()
        schedule.scheduler.step()


def test_a_resumed_triangular_schedule_keeps_its_shape():
    first = triangular(sgd_on(lr=0.1), epochs=5, steps_per_epoch=4, start_factor=0.1, peak=0.5, end_factor=0.0)
    run_schedule(first, 2, 4)
    saved = checkpointed(
        {"optimizer": first.scheduler.optimizer.state_dict(), "scheduler": first.scheduler.state_dict()}
    )
    assert saved["scheduler"]["lr_lambdas"] == [{"total": 20, "peak": 10, "start_factor": 0.1, "end_factor": 0.0}]

    optimizer = sgd_on(lr=0.1)
    resumed = triangular(optimizer, epochs=5, steps_per_epoch=4, start_factor=0.1, peak=0.5, end_factor=0.0)
    optimizer.load_state_dict(saved["optimizer"])
    resumed.scheduler.load_state_dict(saved["scheduler"])
    rates = run_schedule(resumed, 3, 4) + [lr(optimizer)]
    assert rates == pytest.approx([0.1 * f for f in triangle(20, 10, 0.1, 0.0)][8:], abs=1e-12)


def test_plateau_reduces_after_patience_epochs_without_improvement():
    optimizer = sgd_on(lr=0.1)
    schedule = reduce_on_plateau(optimizer, factor=0.5, patience=2)
    assert (schedule.interval, schedule.monitor) == ("epoch", "val_loss")
    losses = [1.0, 0.9, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95]
    rates = run_schedule(schedule, len(losses), 1, metric=lambda epoch: losses[epoch]) + [lr(optimizer)]
    # best 0.9 at epoch 1; the third epoch without improvement (epoch 4) reduces.
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])


@pytest.mark.parametrize(
    "monitor, mode",
    [("val_loss", "min"), ("val_accuracy", "max"), ("val_top5_accuracy", "max"), ("val_f1", "max"),
     ("train_precision", "max"), ("val_recall", "max"), ("val_balanced_accuracy", "max"), ("val_error", "min"),
     ("val_auc", "max")],
)  # fmt: skip
def test_plateau_infers_the_mode_from_the_monitor(monitor, mode):
    assert monitor_mode(monitor) == mode
    schedule = reduce_on_plateau(sgd_on(), monitor=monitor)
    assert schedule.monitor == monitor
    assert schedule.scheduler.mode == mode


def test_plateau_on_accuracy_reduces_when_accuracy_stops_rising():
    optimizer = sgd_on(lr=0.1)
    schedule = reduce_on_plateau(optimizer, monitor="val_accuracy", patience=0)
    accuracies = [0.5, 0.6, 0.55]
    rates = run_schedule(schedule, 3, 1, metric=lambda epoch: accuracies[epoch]) + [lr(optimizer)]
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.01])


def test_plateau_after_warmup_ignores_the_warmup_epochs():
    optimizer = sgd_on(lr=0.1)
    schedule = reduce_on_plateau(optimizer, factor=0.5, patience=1, warmup_epochs=2, warmup_start_factor=0.5)
    assert isinstance(schedule.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    losses = [5.0, 0.1, 1.0, 1.0, 1.0, 1.0]  # 0.1 during warm-up must not become the best
    rates = run_schedule(schedule, len(losses), 1, metric=lambda epoch: losses[epoch]) + [lr(optimizer)]
    assert rates == pytest.approx([0.05, 0.075, 0.1, 0.1, 0.1, 0.05, 0.05])


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda o: cosine(o, epochs=5, steps_per_epoch=1, warmup_epochs=5), "must end before t_max"),
        (lambda o: cosine(o, epochs=10, steps_per_epoch=1, t_max=3, warmup_epochs=3), "must end before t_max"),
        (lambda o: step(o, epochs=10, steps_per_epoch=1, step_size=2, warmup_epochs=2), "must end before step_size"),
        (lambda o: multistep(o, epochs=10, steps_per_epoch=1, milestones=[3, 6], warmup_epochs=3), "first milestone"),
        (lambda o: multistep(o, epochs=10, steps_per_epoch=1, milestones=[6, 3]), "increasing"),
        (lambda o: multistep(o, epochs=10, steps_per_epoch=1, milestones=[]), "increasing"),
        (lambda o: exponential(o, epochs=3, steps_per_epoch=1, warmup_epochs=3), "must end before epochs"),
        (lambda o: cosine(o, epochs=3, steps_per_epoch=1, warmup_start_factor=0.0), "warmup_start_factor"),
        (lambda o: cosine(o, epochs=3, steps_per_epoch=1, interval="batch"), "interval"),
        (lambda o: reduce_on_plateau(o, mode="up"), "mode"),
        (lambda o: reduce_on_plateau(o, factor=2.0), "factor"),
        (lambda o: onecycle(o, epochs=3, steps_per_epoch=1, base_momentum=0.99), "base_momentum"),
        (lambda o: triangular(o, epochs=3, steps_per_epoch=1, start_factor=-0.2), "start_factor"),
        (lambda o: triangular(o, epochs=3, steps_per_epoch=1, end_factor=-0.1), "end_factor"),
        (lambda o: triangular(o, epochs=3, steps_per_epoch=1, peak=1.2), "peak"),
    ],
)
def test_bad_schedule_options_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build(sgd_on())


# -- resuming --------------------------------------------------------------------

RESUMABLE = {
    "plateau": lambda o: reduce_on_plateau(o, factor=0.5, patience=1),
    "plateau_warmup": lambda o: reduce_on_plateau(o, factor=0.5, patience=1, warmup_epochs=3),
    "cosine": lambda o: cosine(o, epochs=12, steps_per_epoch=2),
    "cosine_warmup_steps": lambda o: cosine(o, epochs=12, steps_per_epoch=2, warmup_epochs=2, interval="step"),
    "step_warmup": lambda o: step(o, epochs=12, steps_per_epoch=2, step_size=4, gamma=0.5, warmup_epochs=2),
    "multistep": lambda o: multistep(o, epochs=12, steps_per_epoch=2, milestones=[3, 7, 9], gamma=0.5),
    "exponential_warmup": lambda o: exponential(o, epochs=12, steps_per_epoch=2, gamma=0.8, warmup_epochs=3),
    "onecycle": lambda o: onecycle(o, epochs=12, steps_per_epoch=2),
    "triangular": lambda o: triangular(o, epochs=12, steps_per_epoch=2),
}


def checkpointed(state: dict) -> dict:
    """A state through torch.save and a safe torch.load, as a checkpoint takes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cut", [2, 5])  # during and after the warm-ups
@pytest.mark.parametrize("name", RESUMABLE)
def test_a_resumed_schedule_continues_identically(name, cut):
    losses = [1.0, 0.8, 0.9, 0.9, 0.9, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]
    metric = lambda epoch: losses[epoch]  # noqa: E731

    def drive(schedule: Schedule, epochs: range) -> list[float]:
        optimizer = schedule.scheduler.optimizer
        seen = []
        for epoch in epochs:
            for _ in range(2):
                seen.append(lr(optimizer))
                optimizer.step()
                if schedule.interval == "step":
                    schedule.scheduler.step()
            if schedule.interval == "epoch":
                schedule.scheduler.step(*([metric(epoch)] if schedule.monitor else []))
        return seen

    straight = RESUMABLE[name](sgd_on())
    expected = drive(straight, range(12))

    first = RESUMABLE[name](sgd_on())
    before = drive(first, range(cut))
    saved = checkpointed(
        {"optimizer": first.scheduler.optimizer.state_dict(), "scheduler": first.scheduler.state_dict()}
    )

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before optimizer" or deprecation warnings
        optimizer = sgd_on()
        resumed = RESUMABLE[name](optimizer)
        optimizer.load_state_dict(saved["optimizer"])
        resumed.scheduler.load_state_dict(saved["scheduler"])
        after = drive(resumed, range(cut, 12))
    assert before + after == pytest.approx(expected)
    assert len(set(expected)) > 2  # the rate did change along the way
