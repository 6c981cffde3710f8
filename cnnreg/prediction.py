"""Classifying new images with a run's model and eval transforms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from cnnreg import splits
from cnnreg.device import autocast, input_dtype
from cnnreg.forward import merge_views, prepare_batch, view_weights
from cnnreg.errors import UserError
from cnnreg.records import Prediction

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.engine import Run

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


def predictor(run: Run) -> Predictor:
    return Predictor(model=run.model, transforms=run.eval_transforms, classes=run.data.classes,
                     image_size=run.data.image_size, channels=run.context.channels, device=run.device,
                     precision=run.precision, channels_last=run.channels_last, fit=run.data.fit)


def predict(run: Run | Predictor, images: Sequence[Any], top_k: int = 1) -> list[Prediction]:
    """Classify images (paths, PIL images or uint8 ``[C, H, W]`` tensors) with the
    run's eval transforms; each answer lists the ``top_k`` classes and confidences."""
    from cnnreg.imagefiles import BadImage, decode_image, fit_image

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
        probabilities = torch.softmax(merge_views(p.model(x), view_weights(p.transforms)).float(), dim=1)
    confidences, indices = probabilities.topk(top_k, dim=1)
    return [Prediction(source=s, classes=tuple(p.classes[i] for i in idx), indices=tuple(idx),
                       confidences=tuple(conf))
            for s, idx, conf in zip(sources, indices.cpu().tolist(), confidences.cpu().tolist())]

