"""Recipe callbacks on real runs: best checkpoint, early stopping, metric logs, TensorBoard, lr monitor.

The runs are tiny (96 synthetic 12x12 images). Where a test needs a known
sequence of metric values it registers an in-process plugin with a metric
whose value per epoch is scripted.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import locale
import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torchvision.utils import make_grid

import cnnreg
from cnnreg.core import checkpoint as ckpt
from cnnreg.core.errors import RecipeError
from cnnreg.core.records import EpochRecord, EvalResult, FitResult, Metric
from cnnreg_plugins import callbacks
from cnnreg_plugins.transforms import Normalize
from conftest import tiny_recipe as shared_tiny_recipe

def tiny_recipe(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """The shared tiny recipe with its sizes pinned: 96 train, 48 val, 48 test images, batches of 32
    (and no figures at the end: they are test_plots' subject)."""
    pinned = {"data__train_size": 96, "data__val_size": 48, "data__test_size": 48, "data__batch_size": 32,
              "disable_plugins": ["plots"]}
    return shared_tiny_recipe(tmp_path, **{**pinned, **changes})



class Script:
    """An in-process plugin: the metric ``scripted`` takes ``values[epoch - 1]``
    (for every split), the model's weights are recorded at each epoch's end,
    and the run can be made to crash at the end of one epoch."""

    def __init__(self, values: Sequence[float], crash_at: int | None = None) -> None:
        self.values = list(values)
        self.crash_at = crash_at
        self.epoch = 0
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.files: dict[int, set[str]] = {}

    @cnnreg.hookimpl
    def cnnreg_metrics(self) -> dict[str, Any]:
        return {"scripted": self.scripted}

    def scripted(self) -> Metric:
        """A metric whose value per epoch the test chooses."""
        return Metric(names=("scripted",), compute=lambda tally: {"scripted": self.values[self.epoch - 1]})

    @cnnreg.hookimpl
    def cnnreg_epoch_start(self, run: Any, epoch: int) -> None:
        self.epoch = epoch

    @cnnreg.hookimpl
    def cnnreg_epoch_end(self, run: Any, record: Any) -> None:
        # Registered before the recipe's callbacks, so called after them (pluggy is LIFO).
        self.states[record.epoch] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        if run.run_dir is not None:
            self.files[record.epoch] = {p.name for p in run.run_dir.iterdir()}
        if record.epoch == self.crash_at:
            raise SimulatedCrash(f"simulated crash at the end of epoch {record.epoch}")


class SimulatedCrash(BaseException):
    """What a killed process leaves: no handler runs (a plugin's Exception is caught, named, and saved after)."""


def scripted_run(tmp_path: Path, script: Script, callbacks_: list[dict], output: bool = True, **changes: Any):
    # last.pt only at the end (each save is an fsync), unless a test asks for more
    changes = {"trainer__checkpoint_every": 0, **changes}
    recipe = tiny_recipe(tmp_path, metrics=[{"name": "accuracy"}, {"name": "scripted"}], callbacks=callbacks_,
                         **changes)
    return cnnreg.build(cnnreg.load_recipe(recipe, extra=[script]), output=output)


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


# -- the shared pieces, on their own ---------------------------------------------------------------


def fake_run(run_dir: Path | None, **changes: Any) -> SimpleNamespace:
    """What the callbacks read from a run: a two-group optimizer (lr 0.1 and 0.01), a run monitor
    val_accuracy (mode max), train and val batches and one metric, accuracy."""
    model = nn.Linear(2, 3)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    run = SimpleNamespace(run_dir=run_dir, is_main=True, model=model, optimizer=optimizer, monitor="val_accuracy",
                          mode="max", recipe=SimpleNamespace(name="tiny", trainer=SimpleNamespace(eval_every=1)),
                          batches={"train": None, "val": None},
                          metrics=[("accuracy", SimpleNamespace(names=("accuracy",)))])
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def record(epoch: int, **metrics: float) -> EpochRecord:
    return EpochRecord(epoch=epoch, epochs=10, metrics=metrics, train_seconds=1.5, images_per_second=640.0)


def test_a_warning_reaches_a_block_buffered_stderr_at_once(monkeypatch):
    # stderr piped into a log may be block-buffered: a warning before a crash must not wait in a buffer
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, encoding="utf-8", line_buffering=False))
    callbacks.warn("the disk is full")
    assert raw.getvalue() == b"cnnreg: warning: the disk is full\n"


def test_the_mode_is_the_explicit_one_else_the_runs_for_its_monitor_else_inferred():
    run = SimpleNamespace(monitor="val_scripted", mode="min")  # trainer.mode says min for a name read as max
    assert callbacks.resolve_mode(run, "val_scripted", None) == "min"
    assert callbacks.resolve_mode(run, "val_scripted", "max") == "max"
    assert callbacks.resolve_mode(run, "val_other", None) == "max"
    assert callbacks.resolve_mode(run, "val_loss", None) == "min"


@pytest.mark.parametrize("value, best, mode, min_delta, better", [
    (0.3, None, "max", 0.0, True),  # the first value always counts
    (float("nan"), None, "max", 0.0, False),
    (float("inf"), 0.5, "max", 0.0, False),
    (0.5, 0.5, "max", 0.0, False),  # a tie is no improvement
    (0.5, 0.5, "min", 0.0, False),
    (0.51, 0.5, "max", 0.0, True),
    (0.49, 0.5, "min", 0.0, True),
    (0.51, 0.5, "min", 0.0, False),
    (0.75, 0.5, "max", 0.25, False),  # must beat best by more than min_delta
    (0.76, 0.5, "max", 0.25, True),
    (0.6, 0.5, "max", 0.25, False),
    (0.25, 0.5, "min", 0.25, False),
    (0.24, 0.5, "min", 0.25, True),
    (0.4, 0.5, "min", 0.25, False),
])
def test_improves_needs_a_finite_value_beating_the_best_by_more_than_min_delta(value, best, mode, min_delta, better):
    assert callbacks.improves(value, best, mode, min_delta) is better


