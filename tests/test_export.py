"""Weights that load anywhere, and exports that compute what ``cnnreg predict`` computes.

Every check compares with a path that is not the export's own: the plain
timm / torchvision network built by its library, the tutorial factory
rebuilt from the file's metadata alone, ``cnnreg predict`` reading PNG files,
torchvision's resize. Runs are tiny (synthetic 16x16 images, one epoch) and
use explicit normalisation constants, so the references need no cnnreg code.
"""

from __future__ import annotations

import importlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cnnreg
from cnnreg.cli import main

from _datafiles import write_image
from conftest import cli, tiny_recipe

MEAN, STD = 0.5, 0.25
NORMALIZE = {"name": "normalize", "mean": [MEAN] * 3, "std": [STD] * 3}
SIZE = 16
CLASSES = 3


def _recipe(tmp_path: Path, model: dict, **changes) -> dict:
    return tiny_recipe(tmp_path, model=model, trainer__epochs=1, callbacks=[{"name": "checkpoint"}],
                       disable_plugins=["plots"], transforms={"train": [NORMALIZE], "eval": [NORMALIZE]},
                       data__image_size=SIZE, data__train_size=64, data__val_size=32, data__test_size=16, **changes)


def _train(recipe: dict) -> Path:
    run = cnnreg.build(cnnreg.load_recipe(recipe))
    cnnreg.fit(run)
    assert (run.run_dir / "best.safetensors").is_file()
    return run.run_dir


MODELS = {"timm": {"name": "timm", "arch": "test_resnet"},  # timm's own tiny ResNet: no download
          "torchvision": {"name": "torchvision", "arch": "resnet18"},
          "tutorial": {"name": "simple_cnn", "widths": [8, 8, 8]}}


