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
``interval="step"``. Epoch numbers (``t_max``, ``step_size``,
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
from cnnreg.core.records import Schedule, infer_mode

ParamGroups = list[dict[str, Any]]
LearningRate = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Epochs = Annotated[int, Field(ge=1)]
Steps = Annotated[int, Field(ge=1)]
WarmupEpochs = Annotated[int, Field(ge=0)]
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


@hookimpl
def cnnreg_optimizers():
    return {"sgd": sgd, "adam": adam, "adamw": adamw, "rmsprop": rmsprop}


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
    """
    mode = mode or monitor_mode(monitor)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), not {factor!r}")
    _check_warmup(warmup_epochs, warmup_start_factor)
    options = dict(mode=mode, factor=factor, patience=patience, threshold=threshold, cooldown=cooldown, min_lr=min_lr)
    if warmup_epochs == 0:
        scheduler: ReduceLROnPlateau = ReduceLROnPlateau(optimizer, **options)
    else:
        scheduler = WarmupThenPlateau(optimizer, warmup_epochs, warmup_start_factor, **options)
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
    """
    t_max = epochs if t_max is None else t_max
    _check_warmup(warmup_epochs, warmup_start_factor, before=t_max, what=f"t_max ({t_max})")

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        return CosineAnnealingLR(optimizer, T_max=t_max * per_epoch - warmup, eta_min=eta_min)

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch)


def step(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    step_size: Epochs = 30,
    gamma: Decay = 0.1,
    interval: Interval = "epoch",
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
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
    """
    _check_warmup(warmup_epochs, warmup_start_factor, before=step_size, what=f"step_size ({step_size})")

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        if warmup == 0:
            return StepLR(optimizer, step_size=step_size * per_epoch, gamma=gamma)
        # StepLR counts from the end of the warm-up; reductions at whole
        # multiples of step_size from the start of training are milestones.
        drops = [k * step_size * per_epoch - warmup for k in range(1, epochs // step_size + 1)]
        return MultiStepLR(optimizer, milestones=drops, gamma=gamma)

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch)


def multistep(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    milestones: list[Epochs],
    gamma: Decay = 0.1,
    interval: Interval = "epoch",
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
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
    """
    if not milestones or any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones must be increasing epoch numbers >= 1, e.g. [30, 60, 80], not {list(milestones)}")
    first = milestones[0]
    _check_warmup(warmup_epochs, warmup_start_factor, before=first, what=f"the first milestone ({first})")

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        return MultiStepLR(optimizer, milestones=[m * per_epoch - warmup for m in milestones], gamma=gamma)

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch)


def exponential(
    optimizer: Optimizer,
    epochs: Epochs,
    steps_per_epoch: Steps,
    gamma: Decay = 0.95,
    interval: Interval = "epoch",
    warmup_epochs: WarmupEpochs = 0,
    warmup_start_factor: StartFactor = 0.1,
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
    """
    _check_warmup(warmup_epochs, warmup_start_factor, before=epochs, what=f"epochs ({epochs})")

    def build(per_epoch: int, warmup: int) -> LRScheduler:
        return ExponentialLR(optimizer, gamma=gamma ** (1.0 / per_epoch))

    return _timed(optimizer, build, interval, warmup_epochs, warmup_start_factor, steps_per_epoch)


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

    def __init__(self, optimizer: Optimizer, warmup_epochs: int, warmup_start_factor: float, **options: Any) -> None:
        super().__init__(optimizer, **options)
        self.warmup_epochs = warmup_epochs
        self.warmup = LinearLR(optimizer, start_factor=warmup_start_factor, total_iters=warmup_epochs)
        self._last_lr = self.warmup.get_last_lr()

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        if self.warmup.last_epoch < self.warmup_epochs:
            self.warmup.step()
            self._last_lr = self.warmup.get_last_lr()
        else:
            super().step(metrics, epoch)

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "warmup")}
        state["warmup"] = self.warmup.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        warmup = state.pop("warmup")
        super().load_state_dict(state)
        self.warmup.load_state_dict(warmup)


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
) -> Schedule:
    """A schedule of time alone, after an optional linear warm-up, in ``interval`` units.

    ``build(per_epoch, warmup)`` makes the main schedule; its count starts
    at 0 when the warm-up (``warmup`` units) ends, and it converts epochs to
    units with ``per_epoch``.
    """
    if interval not in ("epoch", "step"):
        raise ValueError(f"interval must be 'epoch' or 'step', not {interval!r}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, not {steps_per_epoch}")
    per_epoch = steps_per_epoch if interval == "step" else 1
    warmup = warmup_epochs * per_epoch
    if warmup == 0:
        return Schedule(build(per_epoch, 0), interval)
    ramp = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup)
    main = build(per_epoch, warmup)
    return Schedule(SequentialLR(optimizer, [ramp, main], milestones=[warmup]), interval)


def _check_warmup(warmup_epochs: int, start_factor: float, before: int | None = None, what: str = "") -> None:
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, not {warmup_epochs}")
    if not 0 < start_factor <= 1:
        raise ValueError(f"warmup_start_factor must be in (0, 1], not {start_factor!r}")
    if before is not None and warmup_epochs >= before:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must end before {what}: shorten the warm-up")


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, not {lr!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), not {value!r}")
