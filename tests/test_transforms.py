"""The batched transforms against torchvision's per-image functional ops.

Each random transform draws per-sample parameters; applying torchvision's
functional op to each image with that image's parameters must give the same
result as the batched op. Random draws are checked for their ranges and
statistics over large batches of tiny images (the draws depend only on the
batch size), with fixed seeds so nothing is flaky.
"""

import inspect
import math
import typing

import pydantic
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cnnreg.core.data import DataContext
from cnnreg_plugins import transforms as T

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])
DEVICES = ["cpu", CUDA]
CONTEXT = DataContext(image_size=(12, 12), channels=3, num_classes=10)


def batch(n: int = 8, c: int = 3, h: int = 12, w: int = 12, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    return x.to(device)


def per_image(x: torch.Tensor, op) -> torch.Tensor:
    """torchvision's reference: ``op(b, image)`` on each image, stacked."""
    return torch.stack([op(b, x[b]) for b in range(len(x))])


def tiny(n: int, device: str = "cpu") -> torch.Tensor:
    """A large batch of 1x1 images: enough for statistics of draws that depend only on B."""
    return torch.zeros(n, 1, 1, 1, device=device)


# -- flips -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, reference", [("random_horizontal_flip", TF.horizontal_flip),
                                             ("random_vertical_flip", TF.vertical_flip)])
def test_flips_match_torchvision_per_image(device, name, reference):
    torch.manual_seed(0)
    x = batch(device=device)
    t = getattr(T, name)(p=0.5)
    params = t.draw(x)
    expected = per_image(x, lambda b, img: reference(img) if params.chosen[b] else img)
    assert torch.equal(t.apply(x, params), expected)
    assert 0 < int(params.chosen.sum()) < len(x)  # per-sample: some flipped, some not


def test_flip_fraction_is_p():
    torch.manual_seed(0)
    chosen = T.random_horizontal_flip(p=0.3).draw(tiny(20_000)).chosen
    # binomial sd = sqrt(.3*.7/20000) = 0.0032; 0.015 is ~5 sd, and a p/1-p mix-up misses by 0.4
    assert abs(chosen.float().mean().item() - 0.3) < 0.015


def test_flip_probability_extremes():
    x = batch()
    assert torch.equal(T.random_horizontal_flip(p=0.0)(x), x)
    assert torch.equal(T.random_vertical_flip(p=1.0)(x), x.flip(-2))


@pytest.mark.parametrize("name, seed, image", [
    ("random_horizontal_flip", 146, (1, 1)), ("random_vertical_flip", 146, (1, 1)),
    ("random_grayscale", 146, (1, 1)), ("random_erasing", 393, (5, 6))])
def test_p_zero_never_applies_even_when_the_draw_is_exactly_zero(name, seed, image):
    """torchvision applies a transform when rand < p, so p = 0 never applies. torch.rand can return
    exactly 0.0 (about once in 2^24 draws); these seeds make one such draw among 65536 samples."""
    x = torch.zeros(1, 1, *image).expand(1 << 16, 1, *image)  # draws depend only on the shape
    factory = T.cnnreg_transforms()[name]
    torch.manual_seed(seed)
    assert factory(p=1e-9).draw(x).chosen.any()  # positive control: a draw below any p > 0 happened
    torch.manual_seed(seed)
    assert not factory(p=0.0).draw(x).chosen.any()


# -- random crop -------------------------------------------------------------------------


