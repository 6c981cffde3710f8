"""Optimizers and learning-rate schedules.

Optimizers take ``params``, a list of parameter-group dicts (the engine's
``param_groups(model)``: the model's ``cnnreg_param_groups()`` or one group
of all its parameters, frozen ones included). A group may carry ``lr_mult``:
its learning rate is ``lr * lr_mult`` (the multiplier stays in the group, and
schedules scale every group's rate alike). A group's own ``weight_decay`` overrides the optimizer's.
Every optimizer can give biases and normalisation parameters (those of at
most one dimension, the rule of timm's ``param_groups_weight_decay``) a rate
and a weight decay of their own: with ``bias_norm_lr_mult`` other than 1 or
a ``bias_norm_weight_decay``, each group is split in two, its biases and
norms (first) with ``lr_mult`` times ``bias_norm_lr_mult`` and that weight
decay, and the rest as it was. The fastest CIFAR-10 trainings (airbench)
give them 64 times the rate and a 64th of the weight decay; timm does not
decay them.
On CUDA the fused implementation is used where torch has one for the
optimizer, else torch's default (foreach on CUDA).

Schedules return :class:`cnnreg.core.records.Schedule`. Those of time alone
(cosine, step, multistep, exponential) step per epoch by default, or per
optimizer step with ``interval="step"``; all of them, and reduce_on_plateau,
can start with a linear warm-up of ``warmup_epochs`` epochs from
``warmup_start_factor`` times the rate to the rate. The warm-up moves in the
schedule's own interval: once per epoch by default, smoothly per step with
``interval="step"``. With ``warmup_steps`` instead, the warm-up moves per
optimizer step whatever the interval (timm's ``warmup_t`` with
``t_in_epochs=False``), and an epoch schedule then goes on per epoch: the
epoch in which the warm-up ends runs at the full rate, and the schedule's
next epochs are counted as with ``warmup_epochs``. Epoch numbers (``t_max``, ``step_size``,
``milestones``) count from the start of training: warm-up takes the place
of the schedule's first epochs, it does not postpone them. onecycle and
triangular change the rate per optimizer step and rise from a lower rate
themselves, so they have no warm-up.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable, Literal

import torch
from pydantic import Field
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

from cnnreg import hookimpl
from cnnreg.core.errors import UserError
from cnnreg.core.records import Schedule, infer_mode

ParamGroups = list[dict[str, Any]]
LearningRate = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Epochs = Annotated[int, Field(ge=1)]
Steps = Annotated[int, Field(ge=1)]
WarmupEpochs = Annotated[int, Field(ge=0)]
WarmupSteps = Annotated[int, Field(ge=0)]
StartFactor = Annotated[float, Field(gt=0, le=1)]
Decay = Annotated[float, Field(gt=0, le=1)]
BiasNormLrMult = Annotated[float, Field(gt=0)]
Interval = Literal["epoch", "step"]

# One rule for "is this metric better low or high", shared with the engine's
# choice of the best epoch, so that a plateau and the best epoch agree.
monitor_mode = infer_mode


# -- optimizers ------------------------------------------------------------------


def sgd(
    params: ParamGroups,
    lr: LearningRate,
    momentum: Momentum = 0.0,
    nesterov: bool = False,
    weight_decay: NonNegative = 0.0,
    dampening: Annotated[float, Field(ge=0, le=1)] = 0.0,
    bias_norm_lr_mult: BiasNormLrMult = 1.0,
    bias_norm_weight_decay: NonNegative | None = None,
) -> Optimizer:
    """Stochastic gradient descent, with optional (Nesterov) momentum (torch.optim.SGD).

    Args:
        params: parameter groups; given by the engine.
        lr: learning rate, > 0 (0.1 with momentum 0.9 is the classic CIFAR choice).
        momentum: momentum factor in [0, 1).
        nesterov: use Nesterov momentum; needs momentum > 0 and no dampening.
        weight_decay: L2 penalty added to the gradients.
        dampening: dampening of the momentum.
        bias_norm_lr_mult: learning-rate multiplier of the biases and normalisation
            parameters (those of at most one dimension), on top of their group's
            lr_mult, e.g. 64 as airbench; 1 keeps them in their groups.
        bias_norm_weight_decay: weight decay of the biases and normalisation
            parameters, e.g. 0 as timm, or weight_decay / 64 with a multiplier of 64
            to keep lr * weight_decay; their group's (or weight_decay) when left out.
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"nesterov needs momentum > 0 and dampening 0 (got momentum={momentum}, dampening={dampening}): "
            "set momentum, e.g. 0.9, or nesterov false"
        )
    _check_lr(lr)
    _check_range("momentum", momentum, 0, 1)
    groups = _scaled_groups(params, lr, bias_norm_lr_mult, bias_norm_weight_decay)
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        **_fast_path(torch.optim.SGD, groups),
    )


