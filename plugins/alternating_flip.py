"""The alternating (derandomised) horizontal flip.

A random flip shows an image mirrored in about half of the epochs, by
chance: over a short training some images are seen only one way round.
The fastest CIFAR-10 trainings (airbench, Keller Jordan 2024) flip half the
images at random in the first epoch and then *alternate*: every image is seen
mirrored exactly every other epoch, which is worth a few tenths of a point at
the same cost.

Which images start flipped depends only on their index in the split and a
seed, through an integer hash computed on the device: nothing is stored per
image and nothing is read back to the host, and a resumed run, or another
rank of a data-parallel one, flips exactly the same images. The engine passes
each sample's index and the epoch (see :mod:`cnnreg.inputs.prepare`); where it has
none (a preview of the augmentations), the flip is an ordinary random one.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from cnnreg import hookimpl

_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: odd and near 2**32 / golden ratio
_MODULUS = 2**32


def starts_flipped(index: Tensor, seed: int) -> Tensor:
    """Bool per sample: whether it is flipped in odd epochs (a fair coin per index and seed)."""
    h = (index.to(torch.int64) * _MULTIPLIER + (seed * 40503 + 12345) * 97) % _MODULUS
    # Mix the high bits in: the low bits of a multiplicative hash of consecutive indices alternate.
    return ((h >> 16) ^ (h >> 7) ^ (h >> 23)).bitwise_and_(1).bool()


@dataclass(frozen=True)
class AlternatingFlip:
    seed: int
    uses_sample_index: ClassVar[bool] = True  # the engine passes index= and epoch=

    def flipped(self, index: Tensor, epoch: int) -> Tensor:
        """Bool per sample: flipped in this epoch (epochs count from 1)."""
        first = starts_flipped(index, self.seed)
        return first if epoch % 2 == 1 else ~first

    def __call__(self, x: Tensor, index: Tensor | None = None, epoch: int = 0) -> Tensor:
        if index is None:
            chosen = torch.rand(x.shape[0], device=x.device) < 0.5
        else:
            chosen = self.flipped(index.to(x.device), epoch)
        return torch.where(chosen.view(-1, 1, 1, 1), x.flip(-1), x)


def alternating_horizontal_flip(seed: int = 0) -> AlternatingFlip:
    """Mirror half of the images left-right in odd epochs and the other half in even ones.

    Each image is seen flipped exactly every other epoch (airbench's
    derandomised flip) instead of at random. For training transforms.

    Args:
        seed: chooses which half of the images is flipped in the first epoch.
    """
    return AlternatingFlip(seed=int(seed))


@hookimpl
def cnnreg_transforms() -> dict:
    return {"alternating_horizontal_flip": alternating_horizontal_flip}
