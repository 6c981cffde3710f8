"""cnnreg.inputs.prepare: uint8 batch -> model input, the sample-index protocol, merged views."""

from __future__ import annotations

import pytest
import torch

from cnnreg.inputs.prepare import apply_transform, merge_views, prepare_batch, view_weights


def uint8_batch(b: int = 2, c: int = 3, h: int = 4, w: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)
    images[0, 0, 0, 0], images[-1, -1, -1, -1] = 0, 255  # both ends of the range
    return images


class Recorder:
    """A transform of the sample-index protocol: remembers what it was called with."""

    uses_sample_index = True

    def __init__(self):
        self.calls = []

    def __call__(self, x, *, index, epoch):
        self.calls.append((x.clone(), index, epoch))
        return x


class NotAsking:
    uses_sample_index = False  # the attribute, but false: a plain call

    def __call__(self, x):
        return plain(x)


def plain(x):
    # no index or epoch keywords: calling it with them would be a TypeError
    return x * 2


class Stack:
    """A test-time augmentation of ``offsets``: view ``v`` is ``x * scale + offsets[v]``, view-major."""

    def __init__(self, offsets, weights, scale=1.0):
        self.offsets, self.view_weights, self.scale = offsets, weights, scale

    def __call__(self, x):
        return torch.cat([x * self.scale + o for o in self.offsets])


# -- prepare_batch ---------------------------------------------------------------------------


def test_a_batch_becomes_float32_in_the_unit_range_in_its_own_layout():
    images = uint8_batch()
    x = prepare_batch(images, [], channels_last=False)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, images.float() / 255)
    assert x[0, 0, 0, 0] == 0 and x[-1, -1, -1, -1] == 1  # 255 is exactly 1
    assert images.dtype == torch.uint8  # the batch itself is left alone


def test_transforms_run_in_their_order_then_the_dtype_and_memory_format_are_set():
    images = uint8_batch()
    to_double = lambda x: x.double()  # noqa: E731 - the last transform's dtype is not the run's
    x = prepare_batch(images, [plain, lambda x: x + 1, to_double], channels_last=True, dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()  # really channels-last: C > 1 and H, W > 1
    # (x * 2) + 1, not (x + 1) * 2
    assert torch.equal(x, (images.double() / 255 * 2 + 1).to(torch.bfloat16))


def test_a_sample_index_transform_gets_the_indices_and_epoch_and_others_only_the_images():
    images = uint8_batch()
    index = torch.tensor([7, 3])
    recorder = Recorder()
    x = prepare_batch(images, [plain, recorder, NotAsking()], channels_last=False, index=index, epoch=3)
    (seen, got_index, got_epoch), = recorder.calls
    assert torch.equal(seen, images.float() / 255 * 2)  # after the transform before it
    assert got_index is index and got_epoch == 3
    assert torch.equal(x, images.float() / 255 * 4)


def test_without_indices_a_sample_index_transform_gets_none_and_epoch_zero():
    recorder = Recorder()
    prepare_batch(uint8_batch(), [recorder], channels_last=False)
    assert [(index, epoch) for _, index, epoch in recorder.calls] == [(None, 0)]
    x = torch.rand(2, 3, 4, 5)
    assert apply_transform(recorder, x) is x
    assert recorder.calls[-1][1:] == (None, 0)
    assert torch.equal(apply_transform(plain, x), x * 2)


# -- views ------------------------------------------------------------------------------------


def test_transforms_without_views_make_one_view():
    assert view_weights([]) is None
    assert view_weights([plain, lambda x: x]) is None


def test_view_weights_are_floats_and_later_transforms_are_the_outer_index():
    first = Stack([0, 10], (1, 3))
    assert view_weights([plain, first]) == (1.0, 3.0)
    assert all(type(w) is float for w in view_weights([first]))
    second = Stack([0, 0, 0], (0.2, 0.3, 0.5))
    # combined view (k, j) of second k over first j sits at k * 2 + j, weighted w2[k] * w1[j]
    assert view_weights([first, plain, second]) == pytest.approx((0.2, 0.6, 0.3, 0.9, 0.5, 1.5))


def test_merged_views_of_two_augmentations_average_each_samples_logits():
    # 3 samples, 2 "classes", views 2 x 3: no two sizes alike, so a swapped axis shows
    images = torch.tensor([[[[10, 20]]], [[[30, 40]]], [[[50, 60]]]], dtype=torch.uint8)
    first = Stack([0.0, 10.0], (0.25, 0.75))
    second = Stack([0.0, 1.0, 2.0], (0.2, 0.3, 0.5), scale=-1.0)
    transforms = [first, second]
    x = prepare_batch(images, transforms, channels_last=False)
    assert x.shape == (6 * 3, 1, 1, 2)
    logits = x.flatten(1)  # a model that passes its input through
    merged = merge_views(logits, view_weights(transforms))
    assert merged.shape == (3, 2)
    assert merge_views(logits.to(torch.bfloat16), view_weights(transforms)).dtype == torch.float32
    v = images.flatten(1).double() / 255
    # by hand: view (k, j) is -(v + offset_j) + offset_k, weighted w2[k] * w1[j]
    want = sum(w2 * w1 * (-(v + o1) + o2)
               for o2, w2 in zip(second.offsets, second.view_weights)
               for o1, w1 in zip(first.offsets, first.view_weights))
    assert torch.allclose(merged.double(), want, atol=1e-5)


def test_merging_one_view_is_the_logits_themselves():
    logits = torch.randn(4, 3)
    assert merge_views(logits, None) is logits
