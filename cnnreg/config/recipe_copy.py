"""``cnnreg cp``: a shipped recipe copied to edit, pointing at the same places, with its schema."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnreg.config.recipe import RecipeSource, validate_raw
from cnnreg.config.shipped import SCHEMA_FILE, SCHEMA_ID, find_shipped, shipped_base_dir, unknown_name_hint
from cnnreg.core.checkpoint import atomic_write_text
from cnnreg.core.errors import UserError
from cnnreg.plugin.catalog import build_catalog
from cnnreg.plugin.manager import plugin_manager


@dataclass(frozen=True)
class Copied:
    """What ``cnnreg cp`` wrote: the recipe, the schema beside it, the paths it rewrote."""

    recipe: Path
    schema: Path | None
    rewritten: tuple[tuple[str, str, str], ...]  # (dotted key, as shipped, in the copy)


def copy_shipped(name: str, dest: str | Path | None, *, schema: dict[str, Any], force: bool = False,
                 disable: tuple[str, ...] = ()) -> Copied:
    """Copy a shipped recipe to ``dest`` (a file, or a folder to put ``NAME.json`` in: one
    that exists or a name ending in ``/``; default ``./NAME.json``) for editing, with
    ``recipe.schema.json`` beside it.

    :param schema: the recipe schema of the installed plugins, written beside the copy.
    :raises UserError: an unknown name, a copy that would overwrite a file (without
        ``force``), a folder that cannot be written.
    """
    shipped = find_shipped(name)
    if shipped is None:
        raise UserError(f"no shipped recipe called {name!r}{unknown_name_hint(name)}")
    target = Path(dest) if dest is not None else Path(f"{shipped.name}.json")
    if target.is_dir() or str(dest).endswith(("/", os.sep)):
        target = target / f"{shipped.name}.json"
    if target.exists() and not force:
        raise UserError(f"{target} exists; give another destination, or --force to overwrite it")
    raw = json.loads(shipped.path.read_text(encoding="utf-8"))
    rewritten = []
    for key, value in relative_paths(raw, disable=disable):
        moved = os.path.relpath(os.path.normpath(shipped_base_dir() / value), target.resolve().parent)
        moved = Path(moved).as_posix()
        if moved != value:
            _set(raw, key, moved)
            rewritten.append((".".join(map(str, key)), value, moved))
    schema_path = target.parent / SCHEMA_FILE
    schema_written = _write_schema(schema_path, schema)
    if schema_written:
        raw = {"$schema": SCHEMA_FILE, **{k: v for k, v in raw.items() if k != "$schema"}}
    else:
        raw.pop("$schema", None)  # a schema of the user's own is there: do not point editors at it
    _write(target, json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    return Copied(target, schema_path if schema_written else None, tuple(rewritten))


def relative_paths(raw: dict[str, Any], disable: tuple[str, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    """The keys of ``raw`` whose values the recipe reads as relative paths, and those values.

    Found by validating the recipe against two folders and keeping what moved: the
    recipe's own model decides what is a path, for plugins' parameters too.
    """
    pm = plugin_manager(disable=disable)
    catalog = build_catalog(pm)
    first, second = (validate_raw(raw, RecipeSource(None, None, Path(base)), catalog, pm).to_json()
                     for base in ("/cnnreg-a/recipes", "/cnnreg-b/recipes"))
    found = []
    for key, value in _leaves(raw):
        if isinstance(value, str) and _get(first, key) != _get(second, key):
            found.append((key, value))
    return found


def _leaves(value: Any, key: tuple[Any, ...] = ()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*key, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*key, i))
    else:
        yield key, value


def _get(data: Any, key: tuple[Any, ...]) -> Any:
    for part in key:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _set(data: Any, key: tuple[Any, ...], value: Any) -> None:
    for part in key[:-1]:
        data = data[part]
    data[key[-1]] = value


def _write_schema(path: Path, schema: dict[str, Any]) -> bool:
    """Write (or refresh) cnnreg's schema at ``path``; ``False`` when a file of another
    kind has that name there (it is left alone)."""
    if path.exists():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("$id") == SCHEMA_ID
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            return False
    _write(path, json.dumps(schema, indent=2) + "\n")
    return True


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; choose a folder you can write to") from None
