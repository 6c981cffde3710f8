"""Sweeps: one run per point, validated up front, ranked by the monitored metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from cnnreg.core.errors import RecipeError
from cnnreg.core.options import Sweep
from cnnreg.workflows.sweep import load_trials, points, run_sweep
from conftest import cli, tiny_recipe


def _sweep_recipe(tmp_path: Path, sweep: dict) -> dict:
    recipe = tiny_recipe(tmp_path, trainer__epochs=1, data__train_size=48, data__val_size=24, data__test_size=12)
    recipe["sweep"] = sweep
    return recipe


@pytest.mark.slow
def test_a_2x2_grid_trains_four_runs_and_ranks_them(tmp_path: Path, recipe_file) -> None:
    path = recipe_file(_sweep_recipe(tmp_path, {"method": "grid", "parameters": {
        "optimizer.lr": [0.01, 0.001], "model.widths": [[4, 4, 4], [8, 8, 8]]}}))
    console = Console(record=True, width=200)
    result = run_sweep(path, console=console)

    assert sorted(t.number for t in result.trials) == [1, 2, 3, 4]
    runs = sorted(p for p in result.run_dir.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["tiny-t01", "tiny-t02", "tiny-t03", "tiny-t04"]
    # each run is a plain recipe with its trial's values
    saved = json.loads((result.run_dir / "tiny-t02" / "recipe.json").read_text())
    assert saved["sweep"] is None and saved["optimizer"]["lr"] == 0.01 and saved["model"]["widths"] == [8, 8, 8]
    bests = [t.best for t in result.trials]
    assert bests == sorted(bests, reverse=True)  # val_accuracy: best first
    for trial in result.trials:
        summary = json.loads((trial.run_dir / "summary.json").read_text())
        assert summary["best"][result.monitor] == trial.best
    listed = json.loads((result.run_dir / "sweep.json").read_text())
    assert [t["trial"] for t in listed["trials"]] == [t.number for t in result.trials]
    text = console.export_text()
    assert "optimizer.lr" in text and "model.widths" in text and result.monitor in text


def test_random_sweeps_draw_reproducibly_within_ranges() -> None:
    sweep = Sweep.model_validate({"method": "random", "budget": 20, "seed": 3, "parameters": {
        "optimizer.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "model.widths": [[4], [8]]}})
    drawn = points(sweep)
    assert drawn == points(sweep) and len(drawn) == 20
    assert all(1e-4 <= p["optimizer.lr"] <= 1e-1 for p in drawn)
    assert {tuple(p["model.widths"]) for p in drawn} == {(4,), (8,)}
    assert min(p["optimizer.lr"] for p in drawn) < 1e-3  # log-uniform: small values are not rare


@pytest.mark.parametrize("sweep, message", [
    ({"method": "random", "parameters": {"optimizer.lr": [0.1]}}, "needs a budget"),
    ({"parameters": {"optimizer.lr": {"low": 0.1, "high": 0.2}}}, "is a range"),
    ({"parameters": {"optimizer.lr": []}}, "at least 1"),
    ({"parameters": {"optimizer.lr": [0.1]}, "trials": 3}, "trials"),
])
def test_a_bad_sweep_section_is_a_located_recipe_error(tmp_path: Path, recipe_file, sweep, message) -> None:
    path = recipe_file(_sweep_recipe(tmp_path, sweep))
    with pytest.raises(RecipeError) as caught:
        load_trials(path)
    text = "\n".join(str(p) for p in caught.value.problems)
    assert message in text and "sweep" in text and str(path) in text


def test_a_bad_swept_key_or_value_points_at_the_sweep_before_anything_runs(tmp_path: Path, recipe_file) -> None:
    path = recipe_file(_sweep_recipe(tmp_path, {"parameters": {"optimizer.lrr": [0.1, 0.2],
                                                               "optimizer.lr": [0.1, -1]}}))
    with pytest.raises(RecipeError) as caught:
        load_trials(path)
    problems = caught.value.problems
    lines = path.read_text().splitlines()
    for key in ("optimizer.lrr", "optimizer.lr"):
        hits = [p for p in problems if p.path == ("sweep", "parameters", key)]
        assert hits, f"no problem located at {key}: {problems}"
        assert f'"{key}"' in lines[hits[0].line - 1]
    assert not (tmp_path / "runs").exists()  # nothing was trained


@pytest.mark.slow
def test_run_refuses_a_sweep_recipe_and_sweep_command_runs_it(tmp_path: Path, recipe_file) -> None:
    path = recipe_file(_sweep_recipe(tmp_path, {"parameters": {"optimizer.lr": [0.01, 0.001]}}))
    refused = cli("run", str(path))
    assert refused.returncode == 2 and "cnnreg sweep" in refused.stderr
    done = cli("sweep", str(path))
    assert done.returncode == 0, done.stderr
    assert "tiny-t01" in done.stdout and "tiny-t02" in done.stdout
