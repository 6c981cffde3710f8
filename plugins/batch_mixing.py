"""Batch mixing: mixup, cutmix and timm's switch between them (the ``batch_mixing`` plugin).

Each image of a training batch is mixed with the batch reversed (timm's
``x.flip(0)``: sample ``i`` with sample ``B - 1 - i``), and its label the
same way, into soft targets ``[B, C]`` for the loss. The transforms declare
``mixes_targets = True`` and the training step calls ``mix(x, targets) ->
(x, soft)`` (:mod:`cnnreg.inputs.prepare`); the metrics keep counting the
hard labels. They belong in ``transforms.train`` only: the assembly refuses
them in ``transforms.eval``, and a loss that takes class indices only (nll).

The draws follow timm's ``Mixup`` (its ``batch`` and ``elem`` modes): with
probability ``prob`` a batch (or a sample) is mixed; with both kinds on,
cutmix is chosen with probability ``switch_prob``; lambda ~ Beta(alpha, alpha);
a cutmix box has sides ``floor(size * sqrt(1 - lambda))`` around a uniform
centre, clipped to the image, and lambda is then corrected to the share of
the image left unpasted (``correct_lam``). Unlike timm, they are drawn from
torch's generator on the batch's device, like every random transform here,
so ``seed`` makes a run repeatable and a resumed run continues the same draws;
nothing is read back to the host.

Label smoothing ``smoothing`` is timm's (``off = s / C``, ``on = 1 - s + off``,
then mixed): this equals the loss's own ``label_smoothing`` on the mixed
targets, so set one of the two.
"""

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from cnnreg import hookimpl
from cnnreg.core.data import DataContext

Probability = Annotated[float, Field(ge=0, le=1)]
Alpha = Annotated[float, Field(ge=0)]
Smoothing = Annotated[float, Field(ge=0, lt=1)]
Mode = Literal["batch", "elem"]


@dataclass(frozen=True)
class MixParams:
    """One row per sample (``[B]``): the weight of its own image and label (after the
    box correction), whether it is cut (a pasted box) rather than blended, and the box
    ``[top, bottom) x [left, right)`` pasted from its partner (empty when not cut)."""

    lam: Tensor
    cut: Tensor
    top: Tensor
    bottom: Tensor
    left: Tensor
    right: Tensor


