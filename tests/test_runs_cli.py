"""`cnnreg runs`: one row per run directory, finished or not."""

from __future__ import annotations

import json
from pathlib import Path

import cnnreg
from cnnreg.cli import main
from cnnreg.runs.listing import describe_run
from conftest import tiny_recipe


def test_runs_lists_finished_and_unfinished_runs(tmp_path: Path, capsys) -> None:
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=1, data__train_size=48, data__val_size=24,
                                            data__test_size=12))
    finished = cnnreg.fit(cnnreg.build(recipe)).run_dir
    # a run killed before its summary: run.json and one logged epoch of three
    unfinished = tmp_path / "runs" / "killed-20261122-101500"
    unfinished.mkdir()
    info = json.loads((finished / "run.json").read_text())
    info["recipe"]["name"], info["recipe"]["trainer"]["epochs"] = "killed", 3
    (unfinished / "run.json").write_text(json.dumps(info))
    (unfinished / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "tra')  # cut by the kill
    (tmp_path / "runs" / "notes").mkdir()  # not a run: left out

    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "killed" in out and "notes" not in out

    summary = json.loads((finished / "summary.json").read_text())
    row = describe_run(finished)
    value = summary["best"][summary["monitor"]]
    assert row["epochs"] == "1/1" and row["stopped"] == "completed"
    assert row["best"] == f"{summary['monitor']}={value:.4g} at epoch 1"
    row = describe_run(unfinished)
    assert row["epochs"] == "1/3" and row["stopped"] == "running or interrupted" and row["best"] == ""


def test_runs_on_a_missing_folder_is_a_user_error(tmp_path: Path, capsys) -> None:
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 0
    assert "no runs" in capsys.readouterr().out
