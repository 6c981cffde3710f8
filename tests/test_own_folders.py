"""A user's own folder of photos: mixed sizes and modes train as they are,
and `validate` gives the verdict `run` gives, on the same folders and faults.

Folders are written here as real JPEG and PNG files of several sizes and
Pillow modes (L, RGB, RGBA, palette, 16-bit).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import cnnreg
from cnnreg.inputs import imagefiles
from cnnreg.core import progress
from cnnreg.cli import main
from cnnreg.core.errors import RecipeError, UserError
from conftest import cli, make_distribution

from _datafiles import write_image, write_image_folder, write_not_an_image_file, write_truncated_file, write_zero_byte_file

TIMM_ARCH = "test_resnet"  # timm's own tiny ResNet; its data config: 160x160 input, crop_pct 0.95


def colour_folder(root: Path, per_class: int = 8, sizes=((30, 40), (44, 28), (36, 36), (52, 48)),
                  modes=("RGB", "P", "RGBA", "RGB")) -> Path:
    """Two learnable classes of photos of mixed sizes and modes: reddish and bluish, with noise."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("blue", "red")):
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
            pixels[..., 2 if name == "blue" else 0] += 150
            ext = "png" if i % 2 else "jpg"
            mode = modes[i % len(modes)] if ext == "png" else "RGB"
            write_image(root / name / f"{i:02d}.{ext}", pixels, mode=mode)
    return root


def recipe_for(tmp_path: Path, root: Path | str, model: dict[str, Any] | None = None, **changes: Any) -> dict:
    recipe: dict[str, Any] = {
        "name": "own", "seed": 0,
        "data": {"name": "imagefolder", "root": str(root), "batch_size": 8, "val_fraction": 0.25,
                 "cache_dir": str(tmp_path / "cache")},
        "model": model or {"name": "simple_cnn", "widths": [8, 8, 8]},
        "optimizer": {"name": "adam", "lr": 0.01},
        "trainer": {"epochs": 1, "progress": "off"},
        "output_dir": str(tmp_path / "runs"),
        "disable_plugins": ["plots"],
    }
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            recipe[section][leaf] = value
        else:
            recipe[section] = value
    return recipe


# -- mixed sizes, no size, no transforms ---------------------------------------------------------


def test_a_transfer_backbone_trains_on_mixed_sizes_without_size_or_transforms(tmp_path):
    root = colour_folder(tmp_path / "photos", per_class=12)
    recipe = cnnreg.load_recipe(recipe_for(tmp_path, root, {"name": "timm", "arch": TIMM_ARCH},
                                           optimizer={"name": "adam", "lr": 0.003}, trainer__epochs=4))
    run = cnnreg.build(recipe)
    # stored at the size the backbone's evaluation resizes to: floor(160 / 0.95), short side, centre cut
    assert run.data.image_size == (168, 168) and run.data.fit == "crop"
    written = json.loads((run.run_dir / "recipe.json").read_text())
    assert written["data"]["size"] == [168, 168] and written["data"]["fit"] == "crop"
    train, evaluation = written["transforms"]["train"], written["transforms"]["eval"]
    assert [t["name"] for t in train] == ["random_resized_crop", "random_horizontal_flip", "normalize"]
    assert [t["name"] for t in evaluation] == ["resize", "center_crop", "normalize"]
    assert train[0]["size"] == [160, 160] and evaluation[0]["size"] == 168 and evaluation[1]["size"] == [160, 160]
    assert train[2]["mean"] == evaluation[2]["mean"] == [0.5, 0.5, 0.5]  # the backbone's own statistics
    info = json.loads((run.run_dir / "run.json").read_text())
    chosen = {d["key"]: d for d in info["defaults"]}
    assert chosen["data.size"]["value"] == [168, 168] and "set data.size" in chosen["data.size"]["override"]
    assert "test_resnet" in chosen["transforms"]["reason"]
    result = cnnreg.fit(run)
    assert result.best.metrics["val_accuracy"] >= 0.8  # two colours: chance is 0.5


