"""The augmentation policies, random_affine and gaussian_blur against torchvision.

The reference for each op is torchvision v2's own op dispatch
(``_apply_image_or_video_transform``, the functional ops with its argument
rules), applied image by image with that image's drawn op and magnitude; the
magnitude bins and the AutoAugment policies are torchvision's own
(``_augmentation_space``, ``_get_policies``). Images are 9x11, non-square, so
a swapped axis shows.
"""

import pytest
import torch
from torchvision.transforms import autoaugment as v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cnnreg_plugins import augment_policies as A

H, W = 9, 11


def images(n: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, c, H, W, generator=torch.Generator().manual_seed(seed))
    x[0, -1] = 0.375  # a constant channel: autocontrast and equalize leave it alone
    return x


def reference(x: torch.Tensor, draws: A.OpDraws, interpolation: str, fill: list[float]) -> torch.Tensor:
    """torchvision's op dispatch on each image, slot after slot, with that image's draws."""
    tv = v2.RandAugment(interpolation=InterpolationMode(interpolation), fill=fill)
    out = []
    for b in range(len(x)):
        img = x[b]
        for slot in range(draws.op.shape[1]):
            name = A.OPS[int(draws.op[b, slot])]
            img = tv._apply_image_or_video_transform(img, name, float(draws.magnitude[b, slot]),
                                                     interpolation=tv.interpolation, fill=tv._fill)
        out.append(img)
    return torch.stack(out)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, geometric_nearest: bool) -> None:
    if geometric_nearest:
        # a sample point within ~1e-6 px of a pixel border may round the other way (see
        # test_batched_ops' rotate test): a few such pixels at most
        assert (out - expected).abs().amax(dim=1).gt(1e-5).float().mean().item() < 0.02
    else:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def magnitudes_for(name: str) -> list[float]:
    """Several bins of both spaces (RandAugment's, TrivialAugmentWide's), signed both ways."""
    values = []
    for kind in ("rand_augment", "trivial_augment_wide"):
        m, signed = A.augmentation_space(kind, 31, H, W).get(name, (None, False))  # Invert: none
        for k in (0, 9, 23, 30):
            if name == "Rotate" and kind == "trivial_augment_wide" and k == 30:
                k = 29  # 135 degrees: not a 90-degree tie, but keep clear of large-angle borders
            value = 0.0 if m is None else float(m[k])
            values += [value, -value] if signed else [value]
    return values


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


# interpolation and fill only matter to the geometric ops
@pytest.mark.parametrize("name, interpolation, fill", [(name, "nearest", [0.0]) for name in A.OPS]
                         + [(name, "bilinear", [0.2, 0.5, 1.0]) for name in GEOMETRIC])
def test_each_op_matches_torchvision_at_several_magnitudes(name, interpolation, fill):
    magnitude = torch.tensor(magnitudes_for(name))[:, None]
    draws = A.OpDraws(torch.full(magnitude.shape, A.OP[name]), magnitude)
    x = images(len(magnitude))
    policy = A.AutoAugment(interpolation, tuple(fill), used=frozenset(range(len(A.OPS))))
    out = policy.apply(x, draws)
    geometric = name in GEOMETRIC
    assert_matches(out, reference(x, draws, interpolation, fill), geometric and interpolation == "nearest")


@pytest.mark.parametrize("channels", [1, 3])
def test_ops_mixed_in_one_batch_and_chained_match_torchvision(channels):
    # every sample its own ops (drawn), two slots: the per-sample selection and the chaining
    x = images(40, c=channels, seed=1)
    torch.manual_seed(3)
    t = A.rand_augment(num_ops=2, magnitude=7, interpolation="bilinear", fill=0.25)
    draws = t.draw(x)
    assert len(set(draws.op[:, 0].tolist())) > 8
    assert_matches(t.apply(x, draws), reference(x, draws, "bilinear", [0.25]), geometric_nearest=False)


def test_auto_augment_draws_apply_as_torchvision():
    x = images(30, seed=2)
    torch.manual_seed(4)
    t = A.auto_augment("cifar10")
    draws = t.draw(x)
    assert_matches(t.apply(x, draws), reference(x, draws, "nearest", [0.0]), geometric_nearest=True)


# -- bins, ranges, policies ---------------------------------------------------------------


@pytest.mark.parametrize("num_bins", [10, 31])
@pytest.mark.parametrize("kind, theirs", [
    ("rand_augment", v2.RandAugment), ("trivial_augment_wide", v2.TrivialAugmentWide), ("auto_augment", v2.AutoAugment)])