def adam(
    params: ParamGroups,
    lr: LearningRate = 1e-3,
    betas: tuple[Beta, Beta] = (0.9, 0.999),
    eps: Annotated[float, Field(gt=0)] = 1e-8,
    weight_decay: NonNegative = 0.0,
    amsgrad: bool = False,
    bias_norm_lr_mult: BiasNormLrMult = 1.0,
    bias_norm_weight_decay: NonNegative | None = None,
) -> Optimizer:
    """Adam (torch.optim.Adam); its weight decay is an L2 penalty on the gradients.

    Args:
        params: parameter groups; given by the engine.
        lr: learning rate, > 0.
        betas: decay rates of the gradient's running mean and of its square.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty added to the gradients (use adamw for decoupled decay).
        amsgrad: use the AMSGrad variant.
        bias_norm_lr_mult: learning-rate multiplier of the biases and normalisation
            parameters (those of at most one dimension), on top of their group's
            lr_mult, e.g. 64 as airbench; 1 keeps them in their groups.
        bias_norm_weight_decay: weight decay of the biases and normalisation
            parameters, e.g. 0 as timm, or weight_decay / 64 with a multiplier of 64
            to keep lr * weight_decay; their group's (or weight_decay) when left out.
    """
    _check_lr(lr)
    groups = _scaled_groups(params, lr, bias_norm_lr_mult, bias_norm_weight_decay)
    options = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    return torch.optim.Adam(groups, **options, **_fast_path(torch.optim.Adam, groups))


def adamw(
    params: ParamGroups,
    lr: LearningRate = 1e-3,
    betas: tuple[Beta, Beta] = (0.9, 0.999),
    eps: Annotated[float, Field(gt=0)] = 1e-8,
    weight_decay: NonNegative = 0.01,
    amsgrad: bool = False,
    bias_norm_lr_mult: BiasNormLrMult = 1.0,
    bias_norm_weight_decay: NonNegative | None = None,
) -> Optimizer:
    """AdamW: Adam with decoupled weight decay (torch.optim.AdamW).

    Args:
        params: parameter groups; given by the engine.
        lr: learning rate, > 0.
        betas: decay rates of the gradient's running mean and of its square.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay, applied to the weights directly.
        amsgrad: use the AMSGrad variant.
        bias_norm_lr_mult: learning-rate multiplier of the biases and normalisation
            parameters (those of at most one dimension), on top of their group's
            lr_mult, e.g. 64 as airbench; 1 keeps them in their groups.
        bias_norm_weight_decay: weight decay of the biases and normalisation
            parameters, e.g. 0 as timm, or weight_decay / 64 with a multiplier of 64
            to keep lr * weight_decay; their group's (or weight_decay) when left out.
    """
    _check_lr(lr)
    groups = _scaled_groups(params, lr, bias_norm_lr_mult, bias_norm_weight_decay)
    options = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    return torch.optim.AdamW(groups, **options, **_fast_path(torch.optim.AdamW, groups))


def rmsprop(
    params: ParamGroups,
    lr: LearningRate = 1e-2,
    alpha: Annotated[float, Field(ge=0, lt=1)] = 0.99,
    eps: Annotated[float, Field(gt=0)] = 1e-8,
    weight_decay: NonNegative = 0.0,
    momentum: Momentum = 0.0,
    centered: bool = False,
    bias_norm_lr_mult: BiasNormLrMult = 1.0,
    bias_norm_weight_decay: NonNegative | None = None,
) -> Optimizer:
    """RMSprop (torch.optim.RMSprop).

    Args:
        params: parameter groups; given by the engine.
        lr: learning rate, > 0.
        alpha: smoothing constant of the squared-gradient average.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty added to the gradients.
        momentum: momentum factor in [0, 1).
        centered: normalise by an estimate of the gradient's variance.
        bias_norm_lr_mult: learning-rate multiplier of the biases and normalisation
            parameters (those of at most one dimension), on top of their group's
            lr_mult, e.g. 64 as airbench; 1 keeps them in their groups.
        bias_norm_weight_decay: weight decay of the biases and normalisation
            parameters, e.g. 0 as timm, or weight_decay / 64 with a multiplier of 64
            to keep lr * weight_decay; their group's (or weight_decay) when left out.
    """
    _check_lr(lr)
    _check_range("momentum", momentum, 0, 1)
    groups = _scaled_groups(params, lr, bias_norm_lr_mult, bias_norm_weight_decay)
    options = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
    return torch.optim.RMSprop(groups, **options, **_fast_path(torch.optim.RMSprop, groups))


