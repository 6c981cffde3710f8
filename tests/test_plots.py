"""The plots plugin: curves.png and confusion.png at the end of a fit with a run directory."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import cnnreg
from cnnreg.core.records import EpochRecord, EvalResult
from cnnreg_plugins import plots
from conftest import tiny_recipe as shared_tiny_recipe


def tiny_recipe(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """The shared tiny recipe with its sizes pinned: 96 train, 48 val, 48 test images, batches of 32."""
    pinned = {"data__train_size": 96, "data__val_size": 48, "data__test_size": 48, "data__batch_size": 32,
              "trainer__checkpoint_every": 0}
    return shared_tiny_recipe(tmp_path, **{**pinned, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    """One fit of two epochs, with the plots plugin installed as usual."""
    tmp_path = tmp_path_factory.mktemp("plots")
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path)))
    return run, cnnreg.fit(run)


def read_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every pixel: a cut file fails here
        return image


def test_a_fit_writes_the_curves_and_the_confusion_matrix(finished):
    run, result = finished
    curves, confusion = read_png(run.run_dir / "curves.png"), read_png(run.run_dir / "confusion.png")
    assert curves.width > 2 * curves.height > 500  # three panels side by side
    assert min(confusion.size) >= 300
    # the figures have content, not a blank canvas
    assert np.asarray(curves.convert("L")).std() > 10 and np.asarray(confusion.convert("L")).std() > 10
    assert not [p for p in run.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_disabled_plots_write_nothing(tmp_path):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=1), disable=["plots"]))
    cnnreg.fit(run)
    assert (run.run_dir / "summary.json").is_file()
    assert not list(run.run_dir.glob("*.png"))


def test_without_matplotlib_the_plugin_does_nothing(finished, tmp_path, monkeypatch, capsys):
    run, result = finished
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plots.cnnreg_fit_end(run=replace(run, run_dir=tmp_path), result=result)
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")
    monkeypatch.undo()  # with matplotlib back, the same call draws
    plots.cnnreg_fit_end(run=replace(run, run_dir=tmp_path), result=result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "curves.png"]


def test_confusion_matrix_rows_are_shares_of_each_true_class_with_names_and_counts():
    result = EvalResult(split="val", metrics={}, per_class={}, confusion=((6, 2, 0), (0, 0, 0), (1, 0, 3)),
                        classes=("red circle", "red square", "cyan circle"))
    figure = plots.confusion_figure(result, epoch=7)
    ax = figure.axes[0]
    rates = np.asarray(ax.images[0].get_array())
    assert rates == pytest.approx(np.array([[0.75, 0.25, 0], [0, 0, 0], [0.25, 0, 0.75]]))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(result.classes)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(result.classes)
    assert sorted(t.get_text() for t in ax.texts) == sorted(["75%\n6", "25%\n2", "25%\n1", "75%\n3"])
    assert ax.get_title() == "confusion matrix (val, epoch 7, 12 images)"


def test_the_confusion_matrix_is_of_the_last_validation_else_of_train():
    def evaluation(split: str) -> EvalResult:
        return EvalResult(split=split, metrics={}, per_class={}, confusion=((1, 0), (0, 1)), classes=("a", "b"))

    every_other = [EpochRecord(epoch=e, epochs=3, metrics={}, evals={"train": evaluation("train"),
                                                                      **({"val": evaluation("val")} if e == 2 else {})})
                   for e in (1, 2, 3)]
    assert plots.last_evaluation(every_other)[0] == 2
    assert plots.last_evaluation(every_other)[1].split == "val"
    train_only = [EpochRecord(epoch=e, epochs=2, metrics={}, evals={"train": evaluation("train")}) for e in (1, 2)]
    assert plots.last_evaluation(train_only)[0] == 2 and plots.last_evaluation(train_only)[1].split == "train"
    assert plots.last_evaluation([]) is None


def test_curves_show_train_and_val_where_they_were_measured():
    def metrics(e: int) -> dict[str, float]:
        val = {"val_loss": 0.9 / e, "val_accuracy": 0.25 * e} if e % 2 == 0 else {}  # eval_every=2
        return {"train_loss": 1.0 / e, "train_accuracy": 0.2 * e, "lr": 0.1 / e, **val}

    records = [EpochRecord(epoch=e, epochs=4, metrics=metrics(e)) for e in (1, 2, 3, 4)]
    figure = plots.curves_figure(records)
    loss, accuracy, lr = figure.axes
    assert [ax.get_title() for ax in figure.axes] == ["loss", "accuracy", "learning rate"]
    assert {line.get_label(): list(line.get_xdata()) for line in loss.lines} == {"train": [1, 2, 3, 4], "val": [2, 4]}
    assert list(accuracy.lines[1].get_ydata()) == pytest.approx([0.5, 1.0])
    assert list(lr.lines[0].get_ydata()) == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])
