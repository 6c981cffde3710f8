"""Averages of the weights over training: an exponential moving average (EMA), and lookahead.

Both keep a second copy of the model's floating-point state (parameters and
buffers such as batch-norm statistics) and move it towards the training
weights every ``every`` optimizer steps, through the ``cnnreg_optimizer_step``
hook::

    average = decay * average + (1 - decay) * weights

* ``ema`` (as timm's ModelEma): the training weights go on undisturbed; the
  average is what validation sees (it is swapped into the model when an
  evaluation starts and swapped out again when the next epoch starts), what
  the best checkpoint saves, and what the model holds when training ends.
* ``lookahead`` (Zhang et al. 2019, as airbench uses it): after each update
  the training weights are reset to the average, so training itself goes on
  from the slow weights; the model ends holding the average too.

``ramp_power`` lets the decay grow with training, ``decay * (step /
total_steps) ** ramp_power``: early on, when the weights move fast, the
average follows them closely (airbench: lookahead every 5 steps, decay
0.95**5, power 3).

Updates are fused ``torch._foreach`` kernels queued on the device; nothing
is read back to the host. The average and whether it is swapped in are
saved in ``last.pt``, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Mapping

import torch
from pydantic import Field

from cnnreg import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.run import Run
    from cnnreg.core.records import FitResult

Decay = Annotated[float, Field(ge=0, lt=1)]
Every = Annotated[int, Field(ge=1)]
Power = Annotated[float, Field(ge=0)]


def averaged_state(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's floating-point parameters and buffers, as tensors sharing its storage."""
    return [t for t in model.state_dict().values() if t.is_floating_point()]


class WeightAverage:
    """One moving average of a model's weights; see the module docstring."""

    def __init__(self, decay: float, every: int, ramp_power: float, reset_model: bool, eval_with_average: bool):
        self.decay, self.every, self.ramp_power = decay, every, ramp_power
        self.reset_model = reset_model
        self.eval_with_average = eval_with_average and not reset_model  # lookahead: the model is the average
        self.average: list[torch.Tensor] | None = None
        self.state: list[torch.Tensor] = []  # the model's own tensors, listed once per fit (state_dict() is slow)
        self.swapped = False  # the model holds the average, the training weights are in self.average

    def decay_at(self, step: int, total_steps: int) -> float:
        return self.decay * (min(step, total_steps) / max(total_steps, 1)) ** self.ramp_power

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        state = self.state = averaged_state(run.model)
        if self.average is None:
            self.average = [t.detach().clone() for t in state]
        else:  # restored from last.pt (on the CPU, maybe in another dtype)
            self.average = [a.to(device=t.device, dtype=t.dtype) for a, t in zip(self.average, state)]

    @hookimpl
    def cnnreg_optimizer_step(self, run: Run, epoch: int, step: int, total_steps: int) -> None:
        if step % self.every or self.average is None:
            return
        state = self.state
        with torch.no_grad():
            torch._foreach_lerp_(self.average, state, 1.0 - self.decay_at(step, total_steps))
            if self.reset_model:
                torch._foreach_copy_(state, self.average)

    @hookimpl
    def cnnreg_evaluate_start(self, run: Run, split: str) -> None:
        if self.eval_with_average and not self.swapped and self.average is not None:
            self._swap(run)

    @hookimpl
    def cnnreg_epoch_start(self, run: Run, epoch: int) -> None:
        if self.swapped:
            self._swap(run)

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        # The model ends holding the average: what evaluate, predict and export then use.
        if not self.swapped and self.average is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.state, self.average)

    def _swap(self, run: Run) -> None:
        # Copies, not pointer swaps: a compiled or CUDA-graphed model keeps its tensors' addresses.
        state = self.state
        with torch.no_grad():
            held = [t.clone() for t in state]
            torch._foreach_copy_(state, self.average)
            torch._foreach_copy_(self.average, held)
        self.swapped = not self.swapped

    def state_dict(self) -> dict[str, Any]:
        return {"average": list(self.average or []), "swapped": self.swapped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.average = list(state["average"]) or None
        self.swapped = bool(state["swapped"])


def ema(decay: Decay = 0.999, every: Every = 1, ramp_power: Power = 0.0, eval_with_average: bool = True) -> WeightAverage:
    """Exponential moving average of the weights, used for validation and kept at the end.

    Args:
        decay: weight of the old average at each update (0.999 averages over
            about the last 1000 updates).
        every: update the average every this many optimizer steps.
        ramp_power: grow the decay with training as (step / total_steps) ** ramp_power;
            0 keeps it constant.
        eval_with_average: validate with the average (and save it as the best
            checkpoint); false: validate the training weights, keep the average for the end.
    """
    return WeightAverage(decay, every, ramp_power, reset_model=False, eval_with_average=eval_with_average)


def lookahead(decay: Decay = 0.95**5, every: Every = 5, ramp_power: Power = 3.0) -> WeightAverage:
    """Lookahead: every few steps move a slow copy of the weights towards them and restart from it.

    Defaults are airbench's: every 5 steps, decay 0.95**5 reached at the end
    of training, growing as the cube of the progress.

    Args:
        decay: weight of the slow weights at each update, at the end of training.
        every: optimizer steps between updates.
        ramp_power: grow the decay with training as (step / total_steps) ** ramp_power.
    """
    return WeightAverage(decay, every, ramp_power, reset_model=True, eval_with_average=False)


@hookimpl
def cnnreg_callbacks() -> dict:
    return {"ema": ema, "lookahead": lookahead}
