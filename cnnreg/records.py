"""Kept for plugins written against cnnreg 0.1: the records live in :mod:`cnnreg.core.records`."""

from cnnreg.core.records import *  # noqa: F401,F403