def muon(
    params: ParamGroups,
    lr: LearningRate = 0.02,
    momentum: Momentum = 0.95,
    nesterov: bool = True,
    weight_decay: NonNegative = 0.01,
    ns_steps: Annotated[int, Field(ge=1, lt=100)] = 5,
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = "original",
    head: Literal["others", "muon"] = "others",
    others: Literal["adamw", "sgd"] = "adamw",
    others_lr: LearningRate = 3e-4,
    others_betas: tuple[Beta, Beta] = (0.9, 0.95),
    others_momentum: Momentum = 0.9,
    others_nesterov: bool = False,
    others_weight_decay: NonNegative = 0.01,
) -> Optimizer:
    """Muon for the weight matrices and conv filters, AdamW or SGD for the rest (torch.optim.Muon).

    As Keller Jordan's Muon and airbench94_muon: Muon orthogonalises the
    momentum of each hidden weight with a Newton-Schulz iteration; biases,
    normalisation parameters (at most one dimension) and the output head go
    to ``others``. The head is the last parameter of two or more dimensions
    in the model's order (its classifier's weight); ``head="muon"`` gives it
    to Muon too. torch's Muon takes 2-D parameters only, so a conv filter
    ``[out, in, kh, kw]`` is stepped as its ``[out, in * kh * kw]`` matrix,
    as airbench94_muon does. Both optimizers look like one to the engine:
    the others' groups come first, then Muon's (whose rate the engine logs),
    each group keeps its ``lr_mult``, and schedules scale both rates alike.
    Needs torch 2.9 or later.

    Args:
        params: parameter groups; given by the engine.
        lr: Muon's learning rate, > 0 (0.02 in Keller Jordan's README).
        momentum: Muon's momentum factor in [0, 1).
        nesterov: Nesterov momentum for Muon.
        weight_decay: Muon's decoupled weight decay.
        ns_steps: Newton-Schulz iterations per step.
        adjust_lr_fn: how Muon scales the rate by a matrix's shape: "original"
            (sqrt(max(1, rows / columns))) or "match_rms_adamw" (0.2 sqrt(max(rows, columns))).
        head: "others" (as Keller Jordan recommends) or "muon" for the output layer's weight.
        others: the optimizer of the rest, "adamw" or "sgd".
        others_lr: its learning rate.
        others_betas: AdamW's betas for the rest.
        others_momentum: SGD's momentum for the rest.
        others_nesterov: SGD's Nesterov momentum for the rest.
        others_weight_decay: the rest's weight decay (decoupled for AdamW, L2 for SGD).
    """
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"optimizer muon needs torch.optim.Muon, in torch 2.9 or later; this is torch "
                        f"{torch.__version__}: upgrade torch, or use adamw or sgd")
    _check_lr(lr)
    _check_lr(others_lr)
    _check_range("momentum", momentum, 0, 1)
    if others_nesterov and others == "sgd" and others_momentum <= 0:
        raise ValueError("others_nesterov needs others_momentum > 0: set others_momentum, e.g. 0.9")
    items = list(params)
    groups = _scaled_groups(items, lr)  # checks the groups; Muon's rates
    own_lr = [isinstance(item, dict) and "lr" in item for item in items] if len(groups) == len(items) else []
    matrices = [p for group in groups for p in group["params"] if p.ndim >= 2]
    head_param = matrices[-1] if head == "others" and matrices else None
    to_muon = {id(p) for p in matrices if p is not head_param}
    muon_groups, other_groups = [], []
    for i, group in enumerate(groups):
        # the others' rate is others_lr * lr_mult; a group's own rate keeps its ratio to lr
        rest = {key: value for key, value in group.items() if key != "lr"}
        if i < len(own_lr) and own_lr[i]:
            rest["lr"] = group["lr"] / lr * others_lr
        muon_groups.append({**group, "params": [p for p in group["params"] if id(p) in to_muon]})
        other_groups.append({**rest, "params": [p for p in group["params"] if id(p) not in to_muon]})
    if not any(group["params"] for group in muon_groups):
        raise UserError("optimizer muon found no weight of two or more dimensions besides the head: "
                        "use adamw or sgd for this model, or head 'muon'")
    if others == "adamw":
        rest_optimizer = adamw(other_groups, lr=others_lr, betas=others_betas, weight_decay=others_weight_decay)
    else:
        rest_optimizer = sgd(other_groups, lr=others_lr, momentum=others_momentum, nesterov=others_nesterov,
                             weight_decay=others_weight_decay)
    options = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                   adjust_lr_fn=adjust_lr_fn)
    return MuonWithOthers(muon_groups, rest_optimizer, **options)


@hookimpl
def cnnreg_optimizers():
    return {"sgd": sgd, "adam": adam, "adamw": adamw, "rmsprop": rmsprop, "muon": muon}


# -- schedules -------------------------------------------------------------------


