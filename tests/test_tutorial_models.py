"""The tutorial CNNs: shapes, parameter counts, options and their checks."""

from __future__ import annotations

import inspect

import pydantic
import pytest
import torch
from torch import nn

from cnnreg_plugins import tutorial_models
from cnnreg_plugins.tutorial_models import mnist_cnn, mnist_cnn_bn, simple_cnn, tutorial_cnn

from conftest import factory_schema as schema

FACTORIES = [tutorial_cnn, simple_cnn, mnist_cnn, mnist_cnn_bn]
TUTORIAL_SIZE = {tutorial_cnn: 32, simple_cnn: 32, mnist_cnn: 28, mnist_cnn_bn: 28}


def conv(cin: int, cout: int, bias: bool) -> int:
    return cin * cout * 9 + (cout if bias else 0)


def bn(channels: int) -> int:
    return 2 * channels  # weight and bias; running statistics are buffers


def linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_plugin_registers_every_tutorial_model():
    assert tutorial_models.cnnreg_models() == {
        "tutorial_cnn": tutorial_cnn,
        "simple_cnn": simple_cnn,
        "mnist_cnn": mnist_cnn,
        "mnist_cnn_bn": mnist_cnn_bn,
    }


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("size", [28, 32, 40, 64, 17])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_gives_one_logit_per_class_at_any_size(factory, size, channels):
    model = factory(num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_non_square_images_work(factory):
    model = factory(in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 24, 48)).shape == (2, 10)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_channels_last_input_gives_the_same_logits_and_gradients(factory):
    torch.manual_seed(0)
    model = factory(in_channels=3).eval()
    x = torch.randn(2, 3, 20, 20)
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_at_the_tutorial_size_the_resizing_pool_does_nothing(factory):
    model = factory(in_channels=3)
    size = TUTORIAL_SIZE[factory]
    features = model.features(torch.randn(2, 3, size, size))
    assert model.pool(features) is features
    assert tuple(features.shape[-2:]) == model.pool.size


def test_pool_to_matches_adaptive_pooling_whether_it_divides_evenly_or_not():
    pool = tutorial_models.PoolTo((4, 4))
    for size in (8, 12, 6, 3, 5):
        x = torch.randn(2, 5, size, size)
        torch.testing.assert_close(pool(x), nn.functional.adaptive_avg_pool2d(x, 4))


def test_tutorial_cnn_has_the_tutorials_parameter_count():
    expected = (
        conv(3, 64, False) + bn(64) + conv(64, 64, False) + bn(64)
        + conv(64, 128, False) + bn(128) + conv(128, 128, False) + bn(128)
        + conv(128, 256, False) + bn(256) + conv(256, 256, False) + bn(256)
        + linear(256 * 4 * 4, 512) + linear(512, 10)
    )  # fmt: skip
    assert count(tutorial_cnn()) == expected


def test_tutorial_cnn_options_change_the_architecture():
    model = tutorial_cnn(num_classes=100, in_channels=1, widths=(8, 16, 32), fc_width=64)
    expected = (
        conv(1, 8, False) + bn(8) + conv(8, 8, False) + bn(8)
        + conv(8, 16, False) + bn(16) + conv(16, 16, False) + bn(16)
        + conv(16, 32, False) + bn(32) + conv(32, 32, False) + bn(32)
        + linear(32 * 16, 64) + linear(64, 100)
    )  # fmt: skip
    assert count(model) == expected
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize(
    "activation, kind",
    [("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU),
     ("gelu", nn.GELU), ("silu", nn.SiLU), ("mish", nn.Mish)],
)
def test_tutorial_cnn_uses_the_chosen_activation_everywhere(activation, kind):
    model = tutorial_cnn(activation=activation, negative_slope=0.2)
    kinds = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish)
    activations = [m for m in model.modules() if isinstance(m, kinds)]
    assert len(activations) == 7  # two per block and the hidden FC layer
    assert all(type(m) is kind for m in activations)
    if kind is nn.LeakyReLU:
        assert all(m.negative_slope == 0.2 for m in activations)


def test_tutorial_cnn_dropout2d_goes_after_each_block_and_only_when_asked():
    assert not any(isinstance(m, nn.Dropout2d) for m in tutorial_cnn().modules())
    drops = [m for m in tutorial_cnn(dropout2d=0.1).modules() if isinstance(m, nn.Dropout2d)]
    assert [d.p for d in drops] == [0.1, 0.1, 0.1]


