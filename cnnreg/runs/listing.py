"""Listing run directories (``cnnreg runs``): one row each, from run.json and summary.json.

A damaged or missing file shows as such in the row; nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def find_runs(root: Path) -> list[dict[str, str]]:
    """A row for every run directory under ``root``, oldest first."""
    rows = [describe_run(path.parent) for path in Path(root).rglob("run.json")]
    rows.sort(key=lambda r: (r["created"], r["name"]))
    return rows


def describe_run(run_dir: Path) -> dict[str, str]:
    """One row of ``cnnreg runs``, from run.json and summary.json; damaged or missing files show as such."""
    info = read_json_object(run_dir / "run.json") or {}
    recipe = info.get("recipe") or {}
    summary = read_json_object(run_dir / "summary.json")
    planned = (recipe.get("trainer") or {}).get("epochs", "?")
    created = str(info.get("created", ""))
    row = {"name": recipe.get("name", run_dir.name), "created": created, "date": created.replace("T", " "),
           "path": str(run_dir)}
    if summary is None:
        done = _epochs_logged(run_dir)
        row.update(epochs=f"{done if done is not None else '?'}/{planned}", best="", stopped="running or interrupted")
        return row
    monitor, epoch = summary.get("monitor"), summary.get("best_epoch")
    value = (summary.get("best") or {}).get(monitor)
    best = f"{monitor}={value:.4g} at epoch {epoch}" if isinstance(value, (int, float)) else "none"
    row.update(epochs=f"{summary.get('epochs_run', '?')}/{planned}", best=best, stopped=str(summary.get("stopped", "")))
    return row


def _epochs_logged(run_dir: Path) -> int | None:
    """Epochs an unfinished run has logged to metrics.jsonl (when the metrics logger ran)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    epochs = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            epochs.add(json.loads(line)["epoch"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a crash
    return len(epochs)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A run file's JSON object; None when it is missing, damaged or not an object (a run cut short)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
