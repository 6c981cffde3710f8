"""The catalog: every registered component, frozen, with its parameter schema.

A catalog is built from a plugin manager by calling each registration hook
implementation on its own, so every component knows which plugin and
distribution registered it, and a plugin that raises while registering is
recorded as broken instead of taking the others down.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pydantic

from cnnreg.core.data import DataContext
from cnnreg.core.errors import UserError
from cnnreg.plugin.kinds import ARTICLES, KINDS, PLURALS  # noqa: F401 - re-exported
from cnnreg.plugin.manager import BrokenPlugin, Origin, PluginManager


# Values a recipe may leave out that the engine fills from the run: the
# dataset's classes and channels flow into the model, the schedule's length
# into the scheduler.
_CLASSES = "the dataset's number of classes"
CONTEXT_PARAMS: dict[str, dict[str, str]] = {
    "model": {"num_classes": _CLASSES, "in_channels": "the dataset's number of channels"},
    # class_counts: for class weights that follow the data (weight: "balanced")
    "loss": {"num_classes": _CLASSES, "class_counts": "the training split's images per class"},
    "metric": {"num_classes": _CLASSES},
    "scheduler": {"epochs": "the trainer's number of epochs",
                  "steps_per_epoch": "the number of optimizer steps in an epoch"},
    # so a callback's checks against the run's length are made where validate makes them
    "callback": {"epochs": "the trainer's number of epochs"},
}
# Live objects handed to factories; never part of a recipe.
INJECTED_PARAMS = {"optimizer": "params", "scheduler": "optimizer"}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")  # whole names only (fullmatch): "$" would let a trailing newline in


@dataclass(frozen=True)
class Family:
    """A component whose ``param`` selects one of many members, listed lazily.

    ``{"name": "timm", "arch": "resnet18"}`` and ``{"name": "timm:resnet18"}``
    mean the same recipe component; ``cnnreg ls models 'timm:*'`` calls
    ``list_members`` (and only then imports what it needs).

    :param factory: the typed factory; one of its parameters is ``param``.
    :param list_members: returns the member names, e.g. ``timm.list_models``.
    :param param: the factory parameter that names the member.
    """

    factory: Callable[..., Any]
    list_members: Callable[[], Iterable[str]]
    param: str = "arch"


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a factory."""

    name: str
    annotation: Any
    default: Any  # inspect.Parameter.empty when required
    description: str
    from_context: bool = False

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty and not self.from_context


