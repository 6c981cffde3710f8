"""``cnnreg calibrate RUN_DIR``: fit the temperature of a finished run and keep it in the run directory.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T,
fitted on the validation split by L-BFGS on the negative log-likelihood
(:func:`cnnreg.workflows.calibration.fit_temperature`). The predictions stay
as they were; the confidences become honest. The validation split, not
the test split: a temperature fitted on the test split would make the
test split's calibration error look better than it is. The result goes to
``RUN_DIR/calibration.json``, which ``evaluate``, ``predict`` and ``export``
then apply (``load_run`` and ``load_predictor`` read it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from cnnreg.core.errors import UserError
from cnnreg.engine.outputs import collect_outputs
from cnnreg.runs import calibration_file
from cnnreg.runs.calibration_file import read_temperature
from cnnreg.runs.directory import read_run_info
from cnnreg.workflows import calibration
from cnnreg.workflows.predict import load_run

__all__ = ["Calibration", "calibrate_run", "measure", "read_temperature"]


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it changes, on the split it was fitted on.

    ``*_before``: the model's own logits; ``*_after``: divided by ``temperature``.
    The ECEs are fractions in [0, 1] over ``bins`` equal-width confidence bins.
    """

    temperature: float
    split: str
    samples: int
    checkpoint: str
    bins: int
    ece_before: float
    ece_after: float
    classwise_ece_before: float
    classwise_ece_after: float
    nll_before: float
    nll_after: float
    accuracy: float  # the same before and after: dividing by T > 0 keeps every argmax
    path: Path | None = None  # where it was written

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path) if self.path is not None else None
        return data


def calibrate_run(run_dir: Path, *, checkpoint: str = "best", device: str | None = None,
                  split: str = "val", disable: tuple[str, ...] | list[str] = ()) -> Calibration:
    """Fit the temperature of the run in ``run_dir`` on ``split`` and write ``calibration.json``.

    The run is reopened as ``cnnreg evaluate`` reopens it (its data loaded,
    the chosen weights), without any earlier calibration: the fit is always
    on the model's own logits, so calibrating again gives the same T.

    :raises UserError: the run has no validation split, the run directory
        cannot be written, or it is not a run directory.
    """
    run_dir = Path(run_dir)
    if split == "test":
        raise UserError("the temperature is not fitted on the test split: the test split's calibration error "
                        "would then look better than it is; fit it on the validation split (the default)")
    read_run_info(run_dir)  # not a run directory: said first
    calibration_file.check_writable(run_dir)  # before the pass over the data, not after it
    run = load_run(run_dir, checkpoint=checkpoint, device=device, disable=disable, calibrated=False)
    if split not in run.batches:
        have = ", ".join(run.batches) or "none"
        raise UserError(
            f"{run_dir} has no {'validation' if split == 'val' else repr(split)} split (it has: {have}); the "
            "temperature must be fitted on held-out data that is not the test split. Train the run again "
            "with one: set data.val_fraction > 0 (e.g. --set data.val_fraction=0.1), or use a dataset that "
            "has a validation split")
    outputs = collect_outputs(run, split)
    result = measure(outputs.logits, outputs.targets, split=split, checkpoint=checkpoint)
    data = {key: value for key, value in result.to_json().items() if key != "path"}
    path = calibration_file.write_calibration(run_dir, {
        **data, "fitted": datetime.now().isoformat(timespec="seconds"),
        "method": "temperature scaling: logits / T, T fitted by L-BFGS on the NLL of the split"})
    return replace(result, path=path)


def measure(logits: torch.Tensor, targets: torch.Tensor, *, split: str = "val", checkpoint: str = "best",
            bins: int = calibration.DEFAULT_BINS) -> Calibration:
    """Fit the temperature on these logits and measure the calibration before and after it."""
    t = calibration.fit_temperature(logits, targets)
    accuracy = float((logits.argmax(dim=1) == targets).double().mean())
    return Calibration(
        temperature=t, split=split, samples=int(len(targets)), checkpoint=checkpoint, bins=bins,
        ece_before=calibration.expected_calibration_error(logits, targets, bins),
        ece_after=calibration.expected_calibration_error(logits, targets, bins, temperature=t),
        classwise_ece_before=calibration.classwise_calibration_error(logits, targets, bins),
        classwise_ece_after=calibration.classwise_calibration_error(logits, targets, bins, temperature=t),
        nll_before=calibration.negative_log_likelihood(logits, targets),
        nll_after=calibration.negative_log_likelihood(logits, targets, temperature=t),
        accuracy=accuracy)