def _torchvision_padding(padding) -> list[int]:
    """The user's padding argument as torchvision reads it (a reference independent of ours):
    one int for every side, [left/right, top/bottom], or [left, top, right, bottom]."""
    if padding is None:
        return [0]
    return [padding] if isinstance(padding, int) else list(padding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_mode", ["constant", "edge", "reflect", "symmetric"])
@pytest.mark.parametrize("size, padding", [(12, 4), ((10, 7), (1, 3)), (9, (2, 0, 3, 5)), ((12, 11), None)])
def test_random_crop_matches_torchvision_per_image(device, padding_mode, size, padding):
    torch.manual_seed(1)
    x = batch(device=device)
    t = T.random_crop(size, padding=padding, fill=0.25, padding_mode=padding_mode)
    params = t.draw(x)
    pad = _torchvision_padding(padding)
    h, w = t.size

    def reference(b, img):
        padded = TF.pad(img, pad, fill=0.25, padding_mode=padding_mode)
        return TF.crop(padded, int(params.top[b]), int(params.left[b]), h, w)

    assert torch.equal(t.apply(x, params), per_image(x, reference))  # a gather: exact


def test_random_crop_per_channel_fill_and_pad_if_needed():
    torch.manual_seed(2)
    x = batch(h=6, w=5)
    t = T.random_crop((9, 8), pad_if_needed=True, fill=[0.1, 0.2, 0.3])
    params = t.draw(x)
    # torchvision's pad_if_needed pads both sides by the whole shortfall: [left/right, top/bottom]
    pad = [8 - 5, 9 - 6]

    def reference(b, img):
        return TF.crop(TF.pad(img, pad, fill=[0.1, 0.2, 0.3]), int(params.top[b]), int(params.left[b]), 9, 8)

    out = t.apply(x, params)
    assert out.shape == (8, 3, 9, 8)
    assert torch.equal(out, per_image(x, reference))


def test_random_crop_offsets_cover_the_range_uniformly():
    torch.manual_seed(0)
    # 20x30 images padded by 3 rows and 2 columns on each side are 26x34; a 16x30 crop leaves
    # 26 - 16 + 1 = 11 row offsets and 34 - 30 + 1 = 5 column offsets (uneven, so swapped axes show)
    t = T.random_crop((16, 30), padding=(2, 3))
    n = 9_900
    params = t.draw(torch.zeros(1, 1, 20, 30).expand(n, 1, 20, 30))
    for offsets, room in ((params.top, 11), (params.left, 5)):
        counts = torch.bincount(offsets, minlength=room)
        assert len(counts) == room  # nothing beyond the room
        # each offset expects n / room (sd <= 30); an off-by-one range leaves one empty or spills one more
        assert counts.min() > 0.85 * n / room and counts.max() < 1.15 * n / room
    # rows and columns are drawn independently: every one of the 11 x 5 corners occurs
    assert len(set(zip(params.top.tolist(), params.left.tolist()))) == 55


def test_random_crop_larger_than_image_is_a_clear_error():
    x = batch(h=32, w=32, n=2)
    with pytest.raises(ValueError, match=r"random_crop size 40x40 is larger than the 32x32 image \(after padding 0\); "
                                         r"lower size or add padding"):
        T.random_crop(40)(x)
    assert T.random_crop(40, padding=4)(x).shape == (2, 3, 40, 40)  # exactly fits once padded


@pytest.mark.parametrize("size, h, w", [((13, 10), 12, 15), ((10, 16), 12, 15)])
def test_random_crop_larger_than_the_image_on_one_axis_is_an_error(size, h, w):
    with pytest.raises(ValueError, match=rf"^random_crop size {size[0]}x{size[1]} is larger than the {h}x{w} image "
                                         r"\(after padding 0\); lower size or add padding$"):
        T.random_crop(size)(batch(n=2, h=h, w=w))


def test_random_crop_error_shows_uneven_padding_as_four_sides():
    with pytest.raises(ValueError, match=r"than the 12x15 image \(after padding \[1, 2, 1, 2\]\);"):
        T.random_crop(20, padding=(1, 2))(batch(n=2, h=12, w=15))


@pytest.mark.parametrize("padding, h, w", [(4, 4, 9), (4, 9, 4), ((0, 0, 0, 5), 5, 9), ((5, 0, 0, 0), 9, 5)])
def test_random_crop_reflect_padding_must_be_smaller_than_the_image(padding, h, w):
    """torch's reflect padding must be smaller than the image; one side on one axis is enough to fail."""
    with pytest.raises(ValueError, match=rf"^random_crop reflect padding must be smaller than the {h}x{w} image; "
                                         r"lower padding or use padding_mode symmetric$"):
        T.random_crop(4, padding=padding, padding_mode="reflect")(batch(n=2, h=h, w=w))
    # a padding one pixel smaller works, and matches torchvision
    smaller = [max(p - 1, 0) for p in ([padding] * 4 if isinstance(padding, int) else padding)]
    x = batch(n=2, h=h, w=w)
    t = T.random_crop(4, padding=tuple(smaller), padding_mode="reflect")
    params = t.draw(x)
    expected = per_image(x, lambda b, img: TF.crop(TF.pad(img, smaller, padding_mode="reflect"),
                                                   int(params.top[b]), int(params.left[b]), 4, 4))
    assert torch.equal(t.apply(x, params), expected)


def test_random_crop_rejects_padding_of_wrong_length():
    with pytest.raises(ValueError, match=r"^padding has 3 values; give 1, 2 \(\[left/right, top/bottom\]\) "
                                         r"or 4 \(\[left, top, right, bottom\]\)$"):
        T.random_crop(8, padding=(1, 2, 3))


@pytest.mark.parametrize("name, options", [("random_rotation", dict(degrees=(30, 60))),
                                           ("random_crop", dict(size=(14, 13), padding=2))])
def test_a_one_value_fill_list_fills_every_channel(name, options):
    """As in torchvision, fill=[v] is the same as fill=v."""
    x = batch(h=12, w=11)
    factory = T.cnnreg_transforms()[name]
    torch.manual_seed(16)
    listed = factory(**options, fill=[0.75])(x)
    torch.manual_seed(16)
    assert torch.equal(listed, factory(**options, fill=0.75)(x))
    assert (listed == 0.75).any()  # the fill shows


# -- random resized crop -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interpolation, antialias", [("bilinear", True), ("bilinear", False), ("bicubic", True),
                                                      ("bicubic", False), ("nearest", True)])
@pytest.mark.parametrize("size", [20, 5, (7, 10)])
def test_random_resized_crop_matches_torchvision_per_image(device, interpolation, antialias, size):
    torch.manual_seed(3)
    x = batch(n=12, h=12, w=14, device=device)
    t = T.random_resized_crop(size, interpolation=interpolation, antialias=antialias, context=CONTEXT)
    params = t.draw(x)

    def reference(b, img):
        box = [int(v[b]) for v in (params.top, params.left, params.height, params.width)]
        return TF.resized_crop(img, *box, size=list(t.size), interpolation=InterpolationMode(interpolation),
                                antialias=antialias)

    out = t.apply(x, params)
    assert out.shape == (12, 3, *t.size)
    # The batched op uses ATen's interpolation weights; what differs is the order of
    # float additions (two matrix products vs ATen's loops). Nearest is exact; up to
    # ~3e-6 was seen for bicubic without antialias (negative lobes, larger sums) on
    # values in [0, 1]. A wrong weight or an off-by-one box errs by 1e-2 and more.
    torch.testing.assert_close(out, per_image(x, reference), atol=5e-6, rtol=0)


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    torch.manual_seed(4)
    x = torch.zeros(5_000, 1, 40, 60)
    t = T.random_resized_crop(8, scale=(0.2, 0.6), ratio=(0.5, 2.0), context=CONTEXT)
    p = t.draw(x)
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= 40).all() and (p.left + p.width <= 60).all()
    area = (p.height * p.width).float() / (40 * 60)
    aspect = p.width.float() / p.height.float()
    # Sides are rounded to whole pixels, which moves the area and aspect a little.
    assert area.min() > 0.18 and area.max() < 0.63
    assert aspect.min() > 0.45 and aspect.max() < 2.2
    # the offsets use the room each box leaves: some boxes touch the right and bottom edges
    assert ((p.top + p.height) == 40).any() and ((p.left + p.width) == 60).any()
    assert len(set(zip(p.height[:50].tolist(), p.width[:50].tolist()))) > 40  # per-sample boxes
    # On a square image, log-uniform aspects make wide and tall boxes equally likely
    # (a uniform draw of the ratio itself would give about 2 wide boxes for 1 tall one).
    p = t.draw(torch.zeros(5_000, 1, 50, 50))
    aspect = p.width.float() / p.height.float()
    assert abs((aspect > 1).float().mean().item() - (aspect < 1).float().mean().item()) < 0.06