@dataclass(frozen=True)
class Component:
    """A registered factory and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    origin: Origin
    family: Family | None = None

    @property
    def qualified(self) -> str:
        return f"{self.plugin}:{self.name}"

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.factory) or ""
        return plain_text(doc.strip().splitlines()[0]) if doc.strip() else ""

    def params(self) -> tuple[Param, ...]:
        return _params(self.kind, self.factory)

    def context_param(self) -> str | None:
        """The name of the parameter annotated ``DataContext``, if any."""
        return _context_param(self.factory)


class ComponentError(UserError):
    """A component name that does not resolve."""


@dataclass(frozen=True)
class Catalog:
    """Every component of every kind, and the plugins that broke."""

    components: tuple[Component, ...]
    broken: tuple[BrokenPlugin, ...] = ()
    _index: dict[tuple[str, str], tuple[Component, ...]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], list[Component]] = {}
        for component in self.components:
            index.setdefault((component.kind, component.name), []).append(component)
        object.__setattr__(self, "_index", {key: tuple(value) for key, value in index.items()})

    def keys(self, kind: str) -> dict[str, Component]:
        """The recipe names of ``kind``: the bare name when only one plugin
        registers it, ``plugin:name`` for each when several do."""
        out: dict[str, Component] = {}
        for (k, name), found in self._index.items():
            if k != kind:
                continue
            if len(found) == 1:
                out[name] = found[0]
            else:
                out.update({c.qualified: c for c in found})
        return out

    def resolve(self, kind: str, name: str) -> tuple[str, Component, dict[str, str]]:
        """Resolve a recipe name to ``(key, component, implied parameters)``.

        Accepts ``name``, ``plugin:name`` and a family member ``family:member``.
        Raises :class:`ComponentError` with close matches, a cross-kind hint,
        both plugins of an ambiguous name, or the broken plugins that might
        have provided it.
        """
        if not isinstance(name, str) or not name:
            raise ComponentError(f"the {kind} name must be a non-empty string")
        found = self._index.get((kind, name), ())
        if len(found) == 1:
            return name, found[0], {}
        if len(found) > 1:
            found = tuple(sorted(found, key=lambda c: c.plugin))
            listed = " and ".join(f"plugin {c.plugin!r} ({c.origin})" for c in found)
            choices = ", ".join(repr(c.qualified) for c in found)
            raise ComponentError(f"{kind} {name!r} is registered by {listed}; pick one: {choices}")
        if ":" in name:
            prefix, rest = name.split(":", 1)
            qualified = [c for c in self._index.get((kind, rest), ()) if c.plugin == prefix]
            if qualified:
                component = qualified[0]
                key = rest if len(self._index[(kind, rest)]) == 1 else component.qualified
                return key, component, {}
            family = self._index.get((kind, prefix), ())
            if len(family) == 1 and family[0].family is not None and rest:
                return prefix, family[0], {family[0].family.param: rest}
        raise ComponentError(self._unknown(kind, name))

    def _unknown(self, kind: str, name: str) -> str:
        message = f"unknown {kind} {name!r}"
        elsewhere = [k for (k, n) in self._index if n == name and k != kind]
        if elsewhere:
            other = elsewhere[0]
            message += f"; {name!r} is {ARTICLES[other]} {other}, not {ARTICLES[kind]} {kind}"
        close = difflib.get_close_matches(name, list(self.keys(kind)), n=3, cutoff=0.6)
        if close:
            message += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
        elif not elsewhere:
            names = sorted(self.keys(kind))
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            message += f"; known {PLURALS[kind]}: {shown or 'none'} (see `cnnreg ls {PLURALS[kind]}`)"
        if self.broken:
            message += "; note that " + "; ".join(str(b) for b in self.broken) + " (it may provide it)"
        return message

    def search(self, kind: str | None = None, pattern: str = "*") -> list[tuple[str, Component]]:
        """``(recipe name, component)`` pairs matching a glob; ``family:*``
        patterns list a family's members (importing what that needs)."""
        kinds = [kind] if kind else list(KINDS)
        rows: list[tuple[str, Component]] = []
        for k in kinds:
            for key, component in sorted(self.keys(k).items()):
                if fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(component.qualified, pattern):
                    rows.append((key, component))
                if component.family is not None and ":" in pattern and pattern.split(":", 1)[0] == key:
                    members = component.family.list_members()
                    rows.extend((f"{key}:{m}", component) for m in members if fnmatch.fnmatchcase(f"{key}:{m}", pattern))
        return rows


def build_catalog(pm: PluginManager) -> Catalog:
    """Call every registration hook implementation and freeze the result."""
    components: list[Component] = []
    broken: dict[str, BrokenPlugin] = dict(pm.broken)
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin, origin = impl.plugin_name, pm.origin(impl.plugin_name)
            try:
                registered = impl.function()
                found = list(_check_registration(kind, hook_name, registered))
            except Exception as exc:
                text = str(exc).strip().splitlines()
                error = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
                broken[plugin] = BrokenPlugin(plugin, origin, hook_name, error)
                continue
            for name, factory, family in found:
                components.append(Component(kind, name, factory, plugin, origin, family))
    return Catalog(tuple(components), tuple(broken.values()))


def _check_registration(kind: str, hook_name: str, registered: Any) -> Iterable[tuple[str, Callable, Family | None]]:
    if registered is None:
        return
    if not isinstance(registered, dict):
        raise TypeError(f"{hook_name}() must return a dict of name -> factory, not {type(registered).__name__}")
    for name, value in registered.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{hook_name}() registered the invalid name {name!r}; a name starts with a letter "
                             "and holds only letters, digits, '_', '.' and '-'")
        family = value if isinstance(value, Family) else None
        factory = family.factory if family else value
        if not callable(factory):
            raise TypeError(f"{hook_name}() registered {name!r} as {type(factory).__name__}, which is not callable")
        _params(kind, factory)  # a signature that cannot become a schema is a registration error
        yield name, factory, family


