"""Run directories: made, written, and read back.

``runs/<name>-<timestamp>/`` holds ``recipe.json`` (the resolved recipe, to
re-run or resume), ``run.json`` (versions, plugins, device, data), and at the
end ``summary.json``; callbacks add checkpoints, logs and plots. Rebuilding
a run from its directory (to evaluate, predict or export) is in
:mod:`cnnreg.workflows.predict`; listing runs in :mod:`cnnreg.runs.listing`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cnnreg.core import checkpoint
from cnnreg.core.errors import UserError
from cnnreg.core.version import version
from cnnreg.core.options import RecipeBase
from cnnreg.core.records import FitResult
from cnnreg.runs.listing import read_json_object

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.run import Run

def new_run_dir(recipe: RecipeBase, fold: int | None = None) -> Path:
    """A new ``<output_dir>/<name>-<timestamp>[-foldK]`` folder."""
    base = f"{recipe.name}-{timestamp()}" + (f"-fold{fold + 1}" if fold is not None else "")
    return unique_dir(runs_root(recipe), base)


def runs_root(recipe: RecipeBase) -> Path:
    """Where run directories go: the recipe's ``output_dir``, else ./runs."""
    return recipe.output_dir or Path.cwd() / "runs"


def output_problem(folder: Path) -> str | None:
    """Why run directories cannot be made under ``folder``, or ``None`` when they can.

    Checked before anything is trained (by ``run`` and ``validate``): the
    folder, or the nearest of its parents that exists, must be a writable
    folder on a writable file system. Nothing is created.
    """
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "the output folder" if existing == folder else f"{existing}, a parent of the output folder,"
        return f"{where} is a file, not a folder: move the file, or choose another output folder"
    if _read_only(existing):
        return f"{existing} is on a read-only file system: choose an output folder on a writable disk"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"{existing} is not writable by this user (uid {os.getuid()}): change its permissions, "
                "or choose an output folder you can write to")
    return None


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - platforms without statvfs
        return False


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def unique_dir(root: Path, base: str) -> Path:
    """Create ``root/base`` (or ``base-2``, ``base-3``, ... when two runs start in
    the same second) and return it; mkdir's exclusivity makes it race-free."""
    for n in range(1, 1000):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:  # checked up front, but the disk can change in between
            raise UserError(f"could not create the run directory {candidate}: {exc.strerror or exc}; "
                            f"{output_problem(root) or 'choose another output folder (--output-dir)'}") from None
    raise UserError(f"could not create a new folder {base} under {root}")


def write_run_files(run: Run) -> None:
    """The resolved recipe (re-runnable, resumable) and the environment it ran in.

    A resumed run keeps the record of its start (``created``, the defaults it
    chose) and adds when it was resumed.
    """
    run.run_dir.mkdir(parents=True, exist_ok=True)
    before = _read_info(run.run_dir)
    recipe = run.recipe.to_json()
    checkpoint.atomic_write_text(run.run_dir / "recipe.json", json.dumps(recipe, indent=2) + "\n")
    info = {
        "recipe": recipe,
        "created": before.get("created") or datetime.now().isoformat(timespec="seconds"),
        **({"resumed": [*before.get("resumed", []), datetime.now().isoformat(timespec="seconds")]} if before else {}),
        "seed": run.recipe.seed,
        "device": str(run.device),
        "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type,
        "precision": run.precision,
        "channels_last": run.channels_last,
        "world_size": run.dist.world_size,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn":
                     torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                     "cnnreg": version()},
        "plugins": dict(run.plugins),
        "broken_plugins": list(run.broken_plugins),
        # what the recipe left out and the run chose, with why and how to choose otherwise
        "defaults": [choice.to_json() for choice in run.choices] or before.get("defaults", []),
        "data": {"classes": list(run.data.classes), "image_size": list(run.data.image_size), "fit": run.data.fit,
                 "channels": run.context.channels, "mean": run.context.mean, "std": run.context.std,
                 "splits": {name: len(b.split) if hasattr(b, "split") else b.num_samples
                            for name, b in run.batches.items()},
                 "skipped_files": [list(s) for s in run.data.skipped]},
    }
    checkpoint.atomic_write_text(run.run_dir / "run.json", json.dumps(info, indent=2, default=str) + "\n")


def _read_info(run_dir: Path) -> dict[str, Any]:
    """What an earlier start of this run recorded in run.json ({} for a new run, or a damaged file)."""
    return read_json_object(run_dir / "run.json") or {}


def write_summary(run: Run, result: FitResult) -> None:
    best, last = result.best, result.last
    summary = {
        "name": run.recipe.name,
        "stopped": result.stopped,
        "epochs_run": len(result.records),
        "monitor": result.monitor,
        "mode": result.mode,
        "best_epoch": result.best_epoch,
        "best": dict(best.metrics) if best else None,
        "last": dict(last.metrics) if last else None,
        "train_seconds": round(result.train_seconds, 3),
        "compile_seconds": round(result.compile_seconds, 3),
        "classes": list(run.data.classes),
        "per_class": {split: {k: list(v) for k, v in ev.per_class.items()}
                      for split, ev in (last.evals.items() if last else [])},
    }
    checkpoint.atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no run.json); give a folder that `cnnreg run` created")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); the run's checkpoints are still usable with its recipe.json") from None


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
