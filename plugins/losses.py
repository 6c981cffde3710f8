"""Classification losses: ``loss(logits, targets) -> scalar mean``.

``logits`` are ``[B, C]`` raw model outputs and ``targets`` int64 class
indices ``[B]``. Each loss returns the mean over the batch, the value that is
backpropagated; the engine multiplies it by the batch size to sum the epoch's
loss. (With class weights the mean is torch's weighted mean, so that sum is
the weighted mean times the batch size, as in any PyTorch loop.)

Half-precision logits are upcast to float32 first, as autocast does for these
losses, so the loss is the same with and without autocast. Class weights are
copied to the logits' device once and cached there: no host-to-device copy and
no synchronisation per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from cnnreg import hookimpl

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Smoothing = Annotated[float, Field(ge=0, lt=1)]


def cross_entropy(
    label_smoothing: Smoothing = 0.0,
    weight: list[Annotated[float, Field(ge=0)]] | None = None,
    num_classes: int | None = None,
) -> Loss:
    """Softmax cross-entropy (torch's F.cross_entropy), optionally class-weighted and smoothed.

    Args:
        label_smoothing: share of the target probability spread evenly over
            all classes, in [0, 1); 0.1 is a common choice.
        weight: one weight per class, to count rare classes more (e.g. inverse
            class frequencies); the mean is weighted by the targets' weights.
        num_classes: number of classes, filled from the dataset; ``weight``
            must have this many entries.
    """
    _check_smoothing(label_smoothing)
    weights = ClassWeights.of(weight, num_classes)
    return CrossEntropy(label_smoothing, weights)


def nll(
    weight: list[Annotated[float, Field(ge=0)]] | None = None,
    num_classes: int | None = None,
) -> Loss:
    """Negative log-likelihood of log-softmax(logits) (torch's F.nll_loss), optionally class-weighted.

    The model returns raw logits; log-softmax is applied here first, so this
    equals ``cross_entropy`` without smoothing. It is kept for recipes that
    follow the tutorials that pair ``log_softmax`` with ``nll_loss``.

    Args:
        weight: one weight per class, to count rare classes more; the mean is
            weighted by the targets' weights.
        num_classes: number of classes, filled from the dataset; ``weight``
            must have this many entries.
    """
    weights = ClassWeights.of(weight, num_classes)
    return NegativeLogLikelihood(weights)


def bce_with_logits(
    label_smoothing: Smoothing = 0.0,
    weight: list[Annotated[float, Field(ge=0)]] | None = None,
    num_classes: int | None = None,
) -> Loss:
    """One-vs-rest binary cross-entropy: an independent sigmoid per class, one-hot targets.

    Each of the C logits is a binary classifier for its class; the target
    index becomes a one-hot row (smoothed to ``1 - s + s/C`` and ``s/C`` when
    ``label_smoothing`` is ``s``), and the loss is the mean over all B x C
    terms (torch's F.binary_cross_entropy_with_logits, as timm uses it). For
    a two-class dataset the model keeps two outputs, one per class, so
    predictions and metrics work as for any other classifier.

    Args:
        label_smoothing: smoothing of the one-hot targets, in [0, 1).
        weight: one weight per class, multiplying that class's binary term.
        num_classes: number of classes, filled from the dataset; ``weight``
            must have this many entries.
    """
    _check_smoothing(label_smoothing)
    weights = ClassWeights.of(weight, num_classes)
    return OneVsRestBCE(label_smoothing, weights)


@hookimpl
def cnnreg_losses():
    return {"cross_entropy": cross_entropy, "nll": nll, "bce_with_logits": bce_with_logits}


# -- the loss callables ----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ClassWeights:
    """Per-class weights, kept on the host and copied once to each device that asks."""

    values: tuple[float, ...]
    _on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @staticmethod
    def of(weight: list[float] | tuple[float, ...] | None, num_classes: int | None) -> ClassWeights | None:
        """Check the user's weights and wrap them; ``None`` when there are none."""
        if weight is None:
            return None
        values = tuple(float(w) for w in weight)
        if num_classes is not None and len(values) != num_classes:
            raise ValueError(
                f"weight has {len(values)} entries but the dataset has {num_classes} classes: give one weight per class"
            )
        if any(not (w >= 0 and w < float("inf")) for w in values):
            raise ValueError(f"class weights must be finite and >= 0, not {list(values)}")
        if not any(w > 0 for w in values):
            raise ValueError("class weights are all zero: at least one class must count")
        return ClassWeights(values)

    def on(self, logits: torch.Tensor) -> torch.Tensor:
        """The weights as a tensor on ``logits``' device and dtype, checked against its width."""
        if logits.shape[-1] != len(self.values):
            raise ValueError(
                f"the model gives {logits.shape[-1]} logits but weight has {len(self.values)} entries, one per class"
            )
        if torch.compiler.is_compiling():
            # In a compiled graph the weights become a constant of the graph;
            # touching the cache would add a guard on it and a recompile.
            return torch.tensor(self.values, dtype=logits.dtype, device=logits.device)
        key = (logits.device, logits.dtype)
        tensor = self._on_device.get(key)
        if tensor is None:
            tensor = torch.tensor(self.values, dtype=logits.dtype, device=logits.device)
            self._on_device[key] = tensor
        return tensor


@dataclass(frozen=True)
class CrossEntropy:
    label_smoothing: float = 0.0
    weights: ClassWeights | None = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        weight = self.weights.on(logits) if self.weights is not None else None
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)


@dataclass(frozen=True)
class NegativeLogLikelihood:
    weights: ClassWeights | None = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        weight = self.weights.on(logits) if self.weights is not None else None
        return F.nll_loss(F.log_softmax(logits, dim=1), targets, weight=weight)


@dataclass(frozen=True)
class OneVsRestBCE:
    label_smoothing: float = 0.0
    weights: ClassWeights | None = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        weight = self.weights.on(logits) if self.weights is not None else None
        num_classes = logits.shape[1]
        off = self.label_smoothing / num_classes
        on = 1.0 - self.label_smoothing + off
        # The smoothed one-hot rows in one scatter, rather than one_hot, a cast
        # and an affine map: three fewer [B, C] temporaries per step.
        one_hot = torch.full_like(logits, off).scatter_(1, targets.unsqueeze(1), on)
        return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_smoothing(label_smoothing: float) -> None:
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), not {label_smoothing!r}")