def test_improves_without_min_delta_counts_any_gain():
    assert callbacks.improves(0.501, 0.5, "max") and callbacks.improves(0.499, 0.5, "min")


def test_only_the_main_process_of_a_run_with_a_directory_writes_files(tmp_path):
    assert callbacks.writes_files(SimpleNamespace(run_dir=tmp_path, is_main=True))
    assert not callbacks.writes_files(SimpleNamespace(run_dir=tmp_path, is_main=False))
    assert not callbacks.writes_files(SimpleNamespace(run_dir=None, is_main=True))


@pytest.mark.parametrize("value, allow_folders, message", [
    ("", True, r"^log_dir must be a non-empty name without surrounding spaces"),
    (" tb", True, r"^log_dir must be a non-empty name without surrounding spaces, not ' tb'"),
    ("tb ", True, r"^log_dir must be a non-empty name"),
    ("/tmp/tb", True, r"^log_dir must be relative to the run directory, not the absolute path '/tmp/tb'"),
    ("C:tb", True, r"^log_dir must be relative to the run directory"),  # a Windows drive
    ("C:\\tb", True, r"^log_dir must be relative to the run directory"),
    ("../tb", True, r"^log_dir must stay inside the run directory; '../tb' climbs out of it with '..'"),
    ("a/../../tb", True, r"^log_dir must stay inside the run directory"),
    ("..\\tb", True, r"^log_dir must stay inside the run directory"),  # '..' with Windows separators
    ("a/b", False, r"^log_dir must be a file name in the run directory, without folders: 'a/b'"),
    ("a\\b", False, r"^log_dir must be a file name in the run directory, without folders"),
])
def test_names_that_leave_the_run_directory_are_refused_saying_why(value, allow_folders, message):
    with pytest.raises(ValueError, match=message):
        callbacks.check_relative_name(value, "log_dir", allow_folders=allow_folders)


@pytest.mark.parametrize("value, allow_folders", [("best.safetensors", False), ("tb/run1", True), ("a\\b", True),
                                                  ("x..y", False)])
def test_names_inside_the_run_directory_are_accepted(value, allow_folders):
    assert callbacks.check_relative_name(value, "filename", allow_folders=allow_folders) == value


def _bounded_writes(monkeypatch, sizes: list[int]) -> list[bytes]:
    """os.write writing at most ``sizes[-1]`` bytes per call (a short write: a nearly full disk);
    a loop that never ends fails instead of hanging."""
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(bytes(data))
        if len(calls) > 100:
            raise RuntimeError("os.write called over and over")
        return real_write(fd, bytes(data[:sizes[-1]]))

    monkeypatch.setattr(os, "write", write)
    return calls


