"""Hyperparameter sweeps: one training run per point of a recipe's ``sweep`` section.

A point sets dotted recipe keys (``optimizer.lr``, ``model.widths``), exactly
like ``--set``. Every point's recipe is validated before anything trains, so
a misspelt key or a value a component refuses is reported at once, at the
sweep's line in the file. The runs go one after another into one parent
folder, ``<output_dir>/<name>-sweep-<timestamp>/``, each in a directory of its
own named ``<name>-t<number>``; ``sweep.json`` there lists every trial's
values and its best monitored metric.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console

from cnnreg.core import checkpoint
from cnnreg.core.tables import PlainTable
from cnnreg.core.errors import Problem, RecipeError, UserError
from cnnreg.config.recipe import Recipe, load_recipe
from cnnreg.core.options import Sweep, SweepRange
from cnnreg.runs.directory import runs_root, timestamp, unique_dir


@dataclass(frozen=True)
class Trial:
    """One point of a sweep: its number (from 1), the values it sets, its validated recipe."""

    number: int
    values: dict[str, Any]
    recipe: Recipe


@dataclass(frozen=True)
class TrialResult:
    number: int
    values: dict[str, Any]
    run_dir: Path | None
    best_epoch: int | None
    best: float | None  # the monitored metric at the best epoch
    stopped: str


@dataclass(frozen=True)
class SweepResult:
    """Every trial's result, best first by the monitored metric."""

    monitor: str
    mode: str
    trials: tuple[TrialResult, ...]
    run_dir: Path | None
    name: str = ""
    method: str | None = None


def points(sweep: Sweep) -> list[dict[str, Any]]:
    """The values each trial sets, in order: every combination of a grid
    (the first parameter varying slowest), or ``budget`` seeded draws."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.parameters[k] for k in keys))]
    rng = random.Random(sweep.seed)
    return [{k: _draw(rng, sweep.parameters[k]) for k in keys} for _ in range(sweep.budget or 0)]


def _draw(rng: random.Random, space: list[Any] | SweepRange) -> Any:
    if isinstance(space, list):
        return rng.choice(space)
    if space.log:
        return math.exp(rng.uniform(math.log(space.low), math.log(space.high)))
    return rng.uniform(space.low, space.high)


def load_trials(source: str | Path | Mapping[str, Any], *, disable: Sequence[str] = (),
                overrides: Mapping[str, Any] | None = None) -> tuple[Recipe, list[Trial]]:
    """The sweep recipe and every trial's recipe, all validated.

    :raises RecipeError: every problem of every trial, a problem caused by a
        swept value located at that parameter in the sweep section.
    :raises UserError: the recipe has no sweep section.
    """
    base = load_recipe(source, disable=disable, overrides=overrides)
    if base.sweep is None:
        raise UserError("this recipe has no sweep section; train it with `cnnreg run`")
    trials: list[Trial] = []
    problems: list[Problem] = []
    for number, values in enumerate(points(base.sweep), start=1):
        # the trial's recipe is a plain one: no sweep, a name of its own
        changes = {**(overrides or {}), **values, "sweep": None, "name": f"{base.name}-t{number:02d}"}
        try:
            recipe = load_recipe(source, disable=disable, overrides=changes)
        except RecipeError as exc:
            problems += [_relocate(base, problem, values, number) for problem in exc.problems]
            continue
        trials.append(Trial(number, values, recipe))
    if problems:
        unique = list(dict.fromkeys(problems))  # a bad key fails every trial the same way: say it once
        raise RecipeError(unique)
    return base, trials


def _relocate(base: Recipe, problem: Problem, values: dict[str, Any], number: int) -> Problem:
    """A problem under a swept key belongs to the sweep's line, not to where the key would be."""
    for key, value in values.items():
        path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        if tuple(problem.path[: len(path)]) == path or tuple(path[: len(problem.path)]) == tuple(problem.path):
            shown = json.dumps(value)
            message = problem.message if shown in problem.message else f"{problem.message} (value {shown})"
            if base.sweep is not None and base.sweep.method == "random":
                message = f"trial {number}: {message}"
            inner = ".".join(map(str, problem.path))
            if inner != key:  # e.g. a list swept whole, refused at one of its items
                message = f"{inner}: {message}"
            return base.problem(("sweep", "parameters", key), message, prefer_key=True)
    return problem


