"""What ``cnnreg ls`` and ``cnnreg schema`` show, cached per environment.

Listing the components means importing every plugin (and so torch, timm,
torchvision): seconds, for a table that changes only when something is
installed. As napari's npe2 manifests do, the answer is kept in a file per
Python environment, keyed on what can change it: the installed distributions
and their versions, the files of cnnreg and of every plugin's package (an
editable install changes them without a new version), the Python and the
plugins blocked. Any change of those rebuilds it on the next call.

A catalog with a broken plugin is never kept: the next call tries that plugin
again and reports what fails then. A cache folder that cannot be written only
costs the speed. ``CNNREG_CACHE_DIR`` moves the folder, ``CNNREG_NO_CACHE=1``
turns the cache off.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

FORMAT = 1  # bump when what is stored changes
GROUP = "cnnreg"


@dataclass(frozen=True)
class Entry:
    """One component as ``cnnreg ls`` shows it."""

    key: str  # its recipe name: bare, or plugin:name when two plugins register it
    qualified: str
    kind: str
    plugin: str
    origin: str
    summary: str
    family: bool  # ``key:*`` lists members (e.g. timm's architectures)


@dataclass(frozen=True)
class Broken:
    name: str
    origin: str
    stage: str
    error: str


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    broken: tuple[Broken, ...]
    schema: dict[str, Any]
    cached: bool = False  # read from the cache file rather than built now


def manifest(disable: Iterable[str] = ()) -> Manifest:
    """The manifest of the installed plugins, minus ``disable``: from the cache when it is current."""
    disable = tuple(sorted(set(disable)))
    if os.environ.get("CNNREG_NO_CACHE"):
        return build_manifest(disable)
    path, key = cache_file(), environment_key(disable)
    cached = _read(path, key)
    if cached is not None:
        return cached
    built = build_manifest(disable)
    if not built.broken:
        _write(path, key, built)
    return built


def build_manifest(disable: Iterable[str] = ()) -> Manifest:
    """Import the plugins and describe what they register (what the cache saves)."""
    from cnnreg.config.recipe import json_schema
    from cnnreg.plugin.catalog import build_catalog
    from cnnreg.plugin.manager import plugin_manager

    catalog = build_catalog(plugin_manager(disable=disable))
    entries = tuple(Entry(key, c.qualified, c.kind, c.plugin, str(c.origin), c.summary, c.family is not None)
                    for key, c in catalog.search())
    broken = tuple(Broken(b.name, str(b.origin), b.stage, b.error) for b in catalog.broken)
    return Manifest(entries, broken, json_schema(catalog))


def search(entries: Iterable[Entry], kind: str | None = None, pattern: str = "*") -> list[Entry]:
    """The entries of ``kind`` (all kinds when None) whose name matches the glob, as the catalog's search."""
    return [e for e in entries if (kind is None or e.kind == kind)
            and (fnmatch.fnmatchcase(e.key, pattern) or fnmatch.fnmatchcase(e.qualified, pattern))]


def lists_family(entries: Iterable[Entry], kind: str | None, pattern: str) -> bool:
    """Whether ``pattern`` (``timm:res*``) asks for a family's members, which only the plugin can list."""
    prefix = pattern.split(":", 1)[0] if ":" in pattern else None
    return any(e.family and e.key == prefix and (kind is None or e.kind == kind) for e in entries)


# -- the cache ------------------------------------------------------------------------------------


def cache_file() -> Path:
    """One file per Python environment (its prefix), in the user's cache folder."""
    folder = os.environ.get("CNNREG_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "cnnreg")
    environment = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:16]
    return Path(folder) / f"manifest-{environment}.json"


def environment_key(disable: Iterable[str] = ()) -> str:
    """A digest of everything the manifest depends on (see the module's docstring)."""
    parts: list[Any] = [FORMAT, sys.version, os.path.realpath(sys.prefix), sorted(disable)]
    parts.append(sorted(_distributions()))
    parts.append(_source_stats())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _distributions() -> Iterable[str]:
    """The installed distributions as ``name-version`` (their metadata folders' names: a
    listing per folder of sys.path, without reading each distribution's metadata)."""
    for folder in sys.path:
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        yield from (f"{folder}/{n}" for n in names if n.endswith((".dist-info", ".egg-info", ".egg-link", ".pth")))


def _source_stats() -> list[tuple[str, int, int]]:
    """Size and modification time of every Python file of cnnreg and of each plugin's top-level package."""
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}  # the cnnreg package
    for entry_point in metadata.entry_points(group=GROUP):
        top = entry_point.module.split(".", 1)[0]
        try:
            spec = importlib.util.find_spec(top)  # finds; imports nothing (a top-level name has no parent)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots.update(spec.submodule_search_locations)
        elif spec.origin:
            roots.add(spec.origin)
    stats = []
    for root in sorted(roots):
        for path in [root] if root.endswith(".py") else _python_files(root):
            try:
                st = os.stat(path)
            except OSError:
                continue
            stats.append((path, st.st_mtime_ns, st.st_size))
    return stats


def _python_files(root: str) -> Iterable[str]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        yield from (os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))


def _read(path: Path, key: str) -> Manifest | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        return Manifest(tuple(Entry(**e) for e in data["entries"]), (), data["schema"], cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent, stale or damaged: build it again


def _write(path: Path, key: str, built: Manifest) -> None:
    data = {"key": key, "entries": [asdict(e) for e in built.entries], "schema": built.schema}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # read-only or full: the answer is right, only the next call is slower

