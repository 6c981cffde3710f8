"""whitening_cnn: shapes, frozen and trainable parameters, the data-set whitening, training."""

from __future__ import annotations

import inspect

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnreg
from cnnreg.plugin.hookspecs import hookimpl
from cnnreg.plugin.manager import plugin_manager
from cnnreg.plugin.catalog import build_catalog
from cnnreg_plugins import compact_models
from cnnreg_plugins.compact_models import WHITEN_EPS, whitening_cnn

from conftest import factory_schema as schema, tiny_recipe

SMALL = (8, 16, 16)  # widths that keep the tests fast; the defaults are checked where they matter


def conv(cin: int, cout: int, k: int = 3, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(channels: int) -> int:
    return 2 * channels  # weight and bias; running statistics are buffers


def smooth_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Noise blurred in space and mixed across channels: neighbouring pixels and
    channels are correlated, as in photographs, so the patch covariance is far
    from diagonal and has a wide spread of eigenvalues."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, channels, size + 4, size + 4, generator=generator)
    blurred = F.avg_pool2d(noise, 5, stride=1) * 3
    mixing = torch.eye(channels) + 0.8 * torch.ones(channels, channels)
    return torch.einsum("dc,nchw->ndhw", mixing, blurred) + 0.5  # not zero-mean: the covariance is uncentred


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.whiten]


def norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# -- registration and options ----------------------------------------------------


def test_the_plugin_registers_whitening_cnn():
    assert compact_models.cnnreg_models() == {"whitening_cnn": whitening_cnn}


def test_it_comes_through_the_entry_point_group():
    component = build_catalog(plugin_manager()).keys("model")["whitening_cnn"]
    assert (component.plugin, component.origin.distribution) == ("compact_models", "cnnreg-framework")
    assert component.factory is whitening_cnn


