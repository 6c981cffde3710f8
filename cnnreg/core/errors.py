"""Errors a user can fix: the CLI prints them without a traceback and exits 2."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

JsonPath = tuple[str | int, ...]


class UserError(Exception):
    """A problem in what the user gave (a recipe, a file, an option).

    Plugins raise it (or ``ValueError``) from factories with a message that
    says what is wrong and how to fix it; the engine adds where.
    """


class Unavailable(UserError):
    """Something a recipe needs is not on this machine: a data folder, a
    weights file, a download without a network.

    ``cnnreg run`` stops with the message, like any user error.
    ``cnnreg validate`` lists it as "not checked" and checks everything
    else; with ``retry_with`` it first calls the same factory again with
    those parameters changed (a model without its pretrained weights), so
    the rest of the component is still checked.

    :param retry_with: parameters that make the factory work without the missing thing.
    """

    def __init__(self, message: str, retry_with: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.retry_with = dict(retry_with) if retry_with else None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, at a place in it.

    :param path: the JSON path, e.g. ``("optimizer", "lr")``.
    :param message: what is wrong, and the fix when there is one.
    :param file: the recipe file, when it came from one.
    :param line: 1-based line of the offending key or value, when known.
    :param column: 1-based column.
    """

    path: JsonPath
    message: str
    file: Path | None = None
    line: int | None = None
    column: int | None = None

    def located(self, file: Path | None, line: int | None, column: int | None) -> Problem:
        return replace(self, file=file, line=line, column=column)

    def __str__(self) -> str:
        where = str(self.file) if self.file is not None else "<recipe>"
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        dotted = format_path(self.path)
        return f"{where} {dotted}: {self.message}" if dotted else f"{where}: {self.message}"


class RecipeError(UserError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def format_path(path: JsonPath) -> str:
    """``("transforms", "train", 1, "size")`` -> ``transforms.train[1].size``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(frozen=True)
class Unchecked:
    """Something ``cnnreg validate`` could not check because it is absent here.

    :param problem: the error the run would give without it.
    :param instead: what was checked in its place ("pretrained=False"), if anything.
    """

    problem: Problem
    instead: str | None = None

    def __str__(self) -> str:
        return str(self.problem) + (f" (checked with {self.instead} instead)" if self.instead else "")

