"""k-fold cross-validation: one training per fold, each metric's mean and std.

The folds partition the training split (stratified by class unless the
recipe says otherwise, seeded); each fold trains on the other folds and
validates on its own. Every fold keeps its own run directory under one
parent folder, whose ``crossval.json`` holds the per-fold and aggregate
figures.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from cnnreg.core import checkpoint
from cnnreg.assemble.build import build
from cnnreg.engine.loop import fit
from cnnreg.runs.directory import new_run_dir
from cnnreg.core.tables import PlainTable
from cnnreg.core.errors import UserError
from cnnreg.config.recipe import Recipe
from cnnreg.core.records import FitResult


@dataclass(frozen=True)
class CrossValidationResult:
    """Each fold's result and, per metric, the mean and standard deviation of
    the folds' best-epoch values."""

    folds: tuple[FitResult, ...]
    mean: dict[str, float]
    std: dict[str, float]
    run_dir: Path | None


def cross_validate(recipe: Recipe, *, device: str | None = None, output: bool = True,
                   console: Console | None = None) -> CrossValidationResult:
    """Train every fold of ``recipe.cross_validation`` and aggregate."""
    cv = recipe.cross_validation
    if cv is None:
        raise UserError("the recipe has no cross_validation section")
    # Under torchrun only rank 0 makes folders; the others write nothing.
    parent = new_run_dir(recipe) if output and os.environ.get("RANK", "0") == "0" else None
    results = []
    for fold in range(cv.folds):
        run_dir = parent / f"fold-{fold + 1}" if parent is not None else None
        run = build(recipe, run_dir=run_dir, output=output, fold=fold, device=device)
        results.append(fit(run))
    mean, std = aggregate(results)
    result = CrossValidationResult(tuple(results), mean, std, parent)
    if parent is not None:
        summary = {"folds": cv.folds, "stratified": cv.stratified, "monitor": results[0].monitor,
                   "mean": mean, "std": std,
                   "per_fold": [dict(r.best.metrics) if r.best else {} for r in results]}
        checkpoint.atomic_write_text(parent / "crossval.json", json.dumps(summary, indent=2) + "\n")
    (console or Console(highlight=False)).print(table(result))
    return result


def aggregate(results: list[FitResult]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (sample) standard deviation of each metric at each fold's best epoch."""
    bests = [r.best.metrics for r in results if r.best is not None]
    names = [n for n in (bests[0] if bests else {}) if all(n in b for b in bests)]
    mean = {n: statistics.fmean(b[n] for b in bests) for n in names}
    std = {n: statistics.stdev([b[n] for b in bests]) if len(bests) > 1 else 0.0 for n in names}
    return mean, std


def table(result: CrossValidationResult) -> PlainTable:
    t = PlainTable(title=f"{len(result.folds)}-fold cross-validation (best epoch of each fold)", title_justify="left")
    t.add_column("metric")
    for i in range(len(result.folds)):
        t.add_column(f"fold {i + 1}", justify="right")
    t.add_column("mean", justify="right")
    t.add_column("std", justify="right")
    for name in result.mean:
        if name.startswith("val_") or name.startswith("train_loss"):
            values = [f"{r.best.metrics[name]:.4f}" if r.best else "" for r in result.folds]
            t.add_row(name, *values, f"{result.mean[name]:.4f}", f"{result.std[name]:.4f}")
    return t