def reduce_on_plateau(
    optimizer: Optimizer,
    monitor: str = "val_loss",
    mode: Literal["min", "max"] | None = None,
    factor: Annotated[float, Field(gt=0, lt=1)] = 0.1,
    patience: Annotated[int, Field(ge=0)] = 10,
    threshold: NonNegative = 1e-4,
    cooldown: Annotated[int, Field(ge=0)] = 0,
    min_lr: NonNegative = 0.0,
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
    warmup_steps: WarmupSteps = 0,
) -> Schedule:
    """Cut the rate by a factor when the monitored metric stops improving (torch's ReduceLROnPlateau).

    Steps once per epoch with the monitored value. During warm-up the metric
    is not watched, so the warm-up epochs are neither best nor bad epochs.

    Args:
        optimizer: the optimizer; given by the engine.
        monitor: the metric to watch, split-prefixed: val_loss, val_accuracy, val_f1, ...
        mode: "min" or "max"; left out, "min" for losses and errors, "max"
            for accuracy, precision, recall, f1 and other scores.
        factor: multiplier applied to the rate on a plateau, in (0, 1).
        patience: epochs without improvement before the rate is reduced.
        threshold: relative improvement that counts as better.
        cooldown: epochs to wait after a reduction before watching again.
        min_lr: the rate never goes below this.
        warmup_epochs: epochs of linear warm-up before watching the metric.
        warmup_start_factor: first warm-up epoch's share of the rate, in (0, 1].
        warmup_steps: optimizer steps of linear warm-up instead of warmup_epochs, per step.
    """
    mode = mode or monitor_mode(monitor)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), not {factor!r}")
    _check_warmup(warmup_epochs, warmup_start_factor, warmup_steps=warmup_steps)
    options = dict(mode=mode, factor=factor, patience=patience, threshold=threshold, cooldown=cooldown, min_lr=min_lr)
    if warmup_epochs == 0 and warmup_steps == 0:
        scheduler: ReduceLROnPlateau = ReduceLROnPlateau(optimizer, **options)
    else:
        scheduler = WarmupThenPlateau(optimizer, warmup_epochs, warmup_start_factor, warmup_steps, **options)
    return Schedule(scheduler, "epoch", monitor)


def cosine(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    t_max: Epochs | None = None,
    eta_min: NonNegative = 0.0,
    interval: Interval = "epoch",
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
    warmup_steps: WarmupSteps = 0,
) -> Schedule:
    """Cosine annealing from the rate down to eta_min at epoch t_max (torch's CosineAnnealingLR).

    As torch's, the curve rises again after ``t_max``: leave ``t_max`` out
    to end exactly at the last epoch.

    Args:
        optimizer: the optimizer; given by the engine.
        epochs: epochs of training; filled in.
        steps_per_epoch: optimizer steps per epoch; filled in.
        t_max: epoch at which the rate reaches eta_min, counted from the start
            of training; the last epoch when left out.
        eta_min: the lowest rate.
        interval: change the rate per "epoch" or smoothly per "step".
        warmup_epochs: epochs of linear warm-up, replacing the curve's start.
        warmup_start_factor: share of the rate the warm-up starts from, in (0, 1].
        warmup_steps: optimizer steps of linear warm-up instead of warmup_epochs, per step.
    """
    t_max = epochs if t_max is None else t_max
    _check_warmup(warmup_epochs, warmup_start_factor, before=t_max, what=f"t_max ({t_max})",
                  warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch)

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        return CosineAnnealingLR(optimizer, T_max=t_max * per_epoch - warmup, eta_min=eta_min)

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch, warmup_steps)


def step(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    step_size: Epochs = 30,
    gamma: Decay = 0.1,
    interval: Interval = "epoch",
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
    warmup_steps: WarmupSteps = 0,
) -> Schedule:
    """Multiply the rate by gamma every step_size epochs (torch's StepLR).

    Args:
        optimizer: the optimizer; given by the engine.
        epochs: epochs of training; filled in.
        steps_per_epoch: optimizer steps per epoch; filled in.
        step_size: epochs between reductions, counted from the start of training.
        gamma: multiplier at each reduction, in (0, 1].
        interval: change the rate per "epoch" or per "step" (matters for the warm-up only).
        warmup_epochs: epochs of linear warm-up; must be shorter than step_size.
        warmup_start_factor: share of the rate the warm-up starts from, in (0, 1].
        warmup_steps: optimizer steps of linear warm-up instead of warmup_epochs, per step.
    """
    _check_warmup(warmup_epochs, warmup_start_factor, before=step_size, what=f"step_size ({step_size})",
                  warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch)

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        if warmup == 0:
            return StepLR(optimizer, step_size=step_size * per_epoch, gamma=gamma)
        # StepLR counts from the end of the warm-up; reductions at whole
        # multiples of step_size from the start of training are milestones.
        drops = [k * step_size * per_epoch - warmup for k in range(1, epochs // step_size + 1)]
        return MultiStepLR(optimizer, milestones=drops, gamma=gamma)

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch, warmup_steps)


def multistep(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    milestones: list[Epochs],
    gamma: Decay = 0.1,
    interval: Interval = "epoch",
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
    warmup_steps: WarmupSteps = 0,
) -> Schedule:
    """Multiply the rate by gamma at each milestone epoch (torch's MultiStepLR).

    Args:
        optimizer: the optimizer; given by the engine.
        epochs: epochs of training; filled in.
        steps_per_epoch: optimizer steps per epoch; filled in.
        milestones: epochs after which the rate drops, increasing, counted from
            the start of training, e.g. [30, 60, 80].
        gamma: multiplier at each milestone, in (0, 1].
        interval: change the rate per "epoch" or per "step" (matters for the warm-up only).
        warmup_epochs: epochs of linear warm-up; must end before the first milestone.
        warmup_start_factor: share of the rate the warm-up starts from, in (0, 1].
        warmup_steps: optimizer steps of linear warm-up instead of warmup_epochs, per step.
    """
    if not milestones or any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones must be increasing epoch numbers >= 1, e.g. [30, 60, 80], not {list(milestones)}")
    first = milestones[0]
    _check_warmup(warmup_epochs, warmup_start_factor, before=first, what=f"the first milestone ({first})",
                  warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch)

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        return MultiStepLR(optimizer, milestones=[m * per_epoch - warmup for m in milestones], gamma=gamma)

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch, warmup_steps)


