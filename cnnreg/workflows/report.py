"""The run report: ``RUN_DIR/report.html``, one self-contained page about a finished run.

What it holds (the sections of :mod:`cnnreg.workflows.report_html`): the
recipe and the environment it ran in (run.json), the outcome
(summary.json), the training curves, the confusion matrix (counts and
normalised; beyond 20 classes the most confused pairs instead of a matrix
nobody can read), the per-class table, the images with the highest loss
(fastai's ``plot_top_losses``), Grad-CAM maps over a few right and wrong
images, and calibration.

Everything about predictions comes from one pass of the evaluation itself
(:func:`cnnreg.engine.outputs.collect_outputs`: the eval transforms, TTA
views merged, the run's precision) over the test split (the val split when
there is none, and the page says so), with the best weights. For a sweep
or k-fold folder the page compares the runs instead (:mod:`.report_compare`).

Nothing but report.html is written: a temperature fitted here for the
calibration section is shown, not stored (``cnnreg calibrate`` stores one).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cnnreg.core import checkpoint
from cnnreg.core.device import autocast
from cnnreg.core.errors import UserError
from cnnreg.core.records import EpochRecord
from cnnreg.core.run import Run
from cnnreg.engine.outputs import SplitOutputs, collect_outputs
from cnnreg.engine.step import prepare
from cnnreg.runs.calibration_file import read_temperature
from cnnreg.runs.directory import load_checkpoint_weights
from cnnreg.workflows import calibration as cal
from cnnreg.workflows import report_figures as figs
from cnnreg.workflows.gradcam import grad_cam, last_spatial_conv
from cnnreg.workflows.report_data import (Calibration, ClassRow, Confusion, Example, RunReport, read_json,
                                          read_records)

REPORT = "report.html"
MATRIX_UP_TO = 20  # classes: a larger matrix is unreadable; the page lists the top confusions instead
CAMS = 4  # right and wrong images each, in the Grad-CAM section


# -- entry points ----------------------------------------------------------------------------


def write_report(run_dir: Path, *, device: str | None = None, top_losses: int = 16,
                 disable: Sequence[str] = ()) -> Path:
    """Write ``run_dir/report.html`` and return its path.

    ``run_dir`` is a run directory, or a sweep or k-fold folder (sweep.json,
    crossval.json, or run directories inside it): then the page compares
    its runs. The run is rebuilt from its directory (data loaded, best weights).
    """
    from cnnreg.workflows.predict import load_run
    from cnnreg.workflows.report_compare import is_comparison, write_comparison

    run_dir = Path(run_dir)
    figs.require_matplotlib()
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give a run directory, or a sweep or k-fold folder")
    if is_comparison(run_dir):
        return write_comparison(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UserError(f"{run_dir} is neither a run directory (no run.json) nor a sweep or k-fold folder "
                        "(no run directories inside); give a folder that `cnnreg run` or `cnnreg sweep` created")
    run = load_run(run_dir, device=device, disable=tuple(disable))
    return write_run_report(run, read_records(run_dir), top_losses=top_losses, best_weights=False)


def write_run_report(run: Run, records: Sequence[EpochRecord], *, top_losses: int = 16,
                     best_weights: bool = True) -> Path:
    """The report of a run in memory (the ``report`` callback's, at fit end).

    :param best_weights: evaluate a copy of the model with best.safetensors
        loaded (when the run kept one), so the page shows what ``cnnreg
        report`` would; the run's own model is left as the fit left it.
    """
    from cnnreg.workflows.report_html import run_page

    if run.run_dir is None:
        raise UserError("this run has no run directory to write a report into")
    figs.require_matplotlib()
    if best_weights and (run.run_dir / checkpoint.WEIGHTS).is_file():
        model = copy.deepcopy(checkpoint.unwrap(run.model))
        load_checkpoint_weights(model, run.run_dir, "best")
        run = replace(run, model=model, step_model=None)
    report = build_report(run, records, top_losses=top_losses)
    path = run.run_dir / REPORT
    checkpoint.atomic_write_text(path, run_page(report))
    return path


# -- what the page shows ---------------------------------------------------------------------


def build_report(run: Run, records: Sequence[EpochRecord], *, top_losses: int = 16) -> RunReport:
    assert run.run_dir is not None
    split, split_note = _report_split(run)
    outputs = collect_outputs(run, split)
    logits, targets = outputs.logits, outputs.targets
    classes = tuple(run.classes)
    probs = logits.double().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    losses = F.cross_entropy(logits.double(), targets, reduction="none")
    counts = np.bincount((targets * len(classes) + predicted).numpy(), minlength=len(classes) ** 2)
    counts = counts.reshape(len(classes), len(classes))

    right = (predicted == targets).nonzero().flatten()
    wrong = (predicted != targets).nonzero().flatten()
    gallery = losses.argsort(descending=True)[:top_losses]
    cam_right = right[confidence[right].argsort(descending=True)][:CAMS]
    cam_wrong = wrong[confidence[wrong].argsort(descending=True)][:CAMS]
    wanted = sorted({int(i) for part in (gallery, cam_right, cam_wrong) for i in outputs.index[part].tolist()})
    images = _images_at(run, split, set(wanted))

    def example(row: int, cams: tuple[tuple[str, bytes], ...] = ()) -> Example:
        index = int(outputs.index[row])
        return Example(index=index, true=classes[int(targets[row])], predicted=classes[int(predicted[row])],
                       confidence=float(confidence[row]), loss=float(losses[row]), image=figs.tile(images[index]),
                       cams=cams)

    cams, cam_note = _cams(run, outputs, images, [int(r) for r in cam_right], [int(r) for r in cam_wrong],
                           predicted)
    return RunReport(
        run_dir=run.run_dir, info=read_json(run.run_dir / "run.json"), summary=read_json(run.run_dir / "summary.json"),
        split=split, split_note=split_note, images=len(targets),
        accuracy=float((predicted == targets).double().mean()), loss=float(losses.mean()),
        tta_views=len(_views(run)), classes=classes, per_class=_per_class(counts, classes),
        confusions=_confusions(counts, classes, 20 if len(classes) > MATRIX_UP_TO else 10),
        curves=figs.png(figs.curves_figure(records)) if records else None,
        confusion_figure=(figs.png(figs.confusion_figure(counts, classes, split))
                          if len(classes) <= MATRIX_UP_TO else None),
        top_losses=tuple(example(int(r)) for r in gallery),
        cam_right=tuple(example(r, cams.get(r, ())) for r in cam_right.tolist()),
        cam_wrong=tuple(example(r, cams.get(r, ())) for r in cam_wrong.tolist()),
        cam_note=cam_note, calibration=_calibration(run, outputs))


def _report_split(run: Run) -> tuple[str, str]:
    if "test" in run.batches:
        return "test", ""
    if "val" in run.batches:
        return "val", ("This run has no test split: the figures below are on the validation split, "
                       "which also chose the best epoch, so they flatter the model somewhat.")
    return "train", ("This run has neither a test nor a validation split: the figures below are on the "
                     "training split, which the model has learnt; they say little about new images.")


def _views(run: Run) -> tuple[float, ...]:
    from cnnreg.inputs.prepare import view_weights

    return view_weights(run.eval_transforms) or (1.0,)


def _per_class(counts: np.ndarray, classes: Sequence[str]) -> tuple[ClassRow, ...]:
    true_totals, predicted_totals, hits = counts.sum(axis=1), counts.sum(axis=0), np.diag(counts)
    rows = []
    for k, name in enumerate(classes):
        precision = hits[k] / predicted_totals[k] if predicted_totals[k] else 0.0
        recall = hits[k] / true_totals[k] if true_totals[k] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(ClassRow(name, float(precision), float(recall), float(f1), int(true_totals[k])))
    return tuple(rows)


def _confusions(counts: np.ndarray, classes: Sequence[str], top: int) -> tuple[Confusion, ...]:
    """The largest off-diagonal cells, most images first (ties in class order)."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    totals = counts.sum(axis=1)
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), len(classes))
        if off[i, j] == 0:
            break
        pairs.append(Confusion(classes[i], classes[j], int(off[i, j]), float(off[i, j] / totals[i])))
    return tuple(pairs)