# -- factory signatures ---------------------------------------------------------


@functools.cache
def _params(kind: str, factory: Callable[..., Any]) -> tuple[Param, ...]:
    try:
        signature = inspect.signature(factory)
        hints = typing.get_type_hints(factory, include_extras=True)
    except Exception as exc:
        raise TypeError(f"cannot read the signature of {_qualname(factory)}: {exc}") from None
    docs = parse_arg_docs(inspect.getdoc(factory) or "")
    injected = INJECTED_PARAMS.get(kind)
    params = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{_qualname(factory)} takes *{p.name}; a factory's parameters must be named so a recipe can be checked")
        if p.name == injected or p.name == "name":
            if p.name == "name":
                raise TypeError(f"{_qualname(factory)} has a parameter called 'name', which recipes use for the component")
            continue
        if p.name not in hints:
            raise TypeError(f"parameter {p.name!r} of {_qualname(factory)} needs a type hint")
        if hints[p.name] is DataContext:
            continue
        filled = CONTEXT_PARAMS.get(kind, {})
        from_context = p.name in filled
        description = docs.get(p.name, "")
        if from_context:
            description = (description + " " if description else "") + f"(default: {filled[p.name]})"
        params.append(Param(p.name, hints[p.name], p.default, description, from_context))
        try:
            pydantic.TypeAdapter(hints[p.name])
        except Exception as exc:
            raise TypeError(f"parameter {p.name!r} of {_qualname(factory)} has a type pydantic cannot check: {exc}") from None
    return tuple(params)


@functools.cache
def _context_param(factory: Callable[..., Any]) -> str | None:
    hints = typing.get_type_hints(factory)
    return next((name for name, hint in hints.items() if hint is DataContext), None)


def _qualname(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


# reST and Markdown inline markup, as docstrings write it: ``code``, :role:`target`
# (:class:`~a.b.C` shows C, :ref:`text <label>` shows text), `code`, **strong**, *emphasis*.
_ROLE = re.compile(r":[\w:.-]+:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``|`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")


def plain_text(text: str) -> str:
    """``text`` with docstring markup removed, for terminals and editors' tooltips:
    summaries and parameter descriptions are shown as a person reads them."""
    text = _ROLE.sub(lambda m: m.group(2).rpartition(".")[2] if m.group(1) else m.group(2), text)
    text = _LITERAL.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    text = _STRONG.sub(r"\1", text)
    return _EMPHASIS.sub(r"\1", text)


_ARGS_HEADER = re.compile(r"^(Args|Arguments|Parameters):\s*$")
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_PARAM = re.compile(r"^:param\s+(?:[\w\[\], |]+\s+)?(\w+):\s*(.*)$")


def parse_arg_docs(doc: str) -> dict[str, str]:
    """Parameter descriptions from a Google-style ``Args:`` section or
    Sphinx ``:param name:`` lines."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    current: str | None = None
    in_args = False
    base_indent = 0
    for line in lines:
        stripped = line.strip()
        sphinx = _SPHINX_PARAM.match(stripped)
        if sphinx:
            current, in_args = sphinx.group(1), False
            out[current] = sphinx.group(2).strip()
            continue
        if _ARGS_HEADER.match(stripped):
            in_args, current, base_indent = True, None, -1
            continue
        if in_args:
            if not stripped:
                continue
            indent = len(line) - len(line.lstrip())
            if base_indent < 0:
                base_indent = indent
            if indent < base_indent or (indent == 0 and stripped.endswith(":")):
                in_args, current = False, None
                continue
            match = _ARG_LINE.match(stripped)
            if indent == base_indent and match:
                current = match.group(1).lstrip("*")
                out[current] = match.group(3).strip()
            elif current:
                out[current] = (out[current] + " " + stripped).strip()
        elif current and stripped and not stripped.startswith(":"):
            out[current] = (out[current] + " " + stripped).strip()
        else:
            current = None
    return {name: plain_text(text) for name, text in out.items()}
