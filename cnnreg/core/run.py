"""The ``Run``: everything one training run is made of, as every hook and plugin receives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pluggy
import torch
from torch import nn

from cnnreg.core.data import DataContext, DataSource
from cnnreg.core.distributed import DistInfo
from cnnreg.core.options import RecipeBase
from cnnreg.core.records import Choice, Metric, Schedule


@dataclass(frozen=True)
class Run:
    """Everything one training run is made of.

    Frozen: the fields never change; the model, optimizer, scheduler and
    scaler they point to are the run's mutable state. Made by
    :func:`cnnreg.build` (``cnnreg.assemble.build``), trained by
    :func:`cnnreg.fit` (``cnnreg.engine.loop``).

    :param recipe: the resolved recipe (every default filled in, the run's choices written in).
    :param pm: the run's plugin manager: the installed plugins plus the recipe's callbacks.
    :param batches: ``{"train": ..., "val": ..., "test": ...}``, :class:`cnnreg.inputs.batches.Batches`.
    :param step_model: the compiled or DDP-wrapped model the step calls (``model`` otherwise).
    :param choices: what the run chose for what the recipe left out.
    :param plugins: the installed plugins the run was assembled from, and the distribution of each.
    :param broken_plugins: the plugins that failed to load, with their errors.
    :param records_pending: the run directory held a run already (``--resume``): its
        recipe.json and run.json are rewritten only once ``fit`` has checked the resume.
    :param temperature: the calibration temperature (``cnnreg calibrate``) that
        :func:`cnnreg.evaluate` divides the logits by; ``None``: uncalibrated.
        ``load_run`` sets it from the run directory's calibration.json; ``build``
        never does, and training's own validation never uses it.
    """

    recipe: RecipeBase
    pm: pluggy.PluginManager
    device: torch.device
    precision: str
    channels_last: bool
    data: DataSource
    context: DataContext
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_transforms: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    eval_transforms: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    metrics: tuple[tuple[str, Metric], ...]
    callbacks: tuple[object, ...]
    batches: dict[str, Any]
    scaler: torch.amp.GradScaler | None
    monitor: str
    mode: str
    run_dir: Path | None
    dist: DistInfo = field(default_factory=DistInfo)
    step_model: nn.Module | None = None
    choices: tuple[Choice, ...] = ()
    plugins: Mapping[str, str] = field(default_factory=dict)
    broken_plugins: tuple[str, ...] = ()
    records_pending: bool = False
    temperature: float | None = None

    @property
    def epochs(self) -> int:
        return self.recipe.trainer.epochs

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.classes

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0
