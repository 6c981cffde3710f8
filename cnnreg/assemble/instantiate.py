"""Calling a recipe's factories: filling context, checking what comes back.

Every factory call goes through :func:`instantiate`, so every failure is
reported the same way: at the recipe place that named the component, with
the plugin and distribution that registered it, and no traceback.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
from pydantic import BaseModel

from cnnreg.core.data import DataContext, DataSource
from cnnreg.core.errors import JsonPath, Problem, RecipeError, Unavailable, Unchecked, UserError
from cnnreg.config.recipe import Recipe
from cnnreg.core.options import DataOptions
from cnnreg.core.records import Metric, Schedule
from cnnreg.plugin.catalog import ARTICLES, INJECTED_PARAMS, Component

# What each kind of factory must return, and how to say it.
_RESULT_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda r: isinstance(r, torch.nn.Module), "a torch.nn.Module"),
    "dataset": (lambda r: isinstance(r, DataSource), "a cnnreg.core.data.DataSource"),
    "transform": (callable, "a callable batch transform"),
    "loss": (callable, "a callable loss(logits, targets)"),
    "optimizer": (lambda r: isinstance(r, torch.optim.Optimizer), "a torch.optim.Optimizer"),
    "scheduler": (lambda r: isinstance(r, Schedule), "a cnnreg.core.records.Schedule"),
    "metric": (lambda r: isinstance(r, Metric), "a cnnreg.core.records.Metric"),
    "callback": (lambda r: r is not None, "a callback object"),
}


def instantiate(
    recipe: Recipe,
    kind: str,
    path: JsonPath,
    spec: BaseModel,
    context: Mapping[str, Any] | None = None,
    data_context: DataContext | None = None,
    live: Any = None,
    unchecked: list[Unchecked] | None = None,
    absent_ok: bool = False,
) -> Any:
    """Call the factory ``spec`` names with its recipe parameters.

    :param recipe: the recipe (for the catalog and error locations).
    :param kind: the component kind.
    :param path: where ``spec`` sits in the recipe, for errors.
    :param spec: the validated component (``name`` plus parameters).
    :param context: values for context parameters the recipe left out
        (``num_classes``, ``in_channels``, ``epochs``, ``steps_per_epoch``).
    :param data_context: passed to a parameter annotated ``DataContext``.
    :param live: the live object injected into optimizers (params) and
        schedulers (optimizer).
    :param unchecked: given (by ``cnnreg validate``), a factory that raises
        :class:`~cnnreg.core.errors.Unavailable` with ``retry_with`` is not an
        error: it joins this list and the factory is called again with those
        parameters.
    :param absent_ok: raise :class:`~cnnreg.core.errors.Unavailable` (also for a
        ``FileNotFoundError``) for the caller to handle, instead of a recipe error.
    """
    component = recipe.component(kind, spec)
    kwargs = component_kwargs(component, spec, context or {})
    injected = INJECTED_PARAMS.get(kind)
    if injected is not None:
        kwargs[injected] = live
    context_param = component.context_param()
    if context_param is not None:
        kwargs[context_param] = data_context
    problem = functools.partial(recipe.problem, path)
    try:
        result = _call(component, spec, kwargs, problem, absent_ok)
    except Unavailable as exc:
        if unchecked is not None and exc.retry_with is not None:
            shown = ", ".join(f"{k}={v!r}" for k, v in exc.retry_with.items())
            unchecked.append(Unchecked(problem(f"{spec.name}: {_message(exc)}"), shown))  # type: ignore[attr-defined]
            result = _call(component, spec, {**kwargs, **exc.retry_with}, problem, absent_ok)
        elif absent_ok:
            raise
        else:  # a run: as any other error of the component
            raise RecipeError([problem(f"{spec.name}: {_message(exc)}")]) from None  # type: ignore[attr-defined]
    check, expected = _RESULT_CHECKS[kind]
    if not check(result):
        raise RecipeError([recipe.problem(path, f"{spec.name!r} ({_by(component)}) returned "  # type: ignore[attr-defined]
                                          f"{type(result).__name__}, but {ARTICLES[kind]} {kind} factory must return {expected}")])
    return result


def _call(component: Component, spec: BaseModel, kwargs: dict[str, Any], problem: Callable[[str], Problem],
          absent_ok: bool) -> Any:
    """The factory's result; its failures as located recipe errors (``Unavailable`` passes through)."""
    try:
        return component.factory(**kwargs)
    except Unavailable:
        raise
    except FileNotFoundError as exc:
        if absent_ok:
            raise Unavailable(_message(exc)) from exc
        raise RecipeError([problem(f"{spec.name}: {_message(exc)}")]) from exc  # type: ignore[attr-defined]
    except (UserError, ValueError, NotADirectoryError, PermissionError) as exc:
        raise RecipeError([problem(f"{spec.name}: {_message(exc)}")]) from exc  # type: ignore[attr-defined]
    except Exception as exc:
        raise RecipeError([problem(f"{spec.name!r} ({_by(component)}) failed: "  # type: ignore[attr-defined]
                                   f"{type(exc).__name__}: {_message(exc)}")]) from None


def component_kwargs(component: Component, spec: BaseModel, context: Mapping[str, Any]) -> dict[str, Any]:
    """The factory's keyword arguments: recipe values, then context for what the recipe left out."""
    kwargs: dict[str, Any] = {}
    set_fields = spec.model_fields_set
    shared = DataOptions.model_fields if component.kind == "dataset" else {}
    for param in component.params():
        if not hasattr(spec, param.name) or param.name in shared:
            continue
        value = getattr(spec, param.name)
        if param.from_context and (param.name not in set_fields or value is None):  # null: "from the run" too
            if param.name in context:
                kwargs[param.name] = context[param.name]
            continue
        kwargs[param.name] = value
    if component.kind == "dataset":  # common data options the factory also declares
        kwargs.update({p.name: getattr(spec, p.name) for p in component.params()
                       if p.name in DataOptions.model_fields and getattr(spec, p.name) is not None})
    return kwargs


def _by(component: Component) -> str:
    return f"plugin {component.plugin!r}, {component.origin}"


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = f"missing key {text}"
    return text or type(exc).__name__