def test_the_state_dict_keys_do_not_depend_on_dropout():
    assert tutorial_cnn(dropout=0, dropout2d=0).state_dict().keys() == tutorial_cnn(dropout2d=0.2).state_dict().keys()


def test_simple_cnn_has_the_tutorials_parameter_count():
    expected = conv(3, 16, True) + conv(16, 32, True) + conv(32, 64, True) + linear(64 * 4 * 4, 128) + linear(128, 10)
    assert count(simple_cnn()) == expected
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in simple_cnn().modules())


def test_simple_cnn_with_batch_norm_drops_the_conv_biases():
    expected = (
        conv(3, 16, False) + bn(16) + conv(16, 32, False) + bn(32) + conv(32, 64, False) + bn(64)
        + linear(64 * 4 * 4, 128) + linear(128, 10)
    )  # fmt: skip
    assert count(simple_cnn(batch_norm=True)) == expected


def test_simple_cnn_leaky_relu_has_its_slope():
    model = simple_cnn(activation="leaky_relu", negative_slope=0.1)
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}


def test_mnist_cnn_has_the_tutorials_parameter_count():
    expected = conv(1, 32, True) + conv(32, 64, True) + linear(64 * 7 * 7, 128) + linear(128, 10)
    assert count(mnist_cnn()) == expected
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in mnist_cnn().modules())


def test_mnist_cnn_bn_adds_batch_norm_and_dropout():
    model = mnist_cnn_bn()
    expected = conv(1, 32, False) + bn(32) + conv(32, 64, False) + bn(64) + linear(64 * 7 * 7, 128) + linear(128, 10)
    assert count(model) == expected
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_dropout_acts_in_training_only(factory):
    torch.manual_seed(0)
    model = factory(in_channels=3, dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_without_dropout_or_batch_norm_training_and_evaluation_agree():
    torch.manual_seed(0)
    model = simple_cnn()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))


def test_batch_norm_learns_statistics_in_training_only():
    model = mnist_cnn_bn()
    before = model.features.block1.bn.running_mean.clone()
    with torch.no_grad():
        model.eval()(torch.randn(4, 1, 28, 28) + 3)
        assert torch.equal(model.features.block1.bn.running_mean, before)
        model.train()(torch.randn(4, 1, 28, 28) + 3)
    assert not torch.equal(model.features.block1.bn.running_mean, before)


@pytest.mark.parametrize(
    "factory, options, message",
    [
        (tutorial_cnn, {"widths": (64, 128)}, "widths must give 3"),
        (tutorial_cnn, {"widths": (64, 0, 128)}, "widths must be a whole number >= 1"),
        (tutorial_cnn, {"dropout": 1.0}, "dropout is a probability"),
        (tutorial_cnn, {"dropout2d": -0.1}, "dropout2d is a probability"),
        (tutorial_cnn, {"activation": "swish"}, "unknown activation 'swish'"),
        (tutorial_cnn, {"negative_slope": -1.0}, "negative_slope"),
        (tutorial_cnn, {"fc_width": 0}, "fc_width"),
        (simple_cnn, {"activation": "gelu"}, "'relu' or 'leaky_relu'"),
        (simple_cnn, {"num_classes": 0}, "num_classes"),
        (mnist_cnn, {"in_channels": 0}, "in_channels"),
        (mnist_cnn, {"widths": (32, 64, 128)}, "widths must give 2"),
        (mnist_cnn_bn, {"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(factory, options, message):
    with pytest.raises(ValueError, match=message):
        factory(**options)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_the_signature_is_a_recipe_schema_that_checks_values(factory):
    model = schema(factory)
    model()  # every option has a default
    with pytest.raises(pydantic.ValidationError):
        model(num_classes=0)
    with pytest.raises(pydantic.ValidationError):
        model(dropout=1.0)
    with pytest.raises(pydantic.ValidationError):
        model(widths=[8])
    options = model(num_classes=3, in_channels=1).model_dump()
    assert factory(**options)(torch.randn(1, 1, 28, 28)).shape == (1, 3)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_every_option_is_documented(factory):
    doc = inspect.getdoc(factory)
    summary, _, rest = doc.partition("\n")
    assert summary.strip()
    args = rest.split("Args:")[1]
    for name in inspect.signature(factory).parameters:
        assert f"{name}:" in args, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("size", [28, 32, 40])
def test_on_cuda_channels_last_bf16_training_steps_work(factory, size):
    model = factory(in_channels=3, num_classes=5).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (8, 5)
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
