"""Recipes: JSON files validated by a pydantic model built from the catalog.

Each component slot (``model``, ``optimizer``, every transform, ...) is a
union discriminated on ``name`` whose alternatives are the registered
components of that kind, each with the parameters of its factory's
signature. Unknown keys are errors at every level. Every problem is reported
at once, like a compiler: ``file:line:col json.path: message``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import pydantic
from pydantic import AfterValidator, BaseModel, Field, PrivateAttr

from cnnreg.core.errors import JsonPath, Problem, RecipeError, UserError
from cnnreg.core.options import DataOptions, RecipeBase, RecipePath, Strict
from cnnreg.config.jsonpos import JsonSyntaxError, SourceMap, parse
from cnnreg.config.shipped import SCHEMA_ID, find_shipped, is_bare_name, shipped_base_dir, unknown_name_hint
from cnnreg.plugin.manager import PluginManager, plugin_manager
from cnnreg.plugin.catalog import KINDS, Catalog, Component, ComponentError, build_catalog, plain_text

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_SECTION_TITLES = {"dataset": "Data", "model": "Model", "loss": "Loss", "optimizer": "Optimizer",
                   "scheduler": "Scheduler", "transform": "Transform", "metric": "Metric", "callback": "Callback"}


class Recipe(RecipeBase):
    """A recipe loaded with :func:`load_recipe`: its options and components,
    bound to the catalog it was validated against and to where it came from."""

    _source: RecipeSource | None = PrivateAttr(default=None)
    _catalog: Catalog | None = PrivateAttr(default=None)
    _pm: PluginManager | None = PrivateAttr(default=None)

    @property
    def source(self) -> RecipeSource | None:
        return self._source

    @property
    def catalog(self) -> Catalog:
        assert self._catalog is not None, "a recipe made outside load_recipe has no catalog"
        return self._catalog

    @property
    def plugins(self) -> PluginManager:
        assert self._pm is not None, "a recipe made outside load_recipe has no plugin manager"
        return self._pm

    def component(self, kind: str, spec: BaseModel) -> Component:
        """The registered component a slot of this recipe names."""
        return self.catalog.keys(kind)[spec.name]  # type: ignore[attr-defined]

    def problem(self, path: JsonPath, message: str, prefer_key: bool = False) -> Problem:
        """A :class:`Problem` at ``path``, located in the recipe's file."""
        return locate(Problem(path, message), self._source, prefer_key)

    def updated(self, values: Mapping[str, Any]) -> Recipe:
        """This recipe with dotted keys set (``{"data.size": [256, 256]}``), validated again.

        The values go into the recipe as it was written (with its overrides),
        so what the recipe left out stays left out; errors still point into its file.
        """
        source = self._source or RecipeSource(None, None, Path.cwd())
        raw = apply_overrides(source.raw if source.raw is not None else self.to_json(), values)
        return validate_raw(raw, replace(source, raw=raw), self.catalog, self.plugins)


@dataclass(frozen=True)
class RecipeSource:
    """Where a recipe came from, to point at its lines, and what it said.

    :param raw: the recipe's JSON data, overrides applied, before validation.
    """

    file: Path | None
    source_map: SourceMap | None
    base_dir: Path
    raw: dict[str, Any] | None = None


def locate(problem: Problem, source: RecipeSource | None, prefer_key: bool = False) -> Problem:
    if source is None:
        return problem
    position = source.source_map.locate(problem.path, prefer_key) if source.source_map else None
    return problem.located(source.file, *(position or (None, None)))


# -- building the model from the catalog ----------------------------------------------------


@dataclass(frozen=True)
class RecipeModel:
    """The pydantic class for a catalog, and which classes stand for which components."""

    cls: type[Recipe]
    components: dict[type[BaseModel], tuple[str, str]]  # class -> (kind, key)


DEFAULT_METRICS = ("accuracy", "precision", "recall", "f1")


