"""Plugins: the hook specifications, the plugin manager that loads entry points, the catalog of registered components."""