def test_append_lines_creates_then_appends_and_survives_short_writes(tmp_path, monkeypatch):
    sizes = [1 << 20]
    calls = _bounded_writes(monkeypatch, sizes)
    path = tmp_path / "log.csv"
    callbacks.append_lines(path, "epoch,loss\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask  # an ordinary file, as open() would make
    callbacks.append_lines(path, "1,0.5\n")
    assert len(calls) == 2  # one write(2) per call: whole lines even if the process is killed
    sizes.append(4)
    callbacks.append_lines(path, "2,0.25 µ\n")
    assert path.read_bytes() == "epoch,loss\n1,0.5\n2,0.25 µ\n".encode("utf-8")
    assert len(calls) == 5  # 10 bytes, 4 at a time


def test_rewrite_kept_lines_keeps_whole_accepted_lines_and_the_header_when_asked(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(b"epoch,x\n1,a\n2,b\xff\n3,c\n4,half")  # an undecodable byte, a line cut short
    kept = callbacks.rewrite_kept_lines(path, lambda line: not line.startswith("3"), header=True)
    assert kept == ["epoch,x\n", "1,a\n", "2,b\ufffd\n"]
    assert path.read_text(encoding="utf-8") == "epoch,x\n1,a\n2,b\ufffd\n"
    # without header=True the first line is judged like the others (the default)
    path.write_text("epoch,x\n1,a\n2,b\n", encoding="utf-8")
    assert callbacks.rewrite_kept_lines(path, lambda line: line.startswith("2")) == ["2,b\n"]
    assert path.read_text(encoding="utf-8") == "2,b\n"
    # the header alone, when nothing after it is kept
    path.write_text("epoch,x\n1,a\n2,b\n", encoding="utf-8")
    assert callbacks.rewrite_kept_lines(path, lambda line: False, header=True) == ["epoch,x\n"]
    assert callbacks.rewrite_kept_lines(tmp_path / "missing.csv", lambda line: True) == []
    assert not (tmp_path / "missing.csv").exists()


@pytest.fixture
def ascii_locale():
    """A locale whose default encoding is ASCII (a C locale; cp1252 on Windows is alike)."""
    saved = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    yield
    locale.setlocale(locale.LC_CTYPE, saved)


def test_the_logs_are_read_back_as_utf8_whatever_the_locale(tmp_path, ascii_locale):
    # a plugin's metric may have a non-ASCII name; the logs are written in UTF-8, so resuming reads UTF-8
    path = tmp_path / "metrics.csv"
    path.write_bytes("epoch,val_précision\n1,0.5\n2,0.25\n".encode("utf-8"))
    assert callbacks._read_header(path) == ["epoch", "val_précision"]
    callbacks.rewrite_kept_lines(path, lambda line: line.startswith("1"), header=True)
    assert path.read_bytes() == "epoch,val_précision\n1,0.5\n".encode("utf-8")


@pytest.mark.parametrize("line, epoch", [
    ('{"epoch": 3, "train_loss": 0.5}\n', 3),
    ('{"epoch": 4, "train_lo', None),  # cut short
    ('{"epoch": "3"}\n', None),
    ('{"train_loss": 0.5}\n', None),
    ('[3, 4]\n', None),
    ('3\n', None),
])
def test_the_epoch_of_a_jsonl_line(line, epoch):
    assert callbacks._jsonl_epoch(line) == epoch


@pytest.mark.parametrize("line, width, epoch", [
    ("3,0.5,0.25\n", 3, 3),
    ("3,0.5\n", 3, None),  # a row cut short
    ("3,0.5,0.25,1\n", 3, None),
    ("epoch,train_loss,lr\n", 3, None),
    ("", 3, None),
])
def test_the_epoch_of_a_csv_line(line, width, epoch):
    assert callbacks._csv_epoch(line, width) == epoch


def test_lines_before_the_resumed_epoch_are_kept():
    assert callbacks._before(2, 3) and not callbacks._before(3, 3) and not callbacks._before(None, 3)


def test_a_csv_line_is_one_quoted_row_ending_in_a_newline():
    assert callbacks.csv_line(["epoch", 1, 0.5, "a,b"]) == 'epoch,1,0.5,"a,b"\n'


def test_reported_metrics_are_each_splits_loss_and_metrics_then_lr_and_time():
    metrics = [("accuracy", SimpleNamespace(names=("accuracy",))), ("f1", SimpleNamespace(names=("f1", "accuracy")))]
    run = SimpleNamespace(batches={"train": None, "val": None}, metrics=metrics)
    assert callbacks.reported_metrics(run) == ["train_loss", "train_accuracy", "train_f1", "val_loss",
                                               "val_accuracy", "val_f1", "lr", "epoch_seconds"]
    run.batches = {"train": None}  # no validation split
    assert callbacks.reported_metrics(run) == ["train_loss", "train_accuracy", "train_f1", "lr", "epoch_seconds"]


def test_current_lrs_are_each_parameter_groups_rate():
    assert callbacks.current_lrs(fake_run(None)) == [0.1, 0.01]


@pytest.mark.parametrize("text, header", [
    ("epoch,train_loss,lr\n1,0.5,0.1\n", ["epoch", "train_loss", "lr"]),
    ("epoch,train_loss", None),  # cut short
    ("1,0.5,0.1\n", None),  # no header
    ("\n1,0.5\n", None),
    ("train_loss,epoch\n", None),
])
def test_the_header_of_a_metrics_table(tmp_path, text, header):
    path = tmp_path / "metrics.csv"
    path.write_text(text, encoding="utf-8")
    assert callbacks._read_header(path) == header
    assert callbacks._read_header(tmp_path / "missing.csv") is None


# -- checkpoint ------------------------------------------------------------------------------------


def test_checkpoint_holds_the_best_epochs_weights(tmp_path):
    script = Script([0.2, 0.5, 0.4, 0.45])
    run = scripted_run(tmp_path, script, [
        {"name": "checkpoint"},  # follows the run's monitor (trainer.monitor)
        {"name": "checkpoint", "monitor": "val_scripted", "mode": "min", "filename": "lowest.safetensors"},
    ], trainer__epochs=4, trainer__monitor="val_scripted")
    result = cnnreg.fit(run)

    assert result.best_epoch == 2
    best = load_file(str(run.run_dir / "best.safetensors"))
    assert weights_equal(best, script.states[2])
    assert not weights_equal(best, script.states[4])
    meta = metadata(run.run_dir / "best.safetensors")
    assert (meta["epoch"], meta["monitor"], meta["mode"], float(meta["value"])) == ("2", "val_scripted", "max", 0.5)
    # mode "min" picks the lowest value, epoch 1
    assert weights_equal(load_file(str(run.run_dir / "lowest.safetensors")), script.states[1])
    assert metadata(run.run_dir / "lowest.safetensors")["epoch"] == "1"
    assert not (run.run_dir / callbacks.LAST_WEIGHTS).exists()


def test_epochs_without_the_metric_do_not_count(tmp_path):
    # val_scripted exists only at epochs 2, 4, 6, 8 (eval_every=2), always 0.5:
    # early stopping counts evaluations, so patience 2 ends the run at epoch 6, not 4.
    script = Script([0.5] * 8)
    run = scripted_run(tmp_path, script, [
        {"name": "checkpoint", "monitor": "val_scripted", "save_last_weights": True},
        {"name": "early_stopping", "monitor": "val_scripted", "patience": 2},
    ], trainer__epochs=8, trainer__eval_every=2)
    result = cnnreg.fit(run)

    assert [r.epoch for r in result.records] == [1, 2, 3, 4, 5, 6]
    assert result.stopped == ("early stopping: val_scripted did not improve by 0 for 2 evaluations "
                              "(best 0.5000 at epoch 2)")
    # the first epoch with the metric is the first improvement; epoch 1 wrote no best weights
    assert "best.safetensors" not in script.files[1]
    assert "best.safetensors" in script.files[2]
    assert metadata(run.run_dir / "best.safetensors")["epoch"] == "2"
    # last.safetensors follows every epoch
    assert weights_equal(load_file(str(run.run_dir / "last.safetensors")), script.states[6])
    assert metadata(run.run_dir / "last.safetensors")["epoch"] == "6"


def test_a_failed_checkpoint_write_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    script = Script([0.1, 0.2, 0.3, 0.4])
    run = scripted_run(tmp_path, script, [{"name": "checkpoint", "monitor": "val_scripted"}], trainer__epochs=4)
    real_save = ckpt.save_model

    def disk_full_from_epoch_3(module, filename, metadata=None):
        if script.epoch >= 3:
            with open(filename, "wb") as handle:
                handle.write(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(module, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_model", disk_full_from_epoch_3)
    result = cnnreg.fit(run)

    assert [r.epoch for r in result.records] == [1, 2, 3, 4] and result.stopped == "completed"
    path = run.run_dir / "best.safetensors"
    assert weights_equal(load_file(str(path)), script.states[2])  # the last good write, intact
    assert metadata(path)["epoch"] == "2"
    err = capsys.readouterr().err
    assert err.count("no space left on the device") == 1, err
    assert "the previous best.safetensors is intact" in err
    assert "the best epoch 4 (val_scripted=0.4000) could not be written" in err
    assert "it holds epoch 2 (val_scripted=0.2000)" in err
    assert not [p for p in run.run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("options, message", [
    ({"filename": "../best.safetensors"}, "climbs out"),
    ({"filename": "/tmp/best.safetensors"}, "absolute"),
    ({"filename": "weights/best.safetensors"}, "without folders"),
    ({"filename": "best.pt"}, "must end in .safetensors"),
    ({"save_best": False}, "nothing would be saved"),
    ({"save_last_weights": True, "filename": "last.safetensors"}, "choose another name"),
])
def test_checkpoint_rejects_options_that_write_nothing_or_outside_the_run(options, message):
    with pytest.raises(ValueError, match=message):
        callbacks.checkpoint(**options)


def test_a_misspelt_monitor_fails_at_build(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, callbacks=[{"name": "checkpoint", "monitor": "val_acuracy"}]))
    with pytest.raises(RecipeError, match="did you mean 'val_accuracy'"):
        cnnreg.build(recipe, output=False)


def _epochs(callback, run, values: dict[int, dict[str, float]]):
    callback.cnnreg_fit_start(run=run, start_epoch=min(values))
    for epoch, metrics in values.items():
        with torch.no_grad():
            run.model.weight.fill_(float(epoch))  # the weights tell which epoch wrote a file
        callback.cnnreg_epoch_end(run=run, record=record(epoch, **metrics))


def test_checkpoint_by_default_keeps_the_best_epoch_of_the_runs_monitor_only(tmp_path):
    run = fake_run(tmp_path)  # the run watches val_accuracy, higher is better
    best = callbacks.checkpoint()
    _epochs(best, run, {1: {"val_accuracy": 0.5, "val_loss": 0.9}, 2: {"val_accuracy": 0.7, "val_loss": 1.0},
                        3: {"val_accuracy": 0.6, "val_loss": 0.2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "best.safetensors"))["weight"], torch.full((3, 2), 2.0))
    assert metadata(tmp_path / "best.safetensors") == {"format": "pt", "epoch": "2", "monitor": "val_accuracy",
                                                       "value": "0.7", "mode": "max", "recipe": "tiny"}
    assert best.state_dict() == {"monitor": "val_accuracy", "best": 0.7, "best_epoch": 2}


def test_checkpoint_with_its_own_monitor_mode_and_file_and_last_weights(tmp_path):
    run = fake_run(tmp_path)
    lowest = callbacks.checkpoint(monitor="val_accuracy", mode="min", save_last_weights=True,
                                  filename="lowest.safetensors")
    _epochs(lowest, run, {1: {"val_accuracy": 0.5}, 2: {"val_accuracy": 0.4}, 3: {"val_accuracy": 0.45}})
    assert metadata(tmp_path / "lowest.safetensors")["epoch"] == "2"
    assert metadata(tmp_path / "last.safetensors") == {"format": "pt", "epoch": "3", "recipe": "tiny"}
    assert torch.equal(load_file(str(tmp_path / "last.safetensors"))["weight"], torch.full((3, 2), 3.0))
    # a monitor of its own (a loss: min) whatever the run watches
    loss = callbacks.checkpoint(monitor="val_loss", filename="loss.safetensors")
    _epochs(loss, run, {1: {"val_loss": 0.5}, 2: {"val_loss": 0.3}, 3: {"val_loss": 0.4}})
    assert metadata(tmp_path / "loss.safetensors")["epoch"] == "2"
    assert metadata(tmp_path / "loss.safetensors")["mode"] == "min"


def test_checkpoint_of_last_weights_only_writes_no_best_file(tmp_path):
    run = fake_run(tmp_path)
    last = callbacks.checkpoint(save_best=False, save_last_weights=True)
    _epochs(last, run, {1: {"val_accuracy": 0.5}, 2: {"val_accuracy": 0.7}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    assert metadata(tmp_path / "last.safetensors")["epoch"] == "2"


def test_checkpoint_writes_nothing_without_a_run_directory_or_off_the_main_process(tmp_path):
    for run in (fake_run(None), fake_run(tmp_path, is_main=False)):
        callback = callbacks.checkpoint(save_last_weights=True)
        _epochs(callback, run, {1: {"val_accuracy": 0.5}})
        callback.cnnreg_fit_end(run=run, result=None)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_first_write_warns_once_that_no_weights_were_saved(tmp_path, monkeypatch, capsys):
    def disk_full(module, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_model", disk_full)
    run = fake_run(tmp_path)
    best = callbacks.checkpoint()
    _epochs(best, run, {1: {"val_accuracy": 0.5}, 2: {"val_accuracy": 0.7}, 3: {"val_accuracy": 0.6}})
    best.cnnreg_fit_end(run=run, result=None)
    err = capsys.readouterr().err
    assert err.count("cnnreg: warning: epoch 1:") == 1 and err.count("Training goes on") == 1, err
    assert "the next improvement tries again" in err
    assert "the best epoch 2 (val_accuracy=0.7000) could not be written to best.safetensors: no weights were saved" in err
    assert best.state_dict() == {"monitor": "val_accuracy", "best": None, "best_epoch": None}


def test_a_resumed_checkpoint_keeps_its_best_unless_it_now_watches_another_metric(tmp_path):
    run = fake_run(tmp_path)
    first = callbacks.checkpoint(monitor="val_accuracy")
    _epochs(first, run, {1: {"val_accuracy": 0.7}})
    saved = first.state_dict()

    resumed = callbacks.checkpoint(monitor="val_accuracy")
    resumed.load_state_dict(saved)
    _epochs(resumed, run, {2: {"val_accuracy": 0.6}})  # worse than the restored best: no write
    assert metadata(tmp_path / "best.safetensors")["epoch"] == "1"
    assert (resumed.best, resumed.best_epoch) == (0.7, 1)

    following_the_run = callbacks.checkpoint()  # monitor left to the run: any saved monitor is its own
    following_the_run.load_state_dict(saved)
    assert (following_the_run.best, following_the_run.best_epoch) == (0.7, 1)
    older = callbacks.checkpoint(monitor="val_accuracy")  # a state saved before monitors were recorded
    older.load_state_dict({"best": 0.7, "best_epoch": 1})
    assert (older.best, older.best_epoch) == (0.7, 1)

    changed = callbacks.checkpoint(monitor="val_loss")  # the recipe now watches another metric: afresh
    changed.load_state_dict(saved)
    assert (changed.best, changed.best_epoch) == (None, None)


@pytest.mark.parametrize("options, message", [
    ({"filename": "../best.safetensors"}, r"^filename must stay inside the run directory"),
    ({"filename": "weights/best.safetensors"}, r"^filename must be a file name in the run directory"),
    ({"filename": "best.pt"}, r"^filename must end in \.safetensors \(the weights are written as safetensors\), "
                              r"not 'best\.pt'"),
    ({"save_best": False}, r"^save_best and save_last_weights are both false, so nothing would be saved; "
                           r"set one of them or remove the callback"),
    ({"save_last_weights": True, "filename": "last.safetensors"},
     r"^filename 'last\.safetensors' is where save_last_weights writes; choose another name"),
])
def test_checkpoint_options_are_refused_naming_the_option_and_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        callbacks.checkpoint(**options)


def test_checkpoint_accepts_its_documented_combinations():
    assert callbacks.checkpoint().filename == "best.safetensors"
    assert callbacks.checkpoint(save_last_weights=True).save_last_weights
    assert callbacks.checkpoint(save_best=False, save_last_weights=True).save_best is False


# -- early stopping --------------------------------------------------------------------------------


def test_early_stopping_stops_at_the_epoch_patience_runs_out(tmp_path):
    # improvements must exceed min_delta=0.1: 0.55 and 0.58 do not beat 0.5 by it
    script = Script([0.2, 0.5, 0.55, 0.58, 0.7, 0.8])
    run = scripted_run(tmp_path, script, [{"name": "early_stopping", "monitor": "val_scripted", "patience": 2,
                                           "min_delta": 0.1}], output=False, trainer__epochs=6)
    result = cnnreg.fit(run)

    assert [r.epoch for r in result.records] == [1, 2, 3, 4]
    assert result.stopped == "early stopping: val_scripted did not improve by 0.1 for 2 epochs (best 0.5000 at epoch 2)"


def test_early_stopping_and_metric_logs_resume_where_last_pt_left_off(tmp_path):
    """A crash after epoch 3 was logged but before its last.pt: the resumed run
    redoes epoch 3 without a duplicate line and keeps the patience count."""
    values = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]  # best at epoch 1, worse after; patience 3 ends at epoch 4
    cbs = [{"name": "early_stopping", "monitor": "val_scripted", "patience": 3}, {"name": "metrics_logger"}]
    run = scripted_run(tmp_path, Script(values, crash_at=3), cbs, trainer__epochs=6, trainer__checkpoint_every=1)
    with pytest.raises(SimulatedCrash, match="simulated crash"):
        cnnreg.fit(run)
    run_dir = run.run_dir
    jsonl, table = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
    assert [json.loads(line)["epoch"] for line in jsonl.read_text().splitlines()] == [1, 2, 3]
    header = table.read_text().splitlines()[0]
    with open(jsonl, "a") as handle:  # what a power cut mid-write could leave
        handle.write('{"epoch": 4, "train_lo')
    with open(table, "a") as handle:
        handle.write("4,0.12")

    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, metrics=[{"name": "accuracy"}, {"name": "scripted"}],
                                            callbacks=cbs, trainer__epochs=6, trainer__checkpoint_every=1),
                                extra=[Script(values)])
    result = cnnreg.fit(cnnreg.build(recipe, run_dir=run_dir), resume=True)

    assert [r.epoch for r in result.records] == [1, 2, 3, 4]
    assert result.stopped == "early stopping: val_scripted did not improve by 0 for 3 epochs (best 0.5000 at epoch 1)"
    lines = jsonl.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert [json.loads(line)["val_scripted"] for line in lines] == values[:4]
    rows = list(csv.reader(table.read_text().splitlines()))
    assert ",".join(rows[0]) == header
    assert [int(row[0]) for row in rows[1:]] == [1, 2, 3, 4]
    assert all(len(row) == len(rows[0]) for row in rows)


def _stops(callback, run, values: dict[int, float | None], monitor: str = "val_loss") -> dict[int, str | None]:
    callback.cnnreg_fit_start(run=run, start_epoch=min(values))
    return {epoch: callback.cnnreg_should_stop(run=run, record=record(epoch, **({} if v is None else {monitor: v})))
            for epoch, v in values.items()}


def test_early_stopping_by_default_watches_val_loss_for_ten_epochs():
    # the defaults recipe.schema.json documents: monitor val_loss (lower is better), patience 10, min_delta 0
    stopping = callbacks.early_stopping()
    stops_at = _stops(stopping, fake_run(None), {1: 0.5, **{e: 0.5 for e in range(2, 13)}})
    assert [e for e, reason in stops_at.items() if reason] == [11, 12]
    assert stops_at[11] == "early stopping: val_loss did not improve by 0 for 10 epochs (best 0.5 at epoch 1)"
    # any drop counts with min_delta 0: a lower loss every epoch never stops
    assert not any(_stops(callbacks.early_stopping(), fake_run(None), {e: 1 - e / 100 for e in range(1, 14)}).values())


def test_early_stopping_with_patience_one_stops_at_the_first_epoch_without_gain():
    stops_at = _stops(callbacks.early_stopping(patience=1), fake_run(None), {1: 0.5, 2: 0.4, 3: 0.45})
    assert stops_at == {1: None, 2: None, 3: "early stopping: val_loss did not improve by 0 for 1 epochs "
                                             "(best 0.4 at epoch 2)"}


def test_early_stopping_with_an_explicit_mode_and_min_delta(tmp_path):
    # mode max on a loss (the user's choice wins over the name), min_delta 0.25
    stopping = callbacks.early_stopping(monitor="val_loss", patience=2, min_delta=0.25, mode="max")
    stops_at = _stops(stopping, fake_run(None), {1: 1.0, 2: 1.5, 3: None, 4: 1.6, 5: 1.7})
    assert stops_at[3] is None and stops_at[4] is None  # epoch 3 has no val_loss: not counted
    assert stops_at[5] == "early stopping: val_loss did not improve by 0.25 for 2 epochs (best 1.5 at epoch 2)"


def test_early_stopping_counts_evaluations_when_validation_is_not_every_epoch():
    run = fake_run(None)
    run.recipe.trainer.eval_every = 2
    stops_at = _stops(callbacks.early_stopping(monitor="val_accuracy", patience=1), run,
                      {2: 0.5, 4: 0.5}, monitor="val_accuracy")
    assert stops_at[4] == "early stopping: val_accuracy did not improve by 0 for 1 evaluations (best 0.5000 at epoch 2)"


def test_a_resumed_early_stopping_keeps_its_count_unless_it_watches_another_metric():
    run = fake_run(None)
    first = callbacks.early_stopping(patience=3)
    _stops(first, run, {1: 0.5, 2: 0.6})
    saved = torch.load(io.BytesIO(_saved(first.state_dict())))  # through a file, as last.pt
    resumed = callbacks.early_stopping(patience=3)
    resumed.load_state_dict(saved)
    assert _stops(resumed, run, {3: 0.6, 4: 0.6}) == {
        3: None, 4: "early stopping: val_loss did not improve by 0 for 3 epochs (best 0.5 at epoch 1)"}
    # a state without a count (or a monitor) restores the best with a fresh count
    older = callbacks.early_stopping(patience=2)
    older.load_state_dict({"best": 0.5, "best_epoch": 1})
    assert (older.best, older.best_epoch, older.wait) == (0.5, 1, 0)
    assert _stops(older, run, {2: 0.6, 3: 0.6})[3] is not None
    other = callbacks.early_stopping(monitor="val_accuracy", patience=3)
    other.load_state_dict(saved)
    assert (other.best, other.best_epoch, other.wait) == (None, None, 0)


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("options, message", [
    ({"patience": 0}, r"^patience must be at least 1, not 0"),
    ({"min_delta": -0.1}, r"^min_delta must be 0 or more, not -0\.1"),
    ({"min_delta": float("nan")}, r"^min_delta must be 0 or more, not nan"),
])
def test_early_stopping_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        callbacks.early_stopping(**options)


# -- metrics logger --------------------------------------------------------------------------------


def test_metrics_logger_writes_one_line_per_epoch_with_stable_columns(tmp_path):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(
        tmp_path, trainer__epochs=3, trainer__eval_every=2, trainer__checkpoint_every=0,
        callbacks=[{"name": "metrics_logger"}])))
    result = cnnreg.fit(run)

    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [entry["epoch"] for entry in logged] == [1, 2, 3]
    for entry, record in zip(logged, result.records):
        assert {k: entry[k] for k in record.metrics} == dict(record.metrics)
        assert entry["images_per_second"] == record.images_per_second
    assert "val_loss" not in logged[0] and "val_loss" in logged[1]  # epoch 1 was not evaluated

    with open(run.run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # the header knows the val columns although the first epoch has none
    assert list(rows[0])[:3] == ["epoch", "train_loss", "train_accuracy"]
    assert {"val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second"} <= set(rows[0])
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert rows[0]["val_loss"] == "" and float(rows[1]["val_loss"]) == result.records[1].metrics["val_loss"]
    assert float(rows[2]["train_accuracy"]) == result.records[2].metrics["train_accuracy"]


def test_metrics_logger_writes_nothing_without_a_run_directory(tmp_path):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=1,
                                                      callbacks=[{"name": "metrics_logger"}])), output=False)
    cnnreg.fit(run)
    assert not (tmp_path / "runs").exists()


