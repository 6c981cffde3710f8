"""Kept for plugins written against cnnreg 0.1: the errors live in :mod:`cnnreg.core.errors`."""

from cnnreg.core.errors import *  # noqa: F401,F403