def test_a_model_without_preprocessing_stores_the_median_size_and_normalizes_with_the_data(tmp_path):
    root = colour_folder(tmp_path / "photos")  # heights 30, 44, 36, 52; widths 40, 28, 36, 48
    run = cnnreg.build(cnnreg.load_recipe(recipe_for(tmp_path, root)))
    assert run.data.image_size == (40, 40)  # the medians 36 and 36 (the lower one), rounded to multiples of 8
    written = json.loads((run.run_dir / "recipe.json").read_text())
    assert written["transforms"] == {"train": [{"name": "normalize", "mean": list(run.data.mean), "std": list(run.data.std)}],
                                     "eval": [{"name": "normalize", "mean": list(run.data.mean), "std": list(run.data.std)}]}
    assert run.data.mean[2] > run.data.mean[1]  # measured on these images: blue and red lifted, green not


def test_the_median_size_is_capped(tmp_path):
    for i, (h, w) in enumerate([(600, 900), (700, 1000), (650, 950)]):
        write_image(tmp_path / "photos" / "a" / f"{i}.jpg", size=(h, w))
        write_image(tmp_path / "photos" / "b" / f"{i}.jpg", size=(w, h))
    check = cnnreg.validate(recipe_for(tmp_path, tmp_path / "photos", data__val_fraction=0.0))
    size = check.choices[0].value
    assert max(size) <= 256 and all(v % 8 == 0 for v in size)


def test_images_of_one_large_size_are_resized_for_a_pretrained_models_preprocessing(tmp_path):
    write_image_folder(tmp_path / "photos", ("a", "b"), per_class=2, size=(300, 400))
    check = cnnreg.validate(recipe_for(tmp_path, tmp_path / "photos", {"name": "timm", "arch": TIMM_ARCH},
                                       data__val_fraction=0.0))
    assert check.choices[0].key == "data.size" and check.choices[0].value == [168, 224]  # short side 168, aspect kept
    small = cnnreg.validate(recipe_for(tmp_path, tmp_path / "photos", data__val_fraction=0.0))
    assert not [c for c in small.choices if c.key == "data.size"]  # no preprocessing: one size is kept


def test_a_resumed_run_keeps_the_record_of_what_was_chosen(tmp_path):
    root = colour_folder(tmp_path / "photos")
    run = cnnreg.build(cnnreg.load_recipe(recipe_for(tmp_path, root, trainer__epochs=2)))
    cnnreg.fit(run)
    before = json.loads((run.run_dir / "run.json").read_text())["defaults"]
    assert [d["key"] for d in before] == ["data.size", "transforms"]
    recipe = cnnreg.load_recipe(run.run_dir / "recipe.json", overrides={"trainer.epochs": 3})
    resumed = cnnreg.build(recipe, run_dir=run.run_dir)
    assert resumed.choices == () and resumed.data.image_size == run.data.image_size  # read back, not chosen again
    assert json.loads((run.run_dir / "run.json").read_text())["defaults"] == before


def test_the_shipped_own_photos_recipe_trains_on_a_folder_of_mixed_photos(tmp_path):
    root = colour_folder(tmp_path / "photos", per_class=12)
    shipped = Path(__file__).parent.parent / "recipes" / "imagefolder-simple-cnn.json"
    recipe = cnnreg.load_recipe(shipped, overrides={
        "data.root": str(root), "data.cache_dir": str(tmp_path / "cache"), "trainer.epochs": 4,
        "trainer.progress": "off", "output_dir": str(tmp_path / "runs"), "disable_plugins": ["plots"]})
    run = cnnreg.build(recipe)
    assert run.data.image_size == (128, 128) and run.choices == ()  # the recipe's size, stretched as the tutorial's
    assert cnnreg.fit(run).best.metrics["val_accuracy"] >= 0.8  # two colours: chance is 0.5


def test_the_quickstart_pointed_at_a_folder_validates_and_runs(tmp_path, capsys):
    """The first thing a new user tries: the offline quickstart with its data switched to their photos."""
    root = colour_folder(tmp_path / "photos")
    raw = json.loads((Path(__file__).parent.parent / "recipes" / "quickstart.json").read_text())
    raw.update(data={"name": "imagefolder", "root": str(root), "batch_size": 8, "cache_dir": str(tmp_path / "c")},
               output_dir=str(tmp_path / "runs"), trainer={"epochs": 1, "progress": "off"})
    path = tmp_path / "quickstart.json"
    path.write_text(json.dumps(raw))
    assert _outcome(capsys, ["validate", str(path)]) == _outcome(capsys, ["run", str(path)]) == (0, [])


