"""Weights & Biases and MLflow loggers: inert, and saying so, without their packages."""

from __future__ import annotations

import importlib.util

import pytest

import cnnreg
from cnnreg.cli import main
from cnnreg.core.errors import RecipeError
from cnnreg_plugins.trackers import flatten

from conftest import tiny_recipe


@pytest.mark.parametrize("name, package", [("wandb_logger", "wandb"), ("mlflow_logger", "mlflow")])
def test_a_missing_tracker_is_listed_as_inert_and_fails_only_the_recipe_that_names_it(name, package, tmp_path, capsys,
                                                                                     monkeypatch):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    assert main(["ls", "callbacks", name]) == 0
    assert f"Inert: {package} is not installed." in capsys.readouterr().out
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, callbacks=[{"name": name}]))
    with pytest.raises(RecipeError) as info:
        cnnreg.build(recipe)
    assert f"callbacks[0]: {name}: the {name} callback needs the {package} package: pip install {package}" in str(info.value)
    assert not (tmp_path / "runs").exists()
    # the other plugins are untouched
    cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path)), output=False)


def test_recipe_values_flatten_to_tracker_parameters():
    assert flatten({"optimizer": {"name": "adam", "lr": 0.1}, "data": {"subset": None},
                    "transforms": {"train": [{"name": "flip"}]}}) == {
        "optimizer.name": "adam", "optimizer.lr": 0.1, "data.subset": None,
        "transforms.train": "[{'name': 'flip'}]"}