def test_random_resized_crop_falls_back_to_a_centred_crop():
    torch.manual_seed(0)
    x = torch.zeros(50, 1, 12, 12)
    # An area of the whole image with an aspect of 2 to 3 never fits; torchvision then
    # takes the centred crop of the nearest allowed aspect: 6 rows by 12 columns.
    p = T.random_resized_crop(6, scale=(1.0, 1.0), ratio=(2.0, 3.0), context=CONTEXT).draw(x)
    assert set(p.height.tolist()) == {6} and set(p.width.tolist()) == {12}
    assert set(p.top.tolist()) == {3} and set(p.left.tolist()) == {0}


@pytest.mark.parametrize("h, w, scale, ratio", [
    (3, 6, 0.01, 1.0),    # sides round(sqrt(0.18)) = 0: never a box, the centred 3x3 fallback (left 1)
    (6, 3, 0.01, 1.0),    # the same, standing up (top 1)
    (3, 6, 1 / 18, 0.2),  # 1 pixel at aspect 0.2: 2 rows by round(0.447) = 0 columns, no box: fallback 3x1
    (6, 3, 1 / 18, 5.0),  # at aspect 5: 0 rows by 2 columns, no box: fallback 1x3
    (2, 4, 0.125, 1.0),   # 1x1 boxes: the smallest that fit
    (6, 4, 0.5, 4 / 3),   # 3 rows by the whole 4 columns: fits, at any of 4 row offsets
    (4, 6, 0.5, 3 / 4),   # the whole 4 rows by 3 columns: fits, at any of 4 column offsets
    # the whole area: only aspects near 1 fit; otherwise the fallback, the whole image, as its
    # aspect 1 lies within the range
    (12, 12, 1.0, (0.01, 100.0)),
])
def test_random_resized_crop_boxes_at_the_limits_match_torchvisions(h, w, scale, ratio):
    """Boxes whose sides are 0, 1 or the whole image: the set of boxes drawn equals the set
    torchvision's own RandomResizedCrop.get_params draws (a box fits if 0 < side <= image side)."""
    from torchvision import transforms as v1

    ratio = ratio if isinstance(ratio, tuple) else (ratio, ratio)
    torch.manual_seed(17)
    p = T.random_resized_crop(4, scale=(scale, scale), ratio=ratio, context=CONTEXT).draw(
        torch.zeros(1, 1, h, w).expand(400, 1, h, w))
    ours = set(zip(p.top.tolist(), p.left.tolist(), p.height.tolist(), p.width.tolist()))
    theirs = {v1.RandomResizedCrop.get_params(torch.zeros(1, h, w), [scale, scale], list(ratio)) for _ in range(400)}
    assert ours == theirs


def test_random_resized_crop_falls_back_just_for_the_samples_whose_ten_attempts_all_fail():
    """0.1 of a 3x30 image is 9 pixels: a box of aspect r (width / height) has round(sqrt(9 / r)) rows,
    at most 3 only if r > 9 / 3.5^2. With r log-uniform in [0.2, 0.8] an attempt fits with
    q = ln(0.8 / (9 / 12.25)) / ln(4): such boxes are 3x3. A sample whose 10 attempts fail, (1 - q)^10
    of them, takes torchvision's fallback: the whole height, width round(3 * 0.8) = 2, centred."""
    torch.manual_seed(18)
    n = 20_000
    p = T.random_resized_crop(4, scale=(0.1, 0.1), ratio=(0.2, 0.8), context=CONTEXT).draw(
        torch.zeros(1, 1, 3, 30).expand(n, 1, 3, 30))
    assert set(p.height.tolist()) == {3} and set(p.width.tolist()) == {2, 3}
    fallback = p.width == 2
    q = math.log(0.8 / (9 / 12.25)) / math.log(4)
    assert abs(fallback.float().mean().item() - (1 - q) ** 10) < 0.015  # binomial sd ~0.0035
    assert set(p.top[fallback].tolist()) == {0} and set(p.left[fallback].tolist()) == {14}  # (30 - 2) // 2
    assert len(set(p.left[~fallback].tolist())) == 28  # a fitting box goes anywhere in its room


def test_an_unsupported_interpolation_is_a_clear_error():
    """A pretrained model may name an interpolation these transforms do not have."""
    lanczos = DataContext(image_size=(12, 12), channels=3, num_classes=10, interpolation="lanczos")
    for factory in (T.resize, T.random_resized_crop):
        with pytest.raises(ValueError, match=r"^interpolation 'lanczos' is not supported; "
                                             r"use nearest, bilinear or bicubic$"):
            factory(context=lanczos)
        assert factory(interpolation="bicubic", context=lanczos).interpolation == "bicubic"


def test_random_resized_crop_size_and_interpolation_follow_the_context():
    pretrained = DataContext(image_size=(32, 32), channels=3, num_classes=10, input_size=(24, 24), interpolation="bicubic")
    t = T.random_resized_crop(context=pretrained)
    assert t.size == (24, 24) and t.interpolation == "bicubic"
    assert T.random_resized_crop(context=CONTEXT).size == (12, 12)
    assert T.random_resized_crop(context=pretrained, interpolation="nearest").interpolation == "nearest"


# -- random rotation ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("center, fill", [(None, 0.0), ((3.0, 8.5), [0.2, 0.5, 1.0])])
def test_random_rotation_matches_torchvision_per_image(device, interpolation, center, fill):
    torch.manual_seed(5)
    x = batch(n=16, h=12, w=15, device=device)
    t = T.random_rotation(45, interpolation=interpolation, center=center, fill=fill)
    params = t.draw(x)

    def reference(b, img):
        return TF.rotate(img, float(params.degrees[b]), interpolation=InterpolationMode(interpolation), center=center,
                         fill=fill)

    out, expected = t.apply(x, params), per_image(x, reference)
    if interpolation == "bilinear":
        # Same grid and grid_sample; torchvision builds the rotation matrix in double
        # precision and this op in float32, which moves sample points by ~1e-6 px.
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    else:
        # Nearest picks a pixel: a sample point that lies within ~1e-6 px of a pixel
        # border may round the other way. Allow a few such pixels, no more.
        mismatched = (out != expected).any(dim=1).float().mean().item()
        assert mismatched < 0.005