@functools.lru_cache(maxsize=8)
def recipe_model(catalog: Catalog) -> RecipeModel:
    """The Recipe class for ``catalog`` (cached per catalog)."""
    owners: dict[type[BaseModel], tuple[str, str]] = {}
    unions: dict[str, Any] = {}
    for kind in KINDS:
        models = []
        for key, component in sorted(catalog.keys(kind).items()):
            model = _component_model(kind, key, component)
            owners[model] = (kind, key)
            models.append(model)
        unions[kind] = (Annotated[Union[tuple(models)], Field(discriminator="name")] if models  # noqa: UP007
                        else Annotated[dict, AfterValidator(_no_components(kind))])

    def default(kind: str, name: str, **params: Any) -> Any:
        if name in catalog.keys(kind):
            return Field(default={"name": name, **params}, validate_default=True)
        return ...

    transform_lists = pydantic.create_model(
        "Transforms", __base__=Strict, __doc__="Batch transforms for training and for evaluation, applied in order.",
        train=(list[unions["transform"]], Field(default_factory=list, description="Applied to training batches.")),
        eval=(list[unions["transform"]], Field(default_factory=list, description="Applied to validation, test and prediction.")),
    )
    metric_defaults = [{"name": m} for m in DEFAULT_METRICS if m in catalog.keys("metric")]
    cls = pydantic.create_model(
        "Recipe", __base__=Recipe, __doc__="A cnnreg training recipe.",
        data=(unions["dataset"], Field(description="The dataset and how it is batched and split.")),
        transforms=(transform_lists, Field(default_factory=transform_lists)),
        model=(unions["model"], ...),
        loss=(unions["loss"], default("loss", "cross_entropy")),
        optimizer=(unions["optimizer"], default("optimizer", "adam")),
        scheduler=(unions["scheduler"] | None, None),
        metrics=(list[unions["metric"]], Field(default=metric_defaults, validate_default=True,
                                              description="Metrics reported for every split.")),
        callbacks=(list[unions["callback"]], Field(default_factory=list)),
    )
    return RecipeModel(cls, owners)


def _no_components(kind: str):
    def check(value: Any) -> Any:
        raise ValueError(f"no {kind} is registered (are all plugins that provide one disabled?)")
    return check


def _component_model(kind: str, key: str, component: Component) -> type[BaseModel]:
    base = DataOptions if kind == "dataset" else Strict
    fields: dict[str, Any] = {"name": (Literal[key], Field(description=component.summary))}
    for param in component.params():
        if kind == "dataset" and param.name in DataOptions.model_fields:
            continue  # the common data option is passed to the factory too
        annotation = _with_recipe_paths(param.annotation)
        if param.from_context:
            fields[param.name] = (annotation | None, Field(None, description=param.description))
        elif param.required:
            fields[param.name] = (annotation, Field(..., description=param.description))
        else:
            fields[param.name] = (annotation, Field(param.default, description=param.description))
    title = "".join(part.capitalize() for part in key.replace(":", "_").replace(".", "_").split("_"))
    model = pydantic.create_model(f"{_SECTION_TITLES[kind]}{title}", __base__=base,
                                  __doc__=plain_text(inspect.getdoc(component.factory) or component.summary), **fields)
    return model


def _with_recipe_paths(annotation: Any) -> Any:
    """The same annotation with every ``Path`` resolved against the recipe's folder."""
    if annotation is Path:
        return RecipePath
    args = typing.get_args(annotation)
    if not args:
        return annotation
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return annotation
    new = tuple(_with_recipe_paths(a) for a in args)
    if new == args:
        return annotation
    if origin is Annotated:
        return Annotated[(new[0], *annotation.__metadata__)]
    if origin in (Union, types.UnionType):
        return Union[new]  # noqa: UP007
    return origin[new]


# -- loading ---------------------------------------------------------------------------


