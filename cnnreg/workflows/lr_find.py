"""``cnnreg lr-find``: the learning-rate range test (Leslie Smith, 2015; fastai's ``lr_find``).

A fresh model, optimizer and batches are built from the recipe exactly as
``cnnreg run`` builds them (:func:`cnnreg.assemble.build.build`, without a
run directory), and trained for ``steps`` optimizer steps with the learning
rate rising geometrically from ``start_lr`` to ``end_lr``, through the
run's own step (:func:`cnnreg.engine.step.forward_backward` and
:func:`~cnnreg.engine.step.optimizer_step`: transforms, precision, loss,
accumulation, clipping). The loss is smoothed (a bias-corrected moving
average) and the sweep stops once it diverges. The suggestion is the
learning rate where the smoothed loss falls fastest against log(lr).

The finder must not change what a later run does (fastai#3013: a finder
that trained the user's own model changed the result): the model it trains
is its own and is thrown away, and the random generators (Python, NumPy,
torch on the CPU and every CUDA device) are put back as they were.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from cnnreg.assemble.build import build
from cnnreg.config.recipe import Recipe
from cnnreg.core.device import rng_state, set_rng_state
from cnnreg.core.errors import UserError
from cnnreg.core.run import Run
from cnnreg.engine.step import forward_backward, optimizer_step

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: The points at each end of the curve the suggestion ignores: the first ones are the
#: moving average warming up, the last ones the blow-up (Lightning skips 10 and 1).
SKIP_BEGIN, SKIP_END = 10, 1
#: The fewest points left between them for a gradient worth reading.
MIN_POINTS = 5


@dataclass(frozen=True)
class LrFindResult:
    """What the range test measured and what it suggests.

    :param lrs: the learning rate of each step (``optimizer.lr``; groups with an
        ``lr_mult`` ran at their multiple of it).
    :param losses: each step's training loss, as measured.
    :param smoothed: the bias-corrected exponential moving average of ``losses``.
    :param suggestion: the learning rate to use.
    :param method: how ``suggestion`` was chosen, in words.
    :param lr_at_min: the learning rate of the lowest smoothed loss (a tenth of it
        is fastai's other rule of thumb).
    :param steps: how many steps ran (``len(lrs)``).
    :param stopped: ``"completed"``, or why the sweep stopped early.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    suggestion: float
    method: str
    lr_at_min: float
    steps: int
    stopped: str
    start_lr: float
    end_lr: float

    @property
    def stopped_early(self) -> bool:
        return self.stopped != "completed"


def lr_find(recipe: Recipe, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
            smoothing: float = 0.98, diverge: float = 4.0, device: str | None = None) -> LrFindResult:
    """Sweep the learning rate from ``start_lr`` to ``end_lr`` over ``steps`` optimizer steps.

    The recipe's optimizer is used with everything it sets (momentum, weight
    decay, parameter groups) except the learning rate, which is set on every
    parameter group at each step; the recipe's scheduler is not used. The
    steps run over as many epochs of the training split as they need. Nothing
    is written: no run directory, no checkpoint, and no plugin's fit events
    are sent (no fit takes place).

    :param smoothing: the moving average's weight on the past (0 smooths nothing).
    :param diverge: stop once the smoothed loss exceeds this many times the best one so far.
    :param device: override ``trainer.device``.
    :raises UserError: bad bounds, or a curve the suggestion cannot be read from
        (too short, or no descent), with what to change.
    """
    check_bounds(start_lr, end_lr, steps, smoothing, diverge)
    with kept_global_state():
        run = build(recipe, output=False, device=device)
        lrs, losses, smoothed, stopped = sweep(run, schedule(start_lr, end_lr, steps), smoothing, diverge)
        del run  # its model and optimizer are the finder's own; nothing of them is kept
    suggestion, method = suggest(lrs, smoothed, stopped)
    best = int(np.nanargmin(np.asarray(smoothed, dtype=np.float64)))
    return LrFindResult(lrs=tuple(lrs), losses=tuple(losses), smoothed=tuple(smoothed), suggestion=suggestion,
                        method=method, lr_at_min=lrs[best], steps=len(lrs), stopped=stopped, start_lr=start_lr,
                        end_lr=end_lr)


def check_bounds(start_lr: float, end_lr: float, steps: int, smoothing: float, diverge: float) -> None:
    if not (math.isfinite(start_lr) and math.isfinite(end_lr) and 0 < start_lr < end_lr):
        raise UserError(f"lr-find: the sweep goes from --start-lr to --end-lr, 0 < start < end; got {start_lr:g} "
                        f"to {end_lr:g}")
    if steps < SKIP_BEGIN + SKIP_END + MIN_POINTS:
        raise UserError(f"lr-find: --steps {steps} is too few to read a curve from; use at least "
                        f"{SKIP_BEGIN + SKIP_END + MIN_POINTS} (100 or more is usual)")
    if not 0 <= smoothing < 1:
        raise UserError(f"lr-find: smoothing must be in [0, 1), got {smoothing:g}")
    if diverge <= 1:
        raise UserError(f"lr-find: diverge must be above 1 (times the best loss), got {diverge:g}")


def schedule(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """``steps`` learning rates, geometric from ``start_lr`` to ``end_lr`` (both included)."""
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def sweep(run: Run, lrs: list[float], smoothing: float, diverge: float
          ) -> tuple[list[float], list[float], list[float], str]:
    """One optimizer step at each learning rate of ``lrs``, until the smoothed loss diverges.

    Returns the learning rates that ran, the raw and smoothed losses, and why it stopped.
    """
    model = run.step_model if run.step_model is not None else run.model
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    multipliers = group_multipliers(run)
    accumulate = run.recipe.trainer.accumulate
    batches = endless_batches(run)
    run.model.train()
    done: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    average, best = 0.0, math.inf
    for i, lr in enumerate(lrs):
        for group, mult in zip(run.optimizer.param_groups, multipliers):
            group["lr"] = lr * mult
        total = 0.0
        for micro in range(accumulate):
            epoch, images, targets, index = next(batches)
            _, loss = forward_backward(run, model, images, targets, index, epoch, sync=micro == accumulate - 1)
            total += float(loss.detach())  # one host read per batch: the finder needs every value
        optimizer_step(run, params)
        loss_value = total / accumulate
        done.append(lr)
        raw.append(loss_value)
        if not math.isfinite(loss_value):
            smooth.append(math.nan)
            return done, raw, smooth, f"stopped early: the loss became {loss_value} at lr {lr:.3g}"
        average = smoothing * average + (1 - smoothing) * loss_value
        value = average / (1 - smoothing ** (i + 1))  # bias correction: the average starts at 0
        smooth.append(value)
        best = min(best, value)
        if value > diverge * best:
            return done, raw, smooth, (f"stopped early: the smoothed loss diverged at lr {lr:.3g} "
                                       f"({value:.4g}, more than {diverge:g} times the best, {best:.4g})")
    return done, raw, smooth, "completed"


def group_multipliers(run: Run) -> list[float]:
    """Each parameter group's learning rate as a multiple of the recipe's ``optimizer.lr``.

    Read from ``initial_lr`` where a scheduler set one: a warmup scheduler
    has already lowered ``lr`` itself when it was made.
    """
    groups = run.optimizer.param_groups
    bases = [float(g.get("initial_lr", g["lr"])) for g in groups]
    recipe_lr = getattr(run.recipe.optimizer, "lr", None)
    base = float(recipe_lr) if isinstance(recipe_lr, (int, float)) and recipe_lr > 0 else bases[0]
    if base <= 0:
        return [1.0 for _ in groups]
    return [b / base for b in bases]


def endless_batches(run: Run) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The training batches in the run's order, epoch after epoch, as ``(epoch, images, targets, index)``."""
    batches = run.batches["train"]
    if len(batches) == 0:
        raise UserError("lr-find: the training split has no batch; check data.batch_size and data.drop_last")
    epoch = 1
    while True:
        batches.set_epoch(epoch)
        for images, targets, index in batches.indexed():
            yield epoch, images, targets, index
        epoch += 1


def suggest(lrs: list[float], smoothed: list[float], stopped: str) -> tuple[float, str]:
    """The learning rate at the steepest descent of the smoothed loss against log(lr).

    The first :data:`SKIP_BEGIN` and last :data:`SKIP_END` points are left out, as
    Lightning's and fastai's ``steep`` do, and so is everything after the lowest
    smoothed loss: a dip there is noise on the way up, and a suggestion next to
    the blow-up would be the worst lr to train with. The index found is one of
    the original steps, so it maps back to its own learning rate (no point is
    dropped in between, which shifted Lightning's index).
    """
    n = len(smoothed)
    end = n - SKIP_END
    if end - SKIP_BEGIN < MIN_POINTS or not all(math.isfinite(v) for v in smoothed[SKIP_BEGIN:end]):
        why = stopped if stopped != "completed" else f"it ran {n} steps"
        raise UserError(f"lr-find: only {n} points ({why}): too few to find the steepest descent. Lower --end-lr "
                        f"(the sweep ended at {lrs[-1]:.3g}) or raise --steps, so more steps fall below it")
    window = np.asarray(smoothed[SKIP_BEGIN:end], dtype=np.float64)
    if float(window.max() - window.min()) <= 1e-3 * max(float(np.abs(window).max()), 1e-12):
        raise UserError(f"lr-find: the loss hardly changed between lr {lrs[SKIP_BEGIN]:.3g} and {lrs[end - 1]:.3g} "
                        f"(smoothed {window.min():.4g} to {window.max():.4g}): no descent to suggest from. Widen "
                        "the range (--start-lr lower, --end-lr higher); a flat curve can also mean the model does "
                        "not train at all (check the loss and the labels)")
    lowest = int(np.argmin(window))
    if lowest + 1 < MIN_POINTS:
        raise UserError(f"lr-find: the smoothed loss was lowest at step {SKIP_BEGIN + lowest + 1} of {n} (lr "
                        f"{lrs[SKIP_BEGIN + lowest]:.3g}) and only rose after it: no descent to suggest from. "
                        "Lower --start-lr, or raise --steps")
    # central differences over the whole window, read only before the lowest point
    slopes = np.gradient(window, np.log(np.asarray(lrs[SKIP_BEGIN:end], dtype=np.float64)))[:lowest]
    steepest = int(np.argmin(slopes))
    values = window[: lowest + 1]
    drop = values[0] - float(values[-1])
    if slopes[steepest] >= 0 or drop <= 1e-3 * max(abs(values[0]), 1e-12):
        raise UserError(f"lr-find: the loss hardly fell between lr {lrs[SKIP_BEGIN]:.3g} and {lrs[end - 1]:.3g} "
                        f"(smoothed {values[0]:.4g} -> lowest {values[-1]:.4g}): no descent to suggest from. "
                        "Widen the range (--start-lr lower, --end-lr higher) or raise --steps; a flat curve can "
                        "also mean the model does not train at all (check the loss and the labels)")
    index = SKIP_BEGIN + steepest
    return lrs[index], (f"steepest descent of the smoothed loss against log(lr) before its lowest point, at step "
                        f"{index + 1} of {n} (the first {SKIP_BEGIN} and last {SKIP_END} steps ignored)")


@contextlib.contextmanager
def kept_global_state() -> Iterator[None]:
    """Put back what ``build`` and the sweep change globally: every random generator
    and torch's determinism and backend flags."""
    state = rng_state()
    if torch.cuda.is_available() and "cuda" not in state:
        state["cuda"] = torch.cuda.get_rng_state_all()  # rng_state leaves out a CUDA not yet initialised
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        set_rng_state(state)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = flags[2:]


# -- the figure and the recipe copy ---------------------------------------------------------------


def lr_find_figure(result: LrFindResult) -> Figure:
    """Loss against the learning rate (log axis): raw, smoothed, and the suggestion marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    ax.plot(result.lrs, result.losses, color="0.7", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    at = result.lrs.index(result.suggestion)
    ax.plot([result.suggestion], [result.smoothed[at]], "o", color="C3", markersize=8,
            label=f"suggestion: {result.suggestion:.3g}")
    ax.axvline(result.suggestion, color="C3", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # the blow-up at the end would squash the curve that matters
        low, high = min(finite), max(finite[: max(1, len(finite) - 1)])
        ax.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.1 * (high - low + 1e-12))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test ({result.steps} steps, {result.stopped.split(':')[0]})")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def save_plot(result: LrFindResult, path: Path) -> Path:
    """Write the figure as a PNG, atomically.

    :raises UserError: matplotlib is not installed (the ``plots`` extra), or the file cannot be written.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("lr-find: the plot needs matplotlib: pip install 'cnnreg-framework[plots]'") from None
    from cnnreg.core.checkpoint import CheckpointError, atomic_write

    figure = lr_find_figure(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    except (OSError, CheckpointError) as exc:
        raise UserError(f"cannot write {path}: {exc}; choose another -o/--output") from None
    return path


def apply_suggestion(recipe: Recipe, lr: float, dest: Path, *, disable: tuple[str, ...] = ()) -> Path:
    """Write the recipe (as written, with its ``--set`` overrides) to ``dest`` with
    ``optimizer.lr`` set to ``lr``; relative paths are rewritten to point at the same
    places from ``dest``'s folder, and a relative ``$schema`` points at the same schema file.

    :param disable: the plugins blocked when the recipe was loaded (``--disable``).
    :raises UserError: ``dest`` exists (never overwritten), the optimizer has no ``lr``,
        or the file cannot be written.
    """
    import json
    import os

    from cnnreg.config.recipe_copy import relative_paths

    if dest.exists():
        raise UserError(f"{dest} exists and is left as it is; give another destination to --apply")
    if not hasattr(recipe.optimizer, "lr"):
        raise UserError(f"optimizer {recipe.optimizer.name!r} has no lr parameter to set; "  # type: ignore[attr-defined]
                        "set its learning rate by hand")
    source = recipe.source
    raw: dict[str, Any] = json.loads(json.dumps(source.raw if source is not None and source.raw is not None
                                                else recipe.to_json()))
    base = source.base_dir if source is not None else Path.cwd()
    target_dir = dest.resolve().parent

    def moved(value: str, start: Path = base) -> str:
        return Path(os.path.relpath(os.path.normpath(start / value), target_dir)).as_posix()

    for key, value in relative_paths(raw, disable=disable):
        node: Any = raw
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = moved(value)
    schema = raw.get("$schema")
    if (isinstance(schema, str) and "://" not in schema and not os.path.isabs(schema) and source is not None
            and source.file is not None):
        # relative to the recipe's own file (a shipped recipe's sits in the package), not to base_dir
        raw["$schema"] = moved(schema, source.file.resolve().parent)
    raw.setdefault("optimizer", {})["lr"] = lr
    text = json.dumps(raw, indent=2, ensure_ascii=False) + "\n"
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        with open(dest, "x", encoding="utf-8") as handle:  # "x": a file made meanwhile is not overwritten
            handle.write(text)
    except FileExistsError:
        raise UserError(f"{dest} exists and is left as it is; give another destination to --apply") from None
    except OSError as exc:
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}; choose a folder you can write to") from None
    return dest
