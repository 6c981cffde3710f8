"""Kept for plugins written against cnnreg 0.1: the data types live in :mod:`cnnreg.core.data`."""

from cnnreg.core.data import *  # noqa: F401,F403
