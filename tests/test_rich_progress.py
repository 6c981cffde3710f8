"""The progress display: plain lines in pipes, rich bars on terminals, silence when disabled."""

from __future__ import annotations

import io
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import cnnreg
from cnnreg.core.stops import Interrupted
from cnnreg.core.records import ProgressRecord
from cnnreg_plugins.rich_progress import PLAIN_FOOTER_LINES, PlainProgress, RichProgress
from conftest import cli
from conftest import tiny_recipe as shared_tiny_recipe

EPOCH_LINE = re.compile(r"^epoch (\d+)/3 train_loss=\d+\.\d{4} train_accuracy=\d\.\d{4} .*val_loss=\d+\.\d{4} "
                        r"val_accuracy=\d\.\d{4} .*lr=0\.01 time=\d+\.\ds \d+ img/s$")

def tiny_recipe(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """The shared tiny recipe with its sizes pinned: 96 train, 48 val, 48 test images, batches of 32."""
    pinned = {"data__train_size": 96, "data__val_size": 48, "data__test_size": 48, "data__batch_size": 32}
    return shared_tiny_recipe(tmp_path, **{**pinned, **changes})



def test_plain_output_in_a_pipe_is_one_line_per_epoch_without_escape_codes(tmp_path, recipe_file):
    path = recipe_file(tiny_recipe(tmp_path, trainer={"epochs": 3, "checkpoint_every": 0}))  # progress "auto"
    done = cli("run", str(path), "--disable", "plots", env={"TERM": "xterm-256color"})
    assert done.returncode == 0, done.stderr

    assert "\x1b" not in done.stdout
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + 3 + PLAIN_FOOTER_LINES, done.stdout
    assert lines[0].startswith("run tiny: device=cpu precision=fp32 model=simple_cnn params=")
    assert "train=96 val=48 test=48" in lines[0] and "run_dir=" in lines[0]
    assert [int(EPOCH_LINE.match(line).group(1)) for line in lines[1:4]] == [1, 2, 3], lines[1:4]
    assert re.match(r"^best epoch [123]/3: val_accuracy=\d\.\d{4}$", lines[4])
    run_dir = next((tmp_path / "runs").iterdir())
    assert re.match(rf"^stopped: completed; 3 epochs, \d+\.\ds; run directory: {re.escape(str(run_dir))}$", lines[5])


def test_disabling_the_plugin_silences_stdout(tmp_path, recipe_file):
    path = recipe_file(tiny_recipe(tmp_path, trainer={"epochs": 1, "progress": "plain"}))
    done = cli("run", str(path), "--disable", "rich_progress", "--disable", "plots")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "summary.json").is_file()
    assert not list(run_dir.glob("*.png"))


@pytest.mark.parametrize("setting, expected", [("off", None), ("plain", PlainProgress), ("rich", RichProgress)])
def test_trainer_progress_picks_the_display(tmp_path, setting, expected):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__progress=setting)), output=False)
    displays = [p for p in run.pm.get_plugins() if isinstance(p, (PlainProgress, RichProgress))]
    assert [type(p) for p in displays] == ([expected] if expected else [])


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120), buffer


def test_rich_display_shows_bars_rows_and_the_per_class_table(tmp_path):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__checkpoint_every=0), disable=["plots"]))
    console, buffer = terminal()
    display = RichProgress(console)
    run.pm.register(display)
    stdout = sys.stdout
    result = cnnreg.fit(run)

    assert sys.stdout is stdout  # the live display gave stdout back
    assert display.progress is None
    text = buffer.getvalue()
    assert "\x1b[?25h" in text  # the cursor is shown again
    plain = strip_ansi(text)
    assert "cnnreg run tiny" in plain and "simple_cnn" in plain and "train 96 · val 48 · test 48" in plain
    for field in ("epoch 1/2", "epoch 2/2", "3/3", "img/s", "loss "):
        assert field in plain, field
    header = next(line for line in plain.splitlines() if line.strip().startswith("epoch  train_loss"))
    assert header.split() == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "time"]
    rows = [line for line in plain.splitlines() if re.match(r"^\s+[12]/2\s", line)]
    assert len(rows) == 2 and rows[0].endswith("*")  # the first epoch is the best so far
    assert f"best epoch {result.best_epoch}/2: val_accuracy" in plain
    assert "stopped: completed" in plain
    assert "per-class results (val)" in plain
    for name in run.classes:
        assert name in plain
    assert f"run directory: {run.run_dir}" in plain


def test_the_bar_shows_the_latest_finished_loss_speed_and_time_left(tmp_path):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path)), output=False)
    console, buffer = terminal()
    display = RichProgress(console)
    display.cnnreg_fit_start(run, 1)
    display.cnnreg_epoch_start(run, 1)
    try:
        display.cnnreg_train_progress(run, ProgressRecord(epoch=1, epochs=2, step=2, steps=3, images=64,
                                                          seconds=2.0, loss=None))
        assert display.progress.tasks[0].fields == {"loss": "loss —", "speed": "32 img/s", "eta": "ETA 0:01"}
        display.cnnreg_train_progress(run, ProgressRecord(epoch=1, epochs=2, step=3, steps=3, images=96,
                                                          seconds=2.5, loss=0.6931))
        assert display.progress.tasks[0].fields["loss"] == "loss 0.6931"
        assert display.progress.tasks[0].completed == 3
    finally:
        display._stop()
    assert "epoch 1/2" in buffer.getvalue() and "loss 0.6931" in buffer.getvalue()


class InterruptAfterEpoch:
    """Sends this process SIGINT at the end of an epoch, as Ctrl-C would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    @cnnreg.hookimpl
    def cnnreg_epoch_end(self, run: Any, record: Any) -> None:
        if record.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_fit_stops_the_live_display_and_keeps_the_plain_line_count(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=3), disable=["plots"])
    run = cnnreg.build(recipe)
    console, buffer = terminal()
    rich_display, plain_out = RichProgress(console), io.StringIO()
    for plugin in (rich_display, PlainProgress(plain_out), InterruptAfterEpoch(1)):
        run.pm.register(plugin)
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(Interrupted):
        cnnreg.fit(run)

    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert rich_display.progress is None and "\x1b[?25h" in buffer.getvalue()
    assert "stopped: interrupted" in strip_ansi(buffer.getvalue())
    lines = plain_out.getvalue().splitlines()
    assert len(lines) == 1 + 1 + PLAIN_FOOTER_LINES
    assert lines[1].startswith("epoch 1/3 ")
    assert lines[-1].startswith("stopped: interrupted; 1 epoch, ")
