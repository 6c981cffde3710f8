"""Plugins through real entry points: a third-party package, broken plugins, blocking."""

from __future__ import annotations

import json

import pytest
import torch.nn as nn

import cnnreg
from cnnreg.core.errors import RecipeError
from cnnreg.plugin.manager import plugin_manager
from cnnreg.plugin.catalog import build_catalog

from conftest import cli, make_distribution, tiny_recipe

BUILT_INS = {"tutorial_models", "datasets", "transforms", "losses", "optim", "metrics", "callbacks",
             "rich_progress", "transfer", "plots", "trackers"}


def test_built_ins_come_through_the_entry_point_group_with_their_distribution():
    pm = plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert BUILT_INS <= names
    assert str(pm.origin("tutorial_models")).startswith("cnnreg-framework ")
    catalog = build_catalog(pm)
    model = catalog.keys("model")["tutorial_cnn"]
    assert (model.plugin, model.origin.distribution) == ("tutorial_models", "cnnreg-framework")


def test_third_party_package_is_listed_in_schema_and_usable(example_plugin_site, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(example_plugin_site))
    catalog = build_catalog(plugin_manager())
    component = catalog.keys("model")["wide_net"]
    assert (component.plugin, str(component.origin)) == ("example", "cnnreg-example-plugin 1.2.3")

    schema = json.dumps(cnnreg.config.recipe.json_schema(catalog))
    assert "wide_net" in schema and "A one-conv network whose width is a parameter." in schema
    assert "channels of the convolution." in schema  # the parameter's docstring

    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "wide_net", "width": 4, "pooling": "max"},
                                            trainer__epochs=1))
    run = cnnreg.build(recipe, output=False)
    assert run.model[0].out_channels == 4
    cnnreg.fit(run)

    with pytest.raises(RecipeError) as info:
        cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "wide_net", "pooling": "min"}))
    assert "model.pooling: expected 'avg' or 'max'" in str(info.value)


def test_third_party_model_in_cli_ls_and_schema(example_plugin_site):
    env = {"PYTHONPATH": str(example_plugin_site)}
    listing = cli("ls", "models", "wide*", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "wide_net" in listing.stdout and "cnnreg-example-plugin 1.2.3" in listing.stdout
    schema = cli("schema", env=env)
    assert schema.returncode == 0
    definitions = json.loads(schema.stdout)["$defs"]
    wide = next(d for d in definitions.values() if d.get("properties", {}).get("name", {}).get("const") == "wide_net")
    assert wide["properties"]["width"] == {"default": 16, "description": "channels of the convolution.",
                                           "maximum": 1024, "minimum": 1, "title": "Width", "type": "integer"}


def _site(tmp_path, monkeypatch, modules, entry_points, name="cnnreg-bad-plugin"):
    root = make_distribution(tmp_path / "site", name, modules, entry_points)
    monkeypatch.syspath_prepend(str(root))
    return root


def test_plugin_that_fails_to_import_is_isolated(tmp_path, monkeypatch):
    _site(tmp_path, monkeypatch, {"bad_import": "import not_a_module_anywhere\n"}, {"bad_import": "bad_import"})
    pm = plugin_manager()
    broken = pm.broken["bad_import"]
    assert broken.stage == "import"
    assert "ModuleNotFoundError: No module named 'not_a_module_anywhere'" in broken.error
    assert str(broken.origin) == "cnnreg-bad-plugin 0.1"
    # everything else still works ...
    cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path)), output=False)
    # ... and a recipe needing something unknown is told about the broken plugin
    with pytest.raises(RecipeError) as info:
        cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "bad_net"}))
    assert "plugin 'bad_import' (cnnreg-bad-plugin 0.1) failed at import" in str(info.value)


def test_plugin_that_raises_while_registering_is_isolated(tmp_path, monkeypatch):
    source = """
        from cnnreg import hookimpl

        @hookimpl
        def cnnreg_models():
            raise RuntimeError("no models today")
    """
    _site(tmp_path, monkeypatch, {"bad_register": source}, {"bad_register": "bad_register"})
    catalog = build_catalog(plugin_manager())
    [broken] = [b for b in catalog.broken if b.name == "bad_register"]
    assert broken.stage == "cnnreg_models" and broken.error == "RuntimeError: no models today"
    assert "tutorial_cnn" in catalog.keys("model")


def test_misspelled_hook_name_fails_loudly_with_a_suggestion(tmp_path, monkeypatch):
    source = """
        from cnnreg import hookimpl

        @hookimpl
        def cnnreg_model():
            return {"typo_net": None}
    """
    _site(tmp_path, monkeypatch, {"typo_hook": source}, {"typo_hook": "typo_hook"})
    pm = plugin_manager()
    assert "'cnnreg_model', which is not a cnnreg hook; did you mean 'cnnreg_models'?" in pm.broken["typo_hook"].error
    assert "typo_hook" not in dict(pm.list_name_plugin())