def test_the_signature_is_a_recipe_schema_that_checks_values():
    model = schema(whitening_cnn)
    model()  # every option has a default
    for bad in ({"num_classes": 0}, {"widths": [8, 8]}, {"whiten_kernel": 0}, {"whiten_bias_epochs": -1},
                {"batchnorm_momentum": 1.0}, {"scaling": 0.0}, {"activation": "mish"}):
        with pytest.raises(pydantic.ValidationError):
            model(**bad)
    options = model(num_classes=3, in_channels=1, widths=SMALL).model_dump()
    assert whitening_cnn(**options)(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_every_option_is_documented():
    doc = inspect.getdoc(whitening_cnn)
    summary, _, rest = doc.partition("\n")
    assert summary.strip()
    args = rest.split("Args:")[1]
    for name in inspect.signature(whitening_cnn).parameters:
        assert f"{name}:" in args, name


@pytest.mark.parametrize(
    "options, message",
    [
        ({"widths": (64, 256)}, "widths must give 3"),
        ({"widths": (64, 0, 256)}, "widths must be a whole number >= 1"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"whiten_kernel": 0}, "whiten_kernel"),
        ({"whiten_bias_epochs": -1}, "whiten_bias_epochs"),
        ({"batchnorm_momentum": 1.0}, "batchnorm_momentum"),
        ({"scaling": 0.0}, "scaling"),
        ({"activation": "mish"}, "unknown activation 'mish'"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(options, message):
    with pytest.raises(ValueError, match=message):
        whitening_cnn(**options)


# -- the architecture --------------------------------------------------------------


def test_the_defaults_are_airbench94():
    model = whitening_cnn()
    assert (model.whiten.in_channels, model.whiten.out_channels, model.whiten.kernel_size) == (3, 24, (2, 2))
    assert model.whiten.padding == (0, 0) and model.whiten.bias is not None
    assert [c.out_channels for c in convs(model)] == [64, 64, 256, 256, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs(model))
    assert model.classifier.in_features == 256 and model.classifier.bias is None
    assert model.scaling == pytest.approx(1 / 9)
    assert model.cnnreg_init_images == 5000
    expected = (
        conv(3, 24, 2, bias=True)
        + conv(24, 64) + bn(64) + conv(64, 64) + bn(64)
        + conv(64, 256) + bn(256) + conv(256, 256) + bn(256)
        + conv(256, 256) + bn(256) + conv(256, 256) + bn(256)
        + 256 * 10
    )  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == expected


def test_batch_norm_is_airbenchs():
    for norm in norms(whitening_cnn(widths=SMALL)):
        assert norm.eps == 1e-12
        assert norm.momentum == pytest.approx(0.4)  # airbench's 0.6 weighs the old statistics
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert not norm.weight.requires_grad and norm.bias.requires_grad
    for norm in norms(whitening_cnn(widths=SMALL, batchnorm_momentum=0.9, norm_weight_trainable=True)):
        assert norm.momentum == pytest.approx(0.1) and norm.weight.requires_grad


@pytest.mark.parametrize("activation, kind", [("gelu", nn.GELU), ("relu", nn.ReLU), ("silu", nn.SiLU)])
def test_the_chosen_activation_is_used_everywhere(activation, kind):
    model = whitening_cnn(widths=SMALL, activation=activation)
    found = [m for m in model.modules() if isinstance(m, (nn.GELU, nn.ReLU, nn.SiLU))]
    assert len(found) == 7  # after the whitening layer and each of six batch norms
    assert all(type(m) is kind for m in found)


def test_each_conv_starts_as_the_identity_on_its_input_channels():
    torch.manual_seed(0)
    model = whitening_cnn()
    for layer in convs(model):
        w = layer.weight.detach()
        identity = torch.zeros(layer.in_channels, layer.in_channels, 3, 3)
        identity[:, :, 1, 1] = torch.eye(layer.in_channels)
        assert torch.equal(w[: layer.in_channels], identity)
        rest = w[layer.in_channels:]
        assert rest.numel() == 0 or rest.abs().sum() > 0  # the other filters keep their random init
    x = torch.randn(2, 24, 8, 8)
    first = model.group1.conv1
    torch.testing.assert_close(first(x)[:, :24], x)


@pytest.mark.parametrize("size", [32, 28, 64, 9, 17])
@pytest.mark.parametrize("channels", [1, 3])
def test_one_logit_per_class_at_any_size(size, channels):
    model = whitening_cnn(num_classes=7, in_channels=channels, widths=SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_non_square_images_work():
    model = whitening_cnn(widths=SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 24, 48)).shape == (2, 10)


def test_at_32x32_the_global_pool_is_airbenchs_3x3_max_pool():
    model = whitening_cnn(widths=SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.group3(model.group2(model.group1(model.whiten_act(model.whiten(x)))))
        assert features.shape[-2:] == (3, 3)
        expected = model.classifier(torch.flatten(nn.MaxPool2d(3)(features), 1)) / 9
        torch.testing.assert_close(model(x), expected)


def test_too_small_images_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="at least 9x9 pixels"):
        whitening_cnn(widths=SMALL)(torch.randn(2, 3, 8, 8))


def test_channels_last_input_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    model = whitening_cnn(widths=SMALL).eval()
    x = torch.randn(2, 3, 20, 20)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, got in grads.items():
        torch.testing.assert_close(got, ref_grads[name], rtol=1e-3, atol=1e-5)


def test_only_the_trainable_parameters_get_gradients():
    model = whitening_cnn(widths=SMALL).train()
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert model.whiten.weight.grad is None
    assert model.whiten.bias.grad is not None
    for norm in norms(model):
        assert norm.weight.grad is None and norm.bias.grad is not None
    for layer in [*convs(model), model.classifier]:
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()

    trainable = whitening_cnn(widths=SMALL, norm_weight_trainable=True).train()
    trainable(torch.randn(4, 3, 16, 16)).sum().backward()
    assert all(norm.weight.grad is not None for norm in norms(trainable))


def test_the_whitening_bias_trains_in_the_first_epochs_only():
    model = whitening_cnn(widths=SMALL, whiten_bias_epochs=2)

    def bias_gets_a_gradient(epoch: int) -> bool:
        model.cnnreg_epoch_start(epoch)
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        # requires_grad never changes: a compiled model would recompile
        assert model.whiten.bias.requires_grad and model.group1.conv1.weight.grad is not None
        return model.whiten.bias.grad is not None

    assert [bias_gets_a_gradient(epoch) for epoch in (1, 2, 3, 4)] == [True, True, False, False]
    assert bias_gets_a_gradient(1)  # resuming from an early epoch trains it again

    never = whitening_cnn(widths=SMALL, whiten_bias_epochs=0)
    assert not never.whiten.bias.requires_grad  # frozen from the start, before any epoch
    never.cnnreg_epoch_start(1)
    assert not never.whiten.bias.requires_grad
    never(torch.randn(2, 3, 16, 16)).sum().backward()
    assert never.whiten.bias.grad is None


# -- whitening from data -------------------------------------------------------------


@pytest.mark.parametrize("channels, k", [(3, 2), (1, 2), (3, 3)])
def test_whitening_decorrelates_the_patches_to_unit_variance(channels, k):
    images = smooth_images(64, channels, 16)
    model = whitening_cnn(in_channels=channels, widths=SMALL, whiten_kernel=k)
    model.cnnreg_init_from_data(images)

    d = channels * k * k
    weight = model.whiten.weight.detach()
    assert weight.shape == (2 * d, channels, k, k)
    torch.testing.assert_close(weight[d:], -weight[:d])  # each filter and its negation

    # Independently of the implementation: the patches' uncentred covariance
    # and its eigenvalues, from the conv itself.
    out = F.conv2d(images.double(), weight[:d].double())  # without bias or the negated half
    z = out.permute(0, 2, 3, 1).reshape(-1, d)
    covariance = z.T @ z / len(z)
    patches = F.unfold(images.double(), k).transpose(1, 2).reshape(-1, d)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)  # largest first

    # outputs are uncorrelated, with variance λ / (λ + eps): about 1 where λ >> eps
    expected = torch.diag(eigenvalues / (eigenvalues + WHITEN_EPS))
    torch.testing.assert_close(covariance, expected, rtol=0, atol=2e-3)
    large = eigenvalues > 100 * WHITEN_EPS
    assert large.sum() >= d // 2  # the test images make most directions large
    torch.testing.assert_close(covariance.diagonal()[large], torch.ones(int(large.sum()), dtype=torch.float64),
                               rtol=0, atol=0.011)
    # the input's own covariance was far from the identity: the test means something
    raw = patches.T @ patches / len(patches)
    assert (raw - torch.eye(d, dtype=torch.float64)).abs().max() > 0.5
    # and the filters W satisfy WᵀW = (Σ + eps I)⁻¹, whatever the eigenvectors' signs
    w = weight[:d].reshape(d, d).double()
    torch.testing.assert_close(w.T @ w, torch.linalg.inv(raw + WHITEN_EPS * torch.eye(d, dtype=torch.float64)),
                               rtol=1e-3, atol=1e-2)


def test_whitening_filters_come_largest_eigenvalue_first():
    images = smooth_images(32, 3, 12)
    model = whitening_cnn(widths=SMALL)
    model.cnnreg_init_from_data(images)
    out = F.conv2d(images, model.whiten.weight[:12])
    variance = out.pow(2).mean(dim=(0, 2, 3))  # λ / (λ + eps), which grows with λ
    assert (variance[:-1] >= variance[1:] - 1e-4).all()


def test_whitening_keeps_the_weights_dtype_device_and_memory_format():
    images = smooth_images(16, 3, 12)
    reference = whitening_cnn(widths=SMALL)
    reference.cnnreg_init_from_data(images)

    model = whitening_cnn(widths=SMALL).to(torch.bfloat16).to(memory_format=torch.channels_last)
    model.cnnreg_init_from_data(images.to(torch.bfloat16))
    weight = model.whiten.weight
    assert weight.dtype == torch.bfloat16 and not weight.requires_grad
    assert weight.is_contiguous(memory_format=torch.channels_last)
    # computed in float32 from the (rounded) images: close to the float32 result
    torch.testing.assert_close(weight.float(), reference.whiten.weight, rtol=0.1, atol=0.5)


def test_whitening_does_not_depend_on_how_the_images_are_chunked(monkeypatch):
    images = smooth_images(40, 3, 12)
    whole = whitening_cnn(widths=SMALL)
    whole.cnnreg_init_from_data(images)
    monkeypatch.setattr(compact_models, "_PATCH_CHUNK", 7)
    chunked = whitening_cnn(widths=SMALL)
    chunked.cnnreg_init_from_data(images)
    # Eigenvectors are defined up to sign (and rotation, where eigenvalues are
    # close): compare WᵀW = (Σ + eps I)⁻¹, which is unique.
    def inverse(model):
        w = model.whiten.weight.detach()[:12].reshape(12, 12).double()
        return w.T @ w

    torch.testing.assert_close(inverse(chunked), inverse(whole), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.randn(4, 1, 16, 16), r"images \[N, 3, H, W\]"),
        (torch.randn(3, 16, 16), r"images \[N, 3, H, W\]"),
        (torch.randn(0, 3, 16, 16), "at least one image"),
        (torch.randn(2, 3, 1, 16), "at least one image of at least 2x2"),
    ],
)
def test_whitening_refuses_images_it_cannot_use(images, message):
    with pytest.raises(ValueError, match=message):
        whitening_cnn(widths=SMALL).cnnreg_init_from_data(images)