def test_random_rotation_angles_are_uniform_in_range():
    torch.manual_seed(6)
    angles = T.random_rotation((-10, 30)).draw(tiny(10_000)).degrees
    assert angles.min() >= -10 and angles.max() <= 30
    assert angles.min() < -9.5 and angles.max() > 29.5  # the whole range is used
    assert abs(angles.mean().item() - 10) < 0.5  # uniform: mean at the middle (sd of the mean ~0.12)
    assert abs((angles < 0).float().mean().item() - 0.25) < 0.02
    symmetric = T.random_rotation(15).degrees
    assert symmetric == (-15.0, 15.0)


@pytest.mark.parametrize("name, param, options", [
    ("random_erasing", "scale", {}), ("random_erasing", "ratio", {}),
    ("random_resized_crop", "scale", dict(context=CONTEXT)), ("random_resized_crop", "ratio", dict(context=CONTEXT)),
    ("random_rotation", "degrees", {})])
def test_reversed_ranges_are_an_error_naming_the_parameter(name, param, options):
    with pytest.raises(ValueError, match=rf"^{param} range \[0.5, 0.25\] is empty; give it as \[min, max\]$"):
        T.cnnreg_transforms()[name](**{param: (0.5, 0.25)}, **options)


def test_random_rotation_rejects_expand():
    with pytest.raises(ValueError, match=r"^random_rotation cannot expand: the images of a batch must keep one size; "
                                         r"set expand to false \(and follow with a resize if needed\)$"):
        T.random_rotation(10, expand=True)


@pytest.mark.parametrize("name, options", [("random_rotation", dict(degrees=10)),
                                           ("random_crop", dict(size=8, padding=2))])
def test_per_channel_fill_must_match_channels(name, options):
    with pytest.raises(ValueError, match=rf"^{name} fill has 2 values but the images have 3 channels; "
                                         r"give one value, or one per channel$"):
        T.cnnreg_transforms()[name](**options, fill=[0.0, 1.0])(batch())


# -- colour --------------------------------------------------------------------------------

_TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _jitter_reference(t: T.ColorJitter, params: T.JitterParams, x: torch.Tensor) -> torch.Tensor:
    def reference(b, img):
        for k in params.order[b].tolist():
            img = _TV_JITTER[k](img, float(params.factors[b, k]))
        return img

    return per_image(x, reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("options", [dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
                                     dict(contrast=(0.2, 0.9)), dict(hue=(-0.5, 0.5), saturation=2.0)])
def test_color_jitter_matches_torchvision_per_image(device, channels, options):
    torch.manual_seed(7)
    x = batch(n=16, c=channels, device=device)
    t = T.color_jitter(**options)
    params = t.draw(x)
    # Same formulas as torchvision; the HSV round trip of hue is written differently
    # (a closed form instead of a table lookup) and per-sample factors are tensors
    # rather than Python floats, so results agree to float rounding, ~1e-7.
    torch.testing.assert_close(t.apply(x, params), _jitter_reference(t, params, x), atol=1e-5, rtol=0)


def test_color_jitter_factors_stay_in_range_and_orders_vary_per_sample():
    torch.manual_seed(8)
    t = T.color_jitter(brightness=0.5, contrast=(0.5, 0.8), saturation=0.2, hue=0.1)
    p = t.draw(tiny(4_000))
    bounds = [(0.5, 1.5), (0.5, 0.8), (0.8, 1.2), (-0.1, 0.1)]
    for k, (low, high) in enumerate(bounds):
        f = p.factors[:, k]
        assert f.min() >= low and f.max() <= high
        assert f.min() < low + 0.01 * (high - low) and f.max() > high - 0.01 * (high - low)
        assert abs(f.mean().item() - (low + high) / 2) < 0.02 * (high - low)
    orders = {tuple(row) for row in p.order.tolist()}
    assert len(orders) == 24  # every permutation of the four ops occurs
    first = torch.bincount(p.order[:, 0], minlength=4).float() / len(p.order)
    assert (first - 0.25).abs().max() < 0.03  # each op comes first a quarter of the time


@pytest.mark.parametrize("name, value, low, high", [
    ("brightness", 0.3, 0.7, 1.3), ("contrast", 0.4, 0.6, 1.4), ("saturation", 0.2, 0.8, 1.2),
    ("contrast", 1.5, 0.0, 2.5),  # torchvision clips the low end at 0
    ("hue", 0.2, -0.2, 0.2),
])
def test_color_jitter_one_number_means_a_range_around_the_identity(name, value, low, high):
    """torchvision's rule: v means [max(0, 1 - v), 1 + v] for a factor, [-v, v] for the hue shift."""
    torch.manual_seed(20)
    k = ["brightness", "contrast", "saturation", "hue"].index(name)
    f = T.color_jitter(**{name: value}).draw(tiny(4_000)).factors[:, k]
    assert f.min() >= low and f.max() <= high
    assert f.min() < low + 0.01 * (high - low) and f.max() > high - 0.01 * (high - low)


def test_color_jitter_leaves_gray_images_exactly_alone_for_saturation_and_hue():
    """torchvision returns a 1-channel image unchanged from adjust_saturation and adjust_hue."""
    torch.manual_seed(19)
    x = batch(c=1)
    assert torch.equal(T.color_jitter(saturation=(0.0, 3.0), hue=0.5)(x), x)


def test_color_jitter_names_the_channel_count_it_cannot_handle():
    with pytest.raises(ValueError, match=r"^color_jitter needs 1- or 3-channel images, not 2 channels$"):
        T.color_jitter(brightness=0.2)(batch(c=2, h=5, w=7))


def test_color_jitter_skips_ops_that_are_off():
    t = T.color_jitter(brightness=0.3, hue=0.0, saturation=(1.0, 1.0))
    assert t.active == (0,)
    p = t.draw(batch())
    assert p.order.shape == (8, 1)
    assert torch.equal(p.factors[:, 1:], torch.tensor([1.0, 1.0, 0.0]).expand(8, 3))
    # an op that is off holds its identity: factor 1 for brightness, contrast and saturation
    p = T.color_jitter(hue=0.2).draw(batch())
    assert torch.equal(p.factors[:, :3], torch.ones(8, 3))
    assert (p.factors[:, 3] != 0).all()


@pytest.mark.parametrize("name, value, message", [
    ("hue", (-0.6, 0.2), r"hue range \[-0.6, 0.2\] must be \[min, max\] within \[-0.5, 0.5\]"),
    ("hue", (0.2, 0.6), r"hue range \[0.2, 0.6\] must be \[min, max\] within \[-0.5, 0.5\]"),
    ("brightness", (1.5, 0.5), r"brightness range \[1.5, 0.5\] must be \[min, max\] within \[0.0, inf\]"),
    ("contrast", (1.5, 0.5), r"contrast range \[1.5, 0.5\] must be \[min, max\] within \[0.0, inf\]"),
    ("saturation", (-0.5, 0.5), r"saturation range \[-0.5, 0.5\] must be \[min, max\] within \[0.0, inf\]"),
])
def test_color_jitter_rejects_bad_ranges(name, value, message):
    with pytest.raises(ValueError, match=f"^color_jitter {message}$"):
        T.color_jitter(**{name: value})


@pytest.mark.parametrize("device", DEVICES)
def test_random_grayscale_matches_torchvision_per_image(device):
    torch.manual_seed(9)
    x = batch(device=device)
    t = T.random_grayscale(p=0.5)
    params = t.draw(x)
    expected = per_image(x, lambda b, img: TF.rgb_to_grayscale(img, num_output_channels=3) if params.chosen[b] else img)
    out = t.apply(x, params)
    assert torch.equal(out, expected)
    assert 0 < int(params.chosen.sum()) < len(x)
    assert torch.equal(T.random_grayscale(p=1.0)(batch(c=1)), batch(c=1))  # gray stays gray, one channel


def test_random_grayscale_names_the_channel_count_it_cannot_handle():
    # 2 channels on 5x7 images: the message must report the channels, not a spatial size
    with pytest.raises(ValueError, match=r"^random_grayscale needs 1- or 3-channel images, not 2 channels$"):
        T.random_grayscale(p=1.0)(batch(c=2, h=5, w=7))


# -- random erasing ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [0.0, [0.1, 0.5, 0.9], "random"])
def test_random_erasing_matches_torchvision_per_image(device, value):
    torch.manual_seed(10)
    x = batch(n=16, h=12, w=10, device=device)
    t = T.random_erasing(p=0.7, value=value)
    p = t.draw(x)

    def reference(b, img):
        if not p.chosen[b]:
            return img
        i, j, h, w = (int(v[b]) for v in (p.top, p.left, p.height, p.width))
        patch = p.value[b, :, i:i + h, j:j + w] if value == "random" else p.value[0]
        return TF.erase(img, i, j, h, w, patch)

    assert torch.equal(t.apply(x, p), per_image(x, reference))
    assert 0 < int(p.chosen.sum()) < len(x)


def test_random_erasing_draws_follow_p_scale_and_ratio():
    torch.manual_seed(11)
    x = torch.zeros(10_000, 1, 40, 40)
    p = T.random_erasing(p=0.4, scale=(0.05, 0.2), ratio=(0.5, 2.0)).draw(x)
    assert abs(p.chosen.float().mean().item() - 0.4) < 0.02
    h, w = p.height[p.chosen].float(), p.width[p.chosen].float()
    area = h * w / 1600
    assert area.min() > 0.04 and area.max() < 0.22
    assert (h / w).min() > 0.45 and (h / w).max() < 2.2
    assert ((p.top + p.height) <= 40).all() and ((p.left + p.width) <= 40).all()
    assert ((p.top + p.height)[p.chosen] == 40).any()
    # the offsets use all the room a box leaves, on both axes: boxes touch every edge
    assert ((p.left + p.width)[p.chosen] == 40).any()
    assert (p.top[p.chosen] == 0).any() and (p.left[p.chosen] == 0).any()


def test_random_erasing_leaves_images_alone_when_no_box_fits():
    # Erasing needs a box strictly smaller than the image; on 1x1 images none fits.
    x = batch(h=1, w=1)
    assert torch.equal(T.random_erasing(p=1.0)(x), x)


@pytest.mark.parametrize("h, w, erased", [(5, 50, 0), (50, 5, 0), (6, 50, 25), (50, 6, 25)])
def test_random_erasing_box_must_be_strictly_smaller_than_the_image_on_each_axis(h, w, erased):
    """scale 0.1 of a 250- or 300-pixel image at aspect 1 is always a 5x5 box (round(sqrt(25)),
    round(sqrt(30))). torchvision erases it only if both sides are strictly smaller than the image's:
    not on 5-pixel sides, whole on 6-pixel ones. torchvision's own transform is the reference."""
    from torchvision.transforms import v2

    x = torch.ones(4, 1, h, w)
    torch.manual_seed(0)
    ours = T.random_erasing(p=1.0, scale=(0.1, 0.1), ratio=(1.0, 1.0))(x)
    theirs = torch.stack([v2.RandomErasing(p=1.0, scale=(0.1, 0.1), ratio=(1.0, 1.0))(img) for img in x])
    assert (theirs == 0).flatten(1).sum(1).tolist() == [erased] * 4  # the reference behaves as stated
    assert (ours == 0).flatten(1).sum(1).tolist() == [erased] * 4


@pytest.mark.parametrize("h, w, ratio", [(3, 30, (0.5, 3.3)), (30, 3, (1 / 3.3, 2.0))])
def test_random_erasing_skips_just_the_samples_whose_ten_attempts_all_fail(h, w, ratio):
    """A box of 0.1 of a 90-pixel image has sides round(sqrt(9 r)) x round(sqrt(9 / r)) (r = height / width,
    log-uniform). On 3 rows it fits only if sqrt(9 r) < 2.5, i.e. r < 25/36: probability
    q = ln((25/36) / 0.5) / ln(3.3 / 0.5); on 3 columns, by symmetry, the same. torchvision gives up on a
    sample after 10 failed attempts, so with p = 1 a fraction (1 - q)^10 (~0.148) stays untouched."""
    torch.manual_seed(14)
    n = 20_000
    p = T.random_erasing(p=1.0, scale=(0.1, 0.1), ratio=ratio).draw(torch.zeros(1, 1, h, w).expand(n, 1, h, w))
    q = math.log((25 / 36) / 0.5) / math.log(3.3 / 0.5)
    # binomial sd of the fraction ~0.0025; a batch-wide "any attempt fits" would leave none untouched
    assert abs((~p.chosen).float().mean().item() - (1 - q) ** 10) < 0.015
    # every box, even of a sample left alone, lies inside its image
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= h).all() and (p.left + p.width <= w).all()


