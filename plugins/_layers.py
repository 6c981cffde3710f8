"""Small pieces the model plugins share: activations by name and argument checks.

The recipe's schema already rejects bad values; these checks serve Python
callers of the factories, with the same wording in every model.
"""

from __future__ import annotations

from torch import nn


def activation_layer(name: str, negative_slope: float = 0.01) -> nn.Module:
    """The activation called ``name`` (in place where torch allows it)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=True)
    if name == "elu":
        return nn.ELU(inplace=True)
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU(inplace=True)
    if name == "mish":
        return nn.Mish(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


def check_activation(name: str, allowed: tuple[str, ...]) -> None:
    if name not in allowed:
        raise ValueError(f"unknown activation {name!r}: use one of {', '.join(allowed)}")


def check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
