"""The recipes installed with cnnreg (``cnnreg.recipes``): found by bare name, listed, copied.

A user who ran ``pip install cnnreg-framework`` has no checkout, so the
recipes are package data. ``cnnreg run quickstart`` runs the shipped one; a
file of that name in the working directory comes first.

A shipped recipe run by name reads its relative paths as it does in a
checkout, from a ``recipes/`` folder of the working directory: its
``"../data"`` is ``./data``, never a folder inside site-packages. The
``recipes/`` folder itself need not exist. ``cnnreg cp`` rewrites those
paths so that the copy, wherever it is written, points at the same places
(:mod:`cnnreg.config.recipe_copy`).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PACKAGE = "cnnreg.recipes"
SCHEMA_FILE = "recipe.schema.json"
SCHEMA_ID = "https://cnnreg.invalid/recipe.schema.json"


@dataclass(frozen=True)
class ShippedRecipe:
    """One recipe of the package: its name (the file's stem), file and description."""

    name: str
    path: Path
    description: str

    @property
    def summary(self) -> str:
        """The description's first sentence."""
        first, dot, _ = self.description.partition(". ")
        return first + ("." if dot else "")


def recipes_folder() -> Path:
    """The installed recipes' folder (a real folder: cnnreg is never installed zipped)."""
    return Path(str(resources.files(PACKAGE)))


def shipped_recipes() -> tuple[ShippedRecipe, ...]:
    """Every shipped recipe, by name."""
    found = []
    for path in sorted(recipes_folder().glob("*.json")):
        if path.name == SCHEMA_FILE:
            continue
        try:
            description = json.loads(path.read_text(encoding="utf-8")).get("description", "")
        except (OSError, ValueError, AttributeError):
            description = ""  # a broken shipped file is reported when it is loaded, with its line
        found.append(ShippedRecipe(path.stem, path, description if isinstance(description, str) else ""))
    return tuple(found)


def is_schema_file(path: Path) -> bool:
    """Whether ``path`` is cnnreg's recipe schema (it sits beside recipes: ``*.json`` finds it too)."""
    if path.name != SCHEMA_FILE or not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("$id") == SCHEMA_ID
    except (OSError, ValueError, AttributeError):
        return False


def is_bare_name(source: str | Path) -> bool:
    """``quickstart``: no folder and no ``.json``; a name, not a path."""
    text = str(source)
    return bool(text) and "/" not in text and os.sep not in text and not text.endswith(".json")


def find_shipped(name: str) -> ShippedRecipe | None:
    """The shipped recipe called ``name`` (``quickstart`` or ``quickstart.json``)."""
    stem = name.removesuffix(".json")
    return next((r for r in shipped_recipes() if r.name == stem), None)


def shipped_base_dir() -> Path:
    """Where a shipped recipe run by name reads its relative paths from (see the module)."""
    return Path.cwd() / "recipes"


def unknown_name_hint(name: str) -> str:
    """What to say about a name that is neither a file nor a shipped recipe."""
    names = [r.name for r in shipped_recipes()]
    close = difflib.get_close_matches(name.removesuffix(".json"), names, n=3, cutoff=0.6)
    if close:
        return "; did you mean the shipped recipe " + " or ".join(repr(c) for c in close) + "?"
    return f"; the shipped recipes are {', '.join(names)} (`cnnreg recipes`)"
