"""Image operations on a batch, with different parameters for each sample.

torchvision's functional ops take one set of parameters per call. These take a
tensor of parameters with one row per sample and do the whole batch in a few
kernels, without a host synchronisation. Each one follows the torchvision op
named in its docstring closely enough for the tests to compare them image by
image.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# -- constants on the device -----------------------------------------------------


def channel_constant(values: Sequence[float], like: Tensor) -> Tensor:
    """``values`` as a ``[1, C, 1, 1]`` tensor with ``like``'s device and dtype.

    Each (values, device, dtype) is built only once. Building it on every
    batch would copy it from the host every step, and on CUDA such a copy
    makes the host wait for the device.
    """
    return _channel_constant(tuple(float(v) for v in values), like.device, like.dtype)


@functools.lru_cache(maxsize=256)
def _channel_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def keep_memory_format(out: Tensor, like: Tensor) -> Tensor:
    """``out`` in ``like``'s memory format (channels_last stays channels_last)."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


# -- random integers ---------------------------------------------------------------


def random_below(high: Tensor, batch: int) -> Tensor:
    """One integer per sample, uniform in ``[0, high[b])``; ``high`` is an int64 ``[B]``.

    (For one bound shared by the batch, ``torch.randint`` is simpler.)
    """
    draw = (torch.rand(batch, device=high.device) * high).floor()
    # floor(u * high) < high in exact arithmetic; float rounding could reach high.
    return torch.minimum(draw, high - 1).long()


def candidate_boxes(
    batch: int, area: int, scale: tuple[float, float], ratio: tuple[float, float], attempts: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``attempts`` random boxes per sample, drawn as torchvision's RandomResizedCrop
    and RandomErasing draw theirs: an area fraction uniform in ``scale``, an aspect
    log-uniform in ``ratio``. Returns the sides ``round(sqrt(a * r))`` and
    ``round(sqrt(a / r))``, float ``[B, attempts]`` each."""
    shape = (batch, attempts)
    box_area = area * torch.empty(shape, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(shape, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    return torch.round(torch.sqrt(box_area * aspect)), torch.round(torch.sqrt(box_area / aspect))


def first_fit(values: Tensor, fits: Tensor) -> Tensor:
    """Per row, the value of the first attempt that fits (argmax returns the first maximum)."""
    return values.gather(1, fits.to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1)


# -- crops and padding -------------------------------------------------------------


def source_index(coord: Tensor, size: int, padding_mode: str) -> Tensor:
    """The pixel in ``[0, size)`` that padded coordinate ``coord`` reads from.

    ``coord`` may lie outside the image; the mapping is torchvision's (PIL's)
    padding mode. For "constant" the index is only clamped so the gather stays
    in bounds: the caller replaces those pixels with the fill value.
    """
    if padding_mode in ("constant", "edge"):
        return coord.clamp(0, size - 1)
    if padding_mode == "reflect":  # mirror without repeating the edge: 2 1 | 0 1 2 3 | 2 1
        period = max(2 * size - 2, 1)
        folded = coord.remainder(period)
        return torch.where(folded < size, folded, period - folded)
    if padding_mode == "symmetric":  # mirror repeating the edge: 1 0 | 0 1 2 3 | 3 2
        period = 2 * size
        folded = coord.remainder(period)
        return torch.where(folded < size, folded, period - 1 - folded)
    raise ValueError(f"unknown padding_mode {padding_mode!r}: use constant, edge, reflect or symmetric")


def pad(x: Tensor, left: int, top: int, right: int, bottom: int, padding_mode: str, fill: Tensor | float) -> Tensor:
    """torchvision's ``pad`` on the whole batch (every sample gets the same padding).

    ``F.pad`` does constant (one fill value), edge and reflect in one kernel;
    symmetric padding and a per-channel fill read the image through the
    padding's index map instead.
    """
    if not (left or top or right or bottom):
        return x
    if padding_mode in ("edge", "reflect") or (padding_mode == "constant" and isinstance(fill, float)):
        mode = {"constant": "constant", "edge": "replicate", "reflect": "reflect"}[padding_mode]
        value = fill if padding_mode == "constant" else None
        return F.pad(x, (left, right, top, bottom), mode=mode, value=value)
    _, _, height, width = x.shape
    rows = torch.arange(-top, height + bottom, device=x.device)
    cols = torch.arange(-left, width + right, device=x.device)
    out = x[:, :, source_index(rows, height, padding_mode)[:, None], source_index(cols, width, padding_mode)[None, :]]
    if padding_mode == "constant":
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]
        out = torch.where(inside, out, fill)
    return out


def gather_pixels(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[b, :, i, j] = x[b, :, rows[b, i], cols[b, j]]``: a per-sample crop in one gather.

    ``rows`` is int64 ``[B, h]`` and ``cols`` int64 ``[B, w]``. The result keeps
    ``x``'s memory format.
    """
    batch, channels, height, width = x.shape
    h, w = rows.shape[1], cols.shape[1]
    flat = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, h * w)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # Gather whole pixels ([B, H*W, C] is a view of a channels_last batch).
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        out = pixels.gather(1, flat.view(batch, h * w, 1).expand(batch, h * w, channels))
        return out.view(batch, h, w, channels).permute(0, 3, 1, 2)
    planes = x.reshape(batch, channels, height * width)
    return planes.gather(2, flat.expand(batch, channels, h * w)).view(batch, channels, h, w)


