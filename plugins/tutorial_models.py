"""The CNNs of the classic PyTorch tutorials, as typed model factories.

Each factory's defaults build the tutorial's architecture; its options are
what a reader tries next (widths, batch norm, dropout, activation).

Any input size works: the convolutional part ends in :class:`PoolTo`, which
brings the feature map to the spatial size the tutorial's classifier expects
(4x4 for CIFAR's 32x32 images, 7x7 for MNIST's 28x28). At the tutorial's own
input size it does nothing at all, so the network is exactly the tutorial's
there; at other sizes it average-pools (or stretches a smaller map) to that
size, so the classifier and the parameter count stay the same. We do not use
``nn.LazyLinear`` for this: lazy parameters do not exist until the first
forward pass, which breaks optimizers and parameter counts built before it.

Flattening goes through ``torch.flatten`` (a reshape), never ``.view``, so
channels_last activations work. Weights keep PyTorch's default initialisation,
as the tutorials do. A convolution followed by batch norm has no bias: the
norm's shift makes it redundant.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cnnreg import hookimpl
from cnnreg_plugins._layers import activation_layer, check_activation, check_count

Activation = Literal["relu", "leaky_relu", "elu", "gelu", "silu", "mish"]
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "elu", "gelu", "silu", "mish")

Count = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0, lt=1)]


class PoolTo(nn.Module):
    """Average-pool a feature map to a fixed ``(H, W)``; nothing when it is that size already.

    Skipping the no-op keeps the tutorial's exact graph at its input size, and
    using plain ``avg_pool2d`` when the size divides evenly keeps the backward
    pass deterministic (CUDA's adaptive pooling backward is not). Both choices
    depend only on the shape, so they cost no device synchronisation.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (oh, ow) = x.shape[-2:], self.size
        if (h, w) == (oh, ow):
            return x
        if h >= oh and w >= ow and h % oh == 0 and w % ow == 0:
            return F.avg_pool2d(x, (h // oh, w // ow))
        return F.adaptive_avg_pool2d(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


# -- the tutorials ---------------------------------------------------------------


def tutorial_cnn(
    num_classes: Count = 10,
    in_channels: Count = 3,
    widths: tuple[Count, Count, Count] = (64, 128, 256),
    activation: Activation = "relu",
    negative_slope: Annotated[float, Field(ge=0)] = 0.01,
    dropout2d: Probability = 0.0,
    fc_width: Count = 512,
    dropout: Probability = 0.5,
) -> nn.Module:
    """VGG-style CIFAR CNN: three blocks of two 3x3 conv + batch norm, FC 512, dropout.

    Each block is conv-BN-activation twice, then 2x2 max pooling. At 32x32
    input the last block's 4x4 map is flattened into FC ``fc_width``, then
    dropout and the classifier.

    Args:
        num_classes: number of output logits; filled from the dataset.
        in_channels: channels of the input images; filled from the dataset.
        widths: output channels of the three conv blocks.
        activation: non-linearity after each batch norm and the hidden FC layer.
        negative_slope: slope for negative inputs, used by leaky_relu only.
        dropout2d: probability of zeroing whole feature maps after each block
            (0 leaves it out).
        fc_width: width of the hidden fully connected layer.
        dropout: dropout probability before the classifier (0 leaves it out).
    """
    _check_common(num_classes, in_channels)
    _check_widths(widths, 3, "tutorial_cnn")
    _check_activation(activation, negative_slope)
    _check_probability("dropout2d", dropout2d)
    _check_probability("dropout", dropout)
    check_count("fc_width", fc_width)

    blocks = []
    channels = in_channels
    for width in widths:
        blocks.append(
            nn.Sequential(
                OrderedDict(
                    conv1=nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    bn1=nn.BatchNorm2d(width),
                    act1=activation_layer(activation, negative_slope),
                    conv2=nn.Conv2d(width, width, 3, padding=1, bias=False),
                    bn2=nn.BatchNorm2d(width),
                    act2=activation_layer(activation, negative_slope),
                    pool=nn.MaxPool2d(2),
                    drop=_dropout(dropout2d, nn.Dropout2d),
                )
            )
        )
        channels = width
    return _network(
        blocks,
        pooled=(4, 4),
        channels=channels,
        fc_width=fc_width,
        activation=activation_layer(activation, negative_slope),
        dropout=dropout,
        num_classes=num_classes,
    )


def simple_cnn(
    num_classes: Count = 10,
    in_channels: Count = 3,
    widths: tuple[Count, Count, Count] = (16, 32, 64),
    batch_norm: bool = False,
    activation: Literal["relu", "leaky_relu"] = "relu",
    negative_slope: Annotated[float, Field(ge=0)] = 0.01,
    fc_width: Count = 128,
    dropout: Probability = 0.0,
) -> nn.Module:
    """Small CIFAR CNN: three 3x3 conv + ReLU + max-pool blocks (16, 32, 64), FC 128.

    At 32x32 input the last block's 4x4 map is flattened into FC
    ``fc_width``, then the classifier.

    Args:
        num_classes: number of output logits; filled from the dataset.
        in_channels: channels of the input images; filled from the dataset.
        widths: output channels of the three conv blocks.
        batch_norm: add batch norm after each convolution.
        activation: relu, or leaky_relu with ``negative_slope``.
        negative_slope: slope for negative inputs, used by leaky_relu only.
        fc_width: width of the hidden fully connected layer.
        dropout: dropout probability before the classifier (0 leaves it out).
    """
    _check_common(num_classes, in_channels)
    _check_widths(widths, 3, "simple_cnn")
    if activation not in ("relu", "leaky_relu"):
        raise ValueError(f"simple_cnn's activation must be 'relu' or 'leaky_relu', not {activation!r}")
    _check_activation(activation, negative_slope)
    _check_probability("dropout", dropout)
    check_count("fc_width", fc_width)

    blocks = []
    channels = in_channels
    for width in widths:
        blocks.append(_conv_block(channels, width, batch_norm, activation_layer(activation, negative_slope)))
        channels = width
    return _network(
        blocks,
        pooled=(4, 4),
        channels=channels,
        fc_width=fc_width,
        activation=activation_layer(activation, negative_slope),
        dropout=dropout,
        num_classes=num_classes,
    )


def mnist_cnn(
    num_classes: Count = 10,
    in_channels: Count = 1,
    widths: tuple[Count, Count] = (32, 64),
    fc_width: Count = 128,
    dropout: Probability = 0.0,
) -> nn.Module:
    """MNIST CNN: conv 32 (3x3) + ReLU + pool, conv 64 (3x3) + ReLU + pool, FC 128.

    The convolutions are padded ("same"), so 28x28 input becomes 14x14, then
    7x7, and 64 * 7 * 7 = 3136 features feed the hidden FC layer of 128, the
    common shape of the PyTorch and Keras MNIST tutorials.

    Args:
        num_classes: number of output logits; filled from the dataset.
        in_channels: channels of the input images; filled from the dataset.
        widths: output channels of the two convolutions.
        fc_width: width of the hidden fully connected layer.
        dropout: dropout probability before the classifier (0 leaves it out).
    """
    return _mnist("mnist_cnn", num_classes, in_channels, widths, fc_width, dropout, batch_norm=False)


def mnist_cnn_bn(
    num_classes: Count = 10,
    in_channels: Count = 1,
    widths: tuple[Count, Count] = (32, 64),
    fc_width: Count = 128,
    dropout: Probability = 0.5,
) -> nn.Module:
    """MNIST CNN with batch norm after each conv and dropout 0.5 before the classifier.

    The same network as ``mnist_cnn``, with batch norm after each convolution
    (which then has no bias) and dropout after the hidden FC layer.

    Args:
        num_classes: number of output logits; filled from the dataset.
        in_channels: channels of the input images; filled from the dataset.
        widths: output channels of the two convolutions.
        fc_width: width of the hidden fully connected layer.
        dropout: dropout probability before the classifier (0 leaves it out).
    """
    return _mnist("mnist_cnn_bn", num_classes, in_channels, widths, fc_width, dropout, batch_norm=True)


@hookimpl
def cnnreg_models():
    return {
        "tutorial_cnn": tutorial_cnn,
        "simple_cnn": simple_cnn,
        "mnist_cnn": mnist_cnn,
        "mnist_cnn_bn": mnist_cnn_bn,
    }


# -- building blocks -------------------------------------------------------------


def _mnist(
    name: str,
    num_classes: int,
    in_channels: int,
    widths: tuple[int, ...],
    fc_width: int,
    dropout: float,
    batch_norm: bool,
) -> nn.Module:
    _check_common(num_classes, in_channels)
    _check_widths(widths, 2, name)
    _check_probability("dropout", dropout)
    check_count("fc_width", fc_width)
    blocks = []
    channels = in_channels
    for width in widths:
        blocks.append(_conv_block(channels, width, batch_norm, nn.ReLU(inplace=True)))
        channels = width
    return _network(
        blocks,
        pooled=(7, 7),
        channels=channels,
        fc_width=fc_width,
        activation=nn.ReLU(inplace=True),
        dropout=dropout,
        num_classes=num_classes,
    )


def _conv_block(in_channels: int, out_channels: int, batch_norm: bool, activation: nn.Module) -> nn.Sequential:
    """3x3 "same" conv, optional batch norm, activation, 2x2 max pooling."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
    if batch_norm:
        layers["bn"] = nn.BatchNorm2d(out_channels)
    layers["act"] = activation
    layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def _network(
    blocks: list[nn.Module],
    pooled: tuple[int, int],
    channels: int,
    fc_width: int,
    activation: nn.Module,
    dropout: float,
    num_classes: int,
) -> nn.Sequential:
    """features -> PoolTo(pooled) -> flatten -> FC, activation, dropout -> classifier."""
    features = nn.Sequential(OrderedDict((f"block{i}", block) for i, block in enumerate(blocks, start=1)))
    classifier = nn.Sequential(
        OrderedDict(
            fc=nn.Linear(channels * pooled[0] * pooled[1], fc_width),
            act=activation,
            drop=_dropout(dropout, nn.Dropout),
            out=nn.Linear(fc_width, num_classes),
        )
    )
    return nn.Sequential(
        OrderedDict(features=features, pool=PoolTo(pooled), flatten=nn.Flatten(), classifier=classifier)
    )


def _dropout(p: float, kind: type[nn.Module]) -> nn.Module:
    # Identity, not Dropout(0): the default network is exactly the tutorial's,
    # and the state_dict keys are the same either way (dropout has no weights).
    return kind(p) if p > 0 else nn.Identity()


# -- option checks (the recipe's schema checks these too; these serve Python callers) --


def _check_common(num_classes: int, in_channels: int) -> None:
    check_count("num_classes", num_classes)
    check_count("in_channels", in_channels)


def _check_widths(widths: tuple[int, ...], length: int, model: str) -> None:
    if len(widths) != length:
        raise ValueError(f"widths must give {length} channel counts for {model}, not {len(widths)}: {list(widths)}")
    for width in widths:
        check_count("each of widths", width)


def _check_probability(name: str, p: float) -> None:
    if not 0 <= p < 1:
        raise ValueError(f"{name} is a probability in [0, 1), not {p!r}")


def _check_activation(name: str, negative_slope: float) -> None:
    check_activation(name, ACTIVATIONS)
    if negative_slope < 0:
        raise ValueError(f"negative_slope must be >= 0, not {negative_slope!r}")
