"""Every shipped recipe validates against the schema and passes the CPU dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cnnreg
from cnnreg.workflows.validation import validate_recipe

from _datafiles import write_image_folder

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").glob("*.json") if p.name != "recipe.schema.json")


def offline_overrides(raw: dict, tmp_path: Path) -> dict:
    """What a recipe needs to be checked here: no network, no ../shared."""
    overrides = {}
    if raw["data"]["name"] == "imagefolder":
        root = tmp_path / "folder"
        for split in ("train", "val"):
            write_image_folder(root / split, ["ants", "bees"], per_class=2, size=(40, 48))
        overrides["data.root"] = str(root)
    model = raw["model"]
    if model["name"] == "torchvision":
        overrides["model.weights"] = None  # the tutorial downloads ImageNet weights
    if model["name"] == "timm":
        overrides["model.pretrained"] = False  # the weights file lives in ../shared
    return overrides


def test_there_are_recipes_for_every_tutorial_example():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "cifar10-tutorial-cnn", "cifar10-simple-cnn", "mnist-cnn", "mnist-cnn-bn",
            "imagefolder-transfer", "imagefolder-simple-cnn", "cifar10-efficientnet-lite0", "cifar10-fast",
            "mnist-fast"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_dry_runs(path, tmp_path):
    raw = json.loads(path.read_text())
    assert raw["description"], "every recipe says what it reproduces and should reach"
    recipe = cnnreg.load_recipe(path, overrides=offline_overrides(raw, tmp_path))
    report = validate_recipe(recipe)
    assert recipe.model.name in report.summary


def test_the_tutorial_recipe_has_the_tutorials_hyperparameters():
    raw = json.loads(Path(__file__).parent.parent.joinpath("recipes", "cifar10-tutorial-cnn.json").read_text())
    assert raw["optimizer"] == {"name": "adam", "lr": 0.001, "weight_decay": 0.0001}
    assert raw["scheduler"] == {"name": "reduce_on_plateau", "monitor": "val_loss", "factor": 0.5, "patience": 5}
    assert raw["data"]["batch_size"] == 128 and raw["trainer"]["epochs"] == 50
    assert [t["name"] for t in raw["transforms"]["train"]] == ["random_horizontal_flip", "random_crop", "normalize"]
    assert raw["transforms"]["train"][1] == {"name": "random_crop", "size": 32, "padding": 4}
    assert {"name": "checkpoint", "monitor": "val_accuracy"} in raw["callbacks"]


def test_the_quickstart_trains_offline_far_above_chance(tmp_path):
    path = Path(__file__).parent.parent / "recipes" / "quickstart.json"
    recipe = cnnreg.load_recipe(path, overrides={"output_dir": str(tmp_path), "trainer.progress": "off"})
    result = cnnreg.fit(cnnreg.build(recipe))
    assert result.best.metrics["val_accuracy"] > 0.6  # ten classes: chance is 0.1


def test_the_timm_style_recipe_trains_with_each_of_its_techniques_on_real_cifar_files(tmp_path):
    from _datafiles import write_cifar

    path = Path(__file__).parent.parent / "recipes" / "cifar10-timm-style.json"
    raw = json.loads(path.read_text())
    assert [t["name"] for t in raw["transforms"]["train"]] == [
        "random_horizontal_flip", "random_crop", "rand_augment", "normalize", "random_erasing", "mixup_cutmix"]
    write_cifar(tmp_path / "data", train_per_class=8, test_per_class=2)
    recipe = cnnreg.load_recipe(path, overrides={
        "data.root": str(tmp_path / "data"), "data.download": False, "data.verify": False, "data.batch_size": 16, "data.val_fraction": 0.2,
        "output_dir": str(tmp_path / "runs"), "trainer.progress": "off", "trainer.epochs": 4})
    result = cnnreg.fit(cnnreg.build(recipe))
    lrs = [record.metrics["lr"] for record in result.records]
    # linear warm-up over the first 3 epochs (per step), then the cosine down to 0 at epoch 4
    assert lrs[0] < lrs[1] < lrs[2] <= 0.002 and lrs[3] < lrs[2]
    assert lrs[0] == pytest.approx(0.002 * (0.1 + 0.9 * 4 / 12), rel=1e-6)  # 4 steps of 12 warm-up steps done
    assert all(record.metrics["train_loss"] == record.metrics["train_loss"] for record in result.records)  # no NaN
    assert (result.run_dir / "best.safetensors").is_file()
