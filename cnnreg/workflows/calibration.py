"""How far to trust a model's confidence: calibration error and temperature scaling.

A model is calibrated when, among the images it gives 80% confidence, 80%
are right. These are the standard measures, on logits ``[N, C]`` and true
classes ``[N]``:

* :func:`expected_calibration_error` (ECE; Guo et al. 2017): the top-class
  confidences in ``bins`` equal-width bins over [0, 1]; the mean over bins
  of |accuracy - mean confidence|, weighted by each bin's share of the
  samples (torchmetrics' ``MulticlassCalibrationError`` with ``norm="l1"``).
* :func:`classwise_calibration_error` (Kull et al. 2019): the same for each
  class's own probability against whether the image is of that class,
  averaged over the classes: it sees the miscalibration of every class, not
  only of the top one.
* :func:`reliability_bins`: what a reliability diagram draws.
* :func:`fit_temperature`: one scalar T > 0 that divides the logits,
  fitted by L-BFGS on the negative log-likelihood of a held-out split (the
  validation split: fitting it on the test split would flatter the result).
  T leaves every prediction as it was; it only makes the confidences honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_BINS = 15


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: its range, how many samples fell in it, their accuracy and mean confidence."""

    low: float
    high: float
    count: int
    accuracy: float
    confidence: float


def _bin_of(confidence: torch.Tensor, bins: int) -> torch.Tensor:
    # Bins (low, high], as torchmetrics' bucketize(right=True) - 1; a confidence of 0 goes to the first.
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    return (torch.bucketize(confidence.contiguous(), edges, right=False) - 1).clamp(0, bins - 1)


def _binned_gap(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> torch.Tensor:
    """Sum over bins of |mean(correct) - mean(confidence)| * share of samples."""
    which = _bin_of(confidence, bins)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, torch.ones_like(confidence, dtype=torch.float64))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence.double())
    right_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct.double())
    filled = count > 0
    gap = (right_sum[filled] - conf_sum[filled]).abs()  # = |acc - conf| * count
    return gap.sum() / confidence.numel()


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = DEFAULT_BINS,
                               temperature: float = 1.0) -> float:
    """ECE of the top-class confidence, in [0, 1]."""
    probs = F.softmax(logits.double() / temperature, dim=1)
    confidence, predicted = probs.max(dim=1)
    return float(_binned_gap(confidence, predicted == targets, bins))


def classwise_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = DEFAULT_BINS,
                                temperature: float = 1.0) -> float:
    """Classwise ECE: each class's probability against membership of that class, averaged over classes."""
    probs = F.softmax(logits.double() / temperature, dim=1)
    onehot = F.one_hot(targets, probs.shape[1])
    per_class = [_binned_gap(probs[:, k], onehot[:, k], bins) for k in range(probs.shape[1])]
    return float(torch.stack(per_class).mean())


def reliability_bins(logits: torch.Tensor, targets: torch.Tensor, bins: int = DEFAULT_BINS,
                     temperature: float = 1.0) -> tuple[ReliabilityBin, ...]:
    """Accuracy and mean confidence per confidence bin (empty bins have count 0 and both 0)."""
    probs = F.softmax(logits.double() / temperature, dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).double()
    which = _bin_of(confidence, bins)
    result = []
    for b in range(bins):
        chosen = which == b
        n = int(chosen.sum())
        result.append(ReliabilityBin(low=b / bins, high=(b + 1) / bins, count=n,
                                     accuracy=float(correct[chosen].mean()) if n else 0.0,
                                     confidence=float(confidence[chosen].mean()) if n else 0.0))
    return tuple(result)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)`` on these samples.

    L-BFGS over log T (so T stays positive without a constraint), in float64,
    from T = 1, with a strong-Wolfe line search; the NLL is convex in 1/T, so
    this finds its minimum.
    """
    if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets) or len(targets) == 0:
        raise ValueError(f"need logits [N, C] and targets [N], N > 0; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    x = logits.detach().double().cpu()
    y = targets.detach().long().cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
