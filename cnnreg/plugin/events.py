"""Run events sent to the plugins, one implementation at a time, so a failure names its plugin.

pluggy would run every implementation of a hook and let an exception out
without saying whose it was. :func:`emit` calls them in pluggy's own order
(last registered first, ``tryfirst``/``trylast`` honoured) and turns an
exception, or a result the hook does not take, into
:class:`~cnnreg.core.stops.PluginFailed` naming the plugin, its
distribution and the hook; the original exception stays its ``__cause__``
(shown with ``--traceback``).
"""

from __future__ import annotations

from typing import Any, Callable

from cnnreg.core.checkpoint import first_line
from cnnreg.core.run import Run
from cnnreg.core.stops import PluginFailed

# What a hook's implementations may return, by hook; the others return None.
_RESULTS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "cnnreg_should_stop": (lambda r: r is None or isinstance(r, str),
                           "a reason (a str saying why training stops) or None"),
    "cnnreg_run_plugins": (lambda r: r is None or isinstance(r, (list, tuple)), "a list of plugin objects or None"),
}


def emit(run: Run, hook: str, /, **kwargs: Any) -> list[Any]:
    """Call ``hook`` on every plugin of the run; returns the results that are not None."""
    caller = getattr(run.pm.hook, hook)
    impls = caller.get_hookimpls()
    if any(impl.hookwrapper or getattr(impl, "wrapper", False) for impl in impls):
        return _through_pluggy(run, hook, caller, kwargs)  # wrappers need pluggy's own call
    results = []
    check = _RESULTS.get(hook)
    for impl in reversed(impls):
        try:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
        except PluginFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any plugin's failure, named
            raise _failed(run, impl.plugin_name, hook, f"{type(exc).__name__}: {first_line(str(exc))}") from exc
        if check is not None and not check[0](result):
            raise _failed(run, impl.plugin_name, hook,
                          f"it returned {type(result).__name__} {result!r:.60}, but {hook} takes {check[1]}")
        if result is not None:
            results.append(result)
    return results


def listens(run: Run, hook: str) -> bool:
    """Whether any plugin implements ``hook`` (a per-step event costs a call per step for nothing otherwise)."""
    return bool(getattr(run.pm.hook, hook).get_hookimpls())


def _through_pluggy(run: Run, hook: str, caller: Any, kwargs: dict[str, Any]) -> list[Any]:
    try:
        return [r for r in caller(**kwargs) if r is not None]
    except PluginFailed:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _failed(run, "(a hook wrapper)", hook, f"{type(exc).__name__}: {first_line(str(exc))}") from exc


def _failed(run: Run, plugin: str, hook: str, message: str) -> PluginFailed:
    origin = getattr(run.pm, "origins", {}).get(plugin)
    index = plugin.split("-")[1] if plugin.startswith("callback-") else ""
    if origin is None and index.isdigit():  # registered by the engine as callback-<i>-<class>
        specs = getattr(run.recipe, "callbacks", ())
        name = specs[int(index)].name if int(index) < len(specs) else plugin
        plugin, origin = name, f"the recipe's callbacks[{index}]"
    return PluginFailed(plugin, str(origin or "registered in-process"), hook, message)