def test_random_erasing_value_must_match_channels():
    with pytest.raises(ValueError, match=r'random_erasing value has 2 values but the images have 3 channels; '
                                         r'give one value, one per channel, or "random"'):
        T.random_erasing(p=1.0, value=[0.0, 1.0])(batch())


def test_random_erasing_noise_has_the_batchs_precision():
    """value "random" writes standard normal noise drawn at the batch's precision: on a float64
    batch the values are not just float32 numbers widened."""
    torch.manual_seed(15)
    x = torch.full((4, 3, 12, 10), 7.0, dtype=torch.float64)  # 7 is never drawn: erased pixels show
    out = T.random_erasing(p=1.0, value="random")(x)
    noise = out[out != 7.0]
    assert out.dtype == torch.float64 and noise.numel() > 0
    assert (noise.float().double() != noise).any()


# -- deterministic ---------------------------------------------------------------------------


def test_resize_follows_torchvision_size_semantics():
    x = batch(h=12, w=16)
    assert T.resize(8, context=CONTEXT)(x).shape == (8, 3, 8, 10)  # an int sets the shorter side
    assert T.resize((5, 7), context=CONTEXT)(x).shape == (8, 3, 5, 7)
    out = T.resize((6, 9), interpolation="bicubic", context=CONTEXT)(x)
    assert torch.equal(out, per_image(x, lambda b, img: TF.resize(img, [6, 9], interpolation=InterpolationMode.BICUBIC)))


@pytest.mark.parametrize("antialias", [True, False])
def test_resize_antialias_matches_torchvision(antialias):
    x = batch(h=12, w=16)
    out = T.resize((5, 7), antialias=antialias, context=CONTEXT)(x)
    assert torch.equal(out, TF.resize(x, [5, 7], interpolation=InterpolationMode.BILINEAR, antialias=antialias))
    # shrinking by more than 2 is where the low-pass filter shows
    assert not torch.equal(out, TF.resize(x, [5, 7], antialias=not antialias))


def test_resize_without_size_follows_the_model_then_the_dataset():
    timm_like = DataContext(image_size=(32, 32), channels=3, num_classes=10, input_size=(16, 16), crop_pct=0.8,
                            interpolation="bicubic")
    r = T.resize(context=timm_like)
    assert r.size == 20 and r.interpolation == "bicubic"  # floor(16 / 0.8): the shorter side, as timm
    assert T.center_crop(context=timm_like)(r(batch(h=32, w=40))).shape == (8, 3, 16, 16)
    no_crop_pct = DataContext(image_size=(32, 32), channels=3, num_classes=10, input_size=(16, 24))
    assert T.resize(context=no_crop_pct).size == (16, 24)
    assert T.resize(context=CONTEXT).size == (12, 12)
    assert T.resize(context=CONTEXT).interpolation == "bilinear"


def test_resize_keeps_the_aspect_for_a_non_square_pretrained_size():
    wide = DataContext(image_size=(30, 60), channels=3, num_classes=10, input_size=(16, 24), crop_pct=0.8)
    # scaled size 20x30; the 30x60 images shrink by min(30/20, 60/30) = 1.5 to cover it
    assert T.resize(context=wide).size == (20, 40)
    # 60x30 images: min(60/20, 30/30) = 1, the width binds and they keep their size
    tall = DataContext(image_size=(60, 30), channels=3, num_classes=10, input_size=(16, 24), crop_pct=0.8)
    assert T.resize(context=tall).size == (60, 30)


def test_center_crop_matches_torchvision_and_defaults_to_the_model_size():
    x = batch(h=12, w=15)
    # inside the image, as wide as it (wider than it is tall), and as tall as it
    for size in ([7, 10], [7, 15], [12, 10]):
        assert torch.equal(T.center_crop(size, context=CONTEXT)(x), TF.center_crop(x, size))
    pretrained = DataContext(image_size=(32, 32), channels=3, num_classes=10, input_size=(9, 9))
    assert T.center_crop(context=pretrained)(x).shape == (8, 3, 9, 9)
    assert T.center_crop(context=CONTEXT)(x).shape == (8, 3, 12, 12)


@pytest.mark.parametrize("size", [(13, 10), (10, 16), (17, 20)])
def test_center_crop_larger_than_image_pads_as_torchvision(size):
    # larger on one axis or both: zero padding, split as torchvision splits it
    x = batch(h=12, w=15)
    out = T.center_crop(size, context=CONTEXT)(x)
    assert out.shape == (8, 3, *size)
    assert torch.equal(out, TF.center_crop(x, list(size)))
    # independently: the image sits at the centre (the odd pixel after it), zeros around it
    top, left = max(size[0] - 12, 0) // 2, max(size[1] - 15, 0) // 2
    expected = torch.zeros(8, 3, max(size[0], 12), max(size[1], 15))
    expected[:, :, top:top + 12, left:left + 15] = x
    crop_top, crop_left = (expected.shape[-2] - size[0]) // 2, (expected.shape[-1] - size[1]) // 2
    assert torch.equal(out, expected[:, :, crop_top:crop_top + size[0], crop_left:crop_left + size[1]])


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_matches_torchvision(device):
    x = batch(device=device)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    assert torch.equal(T.normalize(mean, std, context=CONTEXT)(x), TF.normalize(x, mean, std))