def test_metrics_logger_by_default_writes_both_logs_and_either_alone(tmp_path):
    for options, files in (({}, ["metrics.csv", "metrics.jsonl"]), ({"csv": False}, ["metrics.jsonl"]),
                           ({"jsonl": False}, ["metrics.csv"])):
        run_dir = tmp_path / str(len(options)) / ("csv" if options.get("csv", True) else "jsonl")
        run_dir.mkdir(parents=True)
        run = fake_run(run_dir)
        logger = callbacks.metrics_logger(**options)
        logger.cnnreg_fit_start(run=run, start_epoch=1)
        logger.cnnreg_epoch_end(run=run, record=record(1, train_loss=0.5, val_loss=float("nan")))
        assert sorted(p.name for p in run_dir.iterdir()) == files
    with pytest.raises(ValueError, match=r"^jsonl and csv are both false, so nothing would be logged; set one or "
                                         r"remove the callback"):
        callbacks.metrics_logger(jsonl=False, csv=False)


def test_metrics_logger_lines_hold_the_epoch_its_metrics_and_the_speed(tmp_path):
    run = fake_run(tmp_path)
    logger = callbacks.metrics_logger()
    logger.cnnreg_fit_start(run=run, start_epoch=1)
    logger.cnnreg_epoch_end(run=run, record=record(1, train_loss=0.5, train_accuracy=0.25, lr=0.1,
                                                    epoch_seconds=2.0))
    logger.cnnreg_epoch_end(run=run, record=record(2, train_loss=0.25, train_accuracy=0.5, val_loss=float("inf"),
                                                    val_accuracy=0.75, lr=0.1, epoch_seconds=2.0))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"epoch": 2, "train_loss": 0.25, "train_accuracy": 0.5, "val_loss": None, "val_accuracy": 0.75,
                        "lr": 0.1, "epoch_seconds": 2.0, "train_seconds": 1.5, "images_per_second": 640.0}
    rows = list(csv.reader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert rows[0] == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                       "train_seconds", "images_per_second"]
    assert rows[1] == ["1", "0.5", "0.25", "", "", "0.1", "2.0", "1.5", "640.0"]


