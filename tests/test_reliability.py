"""Reliability and security: real signals on real runs, a full disk while
checkpointing, untrusted checkpoint files, recipes that try to name code,
paths that stay inside the run, and broken data reported, not raised."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import threading
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import cnnreg
from cnnreg.core import checkpoint
from cnnreg.core.checkpoint import CheckpointError
from cnnreg.cli import main
from cnnreg.core.data import DataSource, ImageSplit
from cnnreg.core.errors import RecipeError, UserError
from cnnreg.plugin.hookspecs import hookimpl

from _datafiles import write_image_folder, write_not_an_image_file, write_truncated_file, write_zero_byte_file
from conftest import tiny_recipe

# -- signals on a real `python -m cnnreg run` ------------------------------------------------------

EPOCHS = 10


def signal_recipe(folder: Path) -> dict[str, Any]:
    """A few seconds of training per process on a 2-core machine (long enough for a signal
    sent up to a second after the first checkpoint to land mid-run), a checkpoint every epoch."""
    return tiny_recipe(folder, trainer__epochs=EPOCHS, trainer__deterministic=True, trainer__checkpoint_every=1,
                       data__train_size=384, data__batch_size=16, disable_plugins=["plots"])


def start(recipe: dict[str, Any] | None, folder: Path, *args: str) -> subprocess.Popen:
    """``python -m cnnreg run`` on ``recipe`` (written to ``folder``), or with ``args`` instead."""
    if recipe is not None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "recipe.json"
        path.write_text(json.dumps(recipe))
        args = (str(path),)
    # One thread, as the in-process baseline: the same float reduction order.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cnnreg", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def run_dir_of(folder: Path) -> Path | None:
    found = [p for p in (folder / "runs").glob("*") if (p / "run.json").is_file()] if (folder / "runs").is_dir() else []
    return found[0] if found else None


def send_after(proc: subprocess.Popen, signum: int, delay: float) -> None:
    time.sleep(delay)
    assert proc.poll() is None, f"the run finished before {signal.Signals(signum).name}; make it longer"
    proc.send_signal(signum)


def check_every_file_parses(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.name.startswith("."):
            continue  # an atomic write's temporary file, killed mid-write; never read
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".csv":
            list(csv.reader(path.open()))
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".safetensors":
            load_file(str(path))


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "epoch_seconds"}


def assert_same_final_metrics(actual: dict[str, float], expected: dict[str, float]) -> None:
    actual, expected = comparable(actual), comparable(expected)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if key.endswith("loss"):
            assert actual[key] == pytest.approx(value, rel=1e-6, abs=0), key
        else:
            assert actual[key] == value, key


@pytest.mark.slow
def test_sigint_sigkill_sigterm_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    rng = random.Random(8)  # random moments, the same every run of the test
    # The uninterrupted reference first, in this process: started after it, the
    # runs below are watched from their first moment, so no signal comes too late.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        baseline = cnnreg.fit(cnnreg.build(cnnreg.load_recipe(signal_recipe(tmp_path / "straight"))))
    finally:
        torch.set_num_threads(threads)
    expected = baseline.records[-1].metrics

    interrupted = start(signal_recipe(tmp_path / "int"), tmp_path / "int")
    killed = start(signal_recipe(tmp_path / "kill"), tmp_path / "kill")
    terminated = start(signal_recipe(tmp_path / "term"), tmp_path / "term")

    # Each signal goes a random moment after that run's first checkpoint (so it
    # lands within an epoch or between two), watched in parallel: one run's
    # wait must not make another's signal late.
    plan = [(interrupted, "int", signal.SIGINT), (terminated, "term", signal.SIGTERM), (killed, "kill", signal.SIGKILL)]
    failures: list[BaseException] = []

    def signal_after_first_checkpoint(proc, name, signum, delay):
        try:
            wait_for(lambda: (run_dir_of(tmp_path / name) or tmp_path / "none").joinpath("last.pt").is_file(), proc,
                     "the first last.pt")
            send_after(proc, signum, delay)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=signal_after_first_checkpoint, args=(*p, rng.uniform(0.0, 0.4))) for p in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]

    # Each stopped run is checked, then resumed at once, while the others finish stopping.
    killed.communicate(timeout=90)
    assert killed.returncode == -signal.SIGKILL
    resumed = {"kill": check_stopped_run(tmp_path / "kill")}
    int_out = interrupted.communicate(timeout=90)
    assert interrupted.returncode == 130, int_out
    resumed["int"] = check_stopped_run(tmp_path / "int")
    term_out = terminated.communicate(timeout=90)
    assert terminated.returncode == 143, term_out
    check_stopped_run(tmp_path / "term", resume=False)
    for out in (int_out, term_out):
        assert "Traceback" not in out[1] and "a resumable checkpoint was saved" in out[1]
    assert f"cnnreg run --resume {run_dir_of(tmp_path / 'int')}" in int_out[1]
    assert "interrupted by SIGINT" in int_out[1] and "interrupted by SIGTERM" in term_out[1]

    for name, proc in resumed.items():
        out = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        summary = json.loads((run_dir_of(tmp_path / name) / "summary.json").read_text())
        assert summary["epochs_run"] == EPOCHS and summary["stopped"] == "completed"
        assert_same_final_metrics(summary["last"], expected)


def check_stopped_run(folder: Path, resume: bool = True) -> subprocess.Popen | None:
    """Every file of the stopped run parses and last.pt is mid-run; then ``cnnreg run --resume`` it."""
    run_dir = run_dir_of(folder)
    check_every_file_parses(run_dir)
    state = checkpoint.load_state(run_dir / "last.pt")
    assert 0 <= state["epoch"] < EPOCHS, folder.name  # stopped before the end
    return start(None, folder, "--resume", str(run_dir)) if resume else None


# -- a full disk ------------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_keeps_the_previous_last_pt(tmp_path, monkeypatch, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(tiny_recipe(tmp_path, trainer__epochs=3, disable_plugins=["plots"])))
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) >= 2:  # the second epoch's last.pt: the disk is full
            Path(f).write_bytes(b"half a checkpo")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert main(["run", str(path)]) == 1  # training stopped: a fault of the machine during training
    err = capsys.readouterr().err
    assert "no space left on the device; the previous last.pt is intact" in err
    assert "resume from epoch 1 with: cnnreg run --resume" in err
    assert "Traceback" not in err
    run_dir = next((tmp_path / "runs").iterdir())
    assert checkpoint.load_state(run_dir / "last.pt")["epoch"] == 1  # the first epoch's, whole
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # the partial write was removed


def test_a_full_disk_on_the_first_checkpoint_says_nothing_was_kept(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as info:
        checkpoint.save_state({"epoch": 1}, tmp_path / "last.pt")
    assert "no space left on the device" in str(info.value) and "intact" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# -- untrusted files ----------------------------------------------------------------------------


class RunsCode:
    """Unpickling this would create ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "model": RunsCode(marker)}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="refused to load .*last.pt.*would run code"):
        checkpoint.load_state(tmp_path / "last.pt")
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    run = cnnreg.build(cnnreg.load_recipe(tiny_recipe(folder, trainer__epochs=1, disable_plugins=["plots"])))
    cnnreg.fit(run)
    return run.run_dir


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_evaluate_refuses_a_last_pt_that_would_run_code(tmp_path, finished_run, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    assert not (run_dir / "best.safetensors").exists()  # so evaluate falls back to last.pt
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "model": RunsCode(marker)}, run_dir / "last.pt")
    assert main(["evaluate", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_cut_short_best_safetensors_is_a_clear_error(tmp_path, finished_run, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    model = cnnreg.build(cnnreg.load_recipe(run_dir / "recipe.json"), output=False).model
    checkpoint.save_weights(model, run_dir / "best.safetensors")
    data = (run_dir / "best.safetensors").read_bytes()
    (run_dir / "best.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is not a readable safetensors file.*cut short"):
        checkpoint.load_weights(model, run_dir / "best.safetensors")
    assert main(["evaluate", str(run_dir)]) == 2
    assert "best.safetensors is not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["os.system", "torch.nn:Linear", "builtins:eval", "cnnreg.engine.loop.fit",
                                  "torch.nn.Linear", "__import__", "subprocess:run"])
def test_a_recipe_cannot_name_an_import_path(tmp_path, name):
    with pytest.raises(RecipeError, match=f"model.name: unknown model '{name}'"):
        cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": name}))


# -- paths ----------------------------------------------------------------------------------------


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_relative_paths_resolve_against_the_recipe_folder_and_nothing_is_written_elsewhere(
        tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_image_folder(project / "images", ("cat", "dog"), per_class=4, size=(12, 12))
    recipe = tiny_recipe(tmp_path, data={"name": "imagefolder", "root": "images", "batch_size": 4,
                                         "val_fraction": 0.25},
                         output_dir="out", disable_plugins=["plots"], trainer__epochs=1)
    (project / "recipes").mkdir()
    recipe["data"]["root"] = "../images"
    (project / "recipes" / "r.json").write_text(json.dumps(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = listing(tmp_path)
    assert main(["run", "../project/recipes/r.json"]) == 0
    new = listing(tmp_path) - before
    run_dirs = list((project / "recipes" / "out").iterdir())
    assert len(run_dirs) == 1
    inside = str(run_dirs[0].relative_to(tmp_path))
    assert new == {"project/recipes/out", inside} | {f"{inside}/{p.name}" for p in run_dirs[0].iterdir()}
    assert list(elsewhere.iterdir()) == []


# -- broken data -----------------------------------------------------------------------------------


def bad_image_folder(root: Path) -> list[Path]:
    write_image_folder(root, ("a", "b"), per_class=4, size=(12, 12))
    return [write_truncated_file(root / "a" / "cut off.jpg"), write_zero_byte_file(root / "b" / "empty.png"),
            write_not_an_image_file(root / "b" / "text.jpg")]


def test_bad_images_are_skipped_and_listed_in_run_json(tmp_path, capsys):
    bad = bad_image_folder(tmp_path / "images")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(tiny_recipe(tmp_path, data={"name": "imagefolder", "root": "images", "batch_size": 4,
                                                           "bad_images": "skip", "cache": False, "val_fraction": 0.25},
                                           disable_plugins=["plots"], trainer__epochs=1)))
    assert main(["run", str(path)]) == 0
    assert "warning: skipping 3 unreadable image files" in capsys.readouterr().err
    run_dir = next((tmp_path / "runs").iterdir())
    skipped = json.loads((run_dir / "run.json").read_text())["data"]["skipped_files"]
    assert sorted(p for p, _ in skipped) == sorted(str(p) for p in bad)
    assert all(reason for _, reason in skipped)


def test_bad_images_fail_names_the_file_and_exits_2(tmp_path, capsys):
    bad_image_folder(tmp_path / "images")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(tiny_recipe(tmp_path, data={"name": "imagefolder", "root": "images", "batch_size": 4,
                                                           "bad_images": "fail", "cache": False},
                                           disable_plugins=["plots"], trainer__epochs=1)))
    assert main(["run", str(path)]) == 2  # in-process: a traceback would be an exception here
    err = capsys.readouterr().err
    assert "cut off.jpg" in err and '"bad_images": "skip"' in err
    assert not (tmp_path / "runs").exists()


class BadLabels:
    """A dataset plugin whose labels include ``num_classes`` in one split."""

    def __init__(self, split: str):
        self.split = split

    @hookimpl
    def cnnreg_datasets(self):
        split_name = self.split

        def off_by_one(num_classes: int = 3) -> DataSource:
            """Labels 1..num_classes instead of 0..num_classes-1 in one split."""
            images = torch.randint(0, 256, (12, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            good = torch.arange(12) % num_classes
            splits = {name: ImageSplit(labels=good + 1 if name == split_name else good, images=images)
                      for name in ("train", "val")}
            return DataSource(train=splits["train"], val=splits["val"], classes=tuple("abc"[:num_classes]),
                              image_size=(12, 12), channels=3)

        return {"off_by_one": off_by_one}


@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_out_of_range_name_the_split_and_label_before_training(tmp_path, split):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, data={"name": "off_by_one", "batch_size": 4}),
                                extra=[BadLabels(split)])
    with pytest.raises(UserError, match=rf"labels of the {split} split must be class indices in \[0, 3\): "
                                        r"sample \d+ has label 3"):
        cnnreg.build(recipe)
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
