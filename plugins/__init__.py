"""cnnreg's built-in plugins, installed as ``cnnreg_plugins``.

Each module is one plugin, declared in the ``cnnreg`` entry-point group of
pyproject.toml exactly as a third-party package declares its own.
"""
