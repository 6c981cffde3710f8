"""An example third-party cnnreg plugin: one model with typed parameters."""

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from cnnreg import hookimpl


def wide_net(
    num_classes: int = 10,
    in_channels: int = 3,
    width: Annotated[int, Field(ge=1, le=1024)] = 16,
    pooling: Literal["avg", "max"] = "avg",
) -> nn.Module:
    """A one-conv network whose width is a parameter.

    Args:
        width: channels of the convolution.
        pooling: global pooling before the classifier.
    """
    pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), pool, nn.Flatten(),
                         nn.Linear(width, num_classes))


@hookimpl
def cnnreg_models():
    return {"wide_net": wide_net}