def test_hook_with_a_signature_not_in_the_spec_is_rejected(tmp_path, monkeypatch):
    source = """
        from cnnreg import hookimpl

        @hookimpl
        def cnnreg_epoch_end(run, record, extra):
            pass
    """
    _site(tmp_path, monkeypatch, {"bad_signature": source}, {"bad_signature": "bad_signature"})
    broken = plugin_manager().broken["bad_signature"]
    assert broken.stage == "registration" and "extra" in broken.error


def test_same_name_from_two_plugins_names_both_and_plugin_prefix_picks_one(tmp_path, monkeypatch):
    source = """
        from torch import nn
        from cnnreg import hookimpl

        def simple_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
            '''Another simple_cnn.'''
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

        @hookimpl
        def cnnreg_models():
            return {"simple_cnn": simple_cnn}
    """
    _site(tmp_path, monkeypatch, {"rival": source}, {"rival": "rival"}, name="rival-dist")
    with pytest.raises(RecipeError) as info:
        cnnreg.load_recipe(tiny_recipe(tmp_path))
    message = str(info.value)
    assert "model 'simple_cnn' is registered by plugin 'rival' (rival-dist 0.1) and " in message
    assert "plugin 'tutorial_models' (cnnreg-framework 0.1.0)" in message
    assert "pick one: 'rival:simple_cnn', 'tutorial_models:simple_cnn'" in message

    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "rival:simple_cnn"}))
    assert recipe.component("model", recipe.model).plugin == "rival"
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "tutorial_models:simple_cnn", "widths": [4, 4, 4]}))
    assert recipe.component("model", recipe.model).plugin == "tutorial_models"


def test_factory_returning_the_wrong_type_names_plugin_and_distribution(tmp_path, monkeypatch):
    source = """
        from cnnreg import hookimpl

        def not_a_model(num_classes: int = 10) -> object:
            '''Returns a string.'''
            return "a model, honestly"

        @hookimpl
        def cnnreg_models():
            return {"not_a_model": not_a_model}
    """
    _site(tmp_path, monkeypatch, {"liar": source}, {"liar": "liar"}, name="liar-dist")
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "not_a_model"}))
    with pytest.raises(RecipeError) as info:
        cnnreg.build(recipe, output=False)
    assert str(info.value) == ("<recipe> model: 'not_a_model' (plugin 'liar', liar-dist 0.1) returned str, "
                               "but a model factory must return a torch.nn.Module")


def test_factory_that_raises_is_reported_at_its_place(tmp_path, monkeypatch):
    source = """
        from cnnreg import hookimpl

        def exploding(num_classes: int = 10):
            '''Raises.'''
            raise ZeroDivisionError("boom")

        @hookimpl
        def cnnreg_models():
            return {"exploding": exploding}
    """
    _site(tmp_path, monkeypatch, {"explode": source}, {"explode": "explode"})
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "exploding"}))
    with pytest.raises(RecipeError, match=r"model: 'exploding' \(plugin 'explode', cnnreg-bad-plugin 0.1\) "
                                          r"failed: ZeroDivisionError: boom"):
        cnnreg.build(recipe, output=False)


def test_blocking_a_plugin_by_recipe_field_and_by_argument(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, disable_plugins=["transfer"]))
    assert "timm" not in recipe.catalog.keys("model")
    assert recipe.plugins.is_blocked("transfer") and recipe.plugins.get_plugin("transfer") is None
    pm = plugin_manager(disable=["rich_progress"])
    assert pm.is_blocked("rich_progress")
    with pytest.raises(RecipeError, match="no plugin called 'rich_progres'; did you mean 'rich_progress'"):
        cnnreg.load_recipe(tiny_recipe(tmp_path, disable_plugins=["rich_progres"]))
    # blocking the plugin a recipe needs makes its components unknown
    with pytest.raises(RecipeError, match="unknown model 'simple_cnn'"):
        cnnreg.load_recipe(tiny_recipe(tmp_path, disable_plugins=["tutorial_models"]))


def test_notebook_plugin_registered_in_process(tmp_path):

    class NotebookModels:
        @cnnreg.hookimpl
        def cnnreg_models(self):
            def notebook_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
                """Defined in a notebook cell."""
                return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))
            return {"notebook_net": notebook_net}

    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "notebook_net"}), extra=[NotebookModels()])
    run = cnnreg.build(recipe, output=False)
    assert run.model[-1].out_features == 3 and run.model[-1].in_features == 3
