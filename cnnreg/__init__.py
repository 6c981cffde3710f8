"""cnnreg: a plugin-registry framework for training convolutional networks.

The Python API::

    import cnnreg

    recipe = cnnreg.load_recipe("recipes/quickstart.json")
    run = cnnreg.build(recipe)
    result = cnnreg.fit(run)
    print(cnnreg.evaluate(run, "test").metrics)
    print(cnnreg.predict(run, ["cat.png"], top_k=3))

A notebook registers its own plugin without packaging it::

    class MyModels:
        @cnnreg.hookimpl
        def cnnreg_models(self):
            return {"my_net": my_net}

    recipe = cnnreg.load_recipe(recipe_dict, extra=[MyModels()])
"""

from __future__ import annotations

from typing import Any

from cnnreg.plugin.hookspecs import hookimpl

__all__ = [
    "hookimpl", "plugin_manager", "load_recipe", "validate", "build", "fit", "evaluate", "predict",
    "cross_validate", "load_run", "load_predictor", "Family", "DataSource", "ImageSplit", "DataContext",
    "DatasetInfo", "describes", "UserError", "RecipeError", "Unavailable", "write_report", "write_run_report", "calibrate_run",
]

# The engine imports torch; keep `import cnnreg` (and so `cnnreg --version`,
# `--help` and the cached `cnnreg ls`) light until one of these is used.
_LAZY = {
    "load_recipe": "cnnreg.config.recipe", "plugin_manager": "cnnreg.plugin.manager",
    "build": "cnnreg.assemble.build", "fit": "cnnreg.engine.loop", "evaluate": "cnnreg.engine.loop",
    "predict": "cnnreg.workflows.predict", "cross_validate": "cnnreg.workflows.crossval",
    "load_run": "cnnreg.workflows.predict", "load_predictor": "cnnreg.workflows.predict",
    "write_report": "cnnreg.workflows.report", "write_run_report": "cnnreg.workflows.report",
    "calibrate_run": "cnnreg.workflows.calibrate",
    "Family": "cnnreg.plugin.catalog", "DataSource": "cnnreg.core.data", "ImageSplit": "cnnreg.core.data",
    "DataContext": "cnnreg.core.data", "DatasetInfo": "cnnreg.core.data", "describes": "cnnreg.core.data",
    "UserError": "cnnreg.core.errors", "RecipeError": "cnnreg.core.errors", "Unavailable": "cnnreg.core.errors",
}


def validate(source: Any, *, strict: bool = False, **kwargs: Any) -> Any:
    """Load a recipe (a path or a dict) and check it as ``run`` assembles it, on the CPU.

    :returns: a :class:`cnnreg.workflows.validation.Validation`: a one-line summary, the
        defaults the run will choose, what could not be checked here, warnings.
    :raises RecipeError: with every problem found, located in the file.
    """
    from cnnreg.config.recipe import load_recipe
    from cnnreg.workflows.validation import validate_recipe

    return validate_recipe(load_recipe(source, **kwargs), strict=strict)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnreg' has no attribute {name!r}")
