"""Stochastic weight averaging (SWA; Izmailov et al. 2018), as torch.optim.swa_utils and Lightning do it.

From ``start_epoch`` on, the weights at the end of every epoch are folded
into an equal-weight average (torch's ``AveragedModel``: after n epochs the
average is the mean of their n weights). At the end of training the model
takes the average's parameters and its batch-norm statistics are recomputed
with one pass over the training batches (torch's ``update_bn``: momentum
None, a cumulative mean over the batches), since statistics gathered along
the way belong to none of the averaged weights.

When the average is swapped in (and so what best.safetensors, last.pt and
the final model hold):

* ``eval_with_average`` (the default): every validation from ``start_epoch``
  on sees the average, with the training weights' batch-norm statistics
  (recomputing them each epoch would cost a pass over the training data);
  in the last epoch the finished average, statistics recomputed, is swapped
  in before validation, so the last epoch's metrics, its checkpoint files and
  last.pt are the SWA model's. The training weights go back at the next epoch.
* otherwise validation sees the training weights (as do the checkpoint
  files), and the model takes the finished average when training ends.

``swa_lr`` anneals each parameter group's rate to ``swa_lr`` (times the
group's ``lr_mult``) over ``anneal_epochs`` epochs, from the rate the group
has when ``start_epoch`` begins, with SWALR's curve: in SWA epoch k (0 the
first) the rate is ``swa_lr * a + lr0 * (1 - a)`` with ``a = f(min(1, k /
anneal_epochs))``. A callback cannot replace the recipe's scheduler (it is
part of the run, saved in last.pt and stepped by the engine), so it goes on
stepping and the callback sets the rates over its result: at every SWA
epoch's start, and after every optimizer step when the schedule steps per
step. A scheduler that reads the current rate (ReduceLROnPlateau) sees the
SWA rate then, and its changes are overwritten.

The average, how many epochs it holds, the held training weights and
whether the statistics were recomputed are saved in ``last.pt``: a resumed
run ends with the same weights as one that was not interrupted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn

from cnnreg import hookimpl
from cnnreg.core.device import autocast, input_dtype
from cnnreg.core.errors import UserError
from cnnreg.inputs.prepare import prepare_batch

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.records import EpochRecord, FitResult
    from cnnreg.core.run import Run

Strategy = Literal["cos", "linear"]


def first_swa_epoch(start_epoch: int | float, epochs: int) -> int:
    """The 1-based epoch SWA starts in: ``start_epoch`` itself, or for a fraction f in (0, 1)
    the epoch after ``int(f * epochs)`` ones (Lightning's ``swa_epoch_start``).

    :raises UserError: the epoch is beyond the run's last one.
    """
    first = int(start_epoch * epochs) + 1 if 0 < start_epoch < 1 else int(start_epoch)
    if first > epochs:
        raise UserError(f"swa start_epoch {start_epoch} is beyond the run's {epochs} epochs, so nothing would be "
                        f"averaged: set start_epoch to at most {epochs} (or a fraction such as 0.75), or train longer")
    return first


def annealed_lr(lr0: float, swa_lr: float, swa_epoch: int, anneal_epochs: int, strategy: Strategy) -> float:
    """SWALR's rate in SWA epoch ``swa_epoch`` (0 the first), starting from ``lr0``, in closed form."""
    t = 1.0 if anneal_epochs == 0 else min(1.0, swa_epoch / anneal_epochs)
    alpha = t if strategy == "linear" else (1 - math.cos(math.pi * t)) / 2
    return swa_lr * alpha + lr0 * (1 - alpha)


class StochasticWeightAverage:
    """An equal-weight average of the end-of-epoch weights; see the module docstring."""

    def __init__(self, start_epoch: int | float, swa_lr: float | None, anneal_epochs: int, anneal_strategy: Strategy,
                 update_bn: bool, eval_with_average: bool) -> None:
        self.start_epoch, self.swa_lr = start_epoch, swa_lr
        self.anneal_epochs, self.anneal_strategy = anneal_epochs, anneal_strategy
        self.update_bn, self.eval_with_average = update_bn, eval_with_average
        self.first = 1  # start_epoch as an epoch number, once the run's length is known
        self.averaged: AveragedModel | None = None  # made when the first weights are folded in
        self.restored: Mapping[str, Any] | None = None  # from last.pt, applied once the model is known
        self.held: list[torch.Tensor] | None = None  # the training state while the model holds the average
        self.final = False  # the model holds the finished average
        self.bn_updated = False  # ... with its batch-norm statistics recomputed
        self.lr0: list[float] | None = None  # each group's rate when SWA began
        self.lrs: list[float] | None = None  # the rates of this SWA epoch
        self.epoch: int | None = None  # the epoch being trained; None outside an epoch
        self.folded = False  # this epoch's weights are in the average
        self.state: list[torch.Tensor] = []  # the model's state_dict tensors (its storage), listed once per fit

    # -- events ---------------------------------------------------------------------------------

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        self.first = first_swa_epoch(self.start_epoch, run.recipe.trainer.epochs)
        self.state = list(run.model.state_dict().values())
        if self.held is not None:  # restored on the CPU
            self.held = [h.to(device=t.device, dtype=t.dtype) for h, t in zip(self.held, self.state)]
        saved = self.restored
        self.restored = None
        if saved is not None and int(saved.get("n_averaged", 0)) > 0:
            averaged = self._averaged(run)
            with torch.no_grad():
                for mine, kept in zip(averaged.module.parameters(), saved["average"]):
                    mine.copy_(kept)
                averaged.n_averaged.fill_(int(saved["n_averaged"]))

    @hookimpl
    def cnnreg_epoch_start(self, run: Run, epoch: int) -> None:
        if self.held is not None:
            self._swap_out()
        self.epoch, self.folded, self.lrs = epoch, False, None
        if self.swa_lr is not None and epoch >= self.first:
            groups = run.optimizer.param_groups
            if self.lr0 is None:
                self.lr0 = [float(g["lr"]) for g in groups]
            self.lrs = [annealed_lr(lr0, self.swa_lr * float(g.get("lr_mult", 1.0)), epoch - self.first,
                                    self.anneal_epochs, self.anneal_strategy) for lr0, g in zip(self.lr0, groups)]
            self._set_lrs(run)

    @hookimpl
    def cnnreg_evaluate_start(self, run: Run, split: str) -> None:
        # Inside fit only: this epoch's training is done, so its weights are final.
        if self.epoch is None or self.epoch < self.first or not self.eval_with_average:
            return
        self._fold(run)
        if self.epoch == run.recipe.trainer.epochs:
            self._finish(run, self.epoch)
        elif self.held is None:
            self._swap_in(run)

    @hookimpl(tryfirst=True)  # before the checkpoint callback writes the weights
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        epoch, self.epoch = record.epoch, None
        if epoch < self.first:
            return
        self._fold(run)
        if self.eval_with_average and epoch == run.recipe.trainer.epochs and not self.final:
            self._finish(run, epoch)  # no validation this epoch took it in

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        # A run stopped early ends with the average too; an interrupted or failed one is left
        # as it is: its resume (or the fault) decides.
        stopped = result.stopped
        if self.final or self.averaged is None or stopped == "interrupted" or stopped.startswith("stopped:"):
            return
        self._finish(run, result.records[-1].epoch if result.records else self.first)

    # -- the average ----------------------------------------------------------------------------

    def _averaged(self, run: Run) -> AveragedModel:
        if self.averaged is None:
            # buffers are not averaged: batch-norm statistics are recomputed at the end instead
            self.averaged = AveragedModel(run.model, use_buffers=False)
        return self.averaged

    def _fold(self, run: Run) -> None:
        if not self.folded:
            self._averaged(run).update_parameters(run.model)
            self.folded = True

    def _finish(self, run: Run, epoch: int) -> None:
        if self.held is None:
            self._swap_in(run)
        if self.update_bn:
            recompute_bn(run, epoch)
            self.bn_updated = True
        self.final = True

    def _swap_in(self, run: Run) -> None:
        # Copies, not pointer swaps: a compiled or CUDA-graphed model keeps its tensors' addresses.
        assert self.averaged is not None
        with torch.no_grad():
            self.held = [t.clone() for t in self.state]
            for param, average in zip(run.model.parameters(), self.averaged.module.parameters()):
                param.copy_(average)

    def _swap_out(self) -> None:
        assert self.held is not None
        with torch.no_grad():
            for t, h in zip(self.state, self.held):
                t.copy_(h)
        self.held, self.final, self.bn_updated = None, False, False

    def _set_lrs(self, run: Run) -> None:
        for group, lr in zip(run.optimizer.param_groups, self.lrs or ()):
            if isinstance(group["lr"], torch.Tensor):  # a tensor rate (capturable optimizers) keeps its storage
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        averaged = self.averaged
        return {"average": [p.detach() for p in averaged.module.parameters()] if averaged is not None else [],
                "n_averaged": int(averaged.n_averaged) if averaged is not None else 0,
                "held": list(self.held or []), "final": self.final, "bn_updated": self.bn_updated,
                "lr0": self.lr0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.restored = state
        self.held = list(state.get("held") or []) or None
        self.final, self.bn_updated = bool(state.get("final")), bool(state.get("bn_updated"))
        lr0 = state.get("lr0")
        self.lr0 = [float(v) for v in lr0] if lr0 is not None else None


class StochasticWeightAverageWithLr(StochasticWeightAverage):
    """With ``swa_lr``: also puts the SWA rates back after a per-step schedule's every step.

    A class of its own so that a run without ``swa_lr`` has no per-step hook to dispatch.
    """

    @hookimpl
    def cnnreg_optimizer_step(self, run: Run, epoch: int, step: int, total_steps: int) -> None:
        if self.lrs is not None and run.schedule is not None and run.schedule.interval == "step":
            self._set_lrs(run)


def recompute_bn(run: Run, epoch: int) -> None:
    """torch's ``update_bn`` on the run's model over one pass of the training batches (epoch
    ``epoch``'s order, the train transforms), without moving the random streams training uses."""
    batches = run.batches["train"]
    batches.set_epoch(epoch)
    dtype = input_dtype(run.precision)

    def inputs():
        for images, _, index in batches.indexed():
            yield prepare_batch(images, run.train_transforms, channels_last=run.channels_last, dtype=dtype,
                                index=index, epoch=epoch)

    devices = [run.device.index or 0] if run.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=run.device.type if devices else "cuda"), \
            torch.no_grad(), autocast(run.device, run.precision):
        torch_update_bn(inputs(), run.model)


def swa(epochs: int, start_epoch: int | float = 0.75, swa_lr: float | None = None, anneal_epochs: int = 2,
        anneal_strategy: Strategy = "cos", update_bn: bool = True,
        eval_with_average: bool = True) -> StochasticWeightAverage:
    """Stochastic weight averaging: the mean of the end-of-epoch weights from start_epoch on.

    Args:
        epochs: the run's epochs (filled from the trainer), to check start_epoch against.
        start_epoch: first epoch averaged: an epoch number (>= 1), or a fraction of the run's
            epochs in (0, 1) (0.75 with 20 epochs: from epoch 16).
        swa_lr: anneal the learning rate to this from start_epoch on (times a group's
            lr_mult), over the recipe's scheduler; null keeps the optimizer's rate.
        anneal_epochs: epochs the annealing to swa_lr takes (0: switch at once).
        anneal_strategy: shape of the annealing: "cos" or "linear".
        update_bn: recompute batch-norm statistics for the averaged weights with one pass
            over the training data at the end.
        eval_with_average: validate with the average from start_epoch on (and save it as
            the best checkpoint); false: validate the training weights, take the average at the end.
    """
    if isinstance(start_epoch, bool) or not (0 < start_epoch < 1 or (start_epoch >= 1 and start_epoch == int(start_epoch))):
        raise ValueError(f"start_epoch must be an epoch number (1, 2, ...) or a fraction of the run's epochs "
                         f"in (0, 1), not {start_epoch!r}")
    if swa_lr is not None and not swa_lr > 0:
        raise ValueError(f"swa_lr must be > 0 (the rate SWA anneals to), not {swa_lr!r}; leave it out (null) to "
                         "keep the optimizer's rate")
    if anneal_epochs < 0:
        raise ValueError(f"anneal_epochs must be >= 0 (0 switches to swa_lr at once), not {anneal_epochs!r}")
    first_swa_epoch(start_epoch, epochs)  # here, so validate finds it too (the run checks again on resume)
    kind = StochasticWeightAverage if swa_lr is None else StochasticWeightAverageWithLr
    return kind(start_epoch, swa_lr, anneal_epochs, anneal_strategy, update_bn, eval_with_average)


@hookimpl
def cnnreg_callbacks() -> dict:
    return {"swa": swa}