def test_a_metric_log_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, capsys):
    run = fake_run(tmp_path / "missing")  # the folder is gone: every append fails
    logger = callbacks.metrics_logger()
    logger.cnnreg_fit_start(run=run, start_epoch=1)
    for epoch in (1, 2):
        logger.cnnreg_epoch_end(run=run, record=record(epoch, train_loss=0.5))
    err = capsys.readouterr().err
    assert err.count("cnnreg: warning: could not append epoch 1 to the metric logs in") == 1, err
    assert "epoch 2" not in err and "training goes on" in err


# -- learning-rate monitor -------------------------------------------------------------------------


def test_lr_monitor_reports_each_change_and_writes_lr_csv(tmp_path, capsys):
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(
        tmp_path, trainer__epochs=3, trainer__checkpoint_every=0,
        scheduler={"name": "step", "step_size": 2, "gamma": 0.5},
        callbacks=[{"name": "lr_monitor"}])))
    cnnreg.fit(run)

    err = capsys.readouterr().err
    assert "epoch 3: lr 0.01 -> 0.005 (group 0)" in err
    assert "epoch 2:" not in err  # no change, no line
    rows = list(csv.reader((run.run_dir / "lr.csv").read_text().splitlines()))
    assert rows == [["epoch", "lr_group0"], ["1", "0.01"], ["2", "0.01"], ["3", "0.005"]]