def exponential(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    gamma: Decay = 0.95,
    interval: Interval = "epoch",
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
    warmup_steps: WarmupSteps = 0,
) -> Schedule:
    """Multiply the rate by gamma every epoch (torch's ExponentialLR).

    With ``interval="step"`` the decay is spread over the epoch's steps
    (``gamma ** (1 / steps_per_epoch)`` per step), reaching the same rate at
    each epoch's end. After a warm-up, the decay starts from the full rate.

    Args:
        optimizer: the optimizer; given by the engine.
        epochs: epochs of training; filled in.
        steps_per_epoch: optimizer steps per epoch; filled in.
        gamma: multiplier per epoch, in (0, 1].
        interval: change the rate per "epoch" or smoothly per "step".
        warmup_epochs: epochs of linear warm-up before the decay starts.
        warmup_start_factor: share of the rate the warm-up starts from, in (0, 1].
        warmup_steps: optimizer steps of linear warm-up instead of warmup_epochs, per step.
    """
    _check_warmup(warmup_epochs, warmup_start_factor, before=epochs, what=f"epochs ({epochs})",
                  warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch)

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        return ExponentialLR(optimizer, gamma=gamma ** (1.0 / per_epoch))

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch, warmup_steps)


def onecycle(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    max_lr: LearningRate | None = None,
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    div_factor: Annotated[float, Field(gt=0)] = 25.0,
    final_div_factor: Annotated[float, Field(gt=0)] = 1e4,
    three_phase: bool = False,
    cycle_momentum: bool = True,
    base_momentum: Momentum = 0.85,
    max_momentum: Momentum = 0.95,
) -> Schedule:
    """The 1cycle policy: up to max_lr, then down far below the start, per step (torch's OneCycleLR).

    Its rising first phase (``pct_start``) is its warm-up, so it has no
    ``warmup_epochs``. A parameter group with ``lr_mult`` peaks at
    ``max_lr * lr_mult``. As torch's, ``cycle_momentum`` cycles SGD's momentum
    (or Adam's beta1) between ``max_momentum`` and ``base_momentum``.

    Args:
        optimizer: the optimizer; given by the engine.
        epochs: epochs of training; filled in.
        steps_per_epoch: optimizer steps per epoch; filled in.
        max_lr: the peak rate; the optimizer's rate when left out.
        pct_start: share of the steps spent rising to max_lr.
        anneal_strategy: "cos" or "linear" annealing.
        div_factor: the cycle starts at max_lr / div_factor.
        final_div_factor: the cycle ends at max_lr / div_factor / final_div_factor.
        three_phase: come back down to the start rate before the final decay.
        cycle_momentum: cycle the momentum inversely to the rate.
        base_momentum: momentum at the peak rate.
        max_momentum: momentum at the start and end.
    """
    if cycle_momentum and base_momentum > max_momentum:
        raise ValueError(f"base_momentum ({base_momentum}) must not exceed max_momentum ({max_momentum})")
    groups = optimizer.param_groups
    peaks = (
        [group["lr"] for group in groups]
        if max_lr is None
        else [max_lr * group.get("lr_mult", 1.0) for group in groups]
    )
    scheduler = OneCycleLR(
        optimizer,
        max_lr=peaks,
        total_steps=epochs * steps_per_epoch,
        pct_start=pct_start,
        anneal_strategy=anneal_strategy,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=three_phase,
        cycle_momentum=cycle_momentum,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
    )
    return Schedule(scheduler, "step")


