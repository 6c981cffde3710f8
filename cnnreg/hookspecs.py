"""Kept for plugins written against cnnreg 0.1: the hook specifications live in :mod:`cnnreg.plugin.hookspecs`."""

from cnnreg.plugin.hookspecs import *  # noqa: F401,F403