def load_recipe(
    source: str | Path | Mapping[str, Any],
    *,
    pm: PluginManager | None = None,
    disable: tuple[str, ...] | list[str] = (),
    extra: tuple[Any, ...] | list[Any] = (),
    overrides: Mapping[str, Any] | None = None,
) -> Recipe:
    """Load and validate a recipe from a JSON file or a dict.

    :param source: a path to a JSON file, the name of a shipped recipe (``"quickstart"``;
        see :mod:`cnnreg.config.shipped`), or the recipe as a dict.
    :param pm: the plugin manager to use; default: one made with the
        installed plugins, minus ``disable`` and the recipe's
        ``disable_plugins``, plus ``extra``.
    :param overrides: dotted keys to set before validation, e.g.
        ``{"trainer.epochs": 1}``.
    :raises RecipeError: every problem found, located in the file.
    """
    raw, recipe_source = _read(source)
    if overrides:
        try:
            raw = apply_overrides(raw, overrides)
        except OverrideError as exc:
            path = tuple(int(p) if p.isdigit() else p for p in exc.key.split("."))
            raise RecipeError([locate(Problem(path, f"cannot set {exc.key}: {exc.reason}"), recipe_source)]) from None
    recipe_disable = raw.get("disable_plugins", [])
    if pm is None:
        wanted = list(disable) + [n for n in recipe_disable if isinstance(n, str)] if isinstance(recipe_disable, list) else list(disable)
        pm = plugin_manager(disable=wanted, extra=extra)
    catalog = build_catalog(pm)
    return validate_raw(raw, replace(recipe_source, raw=raw), catalog, pm)


def validate_raw(raw: dict[str, Any], source: RecipeSource, catalog: Catalog, pm: PluginManager) -> Recipe:
    model = recipe_model(catalog)
    raw, problems, settled = _canonical_names(raw, catalog)
    problems += _check_disable(raw, pm)
    try:
        recipe = model.cls.model_validate(raw, context={"base_dir": source.base_dir})
    except pydantic.ValidationError as exc:
        problems += [p for p in _translate(exc, model) if not any(p.path[: len(s)] == s for s in settled)]
        recipe = None
    if problems:
        located = [locate(p, source, prefer_key=p.message.startswith(("unknown parameter", "unknown key")))
                   for p in problems]
        raise RecipeError(sorted(located, key=lambda p: (p.line or 0, p.column or 0)))
    assert recipe is not None
    recipe._source, recipe._catalog, recipe._pm = source, catalog, pm
    return recipe


def _read(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], RecipeSource]:
    if isinstance(source, Mapping):
        return json.loads(json.dumps(source)), RecipeSource(None, None, Path.cwd())
    path = Path(source)
    base_dir = None
    if not path.exists() and is_bare_name(source) and (shipped := find_shipped(str(source))) is not None:
        path, base_dir = shipped.path, shipped_base_dir()

    def fail(message: str, line: int | None = None, column: int | None = None) -> RecipeError:
        return RecipeError([Problem((), message, path, line, column)])

    if path.is_dir():
        raise fail("is a directory; give the path of a recipe's .json file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        hint = unknown_name_hint(path.name) if path.parent == Path(".") else ""
        raise fail("no such file" + hint) from None
    except OSError as exc:
        raise fail(f"cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise fail(f"not valid UTF-8 text (byte 0x{data[exc.start]:02x}); a recipe is a JSON file", line, column) from None
    if "\x00" in text:
        at = text.index("\x00")
        line = text.count("\n", 0, at) + 1
        raise fail("contains NUL bytes: a binary file, not a JSON recipe", line, at - text.rfind("\n", 0, at))
    try:
        raw, source_map = parse(text)
    except JsonSyntaxError as exc:
        raise fail(exc.message, exc.line, exc.column) from None
    if not isinstance(raw, dict):
        raise fail(f"a recipe is a JSON object ({{...}}), not {_json_type(raw)}", 1, 1)
    if raw.get("$id") == SCHEMA_ID:
        raise fail("is cnnreg's recipe schema (what editors complete recipes with), not a recipe; "
                   "give a recipe file (cnnreg recipes lists the shipped ones)", 1, 1)
    return raw, RecipeSource(path, source_map, base_dir or path.resolve().parent)


class OverrideError(UserError):
    """A dotted key (``--set``, a sweep parameter) that does not fit the recipe."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with dotted keys set (``trainer.epochs`` -> ``{"trainer": {"epochs": ..}}``).

    A number indexes a list, as OmegaConf and Hydra read it:
    ``callbacks.0.monitor`` or ``transforms.train.1.padding``; a missing
    object on the way is created, a missing list item is an error.

    :raises OverrideError: a key that indexes past a list's end or into a value
        that is neither an object nor a list.
    """
    raw = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node: Any = raw
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth]) or "the recipe"
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit():
                    raise OverrideError(dotted, f"{here} is a list; index it with a number (0 to {len(node) - 1})")
                if int(part) >= len(node):
                    raise OverrideError(dotted, f"{here} has {len(node)} item{'s' if len(node) != 1 else ''}"
                                        + (f" (0 to {len(node) - 1})" if node else "") + f"; there is no item {part}")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last and not isinstance(node.get(part), (dict, list)):
                    if parts[depth + 1].isdigit():
                        raise OverrideError(dotted, f"{'.'.join(parts[:depth + 1])} is not a list in the recipe, "
                                                    f"so it has no item {parts[depth + 1]}")
                    node[part] = {}
            else:
                raise OverrideError(dotted, f"{here} is {_json_type(node)}, which has no {part!r} inside")
            if last:
                node[index] = value
            else:
                node = node[index]
    return raw


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null", dict: "an object"}.get(type(value), type(value).__name__)


