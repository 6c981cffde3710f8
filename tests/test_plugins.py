"""Plugins through real entry points: a third-party package, broken plugins, blocking."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import types

import pytest
import torch
import torch.nn as nn

import cnnreg
from cnnreg.core.data import DataContext
from cnnreg.core.errors import RecipeError
from cnnreg.plugin.manager import BrokenPlugin, Origin, plugin_manager
from cnnreg.config.recipe import json_schema
from cnnreg.plugin.catalog import (KINDS, Catalog, Component, ComponentError, Family, Param, build_catalog,
                                   parse_arg_docs, plain_text)

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

    schema = json.dumps(json_schema(catalog))
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


# -- the catalog on its own: names that do not resolve, listing, registration errors --------------


def _component(kind, name, plugin="mine", family=None):
    def factory(num_classes: int = 10):
        """A stand-in factory."""
    return Component(kind, name, factory, plugin, Origin("my-dist", "1.0"), family)


def _unknown(catalog, kind, name):
    with pytest.raises(ComponentError) as info:
        catalog.resolve(kind, name)
    return str(info.value)


def test_unknown_name_suggests_at_most_three_close_names_joined_by_or():
    names = ["resnet18", "resnet34", "resnet50", "resnet101", "vgg11"]
    catalog = Catalog(tuple(_component("model", n) for n in names))
    # positive control: four names are close enough to suggest, so the limit of three shows
    assert len(difflib.get_close_matches("resnet", names, n=10)) == 4
    close = difflib.get_close_matches("resnet", names, n=3)  # the standard library's three best
    assert _unknown(catalog, "model", "resnet") == (
        f"unknown model 'resnet'; did you mean {close[0]!r} or {close[1]!r} or {close[2]!r}?")


@pytest.mark.parametrize("count", [12, 13])
def test_unknown_name_with_nothing_close_lists_the_first_twelve_known_names_sorted(count):
    names = [f"loss{i:02d}" for i in reversed(range(count))]  # registered out of order
    catalog = Catalog(tuple(_component("loss", n) for n in names))
    listed = ", ".join(f"loss{i:02d}" for i in range(12)) + (", ..." if count > 12 else "")
    assert _unknown(catalog, "loss", "zzz") == f"unknown loss 'zzz'; known losses: {listed} (see `cnnreg ls losses`)"


def test_unknown_name_of_a_kind_nobody_registers_says_none_are_known():
    catalog = Catalog((_component("model", "net"),))
    assert _unknown(catalog, "metric", "f1") == "unknown metric 'f1'; known metrics: none (see `cnnreg ls metrics`)"


@pytest.mark.parametrize("kind, name, message", [
    ("model", "adam", "unknown model 'adam'; 'adam' is an optimizer, not a model"),
    ("optimizer", "net", "unknown optimizer 'net'; 'net' is a model, not an optimizer"),
])
def test_unknown_name_of_another_kind_says_which_kind_it_is(kind, name, message):
    catalog = Catalog((_component("model", "net"), _component("optimizer", "adam"), _component("loss", "focal")))
    assert _unknown(catalog, kind, name) == message


def test_unknown_name_notes_every_broken_plugin_that_might_provide_it():
    broken = (BrokenPlugin("vision", Origin("vision-dist", "2.0"), "import", "ImportError: no module named cv2"),
              BrokenPlugin("zoo", Origin("zoo-dist", "0.3"), "cnnreg_models", "RuntimeError: offline"))
    catalog = Catalog((_component("model", "net"),), broken)
    assert _unknown(catalog, "model", "segmenter") == (
        "unknown model 'segmenter'; known models: net (see `cnnreg ls models`); note that "
        "plugin 'vision' (vision-dist 2.0) failed at import: ImportError: no module named cv2; "
        "plugin 'zoo' (zoo-dist 0.3) failed at cnnreg_models: RuntimeError: offline (it may provide it)")


def test_search_without_arguments_lists_every_kind_and_a_kind_only_its_own():
    model, loss, metric = _component("model", "net"), _component("loss", "focal"), _component("metric", "f1")
    catalog = Catalog((metric, loss, model))
    assert catalog.search() == [("net", model), ("focal", loss), ("f1", metric)]  # in the order of KINDS
    assert list(KINDS).index("model") < list(KINDS).index("loss") < list(KINDS).index("metric")
    assert catalog.search("loss") == [("focal", loss)]
    assert catalog.search(pattern="f*") == [("focal", loss), ("f1", metric)]
    assert catalog.search("loss", "focal") == [("focal", loss)]
    assert catalog.search("loss", "nothing*") == []


def test_family_pattern_names_the_family_before_its_first_colon():
    # hub-style member names contain colons of their own
    members = ["vit:base", "vit:large", "resnet18"]
    listed = []  # listing members may import a whole library: only a family:pattern does it
    hub = _component("model", "hub", family=Family(lambda **kw: None, lambda: listed.append(1) or members))
    catalog = Catalog((hub, _component("model", "net")))
    assert catalog.search("model", "hub*") == [("hub", hub)] and catalog.search("model", "hub") == [("hub", hub)]
    assert listed == []
    assert catalog.search("model", "hub:vit:*") == [("hub:vit:base", hub), ("hub:vit:large", hub)]
    assert catalog.search("model", "hub:*") == [("hub:vit:base", hub), ("hub:vit:large", hub), ("hub:resnet18", hub)]
    assert catalog.search("model", "net:*") == []  # a component that is no family has no members


def _register(hook, registered):
    """The catalog of one in-process plugin named 'mine' whose ``hook`` returns ``registered``."""
    def implementation():
        if isinstance(registered, BaseException):
            raise registered
        return registered
    plugin = types.SimpleNamespace(**{hook: implementation})
    return build_catalog(plugin_manager(autoload=False, extra=[("mine", plugin)]))


def _registration_error(hook, factory, name="thing"):
    [broken] = _register(hook, {name: factory}).broken
    assert (broken.name, broken.stage) == ("mine", hook)
    return broken.error


def _net(num_classes: int = 10):
    """A stand-in model factory."""


@pytest.mark.parametrize("registered, error", [
    ([_net], "TypeError: cnnreg_models() must return a dict of name -> factory, not list"),
    # the advice names the rule that was broken: 3d_net holds only allowed characters but starts with a digit
    ({"3d_net": _net}, "ValueError: cnnreg_models() registered the invalid name '3d_net'; "
                       "a name starts with a letter and holds only letters, digits, '_', '.' and '-'"),
    ({"my net": _net}, "ValueError: cnnreg_models() registered the invalid name 'my net'; "
                       "a name starts with a letter and holds only letters, digits, '_', '.' and '-'"),
    ({"net\n": _net}, "ValueError: cnnreg_models() registered the invalid name 'net\\n'; "
                       "a name starts with a letter and holds only letters, digits, '_', '.' and '-'"),
    ({7: _net}, "ValueError: cnnreg_models() registered the invalid name 7; "
                "a name starts with a letter and holds only letters, digits, '_', '.' and '-'"),
    ({"net": 42}, "TypeError: cnnreg_models() registered 'net' as int, which is not callable"),
    ({"hub": Family("resnet", lambda: [])}, "TypeError: cnnreg_models() registered 'hub' as str, which is not callable"),
    (RuntimeError("cannot reach the hub\nretry later"), "RuntimeError: cannot reach the hub"),  # the first line
    (RuntimeError(), "RuntimeError"),
    (RuntimeError("  \n"), "RuntimeError"),
])
def test_a_bad_registration_marks_only_its_plugin_broken_with_the_reason(registered, error):
    catalog = _register("cnnreg_models", registered)
    [broken] = catalog.broken
    assert (broken.name, str(broken.origin), broken.stage, broken.error) == ("mine", "(in-process)", "cnnreg_models",
                                                                              error)
    assert catalog.components == ()


def test_registered_names_may_hold_dots_and_dashes_and_families_register_their_factory():
    family = Family(_net, lambda: ["a", "b"])
    catalog = _register("cnnreg_models", {"net-v2.1_b": _net, "hub": family})
    assert catalog.broken == ()
    [hub] = [c for c in catalog.components if c.name == "hub"]
    [net] = [c for c in catalog.components if c.name == "net-v2.1_b"]
    assert (hub.kind, hub.factory, hub.family, hub.plugin) == ("model", _net, family, "mine")
    assert (net.factory, net.family, str(net.origin)) == (_net, None, "(in-process)")
    assert _register("cnnreg_models", None).components == ()  # a hook may register nothing


def test_factory_without_a_type_hint_is_named_by_module_and_qualified_name():
    def factory(width, num_classes: int = 10):
        """No hint on width."""
    error = _registration_error("cnnreg_models", factory)
    assert error == f"TypeError: parameter 'width' of {factory.__module__}.{factory.__qualname__} needs a type hint"


def test_factory_whose_signature_cannot_be_read_is_named_even_without_a_module_or_qualified_name():
    # a tensor method has no __module__: the place shows as '?', not as a made-up module
    error = _registration_error("cnnreg_transforms", torch.Tensor.float)
    assert error.startswith(f"TypeError: cannot read the signature of ?.{torch.Tensor.float.__qualname__}: ")
    # a partial has no __qualname__: its repr names the wrapped function and the bound arguments
    def factory(num_classes: int = 10, width: int = 4):
        """Partially applied."""
    partial = functools.partial(factory, width=8)
    error = _registration_error("cnnreg_models", partial)
    assert error.startswith(f"TypeError: cannot read the signature of functools.{partial!r}: ")


GOOGLE_DOC = '''A conv net.

Note: widths double per block.

Args:
    width (int): channels of the
        convolution.
        Default: 16.
    *extra: ignored.
    Xavier_gain: gain of the initialisation.
    pooling: "avg" or "max".

    depth: blocks, each of
        two convolutions.

Returns:
    model: the network.
'''

SPHINX_DOC = '''A conv net.

:param width: channels of the
    convolution.
:param int depth: blocks.
:param list[int] | None sizes:   widths of the blocks.
:returns: the model.
    a module.
:param pooling: "avg" or "max".

Not part of pooling.
'''


@pytest.mark.parametrize("doc, expected", [
    (GOOGLE_DOC, {"width": "channels of the convolution. Default: 16.", "extra": "ignored.",
                  "Xavier_gain": "gain of the initialisation.", "pooling": '"avg" or "max".',
                  "depth": "blocks, each of two convolutions."}),
    (SPHINX_DOC, {"width": "channels of the convolution.", "depth": "blocks.", "sizes": "widths of the blocks.",
                  "pooling": '"avg" or "max".'}),
    # an Args section written without indentation: continuation lines are indented, the next section ends it
    ("Args:\nwidth: channels\n    of the conv.\ndepth: blocks.\nReturns:\nthe model.\n",
     {"width": "channels of the conv.", "depth": "blocks."}),
    # lines after the Args section are still read: a docstring that adds Sphinx lines after it
    ("Args:\n    width: channels.\n\nReturns:\n    the model.\n:param depth: blocks.\n",
     {"width": "channels.", "depth": "blocks."}),
    ("No parameters documented.\n\nReturns:\n    x: a thing.\n", {}),
])
def test_parameter_descriptions_come_from_google_and_sphinx_docstrings(doc, expected):
    assert parse_arg_docs(doc) == expected


def test_keys_are_bare_names_unless_two_plugins_register_the_same_one():
    shared_b, shared_a = _component("model", "net", plugin="b"), _component("model", "net", plugin="a")
    solo, loss = _component("model", "solo", plugin="a"), _component("loss", "net", plugin="c")
    catalog = Catalog((shared_b, solo, loss, shared_a))
    assert catalog.keys("model") == {"b:net": shared_b, "a:net": shared_a, "solo": solo}
    assert catalog.keys("loss") == {"net": loss}  # the same name in another kind is no clash
    assert catalog.keys("metric") == {}


def test_resolve_accepts_a_name_a_plugin_prefix_and_a_family_member():
    shared_b, shared_a = _component("model", "net", plugin="b"), _component("model", "net", plugin="a")
    solo = _component("model", "solo", plugin="a")
    hub = _component("model", "hub", plugin="a", family=Family(lambda **kw: None, lambda: [], param="variant"))
    catalog = Catalog((shared_b, solo, hub, shared_a))
    assert catalog.resolve("model", "solo") == ("solo", solo, {})
    assert catalog.resolve("model", "a:solo") == ("solo", solo, {})  # the prefix is optional when one plugin has it
    assert catalog.resolve("model", "a:net") == ("a:net", shared_a, {})
    assert catalog.resolve("model", "b:net") == ("b:net", shared_b, {})
    assert catalog.resolve("model", "a:hub") == ("hub", hub, {})
    # a family member is the family plus its selecting parameter; a member's own colons stay in it
    assert catalog.resolve("model", "hub:vit") == ("hub", hub, {"variant": "vit"})
    assert catalog.resolve("model", "hub:hf:vit/base") == ("hub", hub, {"variant": "hf:vit/base"})


def test_an_ambiguous_name_lists_both_plugins_sorted_and_how_to_pick():
    catalog = Catalog((_component("model", "net", plugin="zoo"), _component("model", "net", plugin="vision")))
    assert _unknown(catalog, "model", "net") == (
        "model 'net' is registered by plugin 'vision' (my-dist 1.0) and plugin 'zoo' (my-dist 1.0); "
        "pick one: 'vision:net', 'zoo:net'")


@pytest.mark.parametrize("name, message", [
    ("", "the model name must be a non-empty string"),
    (3, "the model name must be a non-empty string"),
    ("hub:", "unknown model 'hub:'"),  # a family needs a member
    ("solo:x", "unknown model 'solo:x'"),  # only a family takes members
    ("b:solo", "unknown model 'b:solo'"),  # plugin b does not register solo
    ("nobody:x", "unknown model 'nobody:x'"),
])
def test_names_that_do_not_resolve(name, message):
    solo, net = _component("model", "solo", plugin="a"), _component("model", "net", plugin="b")
    hub = _component("model", "hub", plugin="a", family=Family(lambda **kw: None, lambda: []))
    assert _unknown(Catalog((solo, hub, net)), "model", name).split(";")[0] == message


def _context_factory(num_classes: int, in_channels: int = 3, width: int = 8, *, data: DataContext):
    """A factory that takes what the run knows.

    Args:
        width: channels of the first convolution.
    """


def test_a_components_parameters_follow_its_kind_and_skip_the_data_context():
    empty = inspect.Parameter.empty
    model = Component("model", "net", _context_factory, "mine", Origin("my-dist"))
    assert model.params() == (
        Param("num_classes", int, empty, "(default: the dataset's number of classes)", True),
        Param("in_channels", int, 3, "(default: the dataset's number of channels)", True),
        Param("width", int, 8, "channels of the first convolution.", False))
    assert not model.params()[0].required  # the run fills it
    # a loss is told the classes but not the channels
    loss = Component("loss", "net", _context_factory, "mine", Origin("my-dist"))
    assert [(p.name, p.from_context, p.required) for p in loss.params()] == [
        ("num_classes", True, False), ("in_channels", False, False), ("width", False, False)]
    assert model.context_param() == loss.context_param() == "data"
    assert _component("model", "plain").context_param() is None


@pytest.mark.parametrize("order", [("bad", "good"), ("good", "bad")])
def test_a_broken_plugin_does_not_stop_the_next_plugins_of_the_same_hook(order):
    def boom():
        raise RuntimeError("boom")
    plugins = {"bad": types.SimpleNamespace(cnnreg_models=boom),
               "good": types.SimpleNamespace(cnnreg_models=lambda: {"net": _net})}
    catalog = build_catalog(plugin_manager(autoload=False, extra=[(name, plugins[name]) for name in order]))
    assert [b.name for b in catalog.broken] == ["bad"]
    assert [(c.name, c.plugin) for c in catalog.components] == [("net", "good")]


def test_the_live_objects_handed_to_optimizers_and_schedulers_are_not_recipe_parameters():
    # no type hint: a recipe could not give them, the engine passes them
    def sgd(params, lr: float = 0.1):
        """An optimizer."""

    def halving(optimizer, gamma: float = 0.5):
        """A scheduler."""
    plugin = types.SimpleNamespace(cnnreg_optimizers=lambda: {"sgd": sgd}, cnnreg_schedulers=lambda: {"halving": halving})
    catalog = build_catalog(plugin_manager(autoload=False, extra=[("mine", plugin)]))
    assert catalog.broken == ()
    assert [p.name for p in catalog.keys("optimizer")["sgd"].params()] == ["lr"]
    assert [p.name for p in catalog.keys("scheduler")["halving"].params()] == ["gamma"]


@pytest.mark.parametrize(("text", "plain"), [
    ("``torch.nn.Conv2d`` layers", "torch.nn.Conv2d layers"),
    (":class:`~torch.nn.Module` and :func:`timm.create_model`", "Module and timm.create_model"),
    (":ref:`the guide <guide-label>`", "the guide"),
    ("a **bold** and *emphasised* word; 3*4*5 and 2 * x stay", "a bold and emphasised word; 3*4*5 and 2 * x stay"),
    ("`code` in Markdown", "code in Markdown"),
    (":meth:`Module.train` (no tilde: the whole name)", "Module.train (no tilde: the whole name)"),
    (":class:`~Module` and :class:`~a.b.c.Deep`", "Module and Deep"),
    ("nothing to remove", "nothing to remove"),
])
def test_summaries_and_parameter_descriptions_are_plain_text(text, plain):
    assert plain_text(text) == plain


def test_a_factory_docstrings_markup_is_plain_in_its_summary_and_parameters():
    def factory(width: int = 2):
        """A ``wide`` net on :class:`~torch.nn.Module`.

        Args:
            width: channels of the **first** layer (see :func:`torch.nn.Conv2d`).
        """

    component = Component("model", "wide", factory, "p", Origin("d"))
    assert component.summary == "A wide net on Module."
    [param] = component.params()
    assert param.description == "channels of the first layer (see torch.nn.Conv2d)."