# -- resampling --------------------------------------------------------------------


def _cubic(t: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at distance ``t`` (as in ATen's upsample)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resample_weights(
    start: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: str, antialias: bool
) -> Tensor:
    """Per-sample matrices ``[B, out_size, in_size]`` that resize one axis.

    Row ``i`` of sample ``b`` holds the weights with which output pixel ``i``
    mixes the input pixels of ``[start[b], start[b] + length[b])``: the crop of
    that sample, resized to ``out_size`` exactly as ``F.interpolate`` (which
    torchvision's resize calls, align_corners=False) would resize it. The
    formulas are ATen's: its nearest index rule, its 2-tap bilinear and 4-tap
    bicubic (a=-0.75) with edge clamping, and for ``antialias`` its
    PIL-style filters (triangle, or cubic with a=-0.5) stretched by the
    downscale factor and normalised over the pixels inside the crop.
    """
    device = start.device
    batch = start.shape[0]
    length_f = length.to(torch.float32)[:, None]  # [B, 1]
    scale = length_f / out_size  # input pixels per output pixel, as ATen computes it
    i = torch.arange(out_size, device=device, dtype=torch.float32)[None, :]  # [1, out]

    if antialias and interpolation in ("bilinear", "bicubic"):
        stretch = scale.clamp(min=1.0)  # the filter widens only when downscaling
        center = scale * (i + 0.5)  # [B, out], in crop coordinates
        local = (torch.arange(in_size, device=device)[None, :] - start[:, None]).to(torch.float32)  # [B, in]
        distance = (local[:, None, :] + 0.5 - center[:, :, None]) / stretch[:, :, None]
        if interpolation == "bilinear":
            weights = (1 - distance.abs()).clamp(min=0)
        else:
            weights = _cubic(distance, a=-0.5)
        inside = (local >= 0) & (local < length_f)
        weights = weights * inside[:, None, :]
        return weights / weights.sum(dim=-1, keepdim=True)

    if interpolation == "nearest":
        taps = [(torch.minimum((i * scale).floor(), length_f - 1), torch.ones_like(i * scale))]
    elif interpolation == "bilinear":
        src = ((i + 0.5) * scale - 0.5).clamp(min=0)
        lower = src.floor()
        frac = src - lower
        taps = [(lower, 1 - frac), (torch.minimum(lower + 1, length_f - 1), frac)]
    elif interpolation == "bicubic":
        src = (i + 0.5) * scale - 0.5
        lower = src.floor()
        frac = src - lower
        taps = [
            (torch.minimum((lower + k).clamp(min=0), length_f - 1), _cubic(frac - k, a=-0.75))
            for k in (-1, 0, 1, 2)
        ]
    else:
        raise ValueError(f"unknown interpolation {interpolation!r}: use nearest, bilinear or bicubic")
    weights = torch.zeros(batch, out_size, in_size, device=device)
    for index, weight in taps:
        column = (start[:, None] + index.long()).unsqueeze(-1)
        weights.scatter_add_(2, column, weight.expand(batch, out_size).unsqueeze(-1))
    return weights


def resized_crop(
    x: Tensor,
    top: Tensor,
    left: Tensor,
    height: Tensor,
    width: Tensor,
    size: tuple[int, int],
    interpolation: str,
    antialias: bool,
) -> Tensor:
    """Crop each sample's box and resize it to ``size`` (torchvision ``resized_crop``).

    Resizing is linear and separable, so with per-sample weight matrices it is
    two batched matrix products: ``rows @ image @ cols^T``. That reproduces
    F.interpolate on each crop, antialiasing included, up to float rounding
    (and TF32 rounding on CUDA if the run enables TF32 matmuls). The cost,
    about ``2 * C * out_h * H * W`` multiply-adds per image for a square
    image, is small on a GPU for the image sizes augmentation sees.
    """
    _, _, image_h, image_w = x.shape
    rows = resample_weights(top, height, image_h, size[0], interpolation, antialias)
    cols = resample_weights(left, width, image_w, size[1], interpolation, antialias)
    rows, cols = rows.to(x.dtype), cols.to(x.dtype)
    out = torch.matmul(torch.matmul(rows[:, None], x), cols.transpose(1, 2)[:, None])
    return keep_memory_format(out, x)


# -- rotation ----------------------------------------------------------------------


def rotate(
    x: Tensor, degrees: Tensor, center: tuple[float, float] | None, interpolation: str, fill: Tensor | float
) -> Tensor:
    """Rotate each sample by ``degrees[b]`` counter-clockwise (torchvision ``rotate``, expand=False).

    The same construction as torchvision's tensor kernel: the inverse rotation
    about ``center`` (pixel coordinates, default the image centre) as a 2x3
    matrix, torchvision's sampling grid, one ``grid_sample`` for the batch,
    and its fill rule (a channel of ones is sampled along; where it fell
    below 1 the pixel blends towards ``fill``, or takes it for "nearest").
    """
    height, width = x.shape[-2:]
    cx, cy = (0.0, 0.0) if center is None else (center[0] - width * 0.5, center[1] - height * 0.5)
    radians = torch.deg2rad(degrees.to(torch.float32))
    cos, sin = torch.cos(radians), torch.sin(radians)
    # The inverse map (output pixel -> input pixel, origin at the image centre),
    # its x row divided by w/2 and its y row by h/2 because grid_sample wants
    # coordinates in [-1, 1]; torchvision's _affine_grid does the same.
    row_x = torch.stack([cos, -sin, cx - cos * cx + sin * cy], dim=1) / (0.5 * width)
    row_y = torch.stack([sin, cos, cy - sin * cx - cos * cy], dim=1) / (0.5 * height)
    theta = torch.stack([row_x, row_y], dim=1).to(x.dtype)  # [B, 2, 3]
    return _warp(x, theta, interpolation, fill)


def _warp(x: Tensor, theta: Tensor, interpolation: str, fill: Tensor | float) -> Tensor:
    """Sample each image at ``theta[b]`` ([B, 2, 3], grid_sample's [-1, 1] units) of
    torchvision's pixel-centre grid, with torchvision's fill rule (a channel of ones is
    sampled along; where it fell below 1 the pixel blends towards ``fill``, or takes it
    for "nearest")."""
    batch, channels, height, width = x.shape
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=x.device, dtype=x.dtype)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=x.device, dtype=x.dtype)
    ones = torch.ones(height, width, device=x.device, dtype=x.dtype)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width), ones], dim=-1)
    grid = torch.matmul(base.view(1, height * width, 3), theta.transpose(1, 2)).view(batch, height, width, 2)
    ones = torch.ones(batch, 1, height, width, device=x.device, dtype=x.dtype)
    sampled = F.grid_sample(torch.cat([x, ones], dim=1), grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    image, coverage = sampled[:, :channels], sampled[:, channels:]
    if interpolation == "nearest":
        out = torch.where(coverage < 0.5, fill, image)
    else:
        out = (image - fill) * coverage + fill
    return keep_memory_format(out, x)


# -- colour --------------------------------------------------------------------------


def grayscale(x: Tensor) -> Tensor:
    """Luma ``[B, 1, H, W]`` with torchvision's weights (a 1-channel batch is its own)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def blend_towards(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """Brightness, contrast or saturation, chosen per sample by ``op``, in one pass.

    torchvision's three adjustments are the same clamped blend
    ``factor * x + (1 - factor) * target`` towards black (brightness), the
    image's mean gray level (contrast) or its gray image (saturation). So a
    batch whose samples need different ones takes one blend with a
    per-sample target. A factor of 1 leaves a sample unchanged (for images in
    [0, 1]), whatever its ``op``.
    """
    gray = grayscale(x)
    is_contrast = (op == CONTRAST).view(-1, 1, 1, 1)
    is_saturation = (op == SATURATION).view(-1, 1, 1, 1)
    target = torch.where(is_contrast, gray.mean(dim=(1, 2, 3), keepdim=True), torch.where(is_saturation, gray, 0.0))
    f = factor.to(x.dtype).view(-1, 1, 1, 1)
    return x.mul(f).add_(target * (1 - f)).clamp_(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each sample by ``shift[b]`` turns, via HSV (torchvision ``adjust_hue``)."""
    if x.shape[1] == 1:  # as torchvision: no hue in a grayscale image
        return x
    minc, maxc = torch.aminmax(x, dim=1, keepdim=True)
    spread = maxc - minc
    grey = spread == 0  # no hue; dividing by 1 instead of 0 gives hue 0 below
    saturation = spread / torch.where(grey, 1.0, maxc)
    rc, gc, bc = ((maxc - x) / torch.where(grey, 1.0, spread)).unbind(dim=1)
    r, g, _ = x.unbind(dim=1)
    value = maxc[:, 0]
    # The sector follows which channel is the maximum (red wins ties, then green).
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = (hue * (1.0 / 6.0) + 1.0).fmod(1.0)
    hue = (hue + shift.to(x.dtype).view(-1, 1, 1)).remainder(1.0)
    # HSV -> RGB: channel n is v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6,
    # n = 5, 3, 1 for red, green, blue; always within [0, v].
    k = (channel_constant((5.0, 3.0, 1.0), like=x) + 6.0 * hue.unsqueeze(1)).remainder(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return maxc - (maxc * saturation) * ramp


# -- affine warps ----------------------------------------------------------------------


def inverse_affine_matrix(
    angle: Tensor, translate: tuple[Tensor, Tensor], scale: Tensor, shear: tuple[Tensor, Tensor],
    center: tuple[float, float],
) -> Tensor:
    """Per-sample ``[B, 2, 3]`` output -> input maps, torchvision's ``_get_inverse_affine_matrix``.

    Angles and shears in degrees, ``center`` in pixels from the image centre
    (as torchvision's tensor kernel passes it), all tensors ``[B]``.
    torchvision builds the matrix in double precision on the host; this builds
    it in float64 on the device where it has float64 (MPS has not), so nearest
    sampling breaks the same pixel-border ties.
    """
    dtype = torch.float32 if angle.device.type == "mps" else torch.float64
    rot, sx, sy = (torch.deg2rad(t.to(dtype)) for t in (angle, shear[0], shear[1]))
    tx, ty, scale = translate[0].to(dtype), translate[1].to(dtype), scale.to(dtype)
    cx, cy = center
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([torch.stack([m0, m1, m2], dim=1), torch.stack([m3, m4, m5], dim=1)], dim=1)


def affine(x: Tensor, matrix: Tensor, interpolation: str, fill: Tensor | float) -> Tensor:
    """Warp each sample by its inverse map ``matrix[b]`` (from ``inverse_affine_matrix``):
    torchvision's ``affine`` tensor kernel (its grid, one ``grid_sample``, its fill rule)."""
    height, width = x.shape[-2:]
    theta = (matrix / matrix.new_tensor([0.5 * width, 0.5 * height]).view(1, 2, 1)).to(x.dtype)
    return _warp(x, theta, interpolation, fill)


# -- more colour ops (AutoAugment's) ---------------------------------------------------


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.dtype).view(-1, 1, 1, 1)


@functools.lru_cache(maxsize=64)
def _sharpness_kernel(channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=dtype, device=device) / 13.0
    return kernel.expand(channels, 1, 3, 3)


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision ``adjust_sharpness`` with a factor per sample: the interior blends
    away from a 3x3 smoothed image, the one-pixel border is kept."""
    channels, height, width = x.shape[-3:]
    if height <= 2 or width <= 2:
        return x
    blurred = F.conv2d(x, _sharpness_kernel(channels, x.device, x.dtype), groups=channels)
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1.0 - _per_sample(factor, x)))
    return out.clamp_(0, 1)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """torchvision ``posterize`` on float images, ``bits[b]`` per sample: ``2**bits`` levels
    (so 8 bits still quantises a float image to multiples of 1/256, as torchvision does)."""
    levels = _per_sample(torch.pow(2.0, bits.to(torch.float32)), x)
    return x.mul(levels).floor_().clamp_(min=0).minimum(levels - 1).div_(levels)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """torchvision ``solarize``: invert the pixels at or above ``threshold[b]``."""
    return torch.where(x >= _per_sample(threshold, x), 1.0 - x, x)


def autocontrast(x: Tensor) -> Tensor:
    """torchvision ``autocontrast``: stretch each channel of each sample to [0, 1]."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low  # a constant channel stays as it is
    low = torch.where(flat, 0.0, low)
    spread = torch.where(flat, 1.0, high - low)
    return (x - low).div_(spread).clamp_(0, 1)


def equalize(x: Tensor) -> Tensor:
    """torchvision ``equalize`` on float images: on 256 levels (as its uint8 conversion
    makes them), PIL's lookup table per channel of each sample, back to [0, 1].

    As in torchvision the result is quantised to multiples of 1/255 even where a
    channel is left alone (a single level)."""
    batch, channels, height, width = x.shape
    levels = x.mul(256.0 - 1e-3).to(torch.uint8).reshape(batch * channels, height * width).long()
    hist = torch.zeros(batch * channels, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    cum = hist.cumsum(dim=1)
    # pixels not at the channel's top level (the first index reaching the full count)
    below_top = height * width - hist.gather(1, cum.argmax(dim=1, keepdim=True))
    step = below_top.div(255, rounding_mode="floor")
    lut = (cum[:, :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], dim=1)
    out = torch.where(step != 0, lut.gather(1, levels), levels)
    return keep_memory_format(out.view(batch, channels, height, width).to(x.dtype).mul_(1.0 / 255), x)


# -- blur ------------------------------------------------------------------------------


def gaussian_blur(x: Tensor, kernel_size: tuple[int, int], sigma: Tensor) -> Tensor:
    """torchvision ``gaussian_blur`` with ``sigma[b]`` per sample (same on both axes);
    ``kernel_size`` is (x, y) as in torchvision. Reflect padding, and the kernel,
    separable, as two grouped convolutions: one group per (sample, channel)."""
    batch, channels, height, width = x.shape
    kx, ky = kernel_size

    def kernel(size: int) -> Tensor:  # torchvision's: a softmax over (t / sigma)^2
        lim = (size - 1) / (2.0 * math.sqrt(2.0))
        t = torch.linspace(-lim, lim, steps=size, device=x.device, dtype=x.dtype)
        k = torch.softmax(-(t[None, :] / sigma.to(x.dtype)[:, None]).pow(2), dim=1)  # [B, size]
        return k.repeat_interleave(channels, dim=0)  # [B*C, size]

    padded = F.pad(x, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    planes = padded.reshape(1, batch * channels, *padded.shape[-2:])
    planes = F.conv2d(planes, kernel(kx).view(batch * channels, 1, 1, kx), groups=batch * channels)
    planes = F.conv2d(planes, kernel(ky).view(batch * channels, 1, ky, 1), groups=batch * channels)
    return keep_memory_format(planes.view(batch, channels, height, width), x)
