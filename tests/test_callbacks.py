"""Recipe callbacks on real runs: best checkpoint, early stopping, metric logs, TensorBoard, lr monitor.

The runs are tiny (96 synthetic 12x12 images). Where a test needs a known
sequence of metric values it registers an in-process plugin with a metric
whose value per epoch is scripted.
"""

from __future__ import annotations

import csv
import errno
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cnnreg
from cnnreg.core import checkpoint as ckpt
from cnnreg.core.errors import RecipeError
from cnnreg.core.records import Metric
from cnnreg_plugins import callbacks
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
