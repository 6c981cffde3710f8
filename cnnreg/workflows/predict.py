"""Reopening a run's directory, and classifying new images with its model.

``load_run`` rebuilds the whole run (its data loaded) to evaluate it;
``load_predictor`` only the model and eval transforms, from what
``run.json`` recorded, so predicting and exporting need none of the data.
Both take the temperature of the run's ``calibration.json`` when there is
one (``cnnreg calibrate``). Nothing in the directory is modified.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cnnreg.assemble.build import build
from cnnreg.assemble.parts import model_and_eval_transforms
from cnnreg.config.recipe import load_recipe
from cnnreg.core.data import DatasetInfo
from cnnreg.core.device import apply_precision, autocast, input_dtype, resolve_device, resolve_precision
from cnnreg.core.errors import UserError
from cnnreg.core.records import Prediction
from cnnreg.core.run import Run
from cnnreg.inputs import splits
from cnnreg.inputs.prepare import merge_views, prepare_batch, view_weights
from cnnreg.runs.calibration_file import read_temperature
from cnnreg.runs.directory import load_checkpoint_weights, read_run_info

@dataclass(frozen=True)
class Predictor:
    """What classifying new images takes: the model, the eval transforms and
    the data's shape and class names (no dataset needed)."""

    model: nn.Module
    transforms: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    device: torch.device
    precision: str
    channels_last: bool
    fit: str = "stretch"  # how an image of another size meets image_size, as the run's data did
    # The run's calibration temperature (cnnreg calibrate): predict divides the logits by it
    # before the softmax, export bakes the division in; None: uncalibrated.
    temperature: float | None = None


def predictor(run: Run) -> Predictor:
    return Predictor(model=run.model, transforms=run.eval_transforms, classes=run.data.classes,
                     image_size=run.data.image_size, channels=run.context.channels, device=run.device,
                     precision=run.precision, channels_last=run.channels_last, fit=run.data.fit,
                     temperature=run.temperature)


def predict(run: Run | Predictor, images: Sequence[Any], top_k: int = 1) -> list[Prediction]:
    """Classify images (paths, PIL images or uint8 ``[C, H, W]`` tensors) with the
    run's eval transforms; each answer lists the ``top_k`` classes and confidences
    (calibrated ones, ``softmax(logits / T)``, when the run has a temperature)."""
    from cnnreg.inputs.imagefiles import BadImage, decode_image, fit_image

    p = run if isinstance(run, Predictor) else predictor(run)
    top_k = max(1, min(top_k, len(p.classes)))
    batch, sources = [], []
    for item in images:
        if isinstance(item, torch.Tensor):
            tensor = item if item.dtype == torch.uint8 else (item.clamp(0, 1) * 255).round().to(torch.uint8)
            tensor = splits.convert_channels(tensor.unsqueeze(0), p.channels)[0]
            if tuple(tensor.shape[-2:]) != p.image_size:
                tensor = fit_image(tensor, p.image_size, p.fit)  # type: ignore[arg-type]
            batch.append(tensor)
            sources.append("<tensor>")
            continue
        if hasattr(item, "convert") and hasattr(item, "save"):  # a PIL image
            import io
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            buffer.seek(0)
            item, source = buffer, "<image>"
        else:
            source = str(item)
        try:
            array = decode_image(item, size=p.image_size, channels=p.channels, fit=p.fit)  # type: ignore[arg-type]
        except BadImage as exc:
            raise UserError(f"cannot read {source}: {exc.reason}") from None
        batch.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        sources.append(source)
    x = torch.stack(batch).to(p.device)
    p.model.eval()
    with torch.inference_mode(), autocast(p.device, p.precision):
        x = prepare_batch(x, p.transforms, channels_last=p.channels_last, dtype=input_dtype(p.precision))
        logits = merge_views(p.model(x), view_weights(p.transforms)).float()
        probabilities = torch.softmax(logits / p.temperature if p.temperature is not None else logits, dim=1)
    confidences, indices = probabilities.topk(top_k, dim=1)
    return [Prediction(source=s, classes=tuple(p.classes[i] for i in idx), indices=tuple(idx),
                       confidences=tuple(conf))
            for s, idx, conf in zip(sources, indices.cpu().tolist(), confidences.cpu().tolist())]


def load_run(run_dir: Path, *, checkpoint: str = "best", device: str | None = None,
             disable: tuple[str, ...] | list[str] = (), calibrated: bool = True) -> Run:
    """A run rebuilt from its directory, its data loaded, with the chosen weights.

    :param calibrated: take the temperature of the directory's calibration.json,
        when there is one (``run.temperature``, which evaluate applies); False:
        the model's own logits (what ``cnnreg calibrate`` fits on).
    Nothing in the directory is modified.
    """
    run_dir = Path(run_dir)
    read_run_info(run_dir)
    temperature = read_temperature(run_dir) if calibrated else None  # a damaged file: said before the build
    recipe = load_recipe(run_dir / "recipe.json", disable=disable)
    run = replace(build(recipe, output=False, device=device), run_dir=run_dir, temperature=temperature)
    load_checkpoint_weights(run.model, run_dir, checkpoint)
    return run


def load_predictor(run_dir: Path, *, checkpoint: str = "best", device: str | None = None,
                   disable: tuple[str, ...] | list[str] = (), calibrated: bool = True) -> Predictor:
    """The model and eval transforms of a run, without loading its dataset.

    :param calibrated: take the temperature of the directory's calibration.json, when there is one.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    temperature = read_temperature(run_dir) if calibrated else None
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
                     precision=precision, channels_last=channels_last, fit=data.get("fit", "stretch"),
                     temperature=temperature)


def _tuple(value: Any) -> tuple[float, ...] | None:
    return tuple(value) if value is not None else None
