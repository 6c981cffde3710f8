"""Every logit of one split, for what needs more than the running tallies:
calibration (the temperature is fitted on the validation logits) and the
run report (highest-loss images, reliability diagrams).

The pass is the evaluation's own: the run's eval transforms (TTA views
merged the same way), its precision, the model it validates with (an EMA or
SWA average when a callback set one), inference mode. Logits come back as
float32 on the CPU in the split's order, with each sample's index in the
split, so an image can be looked up again. They are the model's own logits:
a calibration temperature (``run.temperature``) is not applied, so that
temperatures are fitted, and ECE before and after measured, on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnreg.core.device import autocast
from cnnreg.core.errors import UserError
from cnnreg.core.run import Run
from cnnreg.engine.step import prepare
from cnnreg.inputs.prepare import merge_views, view_weights


@dataclass(frozen=True)
class SplitOutputs:
    """The model's logits on one split.

    :param split: "train", "val" or "test".
    :param logits: float32 ``[N, C]`` on the CPU.
    :param targets: int64 ``[N]`` true classes.
    :param index: int64 ``[N]`` each sample's position in the split.
    """

    split: str
    logits: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor


def collect_outputs(run: Run, split: str) -> SplitOutputs:
    """The logits of every sample of ``split``, sorted by their index in it."""
    if split not in run.batches:
        have = ", ".join(run.batches)
        raise UserError(f"this run has no {split!r} split (it has: {have})")
    model = run.step_model if run.step_model is not None else run.model
    views = view_weights(run.eval_transforms)
    run.model.eval()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode(), autocast(run.device, run.precision):
        for images, targets, index in run.batches[split].indexed():
            logits = merge_views(model(prepare(run, images, run.eval_transforms, index)), views)
            parts.append((logits.float().cpu(), targets.cpu(), index.cpu()))
    if not parts:
        raise UserError(f"the {split!r} split of this run is empty")
    logits, targets, index = (torch.cat(p) for p in zip(*parts))
    order = torch.argsort(index)
    return SplitOutputs(split=split, logits=logits[order], targets=targets[order].long(), index=index[order])
