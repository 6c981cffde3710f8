"""The resumable training state: everything ``--resume`` needs, as tensors and plain data.

Saved to ``last.pt`` atomically (cnnreg.core.checkpoint) and loaded with
``torch.load(weights_only=True)``: model, optimizer, scheduler, scaler, every
random generator, callbacks' state, the epoch and the position inside it, the
partial tallies of an interrupted epoch, and the history of epoch records.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cnnreg.core import checkpoint
from cnnreg.core.device import rng_state, set_rng_state
from cnnreg.core.errors import UserError
from cnnreg.core.records import EpochRecord, EvalResult

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.run import Run
    from cnnreg.engine.tallies import Tallies

STATE_FORMAT = 1


def training_state(run: Run, epoch: int, step_in_epoch: int = 0, tallies: Tallies | None = None,
                   history: Sequence[EpochRecord] = (), loss_reference: float | None = None) -> dict[str, Any]:
    """Everything needed to continue exactly where training is now.

    :param epoch: the last completed epoch.
    :param step_in_epoch: batches of epoch ``epoch + 1`` already run (interrupted mid-epoch).
    """
    return {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "model": checkpoint.unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.scheduler.state_dict() if run.schedule else None,
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "rng": rng_state(),  # rank 0's: every rank restores it on resume (they start from one seed too)
        "world_size": run.dist.world_size,
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in run.callbacks],
        "partial": tallies.state() if (tallies is not None and step_in_epoch) else None,
        "history": [record_to_json(r) for r in history],
        "loss_reference": loss_reference,  # the run's first loss, for trainer.divergence
    }


def save_training_state(run: Run, epoch: int, step_in_epoch: int = 0, tallies: Tallies | None = None,
                        history: Sequence[EpochRecord] = (), loss_reference: float | None = None) -> Path | None:
    """Write ``last.pt`` (atomically) and return its path; None without a run directory.

    :raises CheckpointError: it could not be written; the previous last.pt is intact.
    """
    if run.run_dir is None or not run.is_main:
        return None
    path = run.run_dir / checkpoint.LAST
    checkpoint.save_state(training_state(run, epoch, step_in_epoch, tallies, history, loss_reference), path)
    return path


def check_state_fits(run: Run, state: dict[str, Any]) -> None:
    """Refuse a training state that another recipe made, saying what differs, before anything is loaded.

    :raises UserError: another model (keys or shapes), another optimizer, or
        another number of parameter groups.
    """
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"checkpoint format {state.get('format')!r} is not one this cnnreg reads ({STATE_FORMAT})")
    have = {k: tuple(v.shape) for k, v in checkpoint.unwrap(run.model).state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in (state.get("model") or {}).items() if isinstance(v, torch.Tensor)}
    problems = []
    missing = [k for k in have if k not in saved]
    extra = [k for k in saved if k not in have]
    shapes = [f"{k} {list(saved[k])} in last.pt, {list(have[k])} now" for k in have if k in saved and saved[k] != have[k]]
    for what, keys in (("in the model but not in last.pt", missing), ("in last.pt but not in the model", extra),
                       ("of another shape", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} tensor{'s' if len(keys) != 1 else ''} {what}: {', '.join(keys[:3])}{more}")
    optimizer = state.get("optimizer") or {}
    saved_groups = optimizer.get("param_groups", [])
    groups = run.optimizer.param_groups
    if not problems and len(saved_groups) != len(groups):
        problems.append(f"the optimizer has {len(groups)} parameter groups, last.pt {len(saved_groups)}")
    elif not problems and [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
        problems.append("the optimizer's parameter groups hold other parameters than last.pt's")
    if problems:
        raise UserError(f"{run.run_dir / checkpoint.LAST} was saved by another recipe than {run.run_dir / 'recipe.json'} "
                        f"now gives: {'; '.join(problems)}. Nothing was changed: undo the edit to resume, or "
                        "start a new run with the new recipe")


def restore_training_state(run: Run, state: dict[str, Any]) -> tuple[int, int, dict | None, list[EpochRecord]]:
    """Load a training state into the run; returns (start epoch, batches to skip, partial tallies, history)."""
    check_state_fits(run, state)
    checkpoint.unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.schedule is not None and state.get("scheduler") is not None:
        run.schedule.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler") is not None:
        run.scaler.load_state_dict(state["scaler"])
    for callback, saved in zip(run.callbacks, state.get("callbacks", [])):
        if saved is not None and hasattr(callback, "load_state_dict"):
            callback.load_state_dict(saved)
    step_in_epoch = state.get("step_in_epoch", 0)
    saved_world = state.get("world_size", 1)
    if step_in_epoch and saved_world != run.dist.world_size:
        # the position is counted in per-rank batches, which another world size cuts differently
        raise UserError(f"this checkpoint was saved mid-epoch by {saved_world} process(es); resume it with "
                        f"{saved_world} (now {run.dist.world_size}), or from an end-of-epoch checkpoint")
    set_rng_state(state["rng"])
    history = [record_from_json(r) for r in state.get("history", [])]
    partial = state.get("partial")
    if partial is not None and not run.is_main:
        partial = None  # the saved tallies are rank 0's; loaded on every rank, the all-reduce would repeat them
    if partial is not None:
        partial = {k: (v.to(run.device) if isinstance(v, torch.Tensor) else
                       [t.to(run.device) if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list) else v)
                   for k, v in partial.items()}
    return state["epoch"] + 1, step_in_epoch, partial, history


def record_to_json(record: EpochRecord) -> dict[str, Any]:
    return {"epoch": record.epoch, "epochs": record.epochs, "metrics": dict(record.metrics),
            "train_seconds": record.train_seconds, "seconds": record.seconds,
            "images_per_second": record.images_per_second,
            "evals": {k: {"metrics": dict(v.metrics), "per_class": {n: list(c) for n, c in v.per_class.items()},
                          "confusion": [list(r) for r in v.confusion], "classes": list(v.classes)}
                      for k, v in record.evals.items()}}


def record_from_json(data: dict[str, Any]) -> EpochRecord:
    evals = {k: EvalResult(split=k, metrics=v["metrics"], per_class={n: tuple(c) for n, c in v["per_class"].items()},
                           confusion=tuple(tuple(r) for r in v["confusion"]), classes=tuple(v["classes"]))
             for k, v in data.get("evals", {}).items()}
    return EpochRecord(epoch=data["epoch"], epochs=data["epochs"], metrics=data["metrics"], evals=evals,
                       train_seconds=data["train_seconds"], seconds=data["seconds"],
                       images_per_second=data["images_per_second"])
