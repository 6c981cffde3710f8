"""Run directories: reopening a finished run to evaluate, predict or export.

A run directory holds ``recipe.json`` (the resolved recipe), ``run.json``
(classes, image size, statistics, versions), ``best.safetensors`` and
``last.pt``. Predicting and exporting need none of the training data: the
model and eval transforms are rebuilt from what ``run.json`` recorded.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cnnreg import checkpoint
from cnnreg.assembly import model_and_eval_transforms
from cnnreg.data import DatasetInfo
from cnnreg.device import apply_precision, resolve_device, resolve_precision
from cnnreg.engine import Run, build
from cnnreg.prediction import Predictor
from cnnreg.errors import UserError
from cnnreg.recipe import load_recipe


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no run.json); give a folder that `cnnreg run` created")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); the run's checkpoints are still usable with its recipe.json") from None


def load_run(run_dir: Path, *, checkpoint: str = "best", device: str | None = None,
             disable: tuple[str, ...] | list[str] = ()) -> Run:
    """A run rebuilt from its directory, its data loaded, with the chosen weights.

    Nothing in the directory is modified.
    """
    run_dir = Path(run_dir)
    read_run_info(run_dir)
    recipe = load_recipe(run_dir / "recipe.json", disable=disable)
    run = replace(build(recipe, output=False, device=device), run_dir=run_dir)
    load_checkpoint_weights(run.model, run_dir, checkpoint)
    return run


def load_predictor(run_dir: Path, *, checkpoint: str = "best", device: str | None = None,
                   disable: tuple[str, ...] | list[str] = ()) -> Predictor:
    """The model and eval transforms of a run, without loading its dataset."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    recipe = load_recipe(run_dir / "recipe.json", disable=disable)
    data = info["data"]
    dataset = DatasetInfo(classes=tuple(data["classes"]), image_size=tuple(data["image_size"]),
                          channels=data["channels"], mean=_tuple(data.get("mean")), std=_tuple(data.get("std")))
    model, transforms = model_and_eval_transforms(recipe, dataset)
    load_checkpoint_weights(model, run_dir, checkpoint)
    run_device = resolve_device(device or recipe.trainer.device)
    model.to(run_device)
    precision = resolve_precision(recipe.trainer.precision, run_device)
    apply_precision(model, precision)
    channels_last = recipe.trainer.channels_last if recipe.trainer.channels_last is not None else run_device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return Predictor(model=model, transforms=transforms, classes=dataset.classes, image_size=dataset.image_size,
                     channels=dataset.channels, device=run_device,
                     precision=precision, channels_last=channels_last, fit=data.get("fit", "stretch"))


def load_checkpoint_weights(model: torch.nn.Module, run_dir: Path, which: str) -> None:
    """``best``: best.safetensors (falling back to last.pt when the run kept no best); ``last``: last.pt."""
    best = Path(run_dir) / checkpoint.WEIGHTS
    last = Path(run_dir) / checkpoint.LAST
    if which == "best" and best.is_file():
        checkpoint.load_weights(model, best)
        return
    if not last.is_file():
        raise UserError(f"{run_dir} has no {'best.safetensors or ' if which == 'best' else ''}last.pt; "
                        "did the run finish an epoch?")
    state = checkpoint.load_state(last)
    checkpoint.unwrap(model).load_state_dict(state["model"])


def _tuple(value: Any) -> tuple[float, ...] | None:
    return tuple(value) if value is not None else None