def test_normalize_defaults_to_the_context_statistics():
    stats = DataContext(image_size=(12, 12), channels=1, num_classes=10, mean=(0.1307,), std=(0.3081,))
    x = batch(c=1)
    assert torch.equal(T.normalize(context=stats)(x), (x - 0.1307) / 0.3081)


def test_normalize_without_statistics_says_to_set_them():
    fix = r"set them in the recipe, e.g. \"mean\": \[0.5, 0.5, 0.5\], \"std\": \[0.25, 0.25, 0.25\]$"
    with pytest.raises(ValueError, match=r"^normalize has no mean and std: neither the dataset nor the model "
                                         r"provides them; " + fix):
        T.normalize(context=CONTEXT)
    with pytest.raises(ValueError, match=r"^normalize has no std: neither"):
        T.normalize(mean=[0.5, 0.5, 0.5], context=CONTEXT)
    with pytest.raises(ValueError, match=r"^normalize has no mean: neither"):
        T.normalize(std=[0.5, 0.5, 0.5], context=CONTEXT)


@pytest.mark.parametrize("mean, std, name", [([0.5] * 3, [0.2] * 2, "std"), ([0.5] * 2, [0.2] * 3, "mean")])
def test_normalize_with_the_wrong_number_of_channels_is_a_clear_error(mean, std, name):
    t = T.normalize(mean, std, context=CONTEXT)
    with pytest.raises(ValueError, match=rf"^normalize {name} has 2 values but the images have 3 channels; "
                                         r"give one value per channel$"):
        t(batch(h=5, w=7))


def test_normalize_rejects_zero_std():
    with pytest.raises(ValueError, match=r"^normalize std must be positive, got \[0.5, 0.0\]$"):
        T.normalize([0.5, 0.5], [0.5, 0.0], context=CONTEXT)
    assert T.normalize([0.5], [1e-6], context=CONTEXT).std == (1e-6,)  # any positive std is fine


# -- every transform -----------------------------------------------------------------------

EVERY = {
    "random_horizontal_flip": dict(p=0.5),
    "random_vertical_flip": dict(p=0.5),
    "random_crop": dict(size=10, padding=2, padding_mode="reflect"),
    "random_resized_crop": dict(size=(9, 11), context=CONTEXT),
    "random_rotation": dict(degrees=20, interpolation="bilinear"),
    "color_jitter": dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
    "random_grayscale": dict(p=0.5),
    "random_erasing": dict(p=0.5, value="random"),
    "resize": dict(size=(7, 9), context=CONTEXT),
    "center_crop": dict(size=8, context=CONTEXT),
    "normalize": dict(mean=[0.5], std=[0.25], context=CONTEXT),
}
OUT_SIZE = {"random_crop": (10, 10), "random_resized_crop": (9, 11), "resize": (7, 9), "center_crop": (8, 8)}


def test_the_hook_registers_every_factory():
    factories = T.cnnreg_transforms()
    assert set(factories) == set(EVERY)
    for name, factory in factories.items():
        assert callable(factory(**EVERY[name])), name


@pytest.mark.parametrize("name", sorted(EVERY))
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_and_channels_last(name, channels):
    t = T.cnnreg_transforms()[name](**EVERY[name])
    x = batch(c=channels)
    torch.manual_seed(12)
    out = t(x)
    assert out.dtype == torch.float32
    assert out.shape == (8, channels, *OUT_SIZE.get(name, (12, 12)))
    torch.manual_seed(12)
    out_cl = t(x.contiguous(memory_format=torch.channels_last))
    # Same draws, same values whatever the memory layout; channels_last stays channels_last.
    torch.testing.assert_close(out_cl, out, atol=1e-6, rtol=0)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) or name == "center_crop"


@pytest.mark.parametrize("name", [n for n in sorted(EVERY) if n.startswith(("random", "color"))])
def test_random_transforms_draw_per_sample_and_repeat_with_the_seed(name):
    t = T.cnnreg_transforms()[name](**EVERY[name])
    x = batch(n=1).expand(16, 3, 12, 12).contiguous()  # 16 copies of one image
    torch.manual_seed(13)
    out = t(x)
    assert len(torch.unique(out.flatten(1), dim=0)) > 1, "every sample got the same draw"
    torch.manual_seed(13)
    assert torch.equal(t(x), out)