def test_lr_monitor_by_default_reports_a_change_and_logs_every_groups_rate(tmp_path, capsys):
    run = fake_run(tmp_path)
    monitor = callbacks.lr_monitor()
    monitor.cnnreg_fit_start(run=run, start_epoch=1)
    for epoch, lr in ((1, 0.1), (2, 0.1), (3, 0.05)):
        run.optimizer.param_groups[0]["lr"] = lr
        monitor.cnnreg_epoch_start(run=run, epoch=epoch)
        monitor.cnnreg_epoch_end(run=run, record=record(epoch))
    assert capsys.readouterr().err == "epoch 3: lr 0.1 -> 0.05 (group 0)\n"
    rows = list(csv.reader((tmp_path / "lr.csv").read_text().splitlines()))
    assert rows == [["epoch", "lr_group0", "lr_group1"], ["1", "0.1", "0.01"], ["2", "0.1", "0.01"],
                    ["3", "0.05", "0.01"]]


def test_a_resumed_lr_monitor_reports_a_change_since_the_epoch_before_the_resume(tmp_path, capsys):
    run = fake_run(tmp_path)
    first = callbacks.lr_monitor()
    first.cnnreg_fit_start(run=run, start_epoch=1)
    first.cnnreg_epoch_start(run=run, epoch=1)
    saved = torch.load(io.BytesIO(_saved(first.state_dict())))

    resumed = callbacks.lr_monitor()
    resumed.load_state_dict(saved)
    resumed.cnnreg_fit_start(run=run, start_epoch=2)
    run.optimizer.param_groups[1]["lr"] = 0.02
    resumed.cnnreg_epoch_start(run=run, epoch=2)
    assert capsys.readouterr().err == "epoch 2: lr 0.01 -> 0.02 (group 1)\n"
    fresh = callbacks.lr_monitor()
    fresh.load_state_dict({"previous": None})  # saved before any epoch started: nothing to compare with
    fresh.cnnreg_epoch_start(run=run, epoch=1)
    assert capsys.readouterr().err == ""