def test_magnitude_bins_and_ranges_are_torchvisions(kind, theirs, num_bins):
    # v2's space (solarize as a fraction of the maximum, for float images) ...
    ours = A.augmentation_space(kind, num_bins, H, W)
    assert list(ours) == list(theirs._AUGMENTATION_SPACE)  # the same ops, in the same order
    for name, (magnitudes, signed) in theirs._AUGMENTATION_SPACE.items():
        values = magnitudes(num_bins, H, W)
        assert ours[name][1] == signed, name
        if values is None:
            assert ours[name][0] is None, name
        else:
            assert torch.equal(ours[name][0], values), name
    # ... is v1's _augmentation_space, whose solarize threshold is on the 0..255 scale
    v1_space = {"rand_augment": lambda: v1.RandAugment()._augmentation_space(num_bins, (H, W)),
                "trivial_augment_wide": lambda: v1.TrivialAugmentWide()._augmentation_space(num_bins),
                "auto_augment": lambda: v1.AutoAugment()._augmentation_space(num_bins, (H, W))}[kind]()
    assert list(v1_space) == list(ours)
    for name, (values, signed) in v1_space.items():
        mine = torch.tensor(0.0) if ours[name][0] is None else ours[name][0].to(values.dtype)
        expected = values / 255.0 if name == "Solarize" else values
        torch.testing.assert_close(mine, expected, atol=1e-6, rtol=0, msg=name)
        assert ours[name][1] == signed, name


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_auto_augment_policies_are_torchvisions(policy):
    for tv in (v1.AutoAugment(), v2.AutoAugment()):
        expected = tv._get_policies(v1.AutoAugmentPolicy(policy))
        assert [tuple(map(tuple, row)) for row in A.POLICIES[policy]] == [tuple(map(tuple, r)) for r in expected]


# -- draws ----------------------------------------------------------------------------------


def tiny(n: int) -> torch.Tensor:
    return torch.zeros(n, 3, H, W)


@pytest.mark.parametrize("factory", [A.rand_augment, A.trivial_augment_wide, A.auto_augment])
def test_draws_differ_per_sample_and_repeat_with_the_seed(factory):
    t, x = factory(), tiny(64)
    torch.manual_seed(5)
    first = t.draw(x)
    torch.manual_seed(5)
    again = t.draw(x)
    assert torch.equal(first.op, again.op) and torch.equal(first.magnitude, again.magnitude)
    assert len(set(first.op[:, 0].tolist())) > 3  # not one op for the whole batch
    torch.manual_seed(6)
    assert not torch.equal(t.draw(x).op, first.op)


def test_rand_augment_draws_every_op_uniformly_at_its_bin_with_both_signs():
    torch.manual_seed(7)
    draws = A.rand_augment(num_ops=2, magnitude=9).draw(tiny(28000))
    counts = torch.bincount(draws.op.flatten(), minlength=len(A.OPS))
    assert counts[-1] == 0  # no Invert in RandAugment
    assert (counts[:-1] - 4000).abs().max() < 300  # 56000 / 14 each, sd ~ 61
    space = A.augmentation_space("rand_augment", 31, H, W)
    for name, (values, signed) in space.items():
        got = draws.magnitude[draws.op == A.OP[name]]
        expected = 0.0 if values is None else float(values[9])
        assert torch.allclose(got.abs(), torch.tensor(expected)), name
        if signed and expected:
            assert abs((got < 0).float().mean().item() - 0.5) < 0.05, name


def test_trivial_augment_draws_one_op_at_a_random_bin():
    torch.manual_seed(8)
    draws = A.trivial_augment_wide(num_magnitude_bins=5).draw(tiny(4000))
    assert draws.op.shape == (4000, 1)
    rotate = draws.magnitude[draws.op == A.OP["Rotate"]]
    assert sorted(set(rotate.abs().tolist())) == [0.0, 33.75, 67.5, 101.25, 135.0]