def test_transforms_keep_their_own_copy_of_list_arguments():
    """A transform is a frozen value: changing a list after building it (a recipe edited in
    place, say) changes nothing, and the transform can be hashed."""
    lists = {"random_crop": dict(size=[9, 10], padding=[1, 2], fill=[0.1, 0.2, 0.3]),
             "random_rotation": dict(degrees=[5, 20], center=[3.0, 4.0], fill=[0.1, 0.2, 0.3]),
             "random_erasing": dict(p=1.0, scale=[0.1, 0.2], ratio=[0.5, 2.0], value=[0.1, 0.2, 0.3]),
             "resize": dict(size=[7, 9], context=CONTEXT)}
    for name, options in lists.items():
        factory = T.cnnreg_transforms()[name]
        t = factory(**options)
        same = factory(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
        for value in options.values():
            if isinstance(value, list):
                value[0] = value[1] = 2  # edit every list in place
        assert t == same, name
        hash(t)


def test_factories_with_a_size_work_without_a_context():
    """Outside a run there is no DataContext; with a size given the transforms still build."""
    t = T.random_resized_crop(8, context=None)
    assert t.size == (8, 8) and t.interpolation == "bilinear"
    assert T.resize(8, context=None).interpolation == "bilinear"
    assert T.center_crop(8, context=None)(batch()).shape == (8, 3, 8, 8)


# -- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, factory", sorted(T.cnnreg_transforms().items()))
def test_factory_signatures_are_ready_for_schemas(name, factory):
    hints = typing.get_type_hints(factory, include_extras=True)
    doc = inspect.getdoc(factory)
    assert doc and doc.splitlines()[0].strip(), f"{name} needs a one-line summary"
    for param in inspect.signature(factory).parameters.values():
        assert param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        if hints[param.name] is DataContext:
            continue
        adapter = pydantic.TypeAdapter(hints[param.name])
        if param.default is not param.empty:
            adapter.validate_python(param.default)  # defaults satisfy their own constraints
        assert f"{param.name}:" in doc, f"{name} documents {param.name} in Args"


_TORCHVISION_CLASS = {
    "random_horizontal_flip": "RandomHorizontalFlip", "random_vertical_flip": "RandomVerticalFlip",
    "random_crop": "RandomCrop", "random_resized_crop": "RandomResizedCrop", "random_rotation": "RandomRotation",
    "random_grayscale": "RandomGrayscale", "random_erasing": "RandomErasing", "resize": "Resize",
}
# Defaults that come from the model or the dataset (None in the signature), tested with the context above.
_FROM_CONTEXT = {"random_resized_crop": {"size", "interpolation"}, "resize": {"size", "interpolation"}}
_REQUIRED = {"random_crop": dict(size=8), "random_rotation": dict(degrees=10),
             "random_resized_crop": dict(context=CONTEXT), "resize": dict(context=CONTEXT)}


@pytest.mark.parametrize("name", sorted(_TORCHVISION_CLASS))
def test_factory_defaults_are_torchvisions(name):
    """A recipe that leaves a parameter out gets what torchvision's class of the same name would use:
    the schema shows torchvision's default, and leaving it out builds the same transform as giving it."""
    from torchvision.transforms import v2

    theirs = inspect.signature(getattr(v2, _TORCHVISION_CLASS[name])).parameters
    factory = T.cnnreg_transforms()[name]
    torchvision_defaults = {}
    for param in inspect.signature(factory).parameters.values():
        if param.name in _FROM_CONTEXT.get(name, ()):
            assert param.default is None, f"{name} {param.name} defaults to the model's or the dataset's"
        elif param.default is not param.empty:
            expected = theirs[param.name].default
            if param.name == "interpolation":
                expected = InterpolationMode(expected).value
            assert param.default == expected, f"{name} {param.name}"
            torchvision_defaults[param.name] = expected
    assert torchvision_defaults
    required = _REQUIRED.get(name, {})
    assert factory(**required) == factory(**required, **torchvision_defaults)


def test_color_jitter_defaults_change_nothing():
    """torchvision's ColorJitter defaults (None) leave images alone; so do ours (0)."""
    t = T.color_jitter()
    assert t.active == ()
    x = batch()
    assert torch.equal(t(x), x)


def test_schema_constraints_reject_bad_values():
    hints = typing.get_type_hints(T.random_horizontal_flip, include_extras=True)
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(hints["p"]).validate_python(1.5)
    hints = typing.get_type_hints(T.random_crop, include_extras=True)
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(hints["size"]).validate_python(0)
    assert pydantic.TypeAdapter(hints["padding"]).validate_python([1, 2, 3, 4]) == (1, 2, 3, 4)
    hints = typing.get_type_hints(T.random_erasing, include_extras=True)
    assert pydantic.TypeAdapter(hints["value"]).validate_python("random") == "random"


# -- the GPU path ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_no_transform_synchronises_with_the_host_on_cuda():
    transforms = [T.cnnreg_transforms()[name](**EVERY[name]) for name in sorted(EVERY)]
    x = batch(n=32, device="cuda")
    for t in transforms:  # warm up: device constants are made once
        t(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in transforms:
            t(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_random_crop_two_value_padding_is_left_right_then_top_bottom():
    """torchvision's [2, 0]: two columns on each side, no rows; a swap would pad rows instead."""
    x = torch.ones(1, 1, 4, 4)
    out = T.random_crop((4, 8), padding=(2, 0), fill=0.0)(x)  # only a crop as wide as the padded image fits
    assert torch.equal(out, TF.pad(x, [2, 0], fill=0.0))


def test_random_resized_crop_keeps_an_asymmetric_aspect_range_as_width_over_height():
    """ratio is width / height, as in torchvision: boxes drawn from (2, 3) are wide, never tall."""
    torch.manual_seed(5)
    p = T.random_resized_crop(8, scale=(0.1, 0.3), ratio=(2.0, 3.0), context=CONTEXT).draw(torch.zeros(4_000, 1, 60, 60))
    aspect = p.width.float() / p.height.float()
    assert aspect.min() > 1.8 and aspect.max() < 3.3


def test_random_resized_crop_fallback_equals_torchvisions_own_transform():
    """No drawn box fits scale 1 at aspect 3 on a square image: torchvision's rule then takes
    the centred box of the nearest allowed aspect. The reference is torchvision's transform itself."""
    from torchvision.transforms import v2

    x = batch(n=3, h=20, w=20)
    ours = T.random_resized_crop((6, 9), scale=(1.0, 1.0), ratio=(3.0, 3.0), antialias=True, context=CONTEXT)(x)
    theirs = v2.RandomResizedCrop((6, 9), scale=(1.0, 1.0), ratio=(3.0, 3.0), antialias=True)
    expected = torch.stack([theirs(image) for image in x])
    assert torch.allclose(ours, expected, atol=1e-5)


def test_random_erasing_keeps_an_asymmetric_aspect_range_as_height_over_width():
    """ratio is height / width for erasing, as torchvision's RandomErasing draws it: (2, 3) erases tall boxes."""
    torch.manual_seed(6)
    p = T.random_erasing(p=1.0, scale=(0.05, 0.15), ratio=(2.0, 3.0)).draw(torch.zeros(4_000, 1, 60, 60))
    h, w = p.height[p.chosen].float(), p.width[p.chosen].float()
    assert (h / w).min() > 1.8 and (h / w).max() < 3.3