def triangular(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    start_factor: Annotated[float, Field(ge=0)] = 0.2,
    peak: Annotated[float, Field(ge=0, le=1)] = 0.23,
    end_factor: Annotated[float, Field(ge=0)] = 0.07,
) -> Schedule:
    """Linearly up to the rate, then linearly down, per optimizer step (airbench94's schedule).

    Of ``total = epochs * steps_per_epoch`` steps, the rate rises from
    ``start_factor`` times the rate at step 0 to the full rate at step
    ``round(peak * total)``, then falls to ``end_factor`` times the rate after
    the last step (and stays there). With ``peak`` 0 it is a linear decay
    from the full rate, with ``end_factor`` 0 it ends at zero. The factors
    are shares of the rate and may exceed 1. Its rise is its warm-up, so it
    has no ``warmup_epochs``; every group keeps its ``lr_mult`` ratio.

    Args:
        optimizer: the optimizer; given by the engine.
        epochs: epochs of training; filled in.
        steps_per_epoch: optimizer steps per epoch; filled in.
        start_factor: share of the rate at the first step, >= 0.
        peak: fraction of all steps at which the full rate is reached, in [0, 1].
        end_factor: share of the rate at the end, >= 0.
    """
    for name, value in (("start_factor", start_factor), ("end_factor", end_factor)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, not {value!r}")
    if not 0 <= peak <= 1:
        raise ValueError(f"peak must be in [0, 1], not {peak!r}")
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, not {epochs} and {steps_per_epoch}")
    total = epochs * steps_per_epoch
    factor = Triangle(total, round(peak * total), float(start_factor), float(end_factor))
    return Schedule(LambdaLR(optimizer, factor), "step")


@hookimpl
def cnnreg_schedulers():
    return {
        "reduce_on_plateau": reduce_on_plateau,
        "cosine": cosine,
        "step": step,
        "multistep": multistep,
        "exponential": exponential,
        "onecycle": onecycle,
        "triangular": triangular,
    }


class WarmupThenPlateau(ReduceLROnPlateau):
    """ReduceLROnPlateau after a linear warm-up of ``warmup_epochs`` epochs.

    torch's SequentialLR cannot hold ReduceLROnPlateau (its step needs the
    metric), so this runs torch's LinearLR for the first epochs, ignoring the
    metric, and plain ReduceLROnPlateau after; it stays a ReduceLROnPlateau
    for code that asks. Its state_dict carries the
    warm-up's, so a resumed run continues where it stopped.
    """

    def __init__(self, optimizer: Optimizer, warmup_epochs: int, warmup_start_factor: float, warmup_steps: int = 0,
                 **options: Any) -> None:
        super().__init__(optimizer, **options)
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.warming = False  # a warm-up step happened in this epoch: its metric is not watched
        self.warmup = LinearLR(optimizer, start_factor=warmup_start_factor, total_iters=warmup_steps or warmup_epochs)
        self._last_lr = self.warmup.get_last_lr()
        if warmup_steps:
            # the engine steps this schedule once an epoch (it needs the metric):
            # the per-step warm-up follows the optimizer's own steps instead
            self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self.warmup.last_epoch < self.warmup_steps:
            self.warmup.step()
            self._last_lr = self.warmup.get_last_lr()
            self.warming = True

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        if self.warmup_steps:
            if self.warming or self.warmup.last_epoch < self.warmup_steps:
                self.warming = False
                return
            super().step(metrics, epoch)
        elif self.warmup.last_epoch < self.warmup_epochs:
            self.warmup.step()
            self._last_lr = self.warmup.get_last_lr()
        else:
            super().step(metrics, epoch)

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "warmup", "_hook")}
        state["warmup"] = self.warmup.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        warmup = state.pop("warmup")
        super().load_state_dict(state)
        self.warmup.load_state_dict(warmup)


