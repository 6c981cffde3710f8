"""Device, precision, seeding and random-state handling: the engine's, never a factory's."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, ContextManager

import numpy as np
import torch
from torch import nn

from cnnreg.core.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device is {name!r} but no CUDA device is available; use \"auto\" or \"cpu\"")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"trainer.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("trainer.device is \"mps\" but MPS is not available; use \"auto\" or \"cpu\"")
    return device


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere."""
    if setting != "auto":
        if setting == "fp16" and device.type == "cpu":
            raise UserError("trainer.precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """Autocast for bf16/fp16 runs; nothing for fp32 and bf16-true (the model is in bf16 itself)."""
    if precision in ("fp32", "bf16-true"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_dtype(precision: str) -> torch.dtype:
    """The dtype a batch enters the model in."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """For ``bf16-true``: cast the model to bf16 but keep its normalisation layers in fp32.

    Autocast re-casts every fp32 weight to bf16 on every forward pass; for a
    small network whose step is bound by kernel launches those casts are a
    large share of the work, so the fastest CIFAR-10 trainings keep the
    weights in low precision. Batch-norm statistics and their small
    per-channel parameters lose too much in bf16, so those layers stay in
    fp32: their input is upcast and their output cast back by hooks.
    Other precisions leave the model alone.
    """
    if precision != "bf16-true":
        return model
    model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, NORM_LAYERS) and not hasattr(module, "_cnnreg_fp32_hooks"):
            module.float()
            module._cnnreg_fp32_hooks = (module.register_forward_pre_hook(_upcast_input),
                                         module.register_forward_hook(_downcast_output))
    return model


def full_precision(model: nn.Module) -> nn.Module:
    """The model in fp32 throughout, without :func:`apply_precision`'s hooks (for export)."""
    for module in model.modules():
        for hook in getattr(module, "_cnnreg_fp32_hooks", ()):
            hook.remove()
        if hasattr(module, "_cnnreg_fp32_hooks"):
            del module._cnnreg_fp32_hooks
    return model.float()


def _upcast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _downcast_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return output.to(torch.bfloat16) if isinstance(output, torch.Tensor) else output


def configure_backends(device: torch.device, deterministic: bool, cudnn_benchmark: bool) -> None:
    """Fast defaults on CUDA (cuDNN autotuning, TF32 matmuls), or reproducibility; on the CPU, a heap that is kept."""
    if device.type == "cpu":
        keep_freed_memory()
    if deterministic:
        # cuBLAS needs this set before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        return
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of returning it.

    By default every allocation above 32 MiB is a fresh mmap and every free
    a munmap, so a CPU training step faults in (and zeroes) its activations'
    pages again each time: measured on 2 cores, a frozen-backbone step of
    tf_efficientnet_lite0 at batch 64 took 2.6 s, 15 s of it in the kernel
    for 10 s of user time; with the heap kept, 0.7 s. The process then holds
    its peak memory until it exits. Returns whether glibc took the settings
    (False off glibc: macOS, musl, Windows).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
            return False
        return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except OSError:
        return False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state, in a form ``torch.load(weights_only=True)`` accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