# -- training ----------------------------------------------------------------------------


class WhitenRecorder:
    """Keeps the whitening layer's weights after every epoch."""

    def __init__(self) -> None:
        self.after: list[tuple[torch.Tensor, torch.Tensor]] = []

    @hookimpl
    def cnnreg_epoch_end(self, run, record):
        self.after.append((run.model.whiten.weight.detach().clone(), run.model.whiten.bias.detach().clone()))


def test_training_on_synthetic_data_beats_chance(tmp_path):
    # Whether or not the engine whitens the first layer (cnnreg_init_from_data)
    # before training, the network must train, and that layer's weights never move.
    recorder = WhitenRecorder()
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "whitening_cnn", "widths": [16, 32, 32],
                                                             "whiten_bias_epochs": 2},
                                            trainer__epochs=6), extra=[recorder])
    run = cnnreg.build(recipe, output=False)
    initial = run.model.whiten.weight.detach().clone()
    result = cnnreg.fit(run)

    first, last = result.records[0].metrics, result.records[-1].metrics
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert last["val_accuracy"] > 0.6  # three classes: chance is 1/3
    # the engine called cnnreg_epoch_start: the bias moved in epochs 1-2 only, the weights never
    weights, biases = zip(*recorder.after)
    assert all(torch.equal(w, initial) for w in weights)
    assert not torch.equal(biases[0], biases[1])
    assert all(torch.equal(b, biases[1]) for b in biases[2:])