def cutmix_boxes(lam: Tensor, centre_y: Tensor, centre_x: Tensor, height: int,
                 width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """timm's ``rand_bbox`` for given centres: sides ``floor(size * sqrt(1 - lam))``,
    clipped to the image. Returns int64 ``top, bottom, left, right``."""
    ratio = (1 - lam).clamp(min=0).sqrt()
    cut_h, cut_w = (height * ratio).floor().long(), (width * ratio).floor().long()
    top = (centre_y - cut_h // 2).clamp(0, height)
    bottom = (centre_y + (cut_h + 1) // 2).clamp(0, height)
    left = (centre_x - cut_w // 2).clamp(0, width)
    right = (centre_x + (cut_w + 1) // 2).clamp(0, width)
    return top, bottom, left, right


def soft_targets(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Class indices ``[B]`` -> smoothed one-hot rows ``[B, C]`` (timm's values); soft targets pass through."""
    if targets.is_floating_point():  # already soft, from an earlier mixing transform
        return targets.float()
    off = smoothing / num_classes
    return torch.full((targets.shape[0], num_classes), off, device=targets.device).scatter_(
        1, targets.long().unsqueeze(1), 1.0 - smoothing + off)


@dataclass(frozen=True)
class BatchMix:
    """Mixup (``mixup_alpha``) and cutmix (``cutmix_alpha``); an alpha of 0 turns that kind off."""

    mixup_alpha: float
    cutmix_alpha: float
    prob: float
    switch_prob: float
    mode: str
    correct_lam: bool
    smoothing: float
    num_classes: int
    name: str

    mixes_targets: ClassVar[bool] = True

    def _beta(self, alpha: float, n: int, device: torch.device) -> Tensor:
        if alpha <= 0:
            return torch.ones(n, device=device)
        # Concentrations made on the device and no argument validation: no host round trip.
        concentration = torch.full((n,), float(alpha), device=device)
        return torch.distributions.Beta(concentration, concentration, validate_args=False).sample()

    def draw(self, x: Tensor) -> MixParams:
        """timm's draws, one for the batch ("batch") or one per sample ("elem")."""
        batch, height, width, device = x.shape[0], x.shape[-2], x.shape[-1], x.device
        n = 1 if self.mode == "batch" else batch
        applied = torch.rand(n, device=device) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = torch.rand(n, device=device) < self.switch_prob
        else:
            cut = torch.full((n,), self.cutmix_alpha > 0, device=device)
        lam = torch.where(cut, self._beta(self.cutmix_alpha, n, device), self._beta(self.mixup_alpha, n, device))
        lam = torch.where(applied, lam, 1.0)
        cut = cut & applied
        centre_y = (torch.rand(n, device=device) * height).long().clamp(max=height - 1)
        centre_x = (torch.rand(n, device=device) * width).long().clamp(max=width - 1)
        top, bottom, left, right = cutmix_boxes(lam, centre_y, centre_x, height, width)
        # A sample that is not cut pastes nothing: an empty box.
        bottom, right = torch.where(cut, bottom, top), torch.where(cut, right, left)
        if self.correct_lam:
            area = ((bottom - top) * (right - left)).float()
            lam = torch.where(cut, 1 - area / (height * width), lam)
        params = MixParams(lam, cut, top, bottom, left, right)
        if n == 1:
            params = MixParams(*(t.expand(batch) for t in (lam, cut, top, bottom, left, right)))
        return params

    def apply(self, x: Tensor, params: MixParams) -> Tensor:
        flipped = x.flip(0)
        lam = params.lam.to(x.dtype).view(-1, 1, 1, 1)
        blended = x * lam + flipped * (1 - lam)
        rows = torch.arange(x.shape[-2], device=x.device)[None, :]
        cols = torch.arange(x.shape[-1], device=x.device)[None, :]
        in_rows = (rows >= params.top[:, None]) & (rows < params.bottom[:, None])
        in_cols = (cols >= params.left[:, None]) & (cols < params.right[:, None])
        pasted = torch.where(in_rows[:, None, :, None] & in_cols[:, None, None, :], flipped, x)
        return torch.where(params.cut.view(-1, 1, 1, 1), pasted, blended)

    def mix_targets(self, targets: Tensor, params: MixParams) -> Tensor:
        """Each sample's (smoothed) label weighted by lambda, its partner's by 1 - lambda."""
        soft = soft_targets(targets, self.num_classes, self.smoothing)
        lam = params.lam.to(soft.device).view(-1, 1)
        return soft * lam + soft.flip(0) * (1 - lam)

    def mix(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The training step's call: mixed images, and soft targets ``[B, C]`` for the loss."""
        if targets.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name} got {x.shape[0]} images but {targets.shape[0]} targets")
        params = self.draw(x)
        return self.apply(x, params), self.mix_targets(targets, params)

    def __call__(self, x: Tensor) -> Tensor:
        # Images only: previews of the training transforms, batch-norm updates, the dry run.
        return self.apply(x, self.draw(x))


def _check(name: str, mode: str, alphas: dict[str, float]) -> None:
    if mode not in ("batch", "elem"):
        raise ValueError(f"{name} mode {mode!r} is not supported; use \"batch\" (one draw per batch, timm's "
                         f"default) or \"elem\" (one per sample)")
    for key, value in alphas.items():
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} {key} must be a finite number >= 0, not {value!r}")
    if not any(v > 0 for v in alphas.values()):
        shown = " and ".join(alphas)
        raise ValueError(f"{name} {shown} {'are' if len(alphas) > 1 else 'is'} 0, which mixes nothing; "
                         f"set {'one of them' if len(alphas) > 1 else 'it'} above 0 (timm uses 0.8 for mixup, "
                         f"1.0 for cutmix) or remove the transform")


def mixup(alpha: Alpha = 1.0, prob: Probability = 1.0, mode: Mode = "batch", smoothing: Smoothing = 0.0,
          *, context: DataContext) -> BatchMix:
    """Blend each training image with another of the batch, labels too (mixup; timm --mixup).

    Image ``i`` becomes ``lam * x[i] + (1 - lam) * x[B-1-i]`` with lam ~ Beta(alpha, alpha),
    and its target the same mix of the two (smoothed) one-hot labels. Training
    only; the loss must take soft targets (cross_entropy, bce_with_logits).

    Args:
        alpha: Beta distribution parameter (timm's --mixup; 0.8 in its ImageNet recipes).
        prob: probability that a batch (or a sample, in "elem" mode) is mixed.
        mode: "batch": one lambda for the whole batch (timm's default); "elem": one per sample.
        smoothing: label smoothing of the one-hot labels before mixing (timm's); the
            loss's label_smoothing does the same, so use one of them.
    """
    _check("mixup", mode, {"alpha": alpha})
    return BatchMix(alpha, 0.0, prob, 0.0, mode, True, smoothing, context.num_classes, "mixup")


def cutmix(alpha: Alpha = 1.0, prob: Probability = 1.0, mode: Mode = "batch", correct_lam: bool = True,
           smoothing: Smoothing = 0.0, *, context: DataContext) -> BatchMix:
    """Paste a random box of another training image into each one, labels mixed by area (cutmix; timm --cutmix).

    The box has sides ``floor(size * sqrt(1 - lam))`` with lam ~ Beta(alpha, alpha),
    centred uniformly and clipped to the image; the label of image ``i`` is
    ``lam`` of its own and ``1 - lam`` of image ``B-1-i``'s. Training only; the
    loss must take soft targets (cross_entropy, bce_with_logits).

    Args:
        alpha: Beta distribution parameter (timm's --cutmix; 1.0 is usual).
        prob: probability that a batch (or a sample, in "elem" mode) is mixed.
        mode: "batch": one box for the whole batch (timm's default); "elem": one per sample.
        correct_lam: set lam to the share of the image not pasted over once the box is clipped (as timm).
        smoothing: label smoothing of the one-hot labels before mixing (timm's).
    """
    _check("cutmix", mode, {"alpha": alpha})
    return BatchMix(0.0, alpha, prob, 0.0, mode, correct_lam, smoothing, context.num_classes, "cutmix")


def mixup_cutmix(mixup_alpha: Alpha = 0.8, cutmix_alpha: Alpha = 1.0, prob: Probability = 1.0,
                 switch_prob: Probability = 0.5, mode: Mode = "batch", correct_lam: bool = True,
                 smoothing: Smoothing = 0.0, *, context: DataContext) -> BatchMix:
    """Mixup or cutmix, chosen at random per batch (timm's Mixup with --mixup and --cutmix).

    Args:
        mixup_alpha: Beta parameter of mixup; 0 turns mixup off.
        cutmix_alpha: Beta parameter of cutmix; 0 turns cutmix off.
        prob: probability that a batch (or a sample) is mixed at all (timm's --mixup-prob).
        switch_prob: probability of cutmix rather than mixup when both are on (timm's --mixup-switch-prob).
        mode: "batch": one draw for the whole batch (timm's default); "elem": one per sample.
        correct_lam: correct cutmix's lam to the clipped box's area (as timm).
        smoothing: label smoothing of the one-hot labels before mixing (timm's).
    """
    _check("mixup_cutmix", mode, {"mixup_alpha": mixup_alpha, "cutmix_alpha": cutmix_alpha})
    return BatchMix(mixup_alpha, cutmix_alpha, prob, switch_prob, mode, correct_lam, smoothing,
                    context.num_classes, "mixup_cutmix")


@hookimpl
def cnnreg_transforms() -> dict:
    return {"mixup": mixup, "cutmix": cutmix, "mixup_cutmix": mixup_cutmix}