@pytest.mark.parametrize("policy", ["imagenet", "svhn"])
def test_auto_augment_draws_follow_the_policy_rows(policy):
    torch.manual_seed(9)
    draws = A.auto_augment(policy).draw(tiny(5000))
    space = A.augmentation_space("auto_augment", 10, H, W)
    rows = A.POLICIES[policy]
    for b in range(0, 5000, 7):
        ops = [A.OPS[k] for k in draws.op[b].tolist()]
        mags = draws.magnitude[b].tolist()
        # some row explains both slots: each is that row's op at its bin (signed), or skipped
        def explains(row):
            for (name, _, bin_), got, m in zip(row, ops, mags):
                if got == "Identity":
                    continue
                values, signed = space[name]
                want = 0.0 if values is None else float(values[bin_])
                if got != name or abs(abs(m) - want) > 1e-6 or (m < 0 and not signed):
                    return False
            return True
        assert any(explains(row) for row in rows), (ops, mags)
    # the first op of imagenet's rows is applied with its probability: overall ~ mean of p
    p0 = sum(row[0][1] for row in rows) / len(rows)
    assert abs((draws.op[:, 0] != 0).float().mean().item() - p0) < 0.03


# -- random affine and gaussian blur ---------------------------------------------------------


@pytest.mark.parametrize("interpolation, fill, center", [
    ("nearest", 0.0, None), ("bilinear", [0.2, 0.5, 1.0], (2.0, 5.25)), ("bilinear", 0.5, None)])
def test_random_affine_matches_torchvision_affine_per_image(interpolation, fill, center):
    x = images(12, seed=3)
    torch.manual_seed(10)
    t = A.random_affine(degrees=35, translate=(0.2, 0.3), scale=(0.7, 1.3), shear=(-10, 15, -5, 20),
                        interpolation=interpolation, fill=fill, center=center)
    p = t.draw(x)
    assert torch.equal(p.tx, p.tx.round()) and p.tx.abs().max() <= round(0.2 * W) and p.ty.abs().max() <= round(0.3 * H)
    fill_list = fill if isinstance(fill, list) else [fill]
    expected = torch.stack([
        TF.affine(x[b], angle=float(p.angle[b]), translate=[int(p.tx[b]), int(p.ty[b])], scale=float(p.scale[b]),
                  shear=[float(p.shear_x[b]), float(p.shear_y[b])], interpolation=InterpolationMode(interpolation),
                  fill=fill_list, center=None if center is None else list(center))
        for b in range(len(x))])
    assert_matches(t.apply(x, p), expected, geometric_nearest=interpolation == "nearest")


def test_random_affine_draw_ranges():
    torch.manual_seed(11)
    p = A.random_affine(degrees=(5, 10), scale=(0.5, 0.6), shear=7).draw(tiny(2000))
    assert 5 <= p.angle.min() and p.angle.max() <= 10 and 0.5 <= p.scale.min() and p.scale.max() <= 0.6
    assert p.shear_x.min() < -6 and p.shear_x.max() > 6 and not p.shear_y.any() and not p.tx.any()


@pytest.mark.parametrize("kernel_size", [3, (5, 3)])
def test_gaussian_blur_matches_torchvision_per_image(kernel_size):
    x = images(6, seed=4)
    torch.manual_seed(12)
    t = A.gaussian_blur(kernel_size, sigma=(0.3, 2.5))
    p = t.draw(x)
    assert len(set(p.sigma.tolist())) == 6 and 0.3 <= p.sigma.min() and p.sigma.max() <= 2.5
    size = [kernel_size] * 2 if isinstance(kernel_size, int) else list(kernel_size)
    expected = torch.stack([TF.gaussian_blur(x[b], size, [float(p.sigma[b])] * 2) for b in range(len(x))])
    torch.testing.assert_close(t.apply(x, p), expected, atol=1e-6, rtol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"^rand_augment magnitude 31 must be below num_magnitude_bins \(31\)"):
        A.rand_augment(magnitude=31)
    with pytest.raises(ValueError, match=r"^gaussian_blur kernel_size must be odd, got \[4, 4\]$"):
        A.gaussian_blur(4)
    with pytest.raises(ValueError, match=r"^rand_augment needs 1- or 3-channel images, not 2 channels$"):
        A.rand_augment()(tiny(2)[:, :2])


def test_the_hook_registers_every_factory_and_keeps_shape_and_layout():
    factories = A.cnnreg_transforms()
    assert set(factories) == {"rand_augment", "trivial_augment_wide", "auto_augment", "random_affine", "gaussian_blur"}
    x = images(8).contiguous(memory_format=torch.channels_last)
    for name, factory in factories.items():
        t = factory(3) if name == "gaussian_blur" else factory()
        out = t(x)
        assert out.shape == x.shape and out.dtype == x.dtype, name
        assert out.is_contiguous(memory_format=torch.channels_last), name
