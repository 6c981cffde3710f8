"""The command line on a finished run: ls, evaluate, predict, export, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cnnreg.cli import main

from conftest import cli, tiny_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run trained through the CLI, with a best checkpoint."""
    tmp_path = tmp_path_factory.mktemp("cli-run")
    recipe = tiny_recipe(tmp_path, trainer__epochs=6, callbacks=[{"name": "checkpoint"}],
                         disable_plugins=["plots"])
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    assert main(["run", str(path)]) == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    return run_dir


def test_ls_lists_builtins_with_plugin_and_distribution(capsys):
    assert main(["ls", "models"]) == 0
    out = capsys.readouterr().out
    for name in ("tutorial_cnn", "simple_cnn", "mnist_cnn", "mnist_cnn_bn", "timm", "torchvision"):
        assert name in out
    assert "tutorial_models" in out and "cnnreg-framework" in out
    assert main(["ls", "transforms", "random_*"]) == 0
    out = capsys.readouterr().out
    assert "random_crop" in out and "normalize" not in out


def test_ls_lists_timm_architectures_on_demand(capsys):
    assert main(["ls", "models", "timm:resnet1*"]) == 0
    out = capsys.readouterr().out
    assert "timm:resnet18" in out and "tutorial_cnn" not in out


def test_ls_rejects_an_unknown_kind(capsys):
    assert main(["ls", "modles"]) == 2
    assert "unknown kind 'modles'" in capsys.readouterr().err


def test_version_and_help():
    result = cli("--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "cnnreg run recipes/quickstart.json" in result.stdout
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("cnnreg 0.")


def test_evaluate_prints_metrics_and_per_class_table(finished_run, capsys):
    assert main(["evaluate", str(finished_run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "per-class results (test)" in out
    summary = json.loads((finished_run / "summary.json").read_text())
    for name in summary["classes"]:
        assert name in out


def test_evaluate_json_agrees_with_its_own_confusion_matrix(finished_run, capsys):
    assert main(["evaluate", str(finished_run), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    confusion = result["confusion"]  # rows are true classes
    total = sum(map(sum, confusion))
    assert result["metrics"]["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(len(confusion))) / total)
    assert result["per_class"]["support"] == [sum(row) for row in confusion]
    assert result["classes"] == json.loads((finished_run / "summary.json").read_text())["classes"]


def test_predict_prints_class_and_confidence(finished_run, tmp_path, capsys):
    import cnnreg

    run = cnnreg.load_run(finished_run)
    images = []
    for i in range(4):
        path = tmp_path / f"image {i}.png"  # a space in the name, too
        Image.fromarray(run.data.train.images[i].permute(1, 2, 0).numpy()).save(path)
        images.append(str(path))
    assert main(["predict", str(finished_run), *images, "--top-k", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == images
    classes = set(run.classes)
    for line in lines:
        assert len(line["classes"]) == 2 and set(line["classes"]) <= classes
        assert 1 >= line["confidences"][0] >= line["confidences"][1] >= 0
    assert main(["predict", str(finished_run), images[0]]) == 0
    assert "%" in capsys.readouterr().out
    assert main(["predict", str(finished_run), str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "safetensors"])
def test_export_checks_the_outputs_match(finished_run, tmp_path, fmt, capsys):
    output = tmp_path / f"model.{fmt}"
    assert main(["export", str(finished_run), "--format", fmt, "-o", str(output)]) == 0
    assert output.exists() and output.stat().st_size > 1000
    assert "outputs match the model" in capsys.readouterr().out


def test_evaluate_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    assert main(["run", "--resume", str(finished_run)]) == 2
    err = capsys.readouterr().err
    assert "is finished: it trained 6 of 6 epochs; nothing was changed" in err
    assert "--set trainer.epochs=16" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()} == before


def test_set_overrides_values_and_reports_bad_ones(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(tiny_recipe(tmp_path)))
    assert main(["validate", str(path), "--set", "trainer.epochs=0"]) == 2
    assert "trainer.epochs: must be greater than or equal to 1; got 0" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "noequals"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
