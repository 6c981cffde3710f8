"""Checkpoint files: written atomically, loaded without running code.

Every write goes to a temporary file in the same folder, is flushed to disk
(fsync) and renamed over the target, so a crash or a kill at any moment
leaves either the old file or the new one, never half of one. Loading uses
safetensors (weights) or ``torch.load(weights_only=True)`` (training state):
a pickle that would run code is refused, not run.

Weights files hold the *portable* module's state dict: a model that wraps a
library's network (a timm or torchvision backbone inside the transfer
plugin's ``TransferModel``) names that network as its
``cnnreg_weights_module``, so best.safetensors loads into
``timm.create_model(arch, num_classes=N)`` as it is, without a ``net.``
prefix to strip. A model's ``cnnreg_weights_metadata`` (strings) says how to
rebuild that module and goes into every weights file's metadata. Files
written before this (the wrapper's keys) still load.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from cnnreg.core.errors import UserError

WEIGHTS = "best.safetensors"
LAST = "last.pt"


class CheckpointError(UserError):
    """A checkpoint could not be written or read."""


def atomic_write(path: Path, write_to: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write_to(temporary_path)``, then fsync and rename.

    :raises CheckpointError: when writing fails (a full disk, say); the file
        that was at ``path`` before is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_to(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
            # Every writer's failure, whatever it raises (OSError, torch's RuntimeError,
            # safetensors' SafetensorError, ...): one error that names the file and the cause.
            kept = f"; the previous {path.name} is intact" if path.exists() else f"; no {path.name} was kept"
            raise CheckpointError(f"could not write {path}: {_io_reason(exc, path)}{kept}") from exc
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of atomic writes a killed process left in ``folder``."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def portable_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state dict a weights file holds: the model's
    ``cnnreg_weights_module`` when it declares one, else the model itself
    (under torch.compile and DDP wrappers)."""
    model = unwrap(model)
    inner = getattr(model, "cnnreg_weights_module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def weights_metadata(model: torch.nn.Module) -> dict[str, str]:
    """What the model says about rebuilding its portable module (``cnnreg_weights_metadata``), as strings."""
    declared = getattr(unwrap(model), "cnnreg_weights_metadata", None) or {}
    return {str(key): str(value) for key, value in dict(declared).items()}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The portable module's weights as safetensors (shared tensors handled by
    safetensors), with the model's own metadata and ``metadata`` (which wins).

    ``"format": "pt"`` is the safetensors convention for torch tensors (Hugging
    Face loaders refuse a file without it).
    """
    module = portable_module(model)
    merged = {"format": "pt", **weights_metadata(model), **(metadata or {})}
    atomic_write(path, lambda tmp: save_model(module, str(tmp), metadata=merged))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model``, strictly, with a readable error.

    The file holds the portable module's keys, or (written before models
    declared one) the whole model's: both load.
    """
    path = Path(path)
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"no weights file at {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); was it cut short?") from None
    module, whole = portable_module(model), unwrap(model)
    missing, unexpected = _diff_keys(module.state_dict(), state)
    if (missing or unexpected) and module is not whole and not any(_diff_keys(whole.state_dict(), state)):
        module, missing, unexpected = whole, [], []  # an older file, with the wrapper's "net." keys
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model: {_key_report(missing, unexpected)}")
    module.load_state_dict(state, strict=False)


def save_state(state: dict[str, Any], path: Path) -> None:
    """A resumable training state (tensors and plain data only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """Load what :func:`save_state` wrote, refusing anything that would run code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects that would run code when unpickled "
            f"({first_line(str(exc))}). cnnreg loads only tensors and plain data; "
            "re-save it as a state dict or safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, ValueError) as exc:
        size = path.stat().st_size if path.exists() else 0
        what = "it is empty (0 bytes)" if size == 0 else f"{type(exc).__name__}: {first_line(str(exc)) or 'unreadable'}"
        raise CheckpointError(f"{path} is not a readable checkpoint ({what}); was it cut short? A run whose "
                              "last.pt is lost can only start again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a cnnreg training state")
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _diff_keys(expected: dict[str, Any], found: dict[str, Any]) -> tuple[list[str], list[str]]:
    # safetensors drops one name of tensors that share storage; those are not missing.
    shared = {k for k, v in expected.items() if any(v is w for j, w in expected.items() if j != k)}
    missing = [k for k in expected if k not in found and k not in shared]
    unexpected = [k for k in found if k not in expected]
    return missing, unexpected


def _key_report(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    return "; ".join(parts)


# What the writers say when the disk fills: torch's zip writer reports the
# short write as "file write failed" or "unexpected pos N vs M", safetensors
# as "No space left on device", or the file size limit as "File too large".
_DISK_FULL = ("no space left", "file write failed", "unexpected pos", "disk quota")


def _io_reason(exc: BaseException, path: Path | None = None) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "the file size limit (ulimit -f) was reached",
                errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(
            exc.errno, exc.strerror or str(exc))
    text = str(exc)
    if "file too large" in text.lower():
        return "the file size limit (ulimit -f) was reached"
    if any(words in text.lower() for words in _DISK_FULL):
        return _short_write(path)
    return first_line(text) or type(exc).__name__


def _short_write(path: Path | None) -> str:
    """Why a write stopped short when the writer did not say (torch's zip writer does not):
    the file size limit, when one is set, else a full disk."""
    import resource
    import shutil

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"the file size limit ({limit:,} bytes, ulimit -f) was reached"
    if path is not None:
        try:
            return f"no space left on the device ({shutil.disk_usage(path.parent).free:,} bytes free)"
        except OSError:
            pass
    return "no space left on the device (the write stopped short)"


def first_line(text: str, limit: int = 200) -> str:
    """The first line of an error's text, for a one-line message ("" when there is none)."""
    lines = str(text).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