class MuonWithOthers(Optimizer):
    """torch's Muon for some parameters and another optimizer for the rest, as one optimizer.

    The engine, GradScaler, gradient clipping and the schedules see one
    ``Optimizer``: ``param_groups`` are the others' groups, then Muon's, with
    the model's own parameters (conv filters in their 4-D shape), and every
    option a schedule changes there (``lr``, ``momentum``) is copied to the
    inner optimizers before each step. torch's Muon refuses parameters of
    more than two dimensions, so it steps a 2-D shadow of each: the weight is
    copied in, its gradient viewed (copied when channels-last) as a matrix,
    and the result copied back; the copies are small next to a CNN's
    activations. ``state_dict`` has torch's layout (``state`` and
    ``param_groups`` numbered over all parameters), so resuming and the
    checks of a resumed run's groups work unchanged.
    """

    def __init__(self, muon_groups: ParamGroups, others: Optimizer, **muon_options: Any) -> None:
        self.others = others
        self._shadows: dict[int, torch.Tensor] = {}  # id of a >2-D parameter -> its 2-D shadow
        inner = []
        for group in muon_groups:
            flat = []
            for p in group["params"]:
                if p.ndim > 2:
                    self._shadows[id(p)] = torch.empty(p.shape[0], p[0].numel(), dtype=p.dtype, device=p.device)
                    flat.append(self._shadows[id(p)])
                else:
                    flat.append(p)
            inner.append({**group, "params": flat})
        self.muon = torch.optim.Muon(inner, **muon_options)
        outer = [dict(group) for group in others.param_groups]
        outer += [{**dict(inner_group), "params": list(group["params"])}
                  for inner_group, group in zip(self.muon.param_groups, muon_groups)]
        super().__init__(outer, {})  # no defaults: they would be added to the others' groups
        # Muon's defaults after, so that onecycle's cycle_momentum finds a "momentum" to cycle
        self.defaults = dict(self.muon.defaults)
        self._pairs = [(p, self._shadows[id(p)]) for group in muon_groups for p in group["params"] if id(p) in self._shadows]

    def _inner_groups(self) -> list[dict[str, Any]]:
        return [*self.others.param_groups, *self.muon.param_groups]

    def _push_options(self) -> None:
        """Copy every option but the parameters from the outer groups to the inner ones."""
        for outer, inner in zip(self.param_groups, self._inner_groups()):
            inner.update({key: value for key, value in outer.items() if key != "params"})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._push_options()
        for p, shadow in self._pairs:
            shadow.copy_(p.reshape(shadow.shape))  # the weight may have changed outside (EMA, a loaded checkpoint)
            shadow.grad = None if p.grad is None else p.grad.reshape(shadow.shape)
        self.others.step()
        self.muon.step()
        for p, shadow in self._pairs:
            p.copy_(shadow.view(p.shape))
            shadow.grad = None
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        self._push_options()
        first, second = self.others.state_dict(), self.muon.state_dict()
        offset = sum(len(group["params"]) for group in first["param_groups"])
        state = {**first["state"], **{index + offset: value for index, value in second["state"].items()}}
        groups = first["param_groups"] + [
            {**group, "params": [index + offset for index in group["params"]]} for group in second["param_groups"]
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        groups = state_dict["param_groups"]
        count = len(self.others.param_groups)
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer has {len(groups)} parameter groups, this one {len(self.param_groups)}")
        offset = sum(len(group["params"]) for group in groups[:count])
        state = state_dict["state"]
        self.others.load_state_dict({
            "state": {index: value for index, value in state.items() if index < offset},
            "param_groups": groups[:count],
        })
        self.muon.load_state_dict({
            "state": {index - offset: value for index, value in state.items() if index >= offset},
            "param_groups": [{**group, "params": [index - offset for index in group["params"]]}
                             for group in groups[count:]],
        })
        for outer, inner in zip(self.param_groups, self._inner_groups()):
            outer.update({key: value for key, value in inner.items() if key != "params"})


class StepWarmupThenEpochs:
    """A linear warm-up per optimizer step, then an epoch schedule stepped at each epoch's end.

    The engine steps it after every optimizer step (its interval is "step"):
    each of the first ``warmup_steps`` steps moves the warm-up, and from then
    on the last step of each epoch moves the epoch schedule, as timm's
    schedulers do with ``warmup_t`` in updates and the schedule in epochs.
    """

    def __init__(self, optimizer: Optimizer, warmup: LRScheduler, main: LRScheduler, warmup_steps: int,
                 steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.warmup, self.main = warmup, main
        self.warmup_steps, self.steps_per_epoch = warmup_steps, steps_per_epoch
        self.last_epoch = 0  # optimizer steps taken, as torch's per-step schedules count them

    def step(self) -> None:
        self.last_epoch += 1
        if self.last_epoch <= self.warmup_steps:
            self.warmup.step()
        elif self.last_epoch % self.steps_per_epoch == 0:
            self.main.step()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "warmup": self.warmup.state_dict(), "main": self.main.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self.warmup.load_state_dict(state_dict["warmup"])
        self.main.load_state_dict(state_dict["main"])


@dataclass(frozen=True)
class Triangle:
    """The triangular schedule's factor at step ``t``, for torch's LambdaLR.

    An object rather than a function: LambdaLR's state_dict keeps the
    ``__dict__`` of callable objects (plain numbers here, so a checkpoint
    loads with ``weights_only``), and loading it puts them back.
    """

    total: int
    peak: int
    start_factor: float
    end_factor: float

    def __call__(self, t: int) -> float:
        t = min(max(t, 0), self.total)
        if t < self.peak:
            return self.start_factor + (1.0 - self.start_factor) * t / self.peak
        if t == self.peak:
            return 1.0
        return 1.0 + (self.end_factor - 1.0) * (t - self.peak) / (self.total - self.peak)


# -- helpers ---------------------------------------------------------------------


def _scaled_groups(
    params: ParamGroups | Iterable[torch.Tensor],
    lr: float,
    bias_norm_lr_mult: float = 1.0,
    bias_norm_weight_decay: float | None = None,
) -> ParamGroups:
    """Copies of the groups with ``lr = lr * lr_mult`` (a group's own ``lr`` is kept).

    Also takes a plain iterable of tensors (``model.parameters()``), as one group.
    Unless ``bias_norm_lr_mult`` is 1 and ``bias_norm_weight_decay`` None, each
    group's biases and normalisation parameters are split off first (see
    :func:`_split_bias_norm`).
    """
    if not (isinstance(bias_norm_lr_mult, (int, float)) and bias_norm_lr_mult > 0):
        raise ValueError(f"bias_norm_lr_mult must be > 0, not {bias_norm_lr_mult!r}")
    if bias_norm_weight_decay is not None and not bias_norm_weight_decay >= 0:
        raise ValueError(f"bias_norm_weight_decay must be >= 0, not {bias_norm_weight_decay!r}")
    split = bias_norm_lr_mult != 1 or bias_norm_weight_decay is not None
    items = list(params)
    if items and all(isinstance(item, torch.Tensor) for item in items):
        items = [{"params": items}]
    groups = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "params" not in item:
            raise ValueError(f"parameter group {i} must be a dict with a 'params' list, not {type(item).__name__}")
        group = dict(item)
        group["params"] = list(group["params"])
        mult = group.setdefault("lr_mult", 1.0)
        if not (isinstance(mult, (int, float)) and mult >= 0):
            raise ValueError(f"parameter group {i} has lr_mult {mult!r}: it must be a number >= 0")
        if group.get("weight_decay", 0) < 0:
            raise ValueError(f"parameter group {i} has weight_decay {group['weight_decay']!r}: it must be >= 0")
        for part in _split_bias_norm(group, bias_norm_lr_mult, bias_norm_weight_decay) if split else [group]:
            part.setdefault("lr", lr * part["lr_mult"])
            groups.append(part)
    return groups


def _split_bias_norm(group: dict[str, Any], lr_mult: float, weight_decay: float | None) -> ParamGroups:
    """The group as two: its biases and normalisation parameters, then the rest.

    As timm's ``param_groups_weight_decay``, a parameter of at most one
    dimension (a bias, a norm's weight or bias) is one of the first; frozen
    ones are split alike. Their group has ``lr_mult`` (and an ``lr`` of its
    own) times ``lr_mult``, and ``weight_decay`` if not None, else the
    group's. The rest keeps the group as it is. An empty part is left out
    (an empty group stays one group). Biases and norms come first, as in
    timm, so that the last group, whose rate the engine logs, stays a main one.
    A group with ``"split_bias_norm": False`` (a model's own choice, through
    ``cnnreg_param_groups``) is kept whole.
    """
    if group.get("split_bias_norm", True) is False:
        return [group]
    bias_norm = {**group, "params": [p for p in group["params"] if p.ndim <= 1]}
    rest = {**group, "params": [p for p in group["params"] if p.ndim > 1]}
    bias_norm["lr_mult"] = group["lr_mult"] * lr_mult
    if "lr" in group:
        bias_norm["lr"] = group["lr"] * lr_mult
    if weight_decay is not None:
        bias_norm["weight_decay"] = weight_decay
    if not bias_norm["params"]:
        return [rest]
    return [bias_norm, rest] if rest["params"] else [bias_norm]


def _fast_path(optimizer_class: type[Optimizer], groups: ParamGroups) -> dict[str, bool]:
    """``fused=True`` when every parameter is on CUDA and torch fuses this optimizer.

    Otherwise torch chooses (foreach on CUDA, a loop on the CPU).
    """
    params = [p for group in groups for p in group["params"]]
    fusable = "fused" in inspect.signature(optimizer_class).parameters
    if fusable and params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def _timed(
    optimizer: Optimizer,
    build: Callable[[int, int], LRScheduler],
    interval: str,
    warmup_epochs: int,
    warmup_start_factor: float,
    steps_per_epoch: int,
    warmup_steps: int = 0,
) -> Schedule:
    """A schedule of time alone, after an optional linear warm-up, in ``interval`` units.

    ``build(per_epoch, warmup)`` makes the main schedule; its count starts
    at 0 when the warm-up (``warmup`` units) ends, and it converts epochs to
    units with ``per_epoch``. A warm-up of ``warmup_steps`` before an epoch
    schedule is stepped per step (:class:`StepWarmupThenEpochs`); the epoch
    schedule counts from the epoch in which it ends.
    """
    if interval not in ("epoch", "step"):
        raise ValueError(f"interval must be 'epoch' or 'step', not {interval!r}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, not {steps_per_epoch}")
    per_epoch = steps_per_epoch if interval == "step" else 1
    if warmup_steps and interval == "epoch":
        main = build(1, warmup_steps // steps_per_epoch)
        # made after main, so it starts from main's first rate, the full one
        ramp = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_steps)
        return Schedule(StepWarmupThenEpochs(optimizer, ramp, main, warmup_steps, steps_per_epoch), "step")
    warmup = warmup_steps or warmup_epochs * per_epoch
    if warmup == 0:
        return Schedule(build(per_epoch, 0), interval)
    ramp = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup)
    main = build(per_epoch, warmup)
    return Schedule(SequentialLR(optimizer, [ramp, main], milestones=[warmup]), interval)


def _check_warmup(warmup_epochs: int, start_factor: float, before: int | None = None, what: str = "",
                  warmup_steps: int = 0, steps_per_epoch: int = 1) -> None:
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, not {warmup_epochs}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, not {warmup_steps}")
    if warmup_epochs and warmup_steps:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) and warmup_steps ({warmup_steps}) are both set: "
                         "give one of them, the other 0")
    if not 0 < start_factor <= 1:
        raise ValueError(f"warmup_start_factor must be in (0, 1], not {start_factor!r}")
    if before is not None and warmup_epochs >= before:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must end before {what}: shorten the warm-up")
    if before is not None and warmup_steps >= before * steps_per_epoch:
        raise ValueError(f"warmup_steps ({warmup_steps}) must end before {what}, at step "
                         f"{before * steps_per_epoch} ({steps_per_epoch} a epoch): shorten the warm-up")


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, not {lr!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), not {value!r}")
