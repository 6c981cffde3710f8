"""The comparison page of a sweep or k-fold folder: its runs side by side.

A folder is a comparison when it holds ``sweep.json`` (``cnnreg sweep``),
``crossval.json`` (a recipe's ``cross_validation``), or no run.json of its
own but run directories inside it. The page ranks the runs by the
monitored metric at their best epoch (a sweep's swept values beside them,
a k-fold's mean and standard deviation under them), overlays their curves,
and links each run's own report.html where one was written. Read from the
files alone: no model is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

from cnnreg.core import checkpoint
from cnnreg.core.errors import UserError
from cnnreg.core.records import EpochRecord
from cnnreg.core.tables import format_value
from cnnreg.workflows import report_figures as figs
from cnnreg.workflows.report_data import read_json, read_records
from cnnreg.workflows.report_html import img, key_values, page, section, table

REPORT = "report.html"


@dataclass(frozen=True)
class Member:
    """One run of the folder."""

    path: Path
    summary: dict[str, Any]
    values: dict[str, Any]  # a sweep trial's swept values ({} otherwise)
    records: tuple[EpochRecord, ...]


def is_comparison(folder: Path) -> bool:
    folder = Path(folder)
    if (folder / "sweep.json").is_file() or (folder / "crossval.json").is_file():
        return True
    return not (folder / "run.json").is_file() and bool(_run_dirs(folder))


def _run_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / "run.json").is_file())


def members(folder: Path) -> tuple[str, list[Member]]:
    """The folder's kind ("sweep", "k-fold" or "runs") and its runs, in folder order."""
    sweep = read_json(folder / "sweep.json")
    values = {}
    for trial in sweep.get("trials") or []:
        if isinstance(trial, dict) and trial.get("run_dir"):
            values[Path(trial["run_dir"]).name] = trial.get("values") or {}
    kind = "sweep" if sweep else "k-fold" if (folder / "crossval.json").is_file() else "runs"
    found = [Member(path, read_json(path / "summary.json"), values.get(path.name, {}), read_records(path))
             for path in _run_dirs(folder)]
    if not found:
        raise UserError(f"{folder} holds no run directories (folders with a run.json) to compare")
    return kind, found


def _score(member: Member) -> float | None:
    monitor = member.summary.get("monitor")
    value = (member.summary.get("best") or {}).get(monitor)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def ranked(found: Sequence[Member]) -> list[Member]:
    """Best first by each run's monitored metric at its best epoch; runs without one last."""
    mode = next((m.summary.get("mode") for m in found if m.summary.get("mode")), "max")

    def key(m: Member) -> tuple[int, float]:
        score = _score(m)
        return (1, 0.0) if score is None else (0, score if mode == "min" else -score)

    return sorted(found, key=key)


def write_comparison(folder: Path) -> Path:
    """Write ``folder/report.html`` comparing the folder's runs; returns its path."""
    folder = Path(folder)
    kind, found = members(folder)
    order = ranked(found)
    monitor = next((m.summary.get("monitor") for m in found if m.summary.get("monitor")), "val_accuracy")
    swept = list(dict.fromkeys(k for m in found for k in m.values))
    extra = [n for n in ("val_loss", "val_accuracy", "train_loss") if n != monitor]

    def link(m: Member) -> str:
        name = escape(m.path.name)
        return f'<a href="{escape(m.path.name)}/{REPORT}">{name}</a>' if (m.path / REPORT).is_file() else name

    rows = []
    for rank, m in enumerate(order, start=1):
        best = m.summary.get("best") or {}
        cells = [str(rank), link(m), *(escape(json.dumps(m.values.get(k))) for k in swept)]
        cells += [_fmt(monitor, best.get(monitor))] + [_fmt(n, best.get(n)) for n in extra]
        cells += [str(m.summary.get("best_epoch", "")), str(m.summary.get("epochs_run", "")),
                  escape(str(m.summary.get("stopped", "")))]
        rows.append(cells)
    headers = ["rank", "run", *swept, f"{monitor} (best)", *extra, "best epoch", "epochs", "stopped"]
    numeric = [True, False, *([False] * len(swept)), True, *([True] * len(extra)), True, True, False]
    ranking = (f"<p>{len(found)} runs, best {escape(monitor)} first (each at its best epoch). "
               "A run's name links to its own report where one was written (`cnnreg report RUN_DIR`).</p>"
               + table(headers, rows, numeric))
    sections = [section("ranking", "Ranked runs", ranking)]
    aggregate = read_json(folder / "crossval.json")
    if aggregate.get("mean"):
        mean, std = aggregate.get("mean") or {}, aggregate.get("std") or {}
        sections.append(section("folds", "Mean over the folds", table(
            ("metric", "mean", "std"), ((escape(n), _fmt(n, mean[n]), _fmt(n, std.get(n))) for n in mean
                                        if n.startswith("val_") or n == "train_loss"), (False, True, True))))
    curves = [(m.path.name, m.records) for m in found if m.records]
    metrics = [n for n in dict.fromkeys([monitor, "val_loss", "train_loss"])
               if any(n in r.metrics for _, records in curves for r in records)]
    body = (img(figs.png(figs.overlaid_curves_figure(curves, metrics)), "every run's curves overlaid")
            if curves and metrics else "<p>No epoch records (last.pt, metrics.jsonl) to draw.</p>")
    sections.append(section("curves", "Training curves", body))
    sections.append(section("runs", "Runs", key_values([("folder", folder), ("kind", kind)]
                                                       + [(m.path.name, m.path) for m in found])))
    nav = [("ranking", "Ranked runs")] + ([("folds", "Mean over the folds")] if aggregate.get("mean") else [])
    nav += [("curves", "Training curves"), ("runs", "Runs")]
    title = f"{'Sweep' if kind == 'sweep' else 'Cross-validation' if kind == 'k-fold' else 'Runs'}: {folder.name}"
    path = folder / REPORT
    checkpoint.atomic_write_text(path, page(title, nav, sections))
    return path


def _fmt(name: str, value: Any) -> str:
    return format_value(name, float(value)) if isinstance(value, (int, float)) else ""