class _Runs(dict):
    """Run directories by kind of model, each trained on first use (a test needs one or two)."""

    def __init__(self, tmp_path_factory) -> None:
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, kind: str) -> Path:
        self[kind] = _train(_recipe(self.tmp_path_factory.mktemp(kind), MODELS[kind]))
        return self[kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> _Runs:
    return _Runs(tmp_path_factory)


def _images(count: int, height: int = SIZE, width: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def _pngs(images: np.ndarray, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images):
        paths.append(folder / f"{stem}-{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _predicted(run_dir: Path, files: list[Path], capsys) -> np.ndarray:
    """``cnnreg predict --json`` on image files: each file's probability of every class, in class order."""
    classes = json.loads((run_dir / "run.json").read_text())["data"]["classes"]
    capsys.readouterr()
    assert main(["predict", str(run_dir), *map(str, files), "--top-k", str(len(classes)), "--json"]) == 0
    rows = []
    for line in capsys.readouterr().out.splitlines():
        answer = json.loads(line)
        by_class = dict(zip(answer["classes"], answer["confidences"]))
        rows.append([by_class[c] for c in classes])
    return np.array(rows)


def _normalized(images: np.ndarray) -> torch.Tensor:
    """What the run's eval transforms make of uint8 images, by hand."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits).float(), dim=1).detach().numpy()


def _export(run_dir: Path, capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["export", str(run_dir), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# -- safetensors: the library's own network, the tutorial's own factory ----------------------


def _plain_network(library: str, arch: str, num_classes: int) -> torch.nn.Module:
    if library == "timm":
        import timm

        return timm.create_model(arch, num_classes=num_classes)
    import torchvision

    return getattr(torchvision.models, arch)(num_classes=num_classes)


@pytest.mark.parametrize("library, arch", [("timm", "test_resnet"), ("torchvision", "resnet18")])
def test_best_weights_and_the_safetensors_export_load_into_the_librarys_own_network(
        runs, tmp_path, capsys, library, arch):
    run_dir = runs[library]
    exported = Path(_export(run_dir, capsys, "--format", "safetensors", "-o", str(tmp_path / "w.safetensors"))["path"])
    images = _images(4)
    expected = _predicted(run_dir, _pngs(images, tmp_path, "img"), capsys)
    for path in (run_dir / "best.safetensors", exported):
        meta = _metadata(path)
        assert (meta["format"], meta["library"], meta["arch"], meta["num_classes"]) == ("pt", library, arch, "3")
        net = _plain_network(library, arch, int(meta["num_classes"]))
        net.load_state_dict(load_file(str(path)), strict=True)
        with torch.no_grad():
            logits = net.eval()(_normalized(images))
        np.testing.assert_allclose(_probabilities(logits), expected, atol=2e-6)


def test_the_transfer_models_whole_state_is_its_networks():
    from cnnreg_plugins.transfer import timm_model

    model = timm_model("test_resnet", num_classes=3, freeze="backbone", unfreeze_last=1)
    assert model.state_dict().keys() == {f"net.{k}" for k in model.net.state_dict()}


def test_a_tutorial_model_is_rebuilt_from_the_files_metadata_alone(runs, tmp_path, capsys):
    run_dir = runs["tutorial"]
    exported = Path(_export(run_dir, capsys, "--format", "safetensors", "-o", str(tmp_path / "w.safetensors"))["path"])
    images = _images(4, seed=1)
    expected = _predicted(run_dir, _pngs(images, tmp_path, "img"), capsys)
    for path in (run_dir / "best.safetensors", exported):
        meta = _metadata(path)
        assert meta["factory"] == "cnnreg_plugins.tutorial_models.simple_cnn"
        module, _, name = meta["factory"].rpartition(".")
        model = getattr(importlib.import_module(module), name)(**json.loads(meta["params"]))
        model.load_state_dict(load_file(str(path)), strict=True)
        with torch.no_grad():
            logits = model.eval()(_normalized(images))
        np.testing.assert_allclose(_probabilities(logits), expected, atol=2e-6)
    assert json.loads(_metadata(exported)["classes"]) == json.loads((run_dir / "run.json").read_text())["data"]["classes"]


def test_a_run_directory_from_before_with_net_prefixed_weights_still_predicts(runs, tmp_path, capsys):
    new = runs["timm"]
    old = tmp_path / "old-run"
    shutil.copytree(new, old)
    state = load_file(str(new / "best.safetensors"))
    # what best.safetensors held before: the TransferModel's own keys
    save_file({f"net.{k}": v for k, v in state.items()}, str(old / "best.safetensors"), metadata={"epoch": "1"})
    files = _pngs(_images(3, seed=2), tmp_path, "img")
    np.testing.assert_allclose(_predicted(old, files, capsys), _predicted(new, files, capsys), atol=0)
    reopened = cnnreg.load_run(old)
    assert all(torch.equal(reopened.model.net.state_dict()[k], v) for k, v in state.items())


# -- pt2 ------------------------------------------------------------------------------------


def test_the_pt2_export_loads_with_torch_export_and_matches_predict(runs, tmp_path, capsys):
    run_dir = runs["timm"]
    # A fresh process, as a user runs it: nothing the run computed is cached there (an export
    # that traced first used to keep normalize's cached constant as the exporter's fake tensor).
    result = cli("export", str(run_dir), "--format", "pt2", "--preprocessing", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["max_abs_diff_vs_predict"] < 1e-5  # the same resize, the same computation
    done = _export(run_dir, capsys, "--format", "pt2")
    assert done["format"] == "pt2" and Path(done["path"]) == run_dir / "model.pt2" and done["max_abs_diff"] < 1e-4
    module = torch.export.load(done["path"]).module()
    images = _images(5, seed=3)  # a batch size the export was not traced with
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected = _predicted(run_dir, _pngs(images, tmp_path, "img"), capsys)
    np.testing.assert_allclose(_probabilities(module(pixels)), expected, atol=2e-6)


# -- preprocessing in the graph ---------------------------------------------------------------


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory) -> Path:
    """An image-folder run whose images are resized to cover 16x20 and centre-cut (fit "crop")."""
    tmp_path = tmp_path_factory.mktemp("crop")
    for label in ("a", "b"):
        for i in range(6):
            write_image(tmp_path / "photos" / label / f"{i}.png", size=(20 + 3 * i, 40 - 2 * i), seed=i)
    recipe = _recipe(tmp_path, {"name": "simple_cnn", "widths": [8, 8, 8]})
    recipe["data"] = {"name": "imagefolder", "root": str(tmp_path / "photos"), "size": [16, 20], "fit": "crop",
                      "batch_size": 4, "val_fraction": 0.25, "cache_dir": str(tmp_path / "cache")}
    return _train(recipe)


@pytest.mark.parametrize("which", ["stretch", "crop"])
def test_onnx_with_preprocessing_takes_uint8_images_of_any_size_as_predict_does(
        runs, crop_run, tmp_path, capsys, which):
    import onnx
    from onnx.reference import ReferenceEvaluator

    run_dir = runs["tutorial"] if which == "stretch" else crop_run
    done = _export(run_dir, capsys, "--format", "onnx", "--preprocessing", "-o", str(tmp_path / "m.onnx"))
    assert done["preprocessing"] and done["max_abs_diff_vs_predict"] < 1e-4
    props = {p.key: p.value for p in onnx.load(done["path"]).metadata_props}
    assert json.loads(props["classes"]) == json.loads((run_dir / "run.json").read_text())["data"]["classes"]
    assert "uint8" in props["inputs"] and "any H and W" in props["inputs"] and props["fit"] == which
    evaluator = ReferenceEvaluator(done["path"])
    for seed, (height, width) in enumerate([(23, 41), (9, 13)]):  # neither is the run's size
        images = _images(2, height, width, seed=10 + seed)
        logits = evaluator.run(None, {"images": images.transpose(0, 3, 1, 2).copy()})[0]
        expected = _predicted(run_dir, _pngs(images, tmp_path, f"{height}x{width}"), capsys)
        np.testing.assert_allclose(_probabilities(torch.from_numpy(logits)), expected, atol=2e-6)


def test_the_graphs_resize_is_predicts_pixel_for_pixel():
    from cnnreg.inputs.graph_fit import GraphFit
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    for _ in range(30):
        height, width = (int(v) for v in rng.integers(1, 120, 2))
        size = (int(rng.integers(4, 40)), int(rng.integers(4, 40)))
        image = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
        # torchvision, as the run's data pipeline resizes: stretched, or covered and centre-cut
        scale = max(size[0] / height, size[1] / width)
        cover = [max(size[0], int(height * scale)), max(size[1], int(width * scale))]
        references = {"stretch": TF.resize(image, list(size), antialias=True),
                      "crop": TF.center_crop(TF.resize(image, cover, antialias=True), list(size))}
        for fit, reference in references.items():
            assert torch.equal(GraphFit(size, fit)(image[None])[0], reference.double()), (fit, height, width, size)


def test_preprocessing_is_refused_for_formats_without_a_graph(runs, capsys):
    assert main(["export", str(runs["tutorial"]), "--format", "safetensors", "--preprocessing"]) == 2
    assert "--preprocessing needs a graph format (onnx or pt2)" in capsys.readouterr().err


# -- TorchScript ----------------------------------------------------------------------------


def _torch_deprecates_torchscript() -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    return any(issubclass(w.category, (FutureWarning, DeprecationWarning)) for w in caught)


def test_torchscript_follows_what_the_installed_torch_does(runs, tmp_path, capsys):
    output = tmp_path / "model.torchscript.pt"
    status = main(["export", str(runs["tutorial"]), "--format", "torchscript", "-o", str(output)])
    captured = capsys.readouterr()
    if _torch_deprecates_torchscript():  # torch 2.14: every torch.jit entry point warns
        assert status == 2 and not output.exists()
        assert "TorchScript is deprecated by the installed torch" in captured.err
        assert "--format pt2" in captured.err and "warning" not in captured.err.lower()
    else:
        assert status == 0 and "outputs match the model" in captured.out


def test_torchscript_on_a_torch_that_does_not_deprecate_it_exports_as_before(runs, tmp_path, capsys, monkeypatch):
    # Only one torch is installed: an older one is simulated by silencing torch.jit's warnings.
    def quiet(function):
        def call(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return function(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.jit, "trace", quiet(torch.jit.trace))
    monkeypatch.setattr(torch.jit, "load", quiet(torch.jit.load))
    output = tmp_path / "model.torchscript.pt"
    done = _export(runs["tutorial"], capsys, "--format", "torchscript", "-o", str(output))
    assert done["format"] == "torchscript" and done["max_abs_diff"] < 1e-4 and output.is_file()
