"""The batched image ops against torchvision and torch, on fixed per-sample parameters.

Each op takes one row of parameters per sample. The reference applies
torchvision's functional op (or ``F.interpolate``, or plain indexing) to each
image with that image's parameters. Images are non-square and crops have
h != w, so a swapped axis shows; the random helpers are checked for their
ranges and statistics with fixed seeds.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cnnreg_plugins import _batched_ops as ops

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])

def images(n: int = 4, c: int = 3, h: int = 7, w: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def per_image(x: torch.Tensor, op) -> torch.Tensor:
    """The reference: ``op(b, image)`` on each image, stacked."""
    return torch.stack([op(b, x[b]) for b in range(len(x))])


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# -- constants and memory format ---------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_constant_is_a_per_channel_tensor_like_the_images(dtype, device):
    like = images().to(device=device, dtype=dtype)
    c = ops.channel_constant([0.1, 0.2, 0.7], like=like)
    assert c.shape == (1, 3, 1, 1) and c.dtype == dtype and c.device == like.device
    assert torch.equal(c.flatten().cpu(), torch.tensor([0.1, 0.2, 0.7], dtype=dtype))
    # it broadcasts over a batch channel by channel
    assert torch.equal((like * 0 + c)[2, :, 3, 4].cpu(), torch.tensor([0.1, 0.2, 0.7], dtype=dtype))


def test_channel_constant_is_built_once_per_values_and_dtype():
    like = images()
    first = ops.channel_constant((0.25, 0.5, 0.75), like=like)
    assert ops.channel_constant([0.25, 0.5, 0.75], like=images(seed=1)) is first  # same values: the cached tensor
    assert ops.channel_constant((0.25, 0.5, 0.5), like=like) is not first
    assert ops.channel_constant((0.25, 0.5, 0.75), like=like.double()).dtype == torch.float64


def test_keep_memory_format_follows_the_reference_layout():
    x = images(c=3, h=5, w=6)
    out = ops.keep_memory_format(x * 2, like=channels_last(x))
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, x * 2)
    out = ops.keep_memory_format(channels_last(x), like=x)
    assert out.is_contiguous() and torch.equal(out, x)
    # a reference in neither layout (a strided view) gives a plain contiguous result
    strided = x[:, :, :, ::2]
    out = ops.keep_memory_format(strided, like=strided)
    assert out.is_contiguous() and torch.equal(out, strided)


# -- random integers -----------------------------------------------------------------------


def test_random_below_draws_each_integer_below_its_own_bound_uniformly():
    torch.manual_seed(0)
    bounds = torch.tensor([1, 2, 5, 7])
    high = bounds.repeat(7_000)  # 7000 samples for each bound, interleaved
    draw = ops.random_below(high, len(high))
    assert draw.dtype == torch.int64 and draw.shape == high.shape
    for k, bound in enumerate(bounds.tolist()):
        values = draw[k::4]
        counts = torch.bincount(values, minlength=bound)
        assert len(counts) == bound  # nothing at or above the bound
        # 7000 / bound each, sd sqrt(7000 p (1 - p)) <= 42. An off-by-one (never 0, never
        # bound - 1, or bound reached) empties or adds a value.
        expected = 7_000 / bound
        assert (counts - expected).abs().max() < 5 * math.sqrt(expected) + 1, (bound, counts)


# -- boxes -------------------------------------------------------------------------------------


def test_candidate_boxes_follow_area_scale_and_log_uniform_aspect():
    torch.manual_seed(1)
    area = 1_000_000  # large, so rounding the sides to pixels hardly moves area or aspect
    first, second = ops.candidate_boxes(3_000, area, (0.2, 0.6), (0.25, 1.0), 7, torch.device("cpu"))
    assert first.shape == (3_000, 7) and second.shape == (3_000, 7)
    assert first.dtype == torch.float32 and torch.equal(first, first.round()) and torch.equal(second, second.round())
    fraction = first * second / area
    aspect = first / second  # the first side is sqrt(area * ratio): the one the ratio divides
    assert fraction.min() > 0.199 and fraction.max() < 0.601
    assert fraction.min() < 0.202 and fraction.max() > 0.598  # the whole scale range is used
    assert abs(fraction.mean().item() - 0.4) < 0.005  # uniform in area (sd of the mean ~0.0013)
    assert aspect.min() > 0.249 and aspect.max() < 1.001
    assert aspect.min() < 0.255 and aspect.max() > 0.98
    # log-uniform in (1/4, 1): the median aspect is 1/2 (a uniform draw would put it at 0.625)
    assert abs((aspect < 0.5).float().mean().item() - 0.5) < 0.02
    # every attempt of every sample is its own draw
    assert (first[:, 1:] != first[:, :1]).float().mean() > 0.95
    assert (first[1:] != first[:1]).float().mean() > 0.95


def test_candidate_boxes_sides_are_rounded_square_roots():
    torch.manual_seed(2)
    # scale and ratio ranges of one value fix the box: sqrt(96 * 0.5 * 3) = 12 and sqrt(96 * 0.5 / 3) = 4,
    # and with a ratio of 2: sqrt(48 * 2) = 9.80 -> 10 and sqrt(48 / 2) = 4.90 -> 5
    first, second = ops.candidate_boxes(5, 96, (0.5, 0.5), (3.0, 3.0), 2, torch.device("cpu"))
    assert torch.equal(first, torch.full((5, 2), 12.0)) and torch.equal(second, torch.full((5, 2), 4.0))
    first, second = ops.candidate_boxes(5, 96, (0.5, 0.5), (2.0, 2.0), 2, torch.device("cpu"))
    assert torch.equal(first, torch.full((5, 2), 10.0)) and torch.equal(second, torch.full((5, 2), 5.0))


def test_first_fit_takes_the_first_attempt_that_fits_in_each_row():
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0], [30.0, 31.0, 32.0, 33.0]])
    fits = torch.tensor([[False, True, True, False], [False, False, False, True], [True, True, True, True]])
    assert torch.equal(ops.first_fit(values, fits), torch.tensor([11.0, 23.0, 30.0]))


# -- padding -------------------------------------------------------------------------------------


def _arange_image(size: int) -> torch.Tensor:
    """A 1 x size image whose pixel j holds j: padding it shows which pixel each position reads."""
    return torch.arange(size, dtype=torch.float32).view(1, 1, size)


@pytest.mark.parametrize("padding_mode", ["edge", "reflect", "symmetric"])
@pytest.mark.parametrize("size", [1, 2, 4, 5])
def test_source_index_is_torchvisions_padding_map(padding_mode, size):
    """Padding coordinates far beyond the image, the reference is torchvision's pad applied
    again and again (each time by less than the image, as its reflect mode requires): mirrored
    padding repeats with the period of the mirror."""
    if padding_mode == "reflect" and size == 1:
        reference = torch.zeros(1, 1, 1 + 2 * 11)  # the only pixel, wherever one reads
    else:
        reference = _arange_image(size)
        while reference.shape[-1] < size + 2 * 11:
            step = min(reference.shape[-1] - 1, 11) if padding_mode == "reflect" else reference.shape[-1]
            reference = TF.pad(reference, [step, 0], padding_mode=padding_mode)
        extra = (reference.shape[-1] - (size + 2 * 11)) // 2
        reference = reference[..., extra:extra + size + 2 * 11]
    coords = torch.arange(-11, size + 11)
    index = ops.source_index(coords, size, padding_mode)
    assert torch.equal(index.float(), reference.flatten())


def test_source_index_clamps_constant_padding_to_the_image():
    # constant padding reads the nearest pixel; the caller replaces those pixels with the fill
    index = ops.source_index(torch.arange(-3, 8), 5, "constant")
    assert index.tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 4]


def test_source_index_names_the_padding_modes():
    with pytest.raises(ValueError, match=r"unknown padding_mode 'wrap': use constant, edge, reflect or symmetric"):
        ops.source_index(torch.arange(3), 3, "wrap")


PADS = [(1, 2, 3, 0), (0, 0, 3, 0), (0, 4, 0, 0), (2, 0, 0, 1), (3, 1, 2, 4)]  # left, top, right, bottom


@pytest.mark.parametrize("padding_mode", ["constant", "edge", "reflect", "symmetric"])
@pytest.mark.parametrize("fill", [0.25, [0.1, 0.5, 0.9]])
@pytest.mark.parametrize("sides", PADS)
def test_pad_matches_torchvision(padding_mode, fill, sides):
    x = images(h=5, w=6)
    fill_arg = ops.channel_constant(fill, like=x) if isinstance(fill, list) else fill
    out = ops.pad(x, *sides, padding_mode, fill_arg)
    left, top, right, bottom = sides
    assert out.shape == (4, 3, 5 + top + bottom, 6 + left + right)
    # torchvision takes a fill only for constant padding (the other modes ignore it)
    expected = TF.pad(x, list(sides), fill=fill if padding_mode == "constant" else 0.0, padding_mode=padding_mode)
    assert torch.equal(out, expected)


def test_pad_refuses_reflect_padding_as_wide_as_the_image_as_torchvision_does():
    # mirroring without repeating the edge has only side - 1 pixels to show
    x = images(h=5, w=6)
    for sides in [(6, 0, 0, 0), (0, 0, 0, 5)]:
        with pytest.raises(RuntimeError, match="Padding size should be less than"):
            TF.pad(x, list(sides), padding_mode="reflect")  # the reference
        with pytest.raises(RuntimeError, match="Padding size should be less than"):
            ops.pad(x, *sides, "reflect", 0.0)


def test_pad_by_nothing_returns_the_batch():
    x = images()
    assert ops.pad(x, 0, 0, 0, 0, "symmetric", 0.0) is x


# -- crops ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gather_pixels_crops_each_sample_at_its_own_rows_and_columns(layout):
    x = images(n=3, c=3, h=6, w=8)
    x = channels_last(x) if layout == "channels_last" else x
    rows = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 0, 2]])  # any rows, in any order
    cols = torch.tensor([[1, 2, 3, 4, 7], [0, 0, 1, 6, 7], [7, 6, 5, 4, 3]])
    out = ops.gather_pixels(x, rows, cols)
    expected = per_image(x, lambda b, img: img[:, rows[b]][:, :, cols[b]])
    assert out.shape == (3, 3, 3, 5)
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def test_gather_pixels_of_a_strided_batch_is_a_plain_contiguous_crop():
    x = images(n=2, c=3, h=6, w=16)[:, :, :, ::2]  # every other column: a view in neither layout
    rows, cols = torch.tensor([[0, 2], [5, 1]]), torch.tensor([[1, 2, 7], [0, 3, 6]])
    out = ops.gather_pixels(x, rows, cols)
    assert torch.equal(out, per_image(x, lambda b, img: img[:, rows[b]][:, :, cols[b]]))
    assert out.is_contiguous()


# -- resampling --------------------------------------------------------------------------------

MODES = [("nearest", False), ("bilinear", False), ("bilinear", True), ("bicubic", False), ("bicubic", True)]


def _interpolate_reference(start: int, length: int, in_size: int, out_size: int, mode: str, antialias: bool):
    """The resize matrix of one crop as F.interpolate computes it: resize the crop of an
    identity matrix (channel k is input pixel k) along one axis."""
    identity = torch.eye(in_size)[:, start:start + length].reshape(1, in_size, 1, length)
    kwargs = {} if mode == "nearest" else dict(align_corners=False, antialias=antialias)
    resized = F.interpolate(identity, size=(1, out_size), mode=mode, **kwargs)
    return resized.view(in_size, out_size).T


@pytest.mark.parametrize("interpolation, antialias", MODES)
@pytest.mark.parametrize("out_size", [3, 5, 13])
def test_resample_weights_are_f_interpolates_per_crop(interpolation, antialias, out_size):
    # crops that shrink, keep and stretch the axis, at the start, middle and end of 11 pixels
    start, length = torch.tensor([0, 2, 6, 3, 10]), torch.tensor([11, 7, 5, 1, 1])
    weights = ops.resample_weights(start, length, 11, out_size, interpolation, antialias)
    assert weights.shape == (5, out_size, 11)
    for b in range(5):
        expected = _interpolate_reference(int(start[b]), int(length[b]), 11, out_size, interpolation, antialias)
        torch.testing.assert_close(weights[b], expected, atol=1e-6, rtol=0)


def test_resample_weights_names_the_interpolations():
    with pytest.raises(ValueError, match=r"unknown interpolation 'area': use nearest, bilinear or bicubic"):
        ops.resample_weights(torch.tensor([0]), torch.tensor([4]), 4, 2, "area", False)


@pytest.mark.parametrize("interpolation, antialias", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_resized_crop_matches_torchvision_per_image(interpolation, antialias, layout):
    x = images(n=4, h=10, w=13)
    x = channels_last(x) if layout == "channels_last" else x
    # boxes: shrink both axes, stretch both, shrink one and stretch the other, the whole image
    top, left = torch.tensor([1, 4, 0, 0]), torch.tensor([2, 5, 3, 0])
    height, width = torch.tensor([8, 3, 9, 10]), torch.tensor([10, 4, 2, 13])
    size = (6, 7)
    out = ops.resized_crop(x, top, left, height, width, size, interpolation, antialias)

    def reference(b, img):
        box = [int(v[b]) for v in (top, left, height, width)]
        return TF.resized_crop(img, *box, size=list(size), interpolation=InterpolationMode(interpolation),
                               antialias=antialias)

    assert out.shape == (4, 3, 6, 7) and out.dtype == x.dtype
    # two matrix products instead of ATen's loops: the same weights, summed in another order
    torch.testing.assert_close(out, per_image(x, reference), atol=5e-6, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def test_resized_crop_keeps_a_double_batch_double():
    x = images(n=2, h=6, w=8).double()
    out = ops.resized_crop(x, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([5, 4]), torch.tensor([6, 7]),
                           (4, 3), "bilinear", True)
    assert out.dtype == torch.float64
    expected = per_image(x, lambda b, img: TF.resized_crop(img, [0, 1][b], [1, 0][b], [5, 4][b], [6, 7][b], [4, 3],
                                                           antialias=True))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)  # the weights are float32 either way


# -- rotation -------------------------------------------------------------------------------------

ANGLES = torch.tensor([0.0, 90.0, -33.0, 147.5, 12.25])


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("center", [None, (2.0, 5.25)])
@pytest.mark.parametrize("fill", [0.0, 0.75, [0.2, 0.5, 1.0]])
def test_rotate_matches_torchvision_per_image(interpolation, center, fill):
    # Turned 90 degrees about (cx, cy), a pixel samples x = y + (cx - cy): exactly on a pixel
    # border when cx - cy ends in .5 (the centre of an 8x11 image: 5 - 3.5), where which
    # neighbour nearest takes is float rounding, and CPUs differ (a whole row flipped on one
    # machine, none on another). So nearest runs on 9x11 (still not square) and the given
    # centre is (2, 5.25): no ties to break.
    x = images(n=5, h=8 if interpolation == "bilinear" else 9, w=11)
    fill_arg = ops.channel_constant(fill, like=x) if isinstance(fill, list) else fill
    out = ops.rotate(x, ANGLES, center, interpolation, fill_arg)
    fill_list = fill if isinstance(fill, list) else [fill] * 3

    def reference(b, img):
        return TF.rotate(img, float(ANGLES[b]), interpolation=InterpolationMode(interpolation),
                         center=None if center is None else list(center), fill=fill_list)

    expected = per_image(x, reference)
    assert out.shape == x.shape
    if interpolation == "bilinear":
        # torchvision builds the matrix in double precision, this op in float32: ~1e-6 px
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    else:
        # a sample point within ~1e-6 px of a pixel border may round the other way; a few such
        # pixels at most (a wrong angle, centre or fill changes most of the image)
        mismatched = (out != expected).any(dim=1).float().mean().item()
        assert mismatched < 0.02


@pytest.mark.parametrize("fill", [0.75, [0.2, 0.5, 1.0]])
def test_rotate_nearest_only_copies_pixels_or_the_fill(fill):
    # values with more bits than torch.rand's multiples of 2**-24, so any arithmetic on a
    # copied pixel (such as blending with the fill) would show
    x = images(n=5, h=8, w=11) ** 3 / 7
    fill_arg = ops.channel_constant(fill, like=x) if isinstance(fill, list) else fill
    out = ops.rotate(x, ANGLES, None, "nearest", fill_arg)
    fills = torch.tensor(fill if isinstance(fill, list) else [fill] * 3)
    for b in range(5):
        for c in range(3):
            allowed = torch.cat([x[b, c].flatten(), fills[c:c + 1]])
            assert torch.isin(out[b, c], allowed).all()
    assert (out == fills.view(1, 3, 1, 1)).any() and (out != fills.view(1, 3, 1, 1)).any()


def test_rotate_warns_about_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. grid_sample's warning when align_corners is left out
        ops.rotate(images(n=2), torch.tensor([10.0, -20.0]), None, "bilinear", 0.0)


def test_rotate_keeps_layout_and_dtype():
    x = channels_last(images(n=2, h=6, w=9))
    degrees = torch.tensor([30.0, -60.0])
    out = ops.rotate(x, degrees, None, "bilinear", 0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # bfloat16 keeps 8 bits, in the sampling grid too: ~0.02 px off, so values err by a few 1e-2
    for dtype, atol in [(torch.float64, 1e-5), (torch.bfloat16, 0.06)]:
        low = ops.rotate(x.to(dtype), degrees, None, "bilinear", 0.5)
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), out, atol=atol, rtol=0)


def test_rotate_computes_the_angle_in_float32_whatever_its_dtype():
    # 33.3125 and -71.5 are exact in half precision; their sines and cosines are not
    x = images(n=2, h=8, w=11)
    degrees = torch.tensor([33.3125, -71.5], dtype=torch.float16)
    out = ops.rotate(x, degrees, None, "bilinear", 0.0)
    expected = per_image(x, lambda b, img: TF.rotate(img, float(degrees[b]), InterpolationMode.BILINEAR, fill=[0.0]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# -- colour -----------------------------------------------------------------------------------------


def test_grayscale_is_torchvisions_luma():
    x = images(n=3, h=4, w=5)
    torch.testing.assert_close(ops.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-7, rtol=0)
    gray = images(c=1)
    assert ops.grayscale(gray) is gray


_TV_BLEND = {ops.BRIGHTNESS: TF.adjust_brightness, ops.CONTRAST: TF.adjust_contrast,
             ops.SATURATION: TF.adjust_saturation}


def test_blend_ops_are_numbered_as_color_jitters_order():
    # ColorJitter draws its order over these numbers, and factors[:, k] belong to op k
    assert (ops.BRIGHTNESS, ops.CONTRAST, ops.SATURATION, ops.HUE) == (0, 1, 2, 3)


@pytest.mark.parametrize("channels", [3, 1])
def test_blend_towards_matches_torchvision_per_sample(channels):
    x = images(n=9, c=channels, h=5, w=6)
    op = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    factor = torch.tensor([0.3, 0.6, 1.7, 1.8, 0.0, 0.4, 1.0, 1.0, 1.0])  # above 1 the blend clamps
    out = ops.blend_towards(x, op, factor)
    expected = per_image(x, lambda b, img: _TV_BLEND[int(op[b])](img, float(factor[b])))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert torch.equal(out[6:], x[6:])  # a factor of 1 leaves any op's sample as it was


def test_blend_towards_keeps_the_image_dtype():
    x = images(n=3)
    op, factor = torch.tensor([0, 1, 2]), torch.tensor([0.5, 1.5, 0.2])
    out = ops.blend_towards(x, op, factor.double())  # double factors: still a float32 batch
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ops.blend_towards(x, op, factor), atol=1e-7, rtol=0)
    assert ops.blend_towards(x.double(), op, factor).dtype == torch.float64


# Pure and mixed colours, grey pixels, and ties for the maximum (red = green, green = blue).
_COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0],
                         [0.8, 0.8, 0.2], [0.1, 0.6, 0.6], [0.9, 0.3, 0.9], [0.2, 0.7, 0.4], [0.3, 0.2, 0.9],
                         [0.6, 0.1, 0.3], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("h, w", [(4, 6), (1, 5)])  # one-row images have hue too
def test_adjust_hue_matches_torchvision_per_sample(h, w):
    x = images(n=6, h=h, w=w)
    x[:, :, 0, :4] = _COLOURS[:4].T  # a few exact colours in every image
    x[3, :, 0, :] = _COLOURS[4:4 + w].T
    shift = torch.tensor([0.0, 0.25, -0.5, 0.5, -0.1, 0.4])
    out = ops.adjust_hue(x, shift)
    expected = per_image(x, lambda b, img: TF.adjust_hue(img, float(shift[b])))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out.dtype == x.dtype


def test_adjust_hue_of_exact_colours():
    # A third of a turn moves red to green and green to blue: exact in hand arithmetic.
    x = _COLOURS.T.reshape(1, 3, 3, 4).expand(2, 3, 3, 4).contiguous()
    out = ops.adjust_hue(x, torch.tensor([1 / 3, 0.0]))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, 0, 2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=1e-6, rtol=0)  # no shift: the same colours


def test_adjust_hue_leaves_gray_images_alone_and_keeps_the_image_dtype():
    gray = images(c=1)
    assert ops.adjust_hue(gray, torch.full((4,), 0.3)) is gray
    x = images()
    out = ops.adjust_hue(x, torch.full((4,), 0.3, dtype=torch.float64))  # a double shift: still a float32 image
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ops.adjust_hue(x, torch.full((4,), 0.3)), atol=1e-6, rtol=0)


# -- the GPU path ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [CUDA])
def test_every_op_computes_on_the_images_device(device):
    """Each op makes its index, weight and grid tensors on the images' device: the results
    stay there and equal the CPU ones (float rounding aside)."""
    torch.manual_seed(3)
    x = images(n=3, h=8, w=11)
    g = x.to(device)
    per_sample = dict(top=torch.tensor([0, 2, 1]), left=torch.tensor([1, 0, 3]), height=torch.tensor([6, 5, 8]),
                      width=torch.tensor([9, 7, 4]))
    cases = {
        "pad": lambda t, d: ops.pad(t, 1, 2, 3, 0, "symmetric", ops.channel_constant([0.1, 0.2, 0.3], like=t)),
        "gather_pixels": lambda t, d: ops.gather_pixels(t, torch.tensor([[0, 3], [7, 1], [2, 2]], device=d),
                                                        torch.tensor([[1, 10, 4], [0, 5, 9], [3, 3, 3]], device=d)),
        "resized_crop": lambda t, d: ops.resized_crop(t, *(v.to(d) for v in per_sample.values()), (5, 6), "bicubic", True),
        "rotate": lambda t, d: ops.rotate(t, torch.tensor([10.0, -35.0, 90.0], device=d), None, "bilinear", 0.5),
        "blend_towards": lambda t, d: ops.blend_towards(t, torch.tensor([0, 1, 2], device=d),
                                                        torch.tensor([0.5, 1.4, 0.2], device=d)),
        "adjust_hue": lambda t, d: ops.adjust_hue(t, torch.tensor([0.1, -0.3, 0.5], device=d)),
    }
    for name, op in cases.items():
        out = op(g, device)
        assert out.device == g.device, name
        torch.testing.assert_close(out.cpu(), op(x, "cpu"), atol=1e-4, rtol=0, msg=name)
    high = torch.tensor([1, 4, 9], device=device)
    assert ops.random_below(high, 3).device == g.device
    assert all(side.device == g.device for side in ops.candidate_boxes(3, 88, (0.1, 0.5), (0.5, 2.0), 4, g.device))
