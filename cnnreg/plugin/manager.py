"""Finding, loading and isolating plugins.

Built-in and third-party plugins are found the same way: the ``cnnreg``
entry-point group. A plugin that fails (at import, at registration, or by
implementing a hook that does not exist) is not fatal: it is recorded as
broken, shown in ``cnnreg ls`` with its error, and only a recipe that needs
one of its components fails.
"""

from __future__ import annotations

import difflib
import inspect
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterable

import pluggy

from cnnreg.plugin import hookspecs

GROUP = "cnnreg"
IN_PROCESS = "(in-process)"


@dataclass(frozen=True)
class Origin:
    """Where a plugin comes from: its distribution and version."""

    distribution: str
    version: str = ""

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}".strip()


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be used, and why."""

    name: str
    origin: Origin
    stage: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} ({self.origin}) failed at {self.stage}: {self.error}"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus where each plugin came from and which ones broke.

    Like pytest's, it also takes ``cnnreg_``-prefixed functions without the
    ``@hookimpl`` marker, so a forgotten decorator still works and a
    misspelled hook name is always caught.
    """

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, Origin] = {}
        self.broken: dict[str, BrokenPlugin] = {}

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if not name.startswith("cnnreg_"):
            return None
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and inspect.isroutine(getattr(plugin, name, None)):
            opts = {}
        return opts

    def origin(self, plugin_name: str) -> Origin:
        return self.origins.get(plugin_name, Origin(IN_PROCESS))

    def add(self, plugin: Any, name: str, origin: Origin) -> bool:
        """Register ``plugin``; on any failure record it as broken and return False."""
        self.origins[name] = origin
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # pluggy's validation errors and anything a plugin raises
            self.broken[name] = BrokenPlugin(name, origin, "registration", _describe(exc))
            return False
        unknown = _unknown_hooks(self, plugin)
        if unknown:
            self.unregister(plugin)
            self.broken[name] = BrokenPlugin(name, origin, "registration", "; ".join(unknown))
            return False
        return True


def plugin_manager(
    autoload: bool = True,
    extra: Iterable[Any] = (),
    disable: Iterable[str] = (),
) -> PluginManager:
    """A plugin manager with cnnreg's hook specs and the installed plugins.

    :param autoload: load every plugin of the ``cnnreg`` entry-point group
        (the built-ins included).
    :param extra: plugin objects or modules to register in-process, e.g. a
        notebook's own module of ``@hookimpl`` functions; a ``(name, plugin)``
        pair names it.
    :param disable: plugin names to block (their entry points are not even
        imported), as ``cnnreg --disable NAME`` and a recipe's
        ``disable_plugins`` do.
    """
    pm = PluginManager()
    for name in disable:
        pm.set_blocked(name)
    if autoload:
        for entry_point in _entry_points():
            if pm.is_blocked(entry_point.name) or entry_point.name in pm.origins:
                continue
            origin = _origin_of(entry_point)
            try:
                plugin = entry_point.load()
            except BaseException as exc:  # a plugin may raise anything at import, even SystemExit
                if isinstance(exc, KeyboardInterrupt):
                    raise
                pm.origins[entry_point.name] = origin
                pm.broken[entry_point.name] = BrokenPlugin(entry_point.name, origin, "import", _describe(exc))
                continue
            pm.add(plugin, entry_point.name, origin)
    for item in extra:
        name, plugin = item if isinstance(item, tuple) else (_default_name(item), item)
        if not pm.is_blocked(name):
            pm.add(plugin, name, Origin(IN_PROCESS))
    return pm


def installed_plugin_names() -> list[str]:
    """Names of every plugin in the entry-point group, loaded or not."""
    return sorted({ep.name for ep in _entry_points()})


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def _origin_of(entry_point: metadata.EntryPoint) -> Origin:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return Origin("unknown distribution")
    return Origin(dist.metadata["Name"] or dist.name, dist.version)


def _default_name(plugin: Any) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return f"{type(plugin).__name__}-{id(plugin):x}"


def _unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """What pluggy's ``check_pending`` finds, for one plugin, with suggestions."""
    known = [name for name in dir(pm.hook) if name.startswith("cnnreg_") and getattr(pm.hook, name).has_spec()]
    problems = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        if all(impl.optionalhook for impl in caller.get_hookimpls() if impl.plugin is plugin):
            continue
        close = difflib.get_close_matches(caller.name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"it implements {caller.name!r}, which is not a cnnreg hook{hint}")
    return problems


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # pluggy's validation errors spread the useful part over several lines
    text = "; ".join(lines[:3]) if isinstance(exc, pluggy.PluginValidationError) else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