def run_sweep(source: str | Path | Mapping[str, Any], *, disable: Sequence[str] = (),
              overrides: Mapping[str, Any] | None = None, device: str | None = None, output: bool = True,
              console: Console | None = None) -> SweepResult:
    """Train every trial of the recipe's sweep, one after another, and rank them."""
    from cnnreg.assemble.build import build
    from cnnreg.engine.loop import fit

    base, trials = load_trials(source, disable=disable, overrides=overrides)
    parent = sweep_dir(base) if output else None
    results: list[TrialResult] = []
    monitor, mode = base.trainer.monitor or "val_accuracy", base.trainer.mode or "max"
    for trial in trials:
        run_dir = parent / trial.recipe.name if parent is not None else None
        result = fit(build(trial.recipe, run_dir=run_dir, output=output, device=device))
        monitor, mode = result.monitor, result.mode  # the engine's choice, the same for every trial
        best = result.best.metrics.get(result.monitor) if result.best is not None else None
        results.append(TrialResult(trial.number, trial.values, result.run_dir or run_dir, result.best_epoch,
                                   best, result.stopped))
    ranked = tuple(sorted(results, key=lambda r: _rank_key(r.best, mode)))
    sweep = SweepResult(monitor, mode, ranked, parent, base.name, base.sweep.method if base.sweep else None)
    if parent is not None and _is_main_process():
        write_sweep_json(sweep)
    (console or Console(highlight=False, soft_wrap=True)).print(table(sweep, list(base.sweep.parameters)))
    return sweep


def sweep_dir(recipe: Recipe) -> Path:
    """``<output_dir>/<name>-sweep-<timestamp>``; created by rank 0 only (under torchrun)."""
    root, base = runs_root(recipe), f"{recipe.name}-sweep-{timestamp()}"
    return unique_dir(root, base) if _is_main_process() else root / base


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _rank_key(value: float | None, mode: str) -> tuple[int, float]:
    if value is None or math.isnan(value):
        return (1, 0.0)  # runs without a score go last
    return (0, value if mode == "min" else -value)


def write_sweep_json(result: SweepResult) -> None:
    checkpoint.atomic_write_text(result.run_dir / "sweep.json", json.dumps(sweep_data(result), indent=2) + "\n")


def sweep_data(result: SweepResult) -> dict[str, Any]:
    """The sweep as JSON data: what sweep.json holds and ``cnnreg sweep --json`` prints."""
    return {"name": result.name, "method": result.method, "monitor": result.monitor, "mode": result.mode,
            "trials": [{"trial": t.number, "values": t.values, "best": t.best, "best_epoch": t.best_epoch,
                        "stopped": t.stopped, "run_dir": str(t.run_dir) if t.run_dir else None}
                       for t in result.trials]}


def table(result: SweepResult, keys: Sequence[str]) -> PlainTable:
    """The trials, best first: the swept values and the best monitored value."""
    t = PlainTable(title=f"sweep: {len(result.trials)} runs, best {result.monitor} first", title_justify="left")
    t.add_column("trial", justify="right")
    for key in keys:
        t.add_column(key)
    t.add_column(result.monitor, justify="right")
    t.add_column("epoch", justify="right")
    t.add_column("run directory", overflow="fold")
    for r in result.trials:
        t.add_row(str(r.number), *(json.dumps(r.values[k]) for k in keys),
                  "" if r.best is None else f"{r.best:.4f}", "" if r.best_epoch is None else str(r.best_epoch),
                  str(r.run_dir) if r.run_dir else "")
    return t
