"""Kept for plugins written against cnnreg 0.1: the catalog (and ``Family``) lives in :mod:`cnnreg.plugin.catalog`."""

from cnnreg.plugin.catalog import *  # noqa: F401,F403