def test_an_lr_log_that_cannot_be_written_warns_once(tmp_path, capsys):
    run = fake_run(tmp_path / "missing")
    monitor = callbacks.lr_monitor(log_to_console=False)
    monitor.cnnreg_fit_start(run=run, start_epoch=1)
    for epoch in (1, 2):
        run.optimizer.param_groups[0]["lr"] = 0.1 / epoch
        monitor.cnnreg_epoch_start(run=run, epoch=epoch)
        monitor.cnnreg_epoch_end(run=run, record=record(epoch))
    err = capsys.readouterr().err
    assert err.count("cnnreg: warning: could not append to") == 1 and "lr.csv" in err, err
    assert "->" not in err  # log_to_console=False: no change lines


# -- tensorboard ---------------------------------------------------------------------------------


def test_tensorboard_logs_scalars_images_and_hparams_without_changing_training(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    recipe = tiny_recipe(tmp_path, callbacks=[{"name": "tensorboard"}])
    run = cnnreg.build(cnnreg.load_recipe(recipe))
    result = cnnreg.fit(run)
    plain = cnnreg.fit(cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path)), output=False))

    events = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for tag, key in (("loss/train", "train_loss"), ("accuracy/val", "val_accuracy")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r.epoch, pytest.approx(r.metrics[key], rel=1e-6)) for r in result.records]
    assert [e.value for e in events.Scalars("lr/group0")] == [pytest.approx(0.01)] * 2
    assert "time/images_per_second" in tags["scalars"]
    assert {"train/augmented_batch", "confusion/val"} <= set(tags["images"])
    grid = events.Images("train/augmented_batch")[0]
    assert grid.width > 12 and grid.height > 12
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optimizer.lr"].number_value == pytest.approx(0.01)
    assert start.session_start_info.hparams["model.name"].string_value == "simple_cnn"
    assert [e.value for e in events.Scalars("hparam/best_val_accuracy")] == [
        pytest.approx(result.best.metrics["val_accuracy"])]
    # the image preview draws from forked random streams: training is the same as without it
    assert result.records[-1].metrics["train_loss"] == plain.records[-1].metrics["train_loss"]


def test_tensorboard_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"pip install 'cnnreg-framework\[tensorboard\]'"):
        callbacks.tensorboard()


def test_tensorboard_log_dir_stays_inside_the_run(tmp_path):
    with pytest.raises(ValueError, match="inside the run directory"):
        callbacks.tensorboard(log_dir="../elsewhere")
    assert callbacks.tensorboard(log_dir="tb/run1").log_dir == "tb/run1"


def test_early_stopping_on_a_loss_needs_a_drop_larger_than_min_delta(tmp_path):
    """mode min: 0.95 and 0.92 are lower than 1.0, but not by 0.1; 0.85 is."""
    script = Script([1.0, 0.95, 0.92, 0.85, 0.8, 0.79])
    run = scripted_run(tmp_path, script, [{"name": "early_stopping", "monitor": "val_scripted", "mode": "min",
                                           "patience": 2, "min_delta": 0.1}], output=False, trainer__epochs=6)
    result = cnnreg.fit(run)
    assert [r.epoch for r in result.records] == [1, 2, 3]
    assert result.stopped == "early stopping: val_scripted did not improve by 0.1 for 2 epochs (best 1.0000 at epoch 1)"