def _images_at(run: Run, split: str, wanted: set[int]) -> dict[int, torch.Tensor]:
    """The uint8 ``[C, H, W]`` images at these indices of the split, as its batches give them.

    One more pass over the split's batches rather than a look into the split:
    the batches are what the model saw (channels converted, resized, files
    decoded as the run decodes them), whatever kind of split it is.
    """
    found: dict[int, torch.Tensor] = {}
    for images, _, index in run.batches[split].indexed():
        positions = index.cpu().tolist()
        keep = [k for k, i in enumerate(positions) if i in wanted]
        for k in keep:
            found[positions[k]] = images[k].cpu()
        if len(found) == len(wanted):
            break
    return found


def _cams(run: Run, outputs: SplitOutputs, images: dict[int, torch.Tensor], right: list[int], wrong: list[int],
          predicted: torch.Tensor) -> tuple[dict[int, tuple[tuple[str, bytes], ...]], str]:
    """Grad-CAM tiles per row of ``outputs``: the predicted class's map, and for a wrong
    prediction also the true class's. The plain eval transforms are used (no TTA views):
    a map belongs to one image."""
    rows = right + wrong
    if not rows:
        return {}, ""
    transforms = tuple(t for t in run.eval_transforms if getattr(t, "view_weights", None) is None)
    model = checkpoint.unwrap(run.model)
    index = outputs.index[rows]
    batch = torch.stack([images[int(i)] for i in index]).to(run.device)
    x = prepare(run, batch, transforms, index.to(run.device))
    model.eval()
    try:
        layer = last_spatial_conv(model, x[:1])
        with autocast(run.device, run.precision):
            for_predicted = grad_cam(model, layer, x, predicted[rows])
            for_true = grad_cam(model, layer, x, outputs.targets[rows])
    except (ValueError, RuntimeError) as exc:  # no conv layer, or a model autograd cannot go through
        return {}, f"Grad-CAM is not available for this model: {exc}"
    name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
    classes = run.classes
    tiles: dict[int, tuple[tuple[str, bytes], ...]] = {}
    for k, row in enumerate(rows):
        image = images[int(outputs.index[row])]
        entry = [(f"for {classes[int(predicted[row])]} (predicted)", figs.cam_tile(image, for_predicted[k]))]
        if row in wrong:
            entry.append((f"for {classes[int(outputs.targets[row])]} (true)", figs.cam_tile(image, for_true[k])))
        tiles[row] = tuple(entry)
    size = tuple(for_predicted.shape[-2:])
    return tiles, f"Maps of layer {name} ({size[0]}x{size[1]}, the last convolution with a spatial output)."


