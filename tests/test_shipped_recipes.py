"""The recipes as package data: run by name, listed, copied to edit with their schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import cnnreg
from cnnreg.cli import main
from cnnreg.core.errors import RecipeError
from conftest import cli, make_distribution

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (REPO / "recipes").glob("*.json") if p.name != "recipe.schema.json")


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_a_bare_name_loads_the_shipped_recipe_and_its_data_is_in_the_working_folder(empty_cwd):
    recipe = cnnreg.load_recipe("mnist-cnn")
    assert recipe.name == "mnist-cnn"
    # "../data" in the shipped file: ./data of the working folder, never site-packages
    assert recipe.data.root == empty_cwd / "data"
    nested = cnnreg.load_recipe("imagefolder-transfer")
    assert nested.data.root == empty_cwd / "data" / "hymenoptera_data"


def test_a_file_in_the_working_folder_comes_before_the_shipped_recipe_of_that_name(empty_cwd):
    raw = json.loads((REPO / "recipes" / "quickstart.json").read_text())
    (empty_cwd / "quickstart").write_text(json.dumps({**raw, "name": "mine"}))
    assert cnnreg.load_recipe("quickstart").name == "mine"


def test_a_misspelt_name_suggests_the_shipped_recipe(empty_cwd, capsys):
    assert main(["validate", "quikstart"]) == 2
    err = capsys.readouterr().err
    assert "quikstart: no such file; did you mean the shipped recipe 'quickstart'?" in err
    assert main(["run", "nothing-like-it.json"]) == 2
    assert "the shipped recipes are cifar10-efficientnet-lite0, " in capsys.readouterr().err
    # a path with a folder is a path: no talk of shipped recipes
    assert main(["validate", "sub/quikstart.json"]) == 2
    assert capsys.readouterr().err.splitlines()[0].endswith("sub/quikstart.json: no such file")


def test_recipes_lists_every_shipped_file_with_its_description(empty_cwd, capsys):
    assert main(["recipes", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {p.stem for p in SHIPPED}
    for path in SHIPPED:
        entry = listed[path.stem]
        assert entry["description"] == json.loads(path.read_text())["description"]
        assert entry["description"].startswith(entry["summary"].rstrip("."))
        assert Path(entry["path"]).read_text() == path.read_text()
    assert main(["recipes"]) == 0
    table = capsys.readouterr().out
    assert all(p.stem in table for p in SHIPPED)


def test_every_shipped_recipe_names_a_schema_that_is_beside_it():
    for path in SHIPPED:
        raw = json.loads(path.read_text())
        assert (path.parent / raw["$schema"]).is_file(), path


@pytest.mark.parametrize("dest", ["edit/", "elsewhere/deeper/my.json", "../outside.json", None])
def test_a_copy_reads_the_same_data_as_the_shipped_recipe(empty_cwd, capsys, dest):
    shipped = cnnreg.load_recipe("imagefolder-transfer")
    args = ["cp", "imagefolder-transfer"] + ([dest] if dest else [])
    assert main(args) == 0
    target = {"edit/": empty_cwd / "edit" / "imagefolder-transfer.json", None: empty_cwd / "imagefolder-transfer.json"
              }.get(dest) or (empty_cwd / dest).resolve()
    copy = cnnreg.load_recipe(target)
    assert copy.data.root == shipped.data.root == empty_cwd / "data" / "hymenoptera_data"
    written = json.loads(target.read_text())
    assert written["$schema"] == "recipe.schema.json"
    schema = json.loads((target.parent / "recipe.schema.json").read_text())
    assert schema["$id"] == "https://cnnreg.invalid/recipe.schema.json"
    assert f"run it with: cnnreg run {Path(os.path.relpath(target)) if dest else 'imagefolder-transfer.json'}" \
        in capsys.readouterr().out


def test_copying_never_overwrites_without_force_and_leaves_a_foreign_schema_alone(empty_cwd, capsys):
    mine = empty_cwd / "quickstart.json"
    mine.write_text("{\"my\": \"work\"}")
    assert main(["cp", "quickstart"]) == 2
    assert "quickstart.json exists; give another destination, or --force to overwrite it" in capsys.readouterr().err
    assert mine.read_text() == "{\"my\": \"work\"}"
    foreign = empty_cwd / "recipe.schema.json"
    foreign.write_text("{\"title\": \"somebody else's\"}")
    assert main(["cp", "quickstart", "--force"]) == 0
    assert foreign.read_text() == "{\"title\": \"somebody else's\"}"
    assert "$schema" not in json.loads(mine.read_text())  # not pointed at a schema that is not ours
    assert cnnreg.load_recipe(mine).name == "quickstart"


def test_copying_into_a_folder_that_cannot_be_made_is_a_clear_error(empty_cwd, capsys):
    (empty_cwd / "file").write_text("")
    assert main(["cp", "quickstart", "file/sub/"]) == 2
    err = capsys.readouterr().err
    assert "cannot write file/sub/" in err and "choose a folder you can write to" in err
    assert main(["cp", "no-such-recipe"]) == 2
    assert "no shipped recipe called 'no-such-recipe'" in capsys.readouterr().err


def test_the_schema_beside_a_copy_has_the_installed_plugins_parameters(tmp_path):
    site = make_distribution(tmp_path / "site", "cnnreg-fancy", {"fancy_models": '''
        def fancy_net(num_classes: int, width: int = 8):
            """A fancy network."""
            raise NotImplementedError
        def cnnreg_models():
            return {"fancy_net": fancy_net}
    '''}, {"fancy": "fancy_models"})
    work = tmp_path / "work"
    work.mkdir()
    done = cli("cp", "quickstart", cwd=work, env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    schema = json.loads((work / "recipe.schema.json").read_text())
    assert schema["$defs"]["ModelFancyNet"]["properties"]["width"]["default"] == 8


def test_validate_skips_the_schema_among_recipes_and_refuses_it_alone(capsys):
    schema = REPO / "recipes" / "recipe.schema.json"
    assert main(["validate", str(REPO / "recipes" / "quickstart.json"), str(schema)]) == 0
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="recipe.schema.json:1:1: is cnnreg's recipe schema"):
        cnnreg.load_recipe(schema)


def test_shipped_recipes_resolve_against_the_folder_the_command_runs_in(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder in (a, b):
        done = cli("validate", "--json", "mnist-cnn", cwd=folder)
        assert done.returncode == 0, done.stderr
        [result] = json.loads(done.stdout)
        assert any(f"{folder / 'data'}/mnist" in note or f"{folder / 'data'}/MNIST" in note
                   for note in result["not_checked"]), result
