"""``cnnreg lr-find``: the learning-rate range test leaves no trace on a later run, sweeps
geometrically, stops at divergence, suggests a learning rate that trains, and its command
writes the plot and the recipe copy it says it writes."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnreg import load_recipe
from cnnreg.assemble.build import build
from cnnreg.cli import main
from cnnreg.core.errors import UserError
from cnnreg.engine.loop import fit
from cnnreg.workflows.lr_find import lr_find, suggest
from conftest import tiny_recipe

TIMING_KEYS = ("epoch_seconds",)  # wall time differs from one fit to the next


def small(tmp_path: Path, **changes) -> dict:
    return tiny_recipe(tmp_path, data__train_size=96, data__val_size=24, data__test_size=12, **changes)


def fit_fresh(recipe) -> tuple[list[dict], dict[str, torch.Tensor]]:
    run = build(recipe, output=False)
    result = fit(run)
    metrics = [{k: v for k, v in r.metrics.items() if k not in TIMING_KEYS} for r in result.records]
    return metrics, {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_lr_find_leaves_a_later_training_and_the_global_generators_as_they_were(tmp_path: Path) -> None:
    recipe = load_recipe(small(tmp_path))
    written = recipe.to_json()
    before_metrics, before_weights = fit_fresh(recipe)

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    result = lr_find(recipe, steps=40)
    assert draws() == expected  # the finder's build seeded them all, then they were put back

    after_metrics, after_weights = fit_fresh(recipe)
    assert after_metrics == before_metrics  # exactly: every epoch, every metric
    assert after_weights.keys() == before_weights.keys()
    for name, tensor in before_weights.items():
        assert torch.equal(after_weights[name], tensor), name
    assert recipe.to_json() == written
    assert not (tmp_path / "runs").exists()  # no run directory, for the sweep or the fits
    assert 0 < result.steps <= 40


def test_the_sweep_is_geometric_from_start_to_end(tmp_path: Path) -> None:
    # 96 images in batches of 32: 3 batches an epoch, so 30 steps run over 10 epochs
    result = lr_find(load_recipe(small(tmp_path)), start_lr=1e-6, end_lr=1e-2, steps=30)
    assert result.stopped == "completed" and not result.stopped_early
    np.testing.assert_allclose(result.lrs, np.geomspace(1e-6, 1e-2, 30), rtol=1e-12)
    assert len(result.losses) == len(result.smoothed) == 30
    assert all(math.isfinite(v) for v in result.losses)


def test_a_huge_end_lr_diverges_and_the_sweep_stops_early(tmp_path: Path) -> None:
    recipe = load_recipe(small(tmp_path, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}))
    result = lr_find(recipe, start_lr=1e-4, end_lr=1e8, steps=60)
    assert result.stopped_early and ("diverged" in result.stopped or "became" in result.stopped)
    assert result.steps < 60
    np.testing.assert_allclose(result.lrs, np.geomspace(1e-4, 1e8, 60)[: result.steps], rtol=1e-12)
    last = result.losses[-1]
    assert not math.isfinite(last) or result.smoothed[-1] > 4 * min(result.smoothed[:-1])
    assert 1e-4 < result.suggestion < result.lrs[-1]


def test_the_suggestion_trains_better_than_a_tiny_lr(tmp_path: Path) -> None:
    raw = small(tmp_path, trainer__epochs=3)  # 9 steps
    result = lr_find(load_recipe(raw), steps=60)
    assert result.start_lr < result.suggestion < result.end_lr
    assert result.suggestion <= result.lr_at_min  # on the way down, not past the minimum

    def final_loss(lr: float) -> float:
        metrics, _ = fit_fresh(load_recipe({**raw, "optimizer": {"name": "adam", "lr": lr}}))
        return metrics[-1]["train_loss"]

    assert final_loss(result.suggestion) < final_loss(result.start_lr * 10) - 0.2


def test_the_suggestion_is_the_steepest_descent_of_a_known_curve() -> None:
    lrs = list(np.geomspace(1e-6, 1.0, 100))
    # a logistic drop centred at lr 1e-3 (steepest there), then a rise from lr 0.1
    curve = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + max(0.0, math.log10(lr) + 1) ** 2
             for lr in lrs]
    lr, method = suggest(lrs, curve, "completed")
    assert 10 ** -3.1 < lr < 10 ** -2.9
    assert "steepest" in method


@pytest.mark.parametrize("curve, words", [
    ([1.0] * 60, "hardly changed"),  # flat
    (list(np.linspace(1.0, 3.0, 60)), "only rose"),  # rising from the start
    ([1.0] * 12 + [float("nan")], "too few"),  # diverged almost at once
])
def test_a_curve_without_a_readable_descent_is_a_user_error_saying_what_to_try(curve, words) -> None:
    lrs = list(np.geomspace(1e-6, 1.0, len(curve)))
    with pytest.raises(UserError, match=words) as info:
        suggest(lrs, curve, "completed")
    assert "--start-lr" in str(info.value) or "--end-lr" in str(info.value)


def test_cli_writes_the_plot_and_applies_the_suggestion_to_a_copy(tmp_path: Path, recipe_file, capsys,
                                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = recipe_file(small(tmp_path))
    png = tmp_path / "plots" / "lr.png"
    assert main(["lr-find", str(path), "--steps", "40", "--json", "-o", str(png), "--apply"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["png"] == str(png)
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert 0 < len(out["lrs"]) == len(out["losses"]) <= 40

    copy = tmp_path / "recipe.lr-find.json"
    assert out["applied"] == str(copy.name)
    written = json.loads(copy.read_text())
    assert written["optimizer"]["lr"] == out["suggestion"]
    original = json.loads(path.read_text())
    assert written == {**original, "optimizer": {**original["optimizer"], "lr": out["suggestion"]}}
    assert load_recipe(copy).optimizer.lr == out["suggestion"]
    assert not (tmp_path / "runs").exists()

    before = copy.read_bytes()
    assert main(["lr-find", str(path), "--steps", "40", "-o", str(png), "--apply", str(copy)]) == 2
    assert "exists" in capsys.readouterr().err
    assert copy.read_bytes() == before


def test_cli_refuses_a_bad_set(tmp_path: Path, recipe_file, capsys) -> None:
    path = recipe_file(small(tmp_path))
    assert main(["lr-find", str(path), "--set", "trainer.epochs"]) == 2
    assert main(["lr-find", str(path), "--set", "optimizer.lr=-1"]) == 2
    assert "optimizer.lr" in capsys.readouterr().err
    assert not (tmp_path / "lr_find.png").exists()
