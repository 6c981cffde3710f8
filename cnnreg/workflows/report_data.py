"""What the run report shows, as plain data, and how it is read back from a run directory.

Kept apart from the code that computes it (:mod:`.report`) and the code
that writes it as HTML (:mod:`.report_html`, :mod:`.report_compare`), so
each imports this and none imports another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnreg.core import checkpoint
from cnnreg.core.records import EpochRecord
from cnnreg.engine.training_state import record_from_json
from cnnreg.runs.listing import read_json_object


@dataclass(frozen=True)
class ClassRow:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Confusion:
    """``count`` images of class ``true`` were predicted as ``predicted`` (``share`` of that class)."""

    true: str
    predicted: str
    count: int
    share: float


@dataclass(frozen=True)
class Example:
    """One image of the split, as the model saw it before normalisation, with what it said."""

    index: int
    true: str
    predicted: str
    confidence: float  # of the predicted class
    loss: float  # cross-entropy of the true class
    image: bytes  # PNG
    cams: tuple[tuple[str, bytes], ...] = ()  # (what the map is for, PNG)


@dataclass(frozen=True)
class Calibration:
    """The calibration section: ``source`` is "stored" (calibration.json), "fitted" (here, on val) or "absent"."""

    source: str
    note: str
    ece: float
    classwise_ece: float
    nll: float
    temperature: float | None = None
    ece_after: float | None = None
    classwise_ece_after: float | None = None
    nll_after: float | None = None
    figure: bytes | None = None


@dataclass(frozen=True)
class RunReport:
    """Everything the page shows about one run."""

    run_dir: Path
    info: dict[str, Any]  # run.json
    summary: dict[str, Any]  # summary.json ({} when absent)
    split: str
    split_note: str
    images: int
    accuracy: float
    loss: float
    tta_views: int
    classes: tuple[str, ...]
    per_class: tuple[ClassRow, ...]
    confusions: tuple[Confusion, ...]
    curves: bytes | None
    confusion_figure: bytes | None
    top_losses: tuple[Example, ...]
    cam_right: tuple[Example, ...]
    cam_wrong: tuple[Example, ...]
    cam_note: str
    calibration: Calibration


# -- reading a run directory -----------------------------------------------------------------------


def read_records(run_dir: Path) -> tuple[EpochRecord, ...]:
    """Every epoch's record: last.pt's history (it keeps them all, for --resume), else
    metrics.jsonl (the metrics_logger's), else none."""
    run_dir = Path(run_dir)
    try:
        history = checkpoint.load_state(run_dir / checkpoint.LAST).get("history") or []
        return tuple(record_from_json(r) for r in history)
    except (checkpoint.CheckpointError, KeyError, TypeError, ValueError):
        pass
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return ()
    records = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            epoch = int(row.pop("epoch"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut by a crash
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        records[epoch] = EpochRecord(epoch=epoch, epochs=epoch, metrics=metrics)
    return tuple(records[e] for e in sorted(records))


def read_json(path: Path) -> dict[str, Any]:
    """A run file's JSON object, {} when it is missing or damaged (the page then leaves that part out)."""
    return read_json_object(Path(path)) or {}