def _slot_items(raw: dict[str, Any]) -> list[tuple[str, JsonPath, Any]]:
    """Every ``(kind, path, value)`` component slot present in raw recipe data."""
    items: list[tuple[str, JsonPath, Any]] = []
    for kind, key in (("dataset", "data"), ("model", "model"), ("loss", "loss"),
                      ("optimizer", "optimizer"), ("scheduler", "scheduler")):
        if key in raw and raw[key] is not None:
            items.append((kind, (key,), raw[key]))
    transforms = raw.get("transforms")
    if isinstance(transforms, dict):
        for split in ("train", "eval"):
            if isinstance(transforms.get(split), list):
                items += [("transform", ("transforms", split, i), v) for i, v in enumerate(transforms[split])]
    for kind, key in (("metric", "metrics"), ("callback", "callbacks")):
        if isinstance(raw.get(key), list):
            items += [(kind, (key, i), v) for i, v in enumerate(raw[key])]
    return items


def _canonical_names(raw: dict[str, Any], catalog: Catalog) -> tuple[dict[str, Any], list[Problem], list[JsonPath]]:
    """Resolve every component name to its catalog key before pydantic sees it.

    ``plugin:name`` and ``family:member`` forms become the key the union is
    discriminated on; unknown names become problems with suggestions, and
    their slots are left out of pydantic's report (``settled``).
    """
    raw = json.loads(json.dumps(raw))
    problems: list[Problem] = []
    settled: list[JsonPath] = []
    for kind, path, value in _slot_items(raw):
        if not isinstance(value, dict) or "name" not in value:
            continue
        try:
            key, _component, implied = catalog.resolve(kind, value["name"])
        except ComponentError as exc:
            problems.append(Problem((*path, "name"), str(exc)))
            settled.append(path)
            continue
        node = _get(raw, path)
        node["name"] = key
        for param, member in implied.items():
            if param in node and node[param] != member:
                problems.append(Problem((*path, param), f"{value['name']!r} already sets {param}={member!r}"))
            node[param] = member
    return raw, problems, settled


def _get(raw: Any, path: JsonPath) -> Any:
    for part in path:
        raw = raw[part]
    return raw


def _check_disable(raw: dict[str, Any], pm: PluginManager) -> list[Problem]:
    from cnnreg.plugin.manager import installed_plugin_names

    names = raw.get("disable_plugins")
    if not isinstance(names, list):
        return []
    known = set(installed_plugin_names()) | set(pm.origins)
    problems = []
    for i, name in enumerate(names):
        if isinstance(name, str) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; installed plugins: {', '.join(sorted(known))}"
            problems.append(Problem(("disable_plugins", i), f"no plugin called {name!r}{hint}"))
    return problems


# -- pydantic errors as compiler messages ------------------------------------------------------


def _translate(exc: pydantic.ValidationError, model: RecipeModel) -> list[Problem]:
    grouped: dict[JsonPath, list[tuple[dict[str, Any], Any, tuple[str, str] | None]]] = {}
    for error in exc.errors(include_url=False):
        path, owner, label = _walk(model, error["loc"])
        grouped.setdefault(path, []).append((error, owner, label))
    problems = []
    for path, errors in grouped.items():
        problems.append(Problem(path, _message(path, errors)))
    return problems


