"""How far to trust a model's confidence: calibration error and temperature scaling.

A model is calibrated when, among the images it gives 80% confidence, 80%
are right. These are the standard measures, on logits ``[N, C]`` and true
classes ``[N]``:

* :func:`expected_calibration_error` (ECE; Guo et al. 2017): the top-class
  confidences in ``bins`` equal-width bins over [0, 1]; the mean over bins
  of |accuracy - mean confidence|, weighted by each bin's share of the
  samples (torchmetrics' ``MulticlassCalibrationError`` with ``norm="l1"``,
  bin for bin: see :func:`_bin_of`).
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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_BINS = 15
# The range a fitted temperature is kept in (1/100 to 100 times as sharp): real fits land
# near 1 to 3; the bounds only matter for separable samples, whose NLL has no minimum.
MIN_T, MAX_T = 1e-2, 1e2


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: its range, how many samples fell in it, their accuracy and mean confidence."""

    low: float
    high: float
    count: int
    accuracy: float
    confidence: float


def _bin_of(confidence: torch.Tensor, bins: int) -> torch.Tensor:
    """Each confidence's bin, ``0 .. bins``: bins ``[k/bins, (k+1)/bins)``, and ``bins`` for exactly 1.

    torchmetrics' bins to the last bit (its float32 edges from ``linspace``,
    ``bucketize(right=True) - 1``, a confidence of exactly 1, a saturated
    softmax, in a bin of its own), so that a confidence on an edge counts
    where torchmetrics counts it and the numbers compare with its
    ``MulticlassCalibrationError``. Sums are then taken in float64.
    """
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float32)
    return (torch.bucketize(confidence.float().contiguous(), edges, right=True) - 1).clamp(0, bins)


def _binned_gap(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> torch.Tensor:
    """Sum over bins of |mean(correct) - mean(confidence)| * share of samples."""
    which = _bin_of(confidence, bins)
    count, conf_sum, right_sum = (torch.zeros(bins + 1, dtype=torch.float64).index_add_(0, which, values.double())
                                  for values in (torch.ones_like(confidence), confidence, correct))
    filled = count > 0
    gap = (right_sum[filled] - conf_sum[filled]).abs()  # = |acc - conf| * count
    return gap.sum() / confidence.numel()


def _check(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Shapes and a usable temperature, said in words (a wrong call, not a user's mistake)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"the temperature must be a positive number; got {temperature!r}")
    if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets) or len(targets) == 0:
        raise ValueError(f"need logits [N, C] and targets [N], N > 0; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"the temperature must be a positive number; got {temperature!r}")


def _probabilities(logits: torch.Tensor, targets: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """``softmax(logits / temperature)`` in float64 on the CPU; a temperature of None is 1 (an uncalibrated run)."""
    temperature = 1.0 if temperature is None else temperature
    _check(logits, targets, temperature)
    return F.softmax(logits.detach().double().cpu() / temperature, dim=1)


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = DEFAULT_BINS,
                               temperature: float | None = 1.0) -> float:
    """ECE of the top-class confidence, in [0, 1]."""
    probs = _probabilities(logits, targets, temperature)
    confidence, predicted = probs.max(dim=1)
    return float(_binned_gap(confidence, predicted == targets.cpu(), bins))


def classwise_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = DEFAULT_BINS,
                                temperature: float | None = 1.0) -> float:
    """Classwise ECE: each class's probability against membership of that class, averaged over classes."""
    probs = _probabilities(logits, targets, temperature)
    onehot = F.one_hot(targets.cpu().long(), probs.shape[1])
    per_class = [_binned_gap(probs[:, k], onehot[:, k], bins) for k in range(probs.shape[1])]
    return float(torch.stack(per_class).mean())


def reliability_bins(logits: torch.Tensor, targets: torch.Tensor, bins: int = DEFAULT_BINS,
                     temperature: float | None = 1.0) -> tuple[ReliabilityBin, ...]:
    """Accuracy and mean confidence per confidence bin (empty bins have count 0 and both 0).

    The bins of :func:`expected_calibration_error`, except that a confidence
    of exactly 1 is drawn in the last bin (a diagram has ``bins`` bars).
    """
    probs = _probabilities(logits, targets, temperature)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets.cpu()).double()
    which = _bin_of(confidence, bins).clamp(max=bins - 1)
    result = []
    for b in range(bins):
        chosen = which == b
        n = int(chosen.sum())
        result.append(ReliabilityBin(low=b / bins, high=(b + 1) / bins, count=n,
                                     accuracy=float(correct[chosen].mean()) if n else 0.0,
                                     confidence=float(confidence[chosen].mean()) if n else 0.0))
    return tuple(result)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, temperature: float | None = 1.0) -> float:
    """The mean cross-entropy of ``softmax(logits / temperature)``, in float64 (None: 1)."""
    temperature = 1.0 if temperature is None else temperature
    _check(logits, targets, temperature)
    return float(F.cross_entropy(logits.detach().double().cpu() / temperature, targets.cpu().long()))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)`` on these samples.

    L-BFGS over log T (so T stays positive without a constraint), in float64,
    from T = 1, with a strong-Wolfe line search. The NLL is convex in 1/T, so
    it has one minimum along log T too, which this finds. Where the samples
    are separable (every one right with a margin) the NLL only falls as T
    goes to 0 and has no minimum: T is then kept within [MIN_T, MAX_T].
    """
    _check(logits, targets, 1.0)
    x = logits.detach().double().cpu()
    y = targets.detach().long().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the logits hold NaN or infinite values; no temperature fits them")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    low, high = math.log(MIN_T), math.log(MAX_T)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamped: past a bound the gradient is 0 and L-BFGS stops there instead of running to 0 or inf.
        loss = F.cross_entropy(x / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = float(log_t.detach().clamp(low, high).exp())
    # Separable samples: the NLL flattens out towards 0 and L-BFGS stops wherever its change
    # falls below the tolerance; the NLL is unimodal in T, so a bound that does better is the answer.
    with torch.no_grad():
        return min((fitted, MIN_T, MAX_T), key=lambda t: float(F.cross_entropy(x / t, y)))
