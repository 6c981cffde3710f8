""":func:`cnnreg.inputs.imagefiles.fit_image` as tensor operations that export
with dynamic image sizes (ONNX, torch.export), pixel for pixel the same.

cnnreg brings an image of another size to the run's size with torchvision's
uint8 resize (bilinear, antialiased); for ``fit="crop"`` after scaling it to
cover the size, then cutting the centre. On uint8 torch computes that resize
in fixed point, as Pillow does: per axis, the antialiased triangle weights in
float64, scaled to integers at a precision set by the largest weight; the
width first, then the height, each pass rounded and clipped to 0..255.
ONNX's float ``Resize`` gives one level more or less in a few per cent of the
pixels, so this module computes the fixed-point arithmetic itself: one
matrix product per axis, its weights computed in the graph from the image's
size (float64, which holds these integer sums exactly). The rules below are
torch's ``_compute_index_ranges_int16_weights`` (aten UpSampleKernel.cpp),
term by term, in its order of operations, since a different rounding order
moves the odd pixel by a level.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnreg.core.errors import UserError

F64 = torch.float64
FITS = ("stretch", "crop")


class GraphFit(nn.Module):
    """uint8 ``[B, C, H, W]`` of any height and width -> float64 ``[B, C, h, w]``
    holding exactly the uint8 values ``fit_image(image, (h, w), fit)`` gives."""

    def __init__(self, size: tuple[int, int], fit: str) -> None:
        super().__init__()
        if fit not in FITS:
            raise UserError(f"cannot export the resize of fit {fit!r} with dynamic image sizes (only "
                            f"{' and '.join(FITS)}); export without --preprocessing and resize the images yourself")
        self.size = (int(size[0]), int(size[1]))
        self.fit = fit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(F64)
        (h, w), height, width = self.size, _length(x, -2), _length(x, -1)
        if self.fit == "crop":
            # fit_image's cover, as Python's floats compute it: scale = max(h / H, w / W),
            # each side max(target, int(side * scale)). torch.div, not h / tensor: that
            # is a reciprocal times h, one rounding more.
            scale = torch.maximum(torch.div(_const(h), height), torch.div(_const(w), width))
            cover_h = torch.maximum(_const(h), torch.floor(height * scale))
            cover_w = torch.maximum(_const(w), torch.floor(width * scale))
        else:
            cover_h, cover_w = _const(h), _const(w)
        x = _resize_axis(x, -1, width, cover_w, keep=w, static=self.fit == "stretch")
        return _resize_axis(x, -2, height, cover_h, keep=h, static=self.fit == "stretch")

    def extra_repr(self) -> str:
        return f"size={self.size}, fit={self.fit!r}"


def _resize_axis(x: torch.Tensor, dim: int, length: torch.Tensor, cover: torch.Tensor, *, keep: int,
                 static: bool) -> torch.Tensor:
    """Resize axis ``dim`` to ``cover`` as torch's uint8 kernel does, keeping the central ``keep``."""
    if static:  # the output size is the run's: no size comes from the data
        rows = torch.arange(keep, dtype=F64)
    else:
        count = cover.to(torch.int64).item()
        torch._check(count >= keep)
        rows = torch.arange(count, dtype=F64)
    weights = _weights(x.shape[dim], length, cover, rows)
    # The precision follows the largest weight of the whole resize, the rows cut away included.
    precision = _precision(weights.max())
    # torchvision's centre crop: int(round((cover - keep) / 2)), halves to even, as torch.round.
    start = torch.round((cover - keep) / 2)
    kept = weights.index_select(0, (start + torch.arange(keep, dtype=F64)).to(torch.int64))
    fixed = torch.floor(kept * torch.pow(2.0, precision) + 0.5)
    summed = x @ fixed.T if dim == -1 else fixed @ x
    return torch.clamp(torch.floor((summed + torch.pow(2.0, precision - 1)) / torch.pow(2.0, precision)), 0, 255)


def _weights(size: int, length: torch.Tensor, cover: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[len(rows), size]``: each output row's normalised antialiased bilinear weights over the input."""
    scale = length / cover
    support = torch.clamp(scale, min=1.0)  # the triangle's half-width: 1, times the scale when shrinking
    invscale = torch.reciprocal(support)
    taps = torch.ceil(support) * 2 + 1
    center = (scale * (rows + 0.5))[:, None]
    first = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    count = torch.clamp(torch.minimum(torch.trunc(center + support + 0.5), length) - first, min=0)
    count = torch.minimum(count, taps)
    j = torch.arange(size, dtype=F64)
    w = torch.clamp(1 - torch.abs((j - center + 0.5) * invscale), min=0)
    w = torch.where((j >= first) & (j < first + count), w, torch.zeros((), dtype=F64))
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total != 0, w / torch.where(total != 0, total, torch.ones((), dtype=F64)), w)


def _precision(largest: torch.Tensor) -> torch.Tensor:
    """The fixed-point bits: the first p in 0..21 with int(0.5 + largest * 2**(p + 1)) >= 2**15, else 22."""
    bits = torch.arange(22, dtype=F64)
    reached = torch.floor(0.5 + largest * torch.pow(2.0, bits + 1)) >= 2**15
    return 22 - reached.to(F64).sum()  # once reached, reached for every larger p


def _length(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A dimension's size as a float64 scalar tensor (symbolic when exported with dynamic sizes)."""
    return torch.ones((), dtype=F64) * x.shape[dim]


def _const(value: int) -> torch.Tensor:
    return torch.full((), float(value), dtype=F64)
