"""The compact network of the fastest CIFAR-10 trainings, as a typed model factory.

``whitening_cnn``'s defaults build the network of airbench94 (Keller Jordan),
which descends from hlb-CIFAR10: it reaches 94% CIFAR-10 test accuracy in a
few seconds of GPU time. Three things make it train that fast, and all three
are here:

* The first layer is a fixed *whitening* convolution: its filters are the
  eigenvectors of the covariance of the training images' 2x2 patches, scaled
  to unit variance, so the first trained layer sees decorrelated inputs.
  Those filters come from data, not gradients, so the model asks the engine
  for training images (``cnnreg_init_images``) and sets them in
  ``cnnreg_init_from_data``. Each filter comes with its negation, so the
  activation that follows keeps both signs of every direction. Only the
  layer's bias trains, and only for the first few epochs
  (``cnnreg_epoch_start``).
* Every 3x3 convolution starts as (close to) the identity on its input
  channels (``dirac_`` on its first filters), so the deep path starts as a
  shortcut and gradients reach the first layers from the first step.
* Batch norm trains only its shift (its scale stays 1), and its running
  statistics weigh each new batch heavily (PyTorch momentum 0.4, not the
  default 0.1), so they keep up with the fast-changing weights of a short
  training.

Any input size works: the network ends in a max pool over the whole
remaining feature map, which at CIFAR's 32x32 is exactly airbench's 3x3 max
pool. Flattening goes through ``torch.flatten``, never ``.view``, so
channels_last activations work.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cnnreg import hookimpl
from cnnreg_plugins._layers import activation_layer, check_activation, check_count

Activation = Literal["gelu", "relu", "silu"]
ACTIVATIONS: tuple[str, ...] = ("gelu", "relu", "silu")

Count = Annotated[int, Field(ge=1)]

# Added to every eigenvalue before scaling by 1/sqrt: directions of (nearly)
# no variance are not blown up into noise. airbench's value, for normalised images.
WHITEN_EPS = 5e-4
# Images whose patch covariance goes through one matrix product: bounds the
# memory of the patch matrix (256 CIFAR images: about 12 MB) whatever the
# number of images the engine hands over.
_PATCH_CHUNK = 256


def whitening_cnn(
    num_classes: Count = 10,
    in_channels: Count = 3,
    widths: tuple[Count, Count, Count] = (64, 256, 256),
    whiten_kernel: Count = 2,
    whiten_bias_epochs: Annotated[int, Field(ge=0)] = 3,
    batchnorm_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.6,
    norm_weight_trainable: bool = False,
    scaling: Annotated[float, Field(gt=0)] = 1 / 9,
    activation: Activation = "gelu",
) -> nn.Module:
    """airbench94's CIFAR CNN: fixed whitening conv, three conv groups (64, 256, 256), max pool, linear.

    The first layer whitens ``whiten_kernel`` x ``whiten_kernel`` patches with
    filters computed from training images (see ``cnnreg_init_from_data``).
    Each group is conv 3x3, 2x2 max pool, batch norm, activation, conv 3x3,
    batch norm, activation; every conv starts close to the identity. A max
    pool over the remaining map (3x3 at 32x32 input) feeds a linear layer
    without bias, whose logits are multiplied by ``scaling``.

    Args:
        num_classes: number of output logits; filled from the dataset.
        in_channels: channels of the input images; filled from the dataset.
        widths: output channels of the three conv groups.
        whiten_kernel: size of the patches the first layer whitens; it has
            2 * in_channels * whiten_kernel**2 output channels.
        whiten_bias_epochs: epochs during which the whitening layer's bias
            trains (its weights never do); 0 freezes it from the start.
        batchnorm_momentum: weight of the old running statistics in batch
            norm's update (airbench's convention; PyTorch's momentum is one
            minus this).
        norm_weight_trainable: train batch norm's scale too; by default it
            stays 1 and only the shift trains.
        scaling: factor applied to the logits (1/9 keeps the initial logits small).
        activation: non-linearity after the whitening layer and each batch norm.
    """
    check_count("num_classes", num_classes)
    check_count("in_channels", in_channels)
    if len(widths) != 3:
        raise ValueError(f"widths must give 3 channel counts for whitening_cnn, not {len(widths)}: {list(widths)}")
    for width in widths:
        check_count("each of widths", width)
    check_count("whiten_kernel", whiten_kernel)
    if isinstance(whiten_bias_epochs, bool) or not isinstance(whiten_bias_epochs, int) or whiten_bias_epochs < 0:
        raise ValueError(f"whiten_bias_epochs must be a whole number >= 0, not {whiten_bias_epochs!r}")
    if not 0 <= batchnorm_momentum < 1:
        raise ValueError(f"batchnorm_momentum is a weight in [0, 1), not {batchnorm_momentum!r}")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, not {scaling!r}")
    check_activation(activation, ACTIVATIONS)
    return WhiteningCNN(
        num_classes=num_classes,
        in_channels=in_channels,
        widths=tuple(widths),
        whiten_kernel=whiten_kernel,
        whiten_bias_epochs=whiten_bias_epochs,
        batchnorm_momentum=batchnorm_momentum,
        norm_weight_trainable=norm_weight_trainable,
        scaling=scaling,
        activation=activation,
    )


@hookimpl
def cnnreg_models():
    return {"whitening_cnn": whitening_cnn}


# -- the network -----------------------------------------------------------------


class WhiteningCNN(nn.Module):
    """The network ``whitening_cnn`` builds; see the module docstring for why it looks so.

    Besides ``forward`` it implements two engine protocols: the engine hands
    ``cnnreg_init_images`` training images to ``cnnreg_init_from_data`` before
    training, and calls ``cnnreg_epoch_start(epoch)`` at the start of each epoch.
    """

    # airbench whitens with 5000 training images: plenty for a 12x12
    # covariance, and cheap to hand over.
    cnnreg_init_images: int = 5000

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: tuple[int, int, int],
        whiten_kernel: int,
        whiten_bias_epochs: int,
        batchnorm_momentum: float,
        norm_weight_trainable: bool,
        scaling: float,
        activation: str,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.whiten_kernel = whiten_kernel
        self.whiten_bias_epochs = whiten_bias_epochs
        self.scaling = scaling
        whiten_width = 2 * in_channels * whiten_kernel**2
        self.whiten = nn.Conv2d(in_channels, whiten_width, whiten_kernel, padding=0, bias=True)
        # Set from data, never by gradients (cnnreg_init_from_data); the
        # optimizer skips it because it never gets a .grad.
        self.whiten.weight.requires_grad_(False)
        # The bias trains for the first whiten_bias_epochs epochs. Switching
        # requires_grad off then would make torch.compile recompile the whole
        # network in mid-training (measured on the CPU: a 20 s epoch instead of
        # 0.05 s); instead its gradient is dropped once it has accumulated, so
        # the optimizer skips it exactly as it would a frozen parameter (no
        # momentum, no weight decay) and the compiled graph stays the same.
        self.whiten_bias_frozen = whiten_bias_epochs == 0
        self.whiten.bias.requires_grad_(whiten_bias_epochs > 0)
        if whiten_bias_epochs > 0:
            self.whiten.bias.register_post_accumulate_grad_hook(self._drop_frozen_bias_grad)
        self.whiten_act = activation_layer(activation)
        channels = whiten_width
        groups = []
        for width in widths:
            groups.append(ConvGroup(channels, width, batchnorm_momentum, norm_weight_trainable, activation))
            channels = width
        self.group1, self.group2, self.group3 = groups
        self.classifier = nn.Linear(channels, num_classes, bias=False)

    @property
    def min_size(self) -> int:
        """The smallest input height and width: three halvings must leave at least one pixel."""
        return 8 + self.whiten_kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            # A shape check (no device sync): clearer than max pooling's "output size is too small".
            raise ValueError(f"whitening_cnn needs images of at least {self.min_size}x{self.min_size} pixels "
                             f"(whiten_kernel {self.whiten_kernel} and three 2x2 poolings), not "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        x = self.whiten_act(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        # A max pool over the whole remaining map: airbench's MaxPool2d(3) at
        # 32x32 input, and any other size works. max_pool2d rather than
        # adaptive_max_pool2d, whose CUDA backward is not deterministic.
        x = F.max_pool2d(x, kernel_size=x.shape[-2:])
        return self.classifier(torch.flatten(x, 1)) * self.scaling

    def cnnreg_param_groups(self) -> list[dict]:
        """The whitening bias in a group of its own that a separate bias/norm
        learning rate leaves alone: airbench gives the 64x rate to the batch
        norms' biases only, and the whitening bias, trained for a few epochs
        at the base rate, is the network's very first shift of its input."""
        rest = [p for name, p in self.named_parameters() if name != "whiten.bias"]
        return [{"params": rest}, {"params": [self.whiten.bias], "split_bias_norm": False}]

    def cnnreg_epoch_start(self, epoch: int) -> None:
        """Train the whitening bias in epochs 1 to ``whiten_bias_epochs`` only.

        From then on its gradient is dropped as soon as it accumulates, and
        the optimizer skips a parameter whose ``.grad`` is None.
        """
        self.whiten_bias_frozen = epoch > self.whiten_bias_epochs

    def _drop_frozen_bias_grad(self, bias: torch.Tensor) -> None:
        if self.whiten_bias_frozen:
            bias.grad = None

    def cnnreg_init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening filters from training images ``[N, C, H, W]``.

        ``images`` are normalised as the network sees them in evaluation (no
        augmentation), on the CPU or the model's device. Every
        ``k x k`` patch (stride 1) is a vector ``p`` of length ``d = C*k*k``;
        with ``Σ = E[p pᵀ]`` (uncentred, as airbench's: the images are
        normalised, so their mean is about zero) and its
        eigenpairs ``(λ_i, v_i)``, largest first, filter ``i`` is
        ``v_i / sqrt(λ_i + eps)``, so the outputs are uncorrelated with
        variance ``λ_i / (λ_i + eps)``: about 1 where ``λ_i >> eps``. The
        filters are followed by their negations (``2d`` channels).
        """
        k, channels = self.whiten_kernel, self.in_channels
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"whitening_cnn initialises from images [N, {channels}, H, W], "
                             f"not a tensor of shape {list(images.shape)}")
        if len(images) == 0 or min(images.shape[-2:]) < k:
            raise ValueError(f"whitening_cnn needs at least one image of at least {k}x{k} pixels to "
                             f"initialise from, not {list(images.shape)}")
        d = channels * k * k
        with torch.no_grad():
            # float32 whatever the model's or the images' dtype: half
            # precision sums of millions of products lose the small eigenvalues.
            covariance = torch.zeros(d, d, dtype=torch.float32, device=images.device)
            count = 0
            for chunk in images.split(_PATCH_CHUNK):
                patches = _patches(chunk.float(), k)
                covariance += patches.T @ patches
                count += len(patches)
            covariance /= count
            # The d x d eigenproblem is tiny: solve it on the CPU in float64,
            # where eigh works on every backend and is accurate for the small
            # eigenvalues the scaling divides by.
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance.cpu().double())
            order = eigenvalues.argsort(descending=True)
            # Rounding can make a zero eigenvalue slightly negative: clamp before the sqrt.
            scale = eigenvalues[order].clamp(min=0).add(WHITEN_EPS).rsqrt()
            filters = eigenvectors[:, order].T * scale[:, None]  # row i: v_i / sqrt(λ_i + eps)
            filters = filters.reshape(d, channels, k, k)
            weight = torch.cat((filters, -filters)).float()
            # copy_ keeps the weight's dtype, device and memory format.
            self.whiten.weight.copy_(weight)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}, whiten_bias_epochs={self.whiten_bias_epochs}"


class ConvGroup(nn.Module):
    """conv 3x3, 2x2 max pool, batch norm, activation, conv 3x3, batch norm, activation.

    Pooling right after the first conv (before its norm) is airbench's order:
    the norm and activation then run on a quarter of the pixels.
    """

    def __init__(self, in_channels: int, out_channels: int, batchnorm_momentum: float,
                 norm_weight_trainable: bool, activation: str) -> None:
        super().__init__()
        self.conv1 = _identity_conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _batch_norm(out_channels, batchnorm_momentum, norm_weight_trainable)
        self.act1 = activation_layer(activation)
        self.conv2 = _identity_conv(out_channels, out_channels)
        self.norm2 = _batch_norm(out_channels, batchnorm_momentum, norm_weight_trainable)
        self.act2 = activation_layer(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        return self.act2(self.norm2(self.conv2(x)))


# -- building blocks -------------------------------------------------------------


def _patches(images: torch.Tensor, k: int) -> torch.Tensor:
    """Every ``k x k`` patch (stride 1) of ``images [N, C, H, W]`` as a row ``[N*H'*W', C*k*k]``.

    Each row is ordered channel, then row, then column: the layout of a conv
    weight's ``[C, k, k]``, so a filter row dotted with a patch row is the conv's output.
    """
    c = images.shape[1]
    windows = images.unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)


def _identity_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 "same" conv without bias (batch norm follows) whose first filters pass their input channel through.

    PyTorch's default initialisation first, then ``dirac_`` on the first
    ``in_channels`` filters: the layer starts close to the identity on its
    input plus some fresh random features.
    """
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


def _batch_norm(channels: int, momentum: float, weight_trainable: bool) -> nn.BatchNorm2d:
    # eps 1e-12 (airbench's): divide by the batch's own standard deviation,
    # with no floor that would damp channels of small variance.
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - momentum)
    # The scale stays 1 unless asked, as in airbench and hlb-CIFAR10: only the
    # shift trains. Frozen by requires_grad, so the optimizer never sees a grad.
    norm.weight.requires_grad_(weight_trainable)
    return norm