@pytest.mark.parametrize("name, tag", [
    ("val_accuracy", "accuracy/val"), ("train_loss", "loss/train"), ("test_f1_macro", "f1_macro/test"),
    ("epoch_seconds", "time/epoch_seconds"), ("train_seconds", "seconds/train"), ("lr", "lr"),
    ("images_per_second", "images_per_second"), ("val", "val"), ("extra_metric", "extra_metric"),
])
def test_scalar_tags_put_each_metrics_splits_side_by_side(name, tag):
    assert callbacks.scalar_tag(name) == tag


def test_hparams_are_the_recipes_values_by_dotted_name():
    recipe = {"seed": 0, "name": "tiny", "data": {"name": "synthetic", "augment": True, "mean": [0.5, 0.25]},
              "optimizer": {"name": "adam", "lr": 0.01, "options": None},
              "transforms": {"train": [{"name": "flip"}, {"name": "normalize", "std": [0.5]}]},
              "splits": [{"size": 3}]}
    assert callbacks.flat_hparams(recipe) == {
        "seed": 0, "name": "tiny", "data.name": "synthetic", "data.augment": True, "data.mean": "[0.5, 0.25]",
        "optimizer.name": "adam", "optimizer.lr": 0.01, "optimizer.options": "null",
        "transforms.train.0.name": "flip", "transforms.train.1.name": "normalize", "transforms.train.1.std": "[0.5]",
        "splits": '[{"size": 3}]'}


def test_final_metrics_are_the_best_monitor_value_and_the_last_epochs_finite_metrics():
    records = (record(1, val_accuracy=0.75, train_loss=0.5, lr=0.1, epoch_seconds=2.0),
               record(2, val_accuracy=0.5, train_loss=0.25, val_loss=float("nan"), lr=0.1, epoch_seconds=2.0))
    result = FitResult(records=records, monitor="val_accuracy", mode="max", best_epoch=1, stopped="completed",
                       train_seconds=4.0, compile_seconds=0.0)
    assert callbacks.final_metrics(result) == {"hparam/best_val_accuracy": 0.75, "hparam/final_val_accuracy": 0.5,
                                               "hparam/final_train_loss": 0.25}
    empty = FitResult(records=(), monitor="val_accuracy", mode="max", best_epoch=None, stopped="interrupted",
                      train_seconds=0.0, compile_seconds=0.0)
    assert callbacks.final_metrics(empty) == {}


class MeanOnly:
    """A transform that carries a mean but no std values: not a normalisation to undo."""

    mean = (0.5, 0.5, 0.5)
    std = ()

    def __call__(self, x):
        return x


@pytest.mark.parametrize("channels", [3, 1])
def test_the_augmented_grid_shows_the_first_32_training_images_with_normalisation_undone(channels):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, channels, 5, 7), dtype=torch.uint8)  # 40 images, 5x7: not square
    mean, std = (0.5, 0.25, 0.75)[:channels], (0.2, 0.4, 0.1)[:channels]
    run = SimpleNamespace(device=torch.device("cpu"), batches={"train": [(images, torch.zeros(40))]},
                          train_transforms=(MeanOnly(), Normalize(mean=mean, std=std), lambda x: x))
    grid = callbacks.augmented_grid(run)
    expected = make_grid(images[:32].float() / 255, nrow=8, padding=1)  # torchvision's grid of the raw images
    assert grid.shape == expected.shape == (3, 4 * 6 + 1, 8 * 8 + 1)
    assert torch.allclose(grid, expected, atol=1e-6)


def test_the_augmented_grid_clips_to_the_displayable_range_and_leaves_the_random_streams_alone():
    images = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8)
    def noise(x):  # values in [-1, 2], and a draw from the random stream
        return x * 3 - 1 + 0 * torch.rand(1)

    run = SimpleNamespace(device=torch.device("cpu"), batches={"train": [(images, torch.zeros(4))]},
                          train_transforms=(noise,))
    torch.manual_seed(3)
    grid = callbacks.augmented_grid(run, count=2)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))  # training draws what it would have drawn without the preview
    assert torch.allclose(grid, make_grid((images[:2].float() / 255 * 3 - 1).clamp(0, 1), nrow=8, padding=1))


def test_the_confusion_image_is_the_confusion_figure_as_rgb():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from cnnreg_plugins._figures import confusion_figure

    result = EvalResult(split="val", metrics={"accuracy": 0.5}, per_class={}, confusion=((3, 1), (2, 2)),
                        classes=("cat", "dog"))
    canvas = FigureCanvasAgg(confusion_figure(result, 7))
    canvas.draw()
    expected = np.asarray(canvas.buffer_rgba())[..., :3]
    image = callbacks.confusion_image(7, result)
    assert image.shape == expected.shape and image.shape[-1] == 3
    assert np.array_equal(image, expected)


def test_tensorboard_defaults_to_a_tensorboard_folder_with_the_image_preview():
    logger = callbacks.tensorboard()
    assert (logger.log_dir, logger.images) == ("tensorboard", True)
    assert callbacks.tensorboard(log_dir="tb/run1", images=False).images is False
    with pytest.raises(ValueError, match=r"^log_dir must stay inside the run directory"):
        callbacks.tensorboard(log_dir="../elsewhere")
    with pytest.raises(ValueError, match=r"^log_dir must be relative to the run directory"):
        callbacks.tensorboard(log_dir="/tmp/tb")


def test_tensorboard_without_a_run_directory_writes_nothing(tmp_path):
    run = fake_run(None)
    logger = callbacks.tensorboard()
    logger.cnnreg_fit_start(run=run, start_epoch=1)
    logger.cnnreg_epoch_start(run=run, epoch=1)
    logger.cnnreg_epoch_end(run=run, record=record(1, train_loss=0.5))
    logger.cnnreg_fit_end(run=run, result=None)
    assert list(tmp_path.iterdir()) == []
