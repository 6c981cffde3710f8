"""The batched transforms against torchvision's per-image functional ops.

Each random transform draws per-sample parameters; applying torchvision's
functional op to each image with that image's parameters must give the same
result as the batched op. Random draws are checked for their ranges and
statistics over large batches of tiny images (the draws depend only on the
batch size), with fixed seeds so nothing is flaky.
"""

import inspect
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
    t = T.random_crop(32, padding=4)
    x = torch.zeros(9_000, 1, 32, 32)
    params = t.draw(x)
    for offsets in (params.top, params.left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9  # nothing beyond the 8-pixel room
        # each of the 9 offsets expects 1000 (sd ~30); an off-by-one range leaves one empty or spills a 10th
        assert counts.min() > 850 and counts.max() < 1150
    assert not torch.equal(params.top[:100], params.left[:100])  # rows and columns drawn independently


def test_random_crop_larger_than_image_is_a_clear_error():
    x = batch(h=32, w=32, n=2)
    with pytest.raises(ValueError, match=r"random_crop size 40x40 is larger than the 32x32 image \(after padding 0\); "
                                         r"lower size or add padding"):
        T.random_crop(40)(x)
    assert T.random_crop(40, padding=4)(x).shape == (2, 3, 40, 40)  # exactly fits once padded


def test_random_crop_reflect_padding_must_be_smaller_than_the_image():
    with pytest.raises(ValueError, match="reflect padding must be smaller than the 4x4 image"):
        T.random_crop(4, padding=4, padding_mode="reflect")(batch(h=4, w=4))


def test_random_crop_rejects_padding_of_wrong_length():
    with pytest.raises(ValueError, match="padding has 3 values"):
        T.random_crop(8, padding=(1, 2, 3))


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


def test_random_rotation_rejects_expand():
    with pytest.raises(ValueError, match="cannot expand"):
        T.random_rotation(10, expand=True)


def test_random_rotation_fill_must_match_channels():
    with pytest.raises(ValueError, match="fill has 2 values but the images have 3 channels"):
        T.random_rotation(10, fill=[0.0, 1.0])(batch())


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


def test_color_jitter_skips_ops_that_are_off():
    t = T.color_jitter(brightness=0.3, hue=0.0, saturation=(1.0, 1.0))
    assert t.active == (0,)
    p = t.draw(batch())
    assert p.order.shape == (8, 1)
    assert torch.equal(p.factors[:, 1:], torch.tensor([1.0, 1.0, 0.0]).expand(8, 3))


def test_color_jitter_rejects_bad_ranges():
    with pytest.raises(ValueError, match="hue range"):
        T.color_jitter(hue=(-0.6, 0.2))
    with pytest.raises(ValueError, match="contrast range"):
        T.color_jitter(contrast=(1.5, 0.5))


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


def test_random_erasing_leaves_images_alone_when_no_box_fits():
    # Erasing needs a box strictly smaller than the image; on 1x1 images none fits.
    x = batch(h=1, w=1)
    assert torch.equal(T.random_erasing(p=1.0)(x), x)


# -- deterministic ---------------------------------------------------------------------------


def test_resize_follows_torchvision_size_semantics():
    x = batch(h=12, w=16)
    assert T.resize(8, context=CONTEXT)(x).shape == (8, 3, 8, 10)  # an int sets the shorter side
    assert T.resize((5, 7), context=CONTEXT)(x).shape == (8, 3, 5, 7)
    out = T.resize((6, 9), interpolation="bicubic", context=CONTEXT)(x)
    assert torch.equal(out, per_image(x, lambda b, img: TF.resize(img, [6, 9], interpolation=InterpolationMode.BICUBIC)))


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


def test_center_crop_matches_torchvision_and_defaults_to_the_model_size():
    x = batch(h=12, w=15)
    assert torch.equal(T.center_crop((7, 10), context=CONTEXT)(x), TF.center_crop(x, [7, 10]))
    pretrained = DataContext(image_size=(32, 32), channels=3, num_classes=10, input_size=(9, 9))
    assert T.center_crop(context=pretrained)(x).shape == (8, 3, 9, 9)
    assert T.center_crop(context=CONTEXT)(x).shape == (8, 3, 12, 12)


def test_center_crop_larger_than_image_is_a_clear_error():
    with pytest.raises(ValueError, match="center_crop size 13x13 is larger than the 12x12 image"):
        T.center_crop(13, context=CONTEXT)(batch())


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
    with pytest.raises(ValueError, match=r"normalize has no mean and std.*set them in the recipe"):
        T.normalize(context=CONTEXT)
    with pytest.raises(ValueError, match=r"normalize has no std"):
        T.normalize(mean=[0.5, 0.5, 0.5], context=CONTEXT)


def test_normalize_with_the_wrong_number_of_channels_is_a_clear_error():
    t = T.normalize([0.5, 0.5, 0.5], [0.2, 0.2, 0.2], context=CONTEXT)
    with pytest.raises(ValueError, match="normalize mean has 3 values but the images have 1 channels"):
        t(batch(c=1))


def test_normalize_rejects_zero_std():
    with pytest.raises(ValueError, match="std must be positive"):
        T.normalize([0.5], [0.0], context=CONTEXT)


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

