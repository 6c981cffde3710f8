"""A run directory's ``calibration.json``: the temperature ``cnnreg calibrate`` fitted.

Here, in the run-directory layer, because both the writer
(:mod:`cnnreg.workflows.calibrate`) and the readers (``load_run`` and
``load_predictor`` in :mod:`cnnreg.workflows.predict`, so evaluate, predict
and export) need it, and the writer imports the readers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cnnreg.core import checkpoint
from cnnreg.core.errors import UserError

FILE = "calibration.json"


def calibration_path(run_dir: Path) -> Path:
    return Path(run_dir) / FILE


def read_calibration(run_dir: Path) -> dict[str, Any] | None:
    """What ``calibration.json`` holds, or ``None`` when the run was never calibrated.

    :raises UserError: the file is there but unreadable, not JSON, or has no
        positive finite ``temperature``: naming the file, and the fix.
    """
    path = calibration_path(run_dir)
    if not path.exists():
        return None
    fix = f"run `cnnreg calibrate {run_dir}` again to rewrite it (or delete it to use the model uncalibrated)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"{path} is damaged ({reason}); {fix}") from None
    temperature = data.get("temperature") if isinstance(data, dict) else None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise UserError(f"{path} is damaged: it holds no positive \"temperature\" (found {temperature!r}); {fix}")
    return data


def read_temperature(run_dir: Path) -> float | None:
    """The run's calibration temperature, or ``None`` when it has no calibration.json."""
    data = read_calibration(run_dir)
    return None if data is None else float(data["temperature"])


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory calibration.json cannot be written into.

    Asked before the validation pass too, so that an unwritable folder costs
    no minutes of evaluation first.

    :raises UserError: naming the folder, why, and what to do.
    """
    folder = Path(run_dir)
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - platforms without statvfs
        read_only = False
    if read_only:
        problem = f"{folder} is on a read-only file system"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"{folder} is not writable by this user (uid {os.getuid()})"
    else:
        return
    raise UserError(f"cannot write {FILE} into the run directory: {problem}; change its permissions, or copy "
                    "the run directory somewhere writable and calibrate the copy")


def write_calibration(run_dir: Path, data: dict[str, Any]) -> Path:
    """Write ``calibration.json`` atomically (a temporary file beside it, then a rename).

    :raises UserError: the folder is not writable, or the write fails (the
        previous file, if any, is left as it was).
    """
    check_writable(run_dir)
    path = calibration_path(run_dir)
    checkpoint.atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