# -- calibration ---------------------------------------------------------------------------------


def _calibration(run: Run, outputs: SplitOutputs) -> Calibration:
    logits, targets = outputs.logits, outputs.targets
    before = dict(ece=cal.expected_calibration_error(logits, targets),
                  classwise_ece=cal.classwise_calibration_error(logits, targets),
                  nll=cal.negative_log_likelihood(logits, targets))
    # a damaged file is a located error here as in evaluate and predict, not a quiet omission
    stored = read_temperature(run.run_dir) if run.run_dir is not None else None
    if stored is not None:
        source, temperature = "stored", stored
        note = "Temperature from calibration.json (fitted on the validation split by cnnreg calibrate)."
    elif "val" in run.batches:
        source = "fitted"
        temperature = cal.fit_temperature(*_val_logits(run, outputs))
        note = (f"Temperature fitted on the validation split for this report only (nothing was stored); "
                f"`cnnreg calibrate {run.run_dir}` stores one for predict and export.")
        if outputs.split == "val":
            note += " With no test split it is judged on the split it was fitted on: the gain is flattered."
    else:
        source, temperature = "absent", None
        note = ("No temperature: this run has no validation split (data.val_fraction is 0 and the dataset has "
                "none), and fitting one on the split it is judged on would flatter it. Train with a validation "
                "split to calibrate.")
    bins = cal.reliability_bins(logits, targets)
    if temperature is None:
        return Calibration(source, note, **before, figure=figs.png(figs.reliability_figure(bins, None, None)))
    after_bins = cal.reliability_bins(logits, targets, temperature=temperature)
    return Calibration(
        source, note, **before, temperature=temperature,
        ece_after=cal.expected_calibration_error(logits, targets, temperature=temperature),
        classwise_ece_after=cal.classwise_calibration_error(logits, targets, temperature=temperature),
        nll_after=cal.negative_log_likelihood(logits, targets, temperature=temperature),
        figure=figs.png(figs.reliability_figure(bins, after_bins, temperature)))


def _val_logits(run: Run, outputs: SplitOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    if outputs.split == "val":
        return outputs.logits, outputs.targets
    val = collect_outputs(run, "val")
    return val.logits, val.targets