def test_a_channel_that_never_varies_is_left_unscaled_not_divided_by_zero(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(("dark", "bright")):
        for i in range(6):
            pixels = np.zeros((16, 16, 3), dtype=np.uint8)
            pixels[..., 0] = rng.integers(0, 100, (16, 16)) + 150 * label  # red varies; green and blue are 0
            write_image(tmp_path / "photos" / name / f"{i}.png", pixels)
    run = cnnreg.build(cnnreg.load_recipe(recipe_for(tmp_path, tmp_path / "photos", trainer__epochs=2)))
    normalize = json.loads((run.run_dir / "recipe.json").read_text())["transforms"]["train"][0]
    assert normalize["std"][1:] == [1.0, 1.0] and 0 < normalize["std"][0] < 1
    assert all(np.isfinite(r.metrics["train_loss"]) for r in cnnreg.fit(run).records)


def test_a_size_the_recipe_gives_is_kept_and_stretches(tmp_path):
    root = colour_folder(tmp_path / "photos")
    run = cnnreg.build(cnnreg.load_recipe(recipe_for(tmp_path, root, data__size=[20, 24],
                                                     transforms={"train": [], "eval": []})))
    assert run.data.image_size == (20, 24) and run.data.fit == "stretch" and run.choices == ()
    assert run.train_transforms == () and run.eval_transforms == ()


def test_crop_fit_is_torchvisions_resize_then_center_crop():
    y, x = np.mgrid[0:90, 0:140]
    smooth = np.stack([(x * 1.8) % 256, (y * 2.5) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    path = Path(os.environ["XDG_CACHE_HOME"]) / "smooth.png"
    Image.fromarray(smooth).save(path)
    ours = imagefiles.decode_image(path, size=(48, 64), fit="crop")
    # torchvision's evaluation preprocessing, from the user's arguments: shorter side to 48, then a 48x64 centre
    reference = TF.center_crop(TF.resize(TF.pil_to_tensor(Image.open(path)), [48], antialias=True), [48, 64])
    assert ours.shape == (48, 64, 3) and np.array_equal(ours, reference.permute(1, 2, 0).numpy())
    stretched = imagefiles.decode_image(path, size=(48, 64))  # torchvision's Resize((48, 64)): the aspect changes
    squeezed = TF.resize(TF.pil_to_tensor(Image.open(path)), [48, 64], antialias=True)
    assert np.array_equal(stretched, squeezed.permute(1, 2, 0).numpy()) and not np.array_equal(stretched, ours)


def test_predict_on_a_crop_fit_run_cuts_the_centre_as_the_data_was(tmp_path):
    root = colour_folder(tmp_path / "photos")
    run = cnnreg.build(cnnreg.load_recipe(recipe_for(tmp_path, root)))
    cnnreg.fit(run)
    predictor = cnnreg.load_predictor(run.run_dir)
    assert predictor.fit == "crop" and predictor.image_size == run.data.image_size
    wide = tmp_path / "wide.png"
    write_image(wide, size=(40, 120))
    [answer] = cnnreg.predict(predictor, [wide])
    assert answer.classes[0] in ("blue", "red") and 0 < answer.confidences[0] <= 1


# -- the header probe -----------------------------------------------------------------------------


def test_the_probe_finds_files_cut_short_and_decodes_only_those(tmp_path, monkeypatch):
    whole = [tmp_path / "a.jpg", tmp_path / "b.png"]
    write_image(whole[0], size=(20, 30))
    write_image(whole[1], size=(10, 12), mode="P")
    cut_jpeg, cut_png = write_truncated_file(tmp_path / "cut.jpg"), tmp_path / "cut.png"
    data = whole[1].read_bytes()
    cut_png.write_bytes(data[: len(data) // 2])
    empty, text = write_zero_byte_file(tmp_path / "empty.png"), write_not_an_image_file(tmp_path / "text.jpg")
    loads: list[str] = []
    original = Image.Image.load

    def counting_load(self):
        loads.append(getattr(self, "filename", ""))
        return original(self)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    files = [*whole, cut_jpeg, cut_png, empty, text]
    headers = imagefiles.probe_files(files, workers=1)
    assert headers.sizes[:2].tolist() == [[20, 30], [10, 12]]
    assert [index for index, _, _ in headers.bad] == [2, 3, 4, 5]
    assert headers.good.tolist() == [True, True, False, False, False, False]
    assert not {str(p) for p in whole} & set(loads)  # sound files: header only
    with pytest.raises(imagefiles.BadImage):
        imagefiles.decode_image(cut_png)  # what the probe predicted, decoding says


def test_a_second_plan_reads_no_file_of_an_unchanged_folder(tmp_path):
    from cnnreg_plugins._image_folder import plan_folder

    written = write_image_folder(tmp_path / "photos", ("a", "b"), per_class=3, size=(9, 7))
    first = plan_folder(tmp_path / "photos", None, 0.0, "skip", tmp_path / "cache")
    for path in (p for paths in written.values() for p in paths):  # garbage of the same size and time stamps
        st = path.stat()
        path.write_bytes(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = plan_folder(tmp_path / "photos", None, 0.0, "skip", tmp_path / "cache")
    assert second.common_size == first.common_size == (9, 7) and second.warnings == ()
    with pytest.raises(UserError, match="every image of class 'a', 'b'"):  # without the cache: read again
        plan_folder(tmp_path / "photos", None, 0.0, "skip", None)


# -- validate and run: the same verdict ------------------------------------------------------------


def _plugin_with_bad_labels(tmp_path: Path, monkeypatch) -> str:
    source = '''
        import torch
        import cnnreg
        from cnnreg.core.data import DataSource, ImageSplit

        def shifted(offset: int = 1) -> DataSource:
            """Two classes whose labels are off by one."""
            images = torch.zeros(12, 3, 8, 8, dtype=torch.uint8)
            labels = torch.arange(12) % 2 + offset
            return DataSource(train=ImageSplit(labels=labels, images=images), classes=("a", "b"),
                              image_size=(8, 8), channels=3)

        @cnnreg.hookimpl
        def cnnreg_datasets():
            return {"shifted": shifted}
    '''
    root = make_distribution(tmp_path / "site", "shifted-data", {"shifted_data": source}, {"shifted": "shifted_data"})
    monkeypatch.syspath_prepend(str(root))
    return "shifted"


def _folder(build: Callable[[Path], Any]) -> Callable[[Path, Any], dict[str, Any]]:
    """A case whose data is a folder that ``build`` writes."""
    def make(tmp_path: Path, monkeypatch: Any) -> dict[str, Any]:
        build(tmp_path / "photos")
        return {"data__root": str(tmp_path / "photos")}
    return make


def _two_classes(root: Path) -> None:
    write_image_folder(root, ("a", "b"), per_class=4, size=(12, 12))


def _with_cut_file(root: Path) -> None:
    _two_classes(root)
    write_truncated_file(root / "a" / "cut.jpg")


def _mixed_modes(root: Path) -> None:
    for i, mode in enumerate(("L", "RGB", "RGBA", "P", "I;16")):
        write_image(root / "a" / f"{i}.png", mode=mode, size=(10 + i, 14), seed=i)
        write_image(root / "b" / f"{i}.png", mode=mode, size=(14, 10 + i), seed=10 + i)


def _one_class(root: Path) -> None:
    write_image_folder(root, ("cats",), per_class=6, size=(12, 12))


def _empty_class(root: Path) -> None:
    _two_classes(root)
    (root / "c").mkdir()


def _unreadable_class(root: Path) -> None:
    write_image_folder(root, ("a",), per_class=4, size=(12, 12))
    write_zero_byte_file(root / "b" / "1.png")
    write_not_an_image_file(root / "b" / "2.jpg")


def _split_mismatch(root: Path) -> None:
    write_image_folder(root / "train", ("a", "b"), per_class=3, size=(12, 12))
    write_image_folder(root / "val", ("a", "c"), per_class=1, size=(12, 12))


def _old_runs_inside(root: Path) -> None:
    _two_classes(root)
    run = root / "runs" / "old-run"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "recipe.json").write_text("{}")
    write_image(run / "curves.png", size=(12, 12))


def _nothing(root: Path) -> None:
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()


CASES = {
    # name: (make the data, recipe changes, exit status, what the message says)
    "mixed sizes and modes": (_folder(_mixed_modes), {}, 0, None),
    "a file cut short, skipped": (_folder(_with_cut_file), {}, 0, r"warning: skipping 1 unreadable image file under .*cut\.jpg"),
    "a file cut short, fail": (_folder(_with_cut_file), {"data__bad_images": "fail"}, 2, r"cannot read image .*cut\.jpg"),
    "a single class": (_folder(_one_class), {}, 2, r"data\.root: imagefolder has 1 class \('cats'\); a classifier needs at least two"),
    "an empty root": (lambda tmp, mp: {"data__root": ""}, {}, 2, r"data\.root: an empty path"),
    "output inside the data folder": (_folder(_two_classes), {"output_dir": "photos/runs"}, 2,
                                      r"data\.root: the run directories would be written inside the data folder"),
    "old runs inside the data folder": (_folder(_old_runs_inside), {}, 2, r"holds cnnreg run directories"),
    "an empty class folder": (_folder(_empty_class), {}, 2, r"class folders without images .*'c'"),
    "a class of unreadable files": (_folder(_unreadable_class), {}, 2, r"every image of class 'b'"),
    "splits with other classes": (_folder(_split_mismatch), {}, 2, r"differ from those of train/"),
    "no images": (_folder(_nothing), {}, 2, r"class folders without images|no images found"),
    "a test fraction beside a test folder": (_folder(lambda r: (_two_classes(r / "train"), _two_classes(r / "test"))),
                                             {"data__test_fraction": 0.2}, 2, r"has a test/ folder"),
    "too few images for one batch": (_folder(_two_classes), {"data__batch_size": 64, "data__drop_last": True}, 2,
                                     r"data\.batch_size: the training split has 6 images, fewer than one batch of 64"),
    "a single photo per class": (_folder(lambda r: write_image_folder(r, ("a", "b"), per_class=1)), {}, 2,
                                 r"data: cannot carve a validation split of 0\.25 from 2 training images"),
    "a class too small for validation": (_folder(lambda r: write_image_folder(r, {"a": 1, "b": 8})), {}, 0,
                                         r"warning: no validation image for class 'a'"),
    "more folds than photos": (_folder(lambda r: write_image_folder(r, ("a", "b"), per_class=2)),
                               {"cross_validation": {"folds": 5}}, 2, r"cross_validation\.folds: k-fold needs 2 <= folds"),
    "photos outside the class folders": (_folder(lambda r: (_two_classes(r), write_image(r / "stray.jpg"))), {}, 0,
                                         r"warning: 1 image file directly in .*'stray\.jpg'.* left out"),
    "a plugin's labels out of range": (lambda tmp, mp: {"data": {"name": _plugin_with_bad_labels(tmp, mp), "batch_size": 4}},
                                       {}, 2, r"data: shifted \(plugin 'shifted', shifted-data 0\.1\) made bad labels: labels of the train "
                                       r"split must be class indices in \[0, 2\)"),
}


def _outcome(capsys, argv: list[str]) -> tuple[int, list[str]]:
    status = main(argv)
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith(("error:", "warning:"))]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_validate_gives_the_verdict_run_gives(case, tmp_path, monkeypatch, capsys):
    make, changes, status, message = CASES[case]
    recipe = recipe_for(tmp_path, tmp_path / "photos", **make(tmp_path, monkeypatch), **changes)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe, indent=2))
    checked = _outcome(capsys, ["validate", str(path)])
    ran = _outcome(capsys, ["run", str(path)])
    assert checked[0] == ran[0] == status, (checked, ran)
    assert checked[1] == ran[1]  # the same located errors and warnings, word for word
    if message is not None:
        assert any(re.search(message, line) for line in ran[1]), ran[1]
    else:
        assert ran[1] == []


def test_a_cache_that_cannot_be_written_costs_time_not_the_run(tmp_path, capsys):
    root = colour_folder(tmp_path / "photos")
    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe_for(tmp_path, root, data__cache_dir=str(tmp_path / "a-file" / "cache"))))
    status, lines = _outcome(capsys, ["run", str(path)])
    assert status == 0 and lines and all(re.match(r"warning: could not write the image cache .*a-file/cache", line)
                                         for line in lines), lines


