"""The installed version, read without importing torch (``cnnreg --version`` stays fast)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "cnnreg-framework"  # not "cnnreg": an unrelated package of that name is on the public index


def version() -> str:
    """The version of the installed distribution, or "unknown" when run from a bare checkout."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
