"""Recipes: validation built from the catalog, and compiler-style error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cnnreg
from cnnreg.cli import main
from cnnreg.core.errors import RecipeError

from conftest import cli

RECIPE = """{
  "name": "golden",
  "data": {"name": "synthetic", "num_classes": 3, "image_size": 12, "batch_size": 16},
  "transforms": {
    "train": [
      {"name": "random_horizontal_flip"},
      {"name": "random_crop", "size": 12, "padding": 2}
    ]
  },
  "model": {"name": "simple_cnn"},
  "optimizer": {"name": "adam", "lr": 0.001},
  "trainer": {"epochs": 2},
  "callbacks": [{"name": "early_stopping", "monitor": "val_loss"}]
}
"""


def errors_for(tmp_path: Path, text: str, capsys) -> tuple[int, list[str]]:
    path = tmp_path / "golden.json"
    path.write_text(text)
    status = main(["validate", str(path)])
    err = capsys.readouterr().err
    lines = [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]
    return status, [line.replace(str(path), "golden.json") for line in lines]


def test_the_golden_recipe_is_valid(tmp_path, capsys):
    assert errors_for(tmp_path, RECIPE, capsys) == (0, [])


@pytest.mark.parametrize("old, new, expected", [
    # depth 1
    ('"trainer"', '"trainr"', 'golden.json:12:3 trainr: unknown key of the recipe; did you mean \'trainer\'?'),
    # depth 2
    ('"epochs": 2', '"epoch": 2', "golden.json:12:15 trainer.epoch: unknown key of trainer; did you mean 'epochs'?"),
    ('"lr": 0.001', '"lr_sheduler": 0.001',
     "golden.json:11:33 optimizer.lr_sheduler: unknown parameter of 'adam'; 'adam' takes: lr, betas, eps, "
     "weight_decay, amsgrad, bias_norm_lr_mult, bias_norm_weight_decay"),
    # depth 3
    ('"monitor": "val_loss"', '"monitr": "val_loss"',
     "golden.json:13:44 callbacks[0].monitr: unknown parameter of 'early_stopping'; did you mean 'monitor'?"),
    # depth 4
    ('"padding": 2', '"paddin": 2',
     "golden.json:7:43 transforms.train[1].paddin: unknown parameter of 'random_crop'; did you mean 'padding'?"),
    # a wrong type
    ('"batch_size": 16', '"batch_size": "sixteen"',
     'golden.json:3:83 data.batch_size: expected a valid integer; got "sixteen"'),
    # a value out of range
    ('"lr": 0.001', '"lr": -0.1', "golden.json:11:39 optimizer.lr: must be greater than 0; got -0.1"),
    # a missing required field
    ('"size": 12, ', '', "golden.json:7:7 transforms.train[1].size: missing required parameter 'size' of 'random_crop'"),
    # an unknown component name that is another kind's
    ('{"name": "simple_cnn"}', '{"name": "adam"}',
     "golden.json:10:21 model.name: unknown model 'adam'; 'adam' is an optimizer, not a model"),
    # a near miss
    ('{"name": "simple_cnn"}', '{"name": "simple_cn"}',
     "golden.json:10:21 model.name: unknown model 'simple_cn'; did you mean 'simple_cnn'?"),
    # malformed JSON
    ('"epochs": 2}', '"epochs": 2,}', "golden.json:12:26: trailing comma before '}'"),
    ('"model": {"name": "simple_cnn"},', '"model": {"name": "simple_cnn"',
     "golden.json:11:3: expected ',' or '}' after a member; is a comma missing?"),
    ('"trainer": {"epochs": 2}', '"trainer": {"epochs": 2}, "trainer": {}',
     "golden.json:12:29: duplicate key 'trainer' (first at line 12, column 3)"),
])
def test_golden_error_messages(tmp_path, capsys, old, new, expected):
    assert old in RECIPE
    status, errors = errors_for(tmp_path, RECIPE.replace(old, new, 1), capsys)
    assert status == 2
    assert errors == [expected]


def test_every_error_is_reported_at_once(tmp_path, capsys):
    text = RECIPE.replace('"epochs": 2', '"epochs": 0').replace('"lr": 0.001', '"lr": 0').replace(
        '"padding": 2', '"padding": "two"')
    status, errors = errors_for(tmp_path, text, capsys)
    assert status == 2
    assert [e.split(" ")[1].rstrip(":") for e in errors] == [
        "transforms.train[1].padding", "optimizer.lr", "trainer.epochs"]


def test_cli_error_has_no_traceback_and_exits_2(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(RECIPE.replace('"epochs": 2', '"epoch": 2'))
    result = cli("run", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{path}:12:15 trainer.epoch: unknown key of trainer; did you mean 'epochs'?" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "golden.json:1:1: the file is empty; a recipe is a JSON object"),
    (b"[1, 2]", "golden.json:1:1: a recipe is a JSON object ({...}), not an array"),
    (b'{"name": "caf\xe9"}', "golden.json:1:14: not valid UTF-8 text (byte 0xe9); a recipe is a JSON file"),
    (b"\x00\x01\x02binary", "golden.json:1:1: contains NUL bytes: a binary file, not a JSON recipe"),
])
def test_unreadable_files(tmp_path, capsys, content, message):
    path = tmp_path / "golden.json"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    assert message in capsys.readouterr().err.replace(str(path), "golden.json")


def test_a_directory_or_a_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert "is a directory; give the path of a recipe's .json file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    path = folder / "r.json"
    path.write_text(json.dumps({"name": "r", "data": {"name": "mnist", "root": "../data"},
                                "model": {"name": "mnist_cnn"}, "output_dir": "out"}))
    recipe = cnnreg.load_recipe(path)
    assert recipe.data.root == tmp_path / "data"  # normalised: messages name the folder itself
    assert recipe.output_dir == folder / "out"


def test_family_shorthand_and_qualified_names(tmp_path):
    base = {"name": "r", "data": {"name": "synthetic"}}
    recipe = cnnreg.load_recipe({**base, "model": {"name": "timm:resnet18"}})
    assert (recipe.model.name, recipe.model.arch) == ("timm", "resnet18")
    recipe = cnnreg.load_recipe({**base, "model": {"name": "tutorial_models:simple_cnn"}})
    assert recipe.model.name == "simple_cnn"
    with pytest.raises(RecipeError, match="unknown model 'nobody:simple_cnn'"):
        cnnreg.load_recipe({**base, "model": {"name": "nobody:simple_cnn"}})


def test_defaults_are_filled_and_the_resolved_recipe_reloads(tmp_path):
    recipe = cnnreg.load_recipe(json.loads(RECIPE))
    resolved = recipe.to_json()
    assert resolved["loss"] == {"name": "cross_entropy", "label_smoothing": 0.0, "weight": None, "num_classes": None,
                                "class_counts": None}
    assert [m["name"] for m in resolved["metrics"]] == ["accuracy", "precision", "recall", "f1"]
    assert resolved["trainer"]["precision"] == "auto"
    again = cnnreg.load_recipe(resolved)
    assert again.to_json() == resolved


def test_schema_is_draft_2020_12_with_every_component(tmp_path):
    from cnnreg.plugin.manager import plugin_manager
    from cnnreg.config.recipe import json_schema
    from cnnreg.plugin.catalog import build_catalog

    catalog = build_catalog(plugin_manager())
    schema = json_schema(catalog)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    names = {d["properties"]["name"].get("const") for d in schema["$defs"].values()
             if "name" in d.get("properties", {})}
    for kind in ("model", "dataset", "transform", "optimizer", "loss", "metric"):
        assert set(catalog.keys(kind)) <= names, kind
    crop = next(d for d in schema["$defs"].values() if d.get("properties", {}).get("name", {}).get("const") == "random_crop")
    assert "size" in crop["required"] and crop["additionalProperties"] is False
    # a recipe may name its schema
    cnnreg.load_recipe({**json.loads(RECIPE), "$schema": "./recipe.schema.json"})