def test_absent_data_is_not_checked_unless_strict_and_strict_says_what_run_says(tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe_for(tmp_path, tmp_path / "not-yet", {"name": "timm", "arch": TIMM_ARCH},
                                          transforms={"train": [{"name": "random_crop", "size": 150}], "eval": []})))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"not checked: .*recipe\.json:\d+:\d+ data: imagefolder: image folder .*not-yet does not exist", out)
    assert "stand-in batch of 3x168x168" in out  # the backbone's size: every crop of the recipe is tried on it
    strict = _outcome(capsys, ["validate", "--strict", str(path)])
    ran = _outcome(capsys, ["run", str(path)])
    assert strict[0] == ran[0] == 2 and strict[1] == ran[1] and "does not exist" in ran[1][0]


def test_absent_data_still_checks_the_rest(tmp_path):
    recipe = recipe_for(tmp_path, tmp_path / "not-yet", transforms={"train": [{"name": "random_crop", "size": 80}],
                                                                      "eval": []},
                        optimizer={"name": "adam", "lr": 0.01, "lr_sheduler": 1})
    with pytest.raises(RecipeError, match="lr_sheduler"):
        cnnreg.validate(recipe)
    recipe = recipe_for(tmp_path, tmp_path / "not-yet", data__size=32,
                        transforms={"train": [{"name": "random_crop", "size": 80}], "eval": []})
    with pytest.raises(RecipeError, match=r"transforms\.train\[0\].*random_crop size 80x80 is larger than"):
        cnnreg.validate(recipe)