def _message(path: JsonPath, errors: list[tuple[dict[str, Any], Any, tuple[str, str] | None]]) -> str:
    error, owner, label = errors[0]
    kind = error["type"]
    leaf = path[-1] if path else ""
    fields = list(owner.model_fields) if owner is not None else []
    aliases = ["$schema" if f == "schema_" else f for f in fields]
    where = f"{label[1]!r}" if label else (f"{path[-2]}" if len(path) > 1 else "the recipe")
    if kind == "extra_forbidden":
        what = "parameter" if label else "key"
        close = difflib.get_close_matches(str(leaf), [a for a in aliases if a != "name"], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else (
            f"; {where} takes: {', '.join(a for a in aliases if a != 'name') or 'no parameters'}")
        return f"unknown {what} of {where}{hint}"
    if kind == "missing":
        if label:
            return f"missing required parameter {leaf!r} of {label[1]!r}"
        return f"missing required key {leaf!r}"
    if kind == "union_tag_not_found":
        return "a component is an object with a \"name\" (and its parameters)"
    if kind in ("model_type", "model_attributes_type", "dict_type") and isinstance(error.get("input"), (list, str, int, float, bool)):
        return f"expected an object ({{...}}), got {_json_type(error['input'])} {_short(error['input'])}"
    expected, other = [], []
    for err, _, _ in errors:
        msg = err["msg"]
        msg = msg[0].lower() + msg[1:] if msg else msg
        if msg.startswith("value error, "):
            msg = msg[len("value error, "):]
        if msg.startswith("input should be "):
            # pydantic explains each union member's failure; the user needs what would be accepted
            want = msg[len("input should be "):].split(", unable to")[0]
            if want not in expected:
                expected.append(want)
        elif msg not in other:
            other.append(msg)
    constraint = expected and all(w.startswith(("greater", "less", "a multiple", "finite")) for w in expected)
    parts = other + ([f"{'must be' if constraint else 'expected'} {' or '.join(expected)}"] if expected else [])
    got = error.get("input")
    suffix = "" if isinstance(got, dict) else f"; got {_short(got)}"
    return "; ".join(parts) + suffix


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or value == value else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(model: RecipeModel, loc: tuple[Any, ...]) -> tuple[JsonPath, Any, tuple[str, str] | None]:
    """Map pydantic's error location to a JSON path, the model that owns the
    last key, and that model's component ``(kind, key)`` if it is one."""
    tp: Any = model.cls
    path: list[str | int] = []
    owner: Any = None
    for segment in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if segment == _tag(tp) and segment not in tp.model_fields:
                continue  # the discriminator's tag of a one-member union
            owner = tp
            field = tp.model_fields.get(segment) if isinstance(segment, str) else None
            if field is None:  # an alias ($schema) or an unknown key
                path.append(segment)
                tp = None
                continue
            path.append(field.alias or segment)
            tp = field.annotation
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (Union, types.UnionType):
            member = next((a for a in args if _tag(a) == segment), None)
            if member is None:
                member = next((a for a in args if _type_repr(a) == segment), None)
            if member is not None or isinstance(segment, str):
                tp = member
                continue
        if origin in (list, tuple) and isinstance(segment, int):
            path.append(segment)
            tp = args[0] if args else None
            continue
        if origin is dict:
            path.append(segment)
            tp = args[1] if len(args) > 1 else None
            continue
        if isinstance(segment, str) and (segment.startswith(("function-", "constrained-", "lax-", "json-"))
                                         or "[" in segment):
            continue  # pydantic's names for validators and union members, not JSON keys
        path.append(segment)
        tp = None
    label = model.components.get(owner) if owner is not None else None
    return tuple(path), owner, label


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _tag(tp: Any) -> str | None:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "name" in tp.model_fields:
        args = typing.get_args(tp.model_fields["name"].annotation)
        return args[0] if args else None
    return None


def _type_repr(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)


# -- schema ---------------------------------------------------------------------------------


def json_schema(catalog: Catalog) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) in which every registered component is an
    alternative with its own parameters, for editors."""
    schema = recipe_model(catalog).cls.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_ID, **schema}
