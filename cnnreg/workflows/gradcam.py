"""Grad-CAM (Selvaraju et al. 2017): where in an image the model found the evidence for a class.

The class score's gradient with respect to the last convolution's output,
averaged over the positions, weighs that output's channels; their weighted
sum, through a ReLU, is the map (low resolution: the layer's own grid).

Written here with two hooks rather than taken from captum or grad-cam: the
run report needs one method on one layer, and a dependency for 30 lines is
not worth it. Measured against captum 0.9's ``LayerGradCam`` (relu on) on the
same layer and images: identical maps (largest difference 0.0) for simple_cnn
with and without batch norm and timm's resnet10t; 8 images of 224 px through
resnet10t on 2 busy CPU cores took 1.34 s here and 1.15 s with captum (one
forward and one backward pass is all either does). tests/test_report.py
keeps the comparison, on timm's test_resnet and test_efficientnet too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def last_spatial_conv(model: nn.Module, example: torch.Tensor) -> nn.Conv2d:
    """The last ``nn.Conv2d`` the model runs whose output is still an image (more than 1x1).

    Found by running ``example`` (one input batch) with a hook on every
    convolution: the order modules are called in is the order that counts,
    not the order they were declared in (timm and torchvision declare heads,
    stems and blocks in varied orders). A 1x1-output convolution (a
    squeeze-and-excitation gate, a convolutional classifier head) has no map
    to show.
    """
    called: list[tuple[nn.Conv2d, tuple[int, ...]]] = []

    def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        called.append((module, tuple(output.shape)))  # type: ignore[arg-type]

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    spatial = [module for module, shape in called if len(shape) == 4 and shape[-1] * shape[-2] > 1]
    if not spatial:
        raise ValueError("the model has no convolution with a spatial output: Grad-CAM has no map to show")
    return spatial[-1]


def grad_cam(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps ``[B, h, w]`` (float32, not normalised) of ``targets`` for ``inputs`` at ``layer``.

    The model must be in eval mode (batch norm on its running statistics),
    so that each image's map depends on that image alone.
    """
    saved: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        saved.append(output)
        # A clone goes on: an in-place activation after the layer (ReLU(inplace=True),
        # as the tutorial models and timm use) would otherwise overwrite what is kept.
        return output.clone()

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            # The input asks for a gradient so one flows to the layer even when
            # every weight before it is frozen (a transfer run's backbone).
            x = inputs.detach().clone().requires_grad_(True)
            logits = model(x)
            score = logits.float().gather(1, targets.view(-1, 1).to(logits.device)).sum()
            (gradient,) = torch.autograd.grad(score, saved[-1])
    finally:
        handle.remove()
    activation = saved[-1].detach().float()
    weights = gradient.float().mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))