def test_missing_weights_are_not_checked_but_the_architecture_is(tmp_path):
    write_image_folder(tmp_path / "photos", ("a", "b"), per_class=2, size=(12, 12))
    model = {"name": "timm", "arch": TIMM_ARCH, "pretrained": str(tmp_path / "absent.safetensors")}
    check = cnnreg.validate(recipe_for(tmp_path, tmp_path / "photos", model, data__val_fraction=0.0))
    [unchecked] = check.unchecked
    assert "absent.safetensors" in str(unchecked) and unchecked.instead == "pretrained=False"
    with pytest.raises(RecipeError, match="weights file for timm model 'test_resnet' not found"):
        cnnreg.validate(recipe_for(tmp_path, tmp_path / "photos", model, data__val_fraction=0.0), strict=True)


@pytest.mark.slow
def test_the_shipped_recipes_validate_on_a_fresh_checkout_without_a_network(tmp_path):
    recipes = sorted(str(p) for p in (Path(__file__).parent.parent / "recipes").glob("*.json"))
    offline = {"HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    done = cli("validate", *recipes, cwd=tmp_path, env=offline)
    assert done.returncode == 0, done.stdout + done.stderr
    # recipes/*.json also finds the schema beside them: skipped, said so, not an error
    assert done.stdout.count("ok ") == len(recipes) - 1
    assert "skipped " in done.stdout and "recipe.schema.json: the recipe schema (for editors), not a recipe" in done.stdout
    transfer = done.stdout.split("imagefolder-transfer.json:", 1)[1].split("\nok ", 1)[0]
    assert re.search(r"\n  not checked: .*hymenoptera_data does not exist", transfer), transfer
    strict = cli("validate", "--strict", *recipes, cwd=tmp_path, env=offline)
    assert strict.returncode == 2 and "does not exist" in strict.stderr


# -- progress while preparing ------------------------------------------------------------------------


def test_long_preparation_leaves_a_few_plain_lines_in_a_log(monkeypatch, capsys):
    monkeypatch.setattr(progress, "PLAIN_AFTER", 0.0)
    with progress.reporting("plain"):
        with progress.step("decoding the images of train", total=3) as advance:
            advance(2)
            advance(1)
        progress.note("image cache: wrote 3 images (1.2 kB) to /somewhere")
    with progress.reporting("off"):
        with progress.step("silent", total=1) as advance:
            advance(1)
        progress.note("not shown")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert re.match(r"^decoding the images of train: 3 files, done in \d+\.\ds, [\d,]+ files/s$", err[0])
    assert err[1] == "image cache: wrote 3 images (1.2 kB) to /somewhere"


def test_preparation_shows_a_bar_with_count_rate_and_time_left_on_a_terminal(tmp_path):
    import pty
    import subprocess
    import sys

    write_image_folder(tmp_path / "photos", ("a", "b"), per_class=300, size=(16, 16), formats=("png",))
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe_for(tmp_path, tmp_path / "photos", trainer__progress="auto")))
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm-256color"}
    process = subprocess.Popen([sys.executable, "-m", "cnnreg", "validate", str(path)], stdin=follower,
                               stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower closed: the process is done
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    assert "reading the image headers of photos" in text and re.search(r"\d+/600", text)  # a bar with its count
    assert "\x1b[" in output.decode(errors="replace")  # drawn in place, with escape codes


def test_the_image_extensions_are_torchvisions():
    # written out in cnnreg.inputs.imagefiles so that listing a folder needs no torchvision import
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert imagefiles.IMG_EXTENSIONS == IMG_EXTENSIONS
