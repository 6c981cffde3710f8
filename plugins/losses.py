"""Classification losses: ``loss(logits, targets) -> scalar mean``.

``logits`` are ``[B, C]`` raw model outputs and ``targets`` int64 class
indices ``[B]``. Each loss returns the mean over the batch, the value that is
backpropagated; the engine multiplies it by the batch size to sum the epoch's
loss. (With class weights the mean is torch's weighted mean, so that sum is
the weighted mean times the batch size, as in any PyTorch loop.)
A loss that declares ``accepts_soft_targets = True`` also takes float
probabilities ``[B, C]``, the targets that mixup and cutmix make (plugin
``batch_mixing``); the assembly refuses a mixing transform with any other loss.

Half-precision logits are upcast to float32 first, as autocast does for these
losses, so the loss is the same with and without autocast. Class weights are
copied to the logits' device once and cached there: no host-to-device copy and
no synchronisation per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from cnnreg import hookimpl
from cnnreg.core.balance import balanced_weights
from cnnreg.core.errors import Unavailable

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Smoothing = Annotated[float, Field(ge=0, lt=1)]
#: One weight per class, or "balanced": sklearn's n_samples / (n_classes * count_c)
#: from the training split's class counts (after the validation split and data.subset).
Weight = list[Annotated[float, Field(ge=0)]] | Literal["balanced"] | None


def cross_entropy(
    label_smoothing: Smoothing = 0.0,
    weight: Weight = None,
    num_classes: int | None = None,
    class_counts: tuple[int, ...] | None = None,
) -> Loss:
    """Softmax cross-entropy (torch's F.cross_entropy), optionally class-weighted and smoothed.

    Args:
        label_smoothing: share of the target probability spread evenly over
            all classes, in [0, 1); 0.1 is a common choice.
        weight: one weight per class, to count rare classes more, or
            ``"balanced"``: n_samples / (n_classes * count) from the training
            split (sklearn's formula); the mean is weighted by the targets' weights.
        num_classes: number of classes, filled from the dataset; ``weight``
            must have this many entries.
        class_counts: training images per class, filled from the run's
            training split; used by ``weight: "balanced"``.
    """
    _check_smoothing(label_smoothing)
    weights = ClassWeights.of(weight, num_classes, class_counts)
    return CrossEntropy(label_smoothing, weights)


def nll(
    weight: Weight = None,
    num_classes: int | None = None,
    class_counts: tuple[int, ...] | None = None,
) -> Loss:
    """Negative log-likelihood of log-softmax(logits) (torch's F.nll_loss), optionally class-weighted.

    The model returns raw logits; log-softmax is applied here first, so this
    equals ``cross_entropy`` without smoothing. It is kept for recipes that
    follow the tutorials that pair ``log_softmax`` with ``nll_loss``.

    Args:
        weight: one weight per class, to count rare classes more, or
            ``"balanced"`` (as for cross_entropy); the mean is weighted by the
            targets' weights.
        num_classes: number of classes, filled from the dataset; ``weight``
            must have this many entries.
        class_counts: training images per class, filled from the run's
            training split; used by ``weight: "balanced"``.
    """
    weights = ClassWeights.of(weight, num_classes, class_counts)
    return NegativeLogLikelihood(weights)


def bce_with_logits(
    label_smoothing: Smoothing = 0.0,
    weight: Weight = None,
    num_classes: int | None = None,
    class_counts: tuple[int, ...] | None = None,
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
        weight: one weight per class, multiplying that class's binary term,
            or ``"balanced"`` (as for cross_entropy).
        num_classes: number of classes, filled from the dataset; ``weight``
            must have this many entries.
        class_counts: training images per class, filled from the run's
            training split; used by ``weight: "balanced"``.
    """
    _check_smoothing(label_smoothing)
    weights = ClassWeights.of(weight, num_classes, class_counts)
    return OneVsRestBCE(label_smoothing, weights)


def focal(
    gamma: Annotated[float, Field(ge=0)] = 2.0,
    alpha: Annotated[float, Field(gt=0)] | Weight = None,
    num_classes: int | None = None,
    class_counts: tuple[int, ...] | None = None,
) -> Loss:
    """Softmax focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, mean over the batch.

    The multi-class form of torchvision's binary ``sigmoid_focal_loss``:
    ``p_t`` is the softmax probability of the target class, and ``(1 -
    p_t)^gamma`` scales down the examples the model already gets right, so
    the rare and hard ones dominate. With ``gamma`` 0 it is cross-entropy.

    Args:
        gamma: focusing exponent; 0 gives cross-entropy, 2 is the paper's choice.
        alpha: class weighting: ``None`` (none), a number (multiplies the
            loss), one weight per class, or ``"balanced"`` (as cross_entropy's
            weight). Per-class weights give torch's weighted mean, so gamma 0
            equals cross_entropy with ``weight`` alpha.
        num_classes: number of classes, filled from the dataset; a list
            ``alpha`` must have this many entries.
        class_counts: training images per class, filled from the run's
            training split; used by ``alpha: "balanced"``.
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, not {gamma!r}")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if not 0 < alpha < float("inf"):
            raise ValueError(f"alpha must be a positive number, a list or \"balanced\", not {alpha!r}")
        return FocalLoss(float(gamma), None, float(alpha))
    return FocalLoss(float(gamma), ClassWeights.of(alpha, num_classes, class_counts, key="alpha"))


@hookimpl
def cnnreg_losses():
    return {"cross_entropy": cross_entropy, "nll": nll, "bce_with_logits": bce_with_logits, "focal": focal}


# -- the loss callables ----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ClassWeights:
    """Per-class weights, kept on the host and copied once to each device that asks."""

    values: tuple[float, ...]
    _on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @staticmethod
    def of(weight: list[float] | tuple[float, ...] | str | None, num_classes: int | None,
           class_counts: tuple[int, ...] | None = None, key: str = "weight") -> ClassWeights | None:
        """Check the user's weights (or compute the balanced ones) and wrap them; ``None`` when there are none."""
        if weight is None:
            return None
        if isinstance(weight, str):
            if weight != "balanced":
                raise ValueError(f'{key} must be a list of per-class weights or "balanced", not {weight!r}')
            if class_counts is None:
                # validate on data described without its labels: the rest of the
                # loss is still checked, with even weights standing in
                retry = {"class_counts": (1,) * num_classes} if num_classes else {key: None}
                raise Unavailable(f'{key} "balanced" needs the training split\'s class counts, known only '
                                  "once the data is loaded", retry_with=retry)
            if num_classes is not None and len(class_counts) != num_classes:
                raise ValueError(f"class_counts has {len(class_counts)} entries but the dataset has "
                                 f"{num_classes} classes: give one count per class")
            weight = balanced_weights(class_counts, key=key)
        values = tuple(float(w) for w in weight)
        if num_classes is not None and len(values) != num_classes:
            raise ValueError(
                f"{key} has {len(values)} entries but the dataset has {num_classes} classes: give one weight per class"
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

    accepts_soft_targets: ClassVar[bool] = True  # mixup / cutmix: probabilities [B, C]

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        weight = self.weights.on(logits) if self.weights is not None else None
        if targets.ndim == 2 and weight is not None:
            return _weighted_soft_cross_entropy(logits, targets.to(logits.dtype), weight, self.label_smoothing)
        # Soft targets without weights: torch's probability mode, which smooths them
        # as (1 - s) * p + s / C, the same smoothing as for indices.
        targets = targets.to(logits.dtype) if targets.ndim == 2 else targets
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)


def _weighted_soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                                 label_smoothing: float) -> torch.Tensor:
    """Class-weighted cross-entropy of probability targets, normalised by the targets' weight.

    torch's probability mode divides a weighted sum by the batch size, so one-hot
    rows would not give the loss of their indices (which divides by the sum of
    the targets' weights). Dividing by ``sum(w * p)`` does: this is torch's
    index-mode loss, smoothing included, for any mix of one-hot rows.
    """
    smoothed = targets * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    return -(smoothed * weight * log_p).sum() / (targets * weight).sum()


@dataclass(frozen=True)
class NegativeLogLikelihood:
    weights: ClassWeights | None = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim != 1:  # the assembly refuses nll with mixing transforms; this is for direct calls
            raise ValueError(f"nll takes class indices [B], not targets of shape {tuple(targets.shape)}; "
                             f"for soft targets (mixup, cutmix) use cross_entropy")
        logits = _at_least_float32(logits)
        weight = self.weights.on(logits) if self.weights is not None else None
        return F.nll_loss(F.log_softmax(logits, dim=1), targets, weight=weight)


@dataclass(frozen=True)
class OneVsRestBCE:
    label_smoothing: float = 0.0
    weights: ClassWeights | None = None

    accepts_soft_targets: ClassVar[bool] = True  # mixup / cutmix: probabilities [B, C]

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        weight = self.weights.on(logits) if self.weights is not None else None
        num_classes = logits.shape[1]
        if targets.ndim == 2:  # soft targets, smoothed as one-hot rows are: one-hot gives the index loss
            soft = targets.to(logits.dtype) * (1 - self.label_smoothing) + self.label_smoothing / num_classes
            return F.binary_cross_entropy_with_logits(logits, soft, weight=weight)
        off = self.label_smoothing / num_classes
        on = 1.0 - self.label_smoothing + off
        # The smoothed one-hot rows in one scatter, rather than one_hot, a cast
        # and an affine map: three fewer [B, C] temporaries per step.
        one_hot = torch.full_like(logits, off).scatter_(1, targets.unsqueeze(1), on)
        return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight)


@dataclass(frozen=True)
class FocalLoss:
    gamma: float = 2.0
    weights: ClassWeights | None = None
    scale: float = 1.0
    accepts_soft_targets: ClassVar[bool] = True  # mixup / cutmix: probabilities [B, C]

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _at_least_float32(logits)
        log_p = F.log_softmax(logits, dim=1)
        # Class indices become one-hot rows; probability rows (mixup) are used as they
        # are, so one formula serves both: sum_c q_c (1 - p_c)^gamma (-log p_c).
        q = targets.to(log_p.dtype) if targets.ndim == 2 else torch.zeros_like(log_p).scatter_(1, targets.unsqueeze(1), 1.0)
        focus = (1 - log_p.exp()).clamp_(min=0).pow(self.gamma)  # clamp: exp may round past 1
        if self.weights is not None:
            q = q * self.weights.on(logits)
            # torch's weighted mean: sum of the weighted terms over the sum of the targets' weights
            return -(q * focus * log_p).sum() / q.sum()
        return -(q * focus * log_p).sum(dim=1).mean() * self.scale


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_smoothing(label_smoothing: float) -> None:
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), not {label_smoothing!r}")
