"""Faults of the machine, the run and the plugins, injected for real: each ends in one clear
message and a documented exit status, without a traceback, and no file the run had is changed.

Machine faults run the real CLI in a child process: a file where the run folder goes, a
folder the user cannot write (under uid 65534, where the tests may drop privileges), a
full disk through ``RLIMIT_FSIZE``. Plugin faults come from real plugin distributions
(dist-info on sys.path) that raise, or return the wrong type, in each run hook.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cnnreg.cli import main
from cnnreg.engine import step
from conftest import make_distribution, tiny_recipe

from _datafiles import write_image_folder, write_mnist

REPO = Path(__file__).parent.parent


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_recipe(tmp_path: Path, name: str = "recipe.json", **changes: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(tiny_recipe(tmp_path, disable_plugins=["plots"], **changes), indent=2))
    return path


def as_user(uid: int) -> list[str]:
    """The command prefix that runs a program as ``uid`` (util-linux's setpriv), or skips the test."""
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("dropping privileges needs root and setpriv")
    if subprocess.run([*prefix, sys.executable, "-c", "import cnnreg"], capture_output=True).returncode != 0:
        pytest.skip(f"uid {uid} cannot run this Python and cnnreg here")
    return prefix


def run_child(args: list[str], cwd: Path, *, file_limit: int | None = None, prefix: list[str] = (),
              timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m cnnreg ARGS`` in a child process, under a file-size limit or a command prefix."""

    def limits() -> None:
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", "cnnreg", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limits)


def assert_clean(done: subprocess.CompletedProcess, status: int, *messages: str) -> None:
    assert done.returncode == status, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for message in messages:
        assert message in done.stderr, done.stderr


# -- output that cannot be written -------------------------------------------------------------


def test_a_file_where_the_runs_folder_goes_is_refused_before_training(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    path = write_recipe(tmp_path)
    before = files_of(tmp_path)
    for command in ("validate", "run"):
        done = run_child([command, str(path)], tmp_path)
        assert_clean(done, 2, "output_dir: run directories cannot be written under",
                     "is a file, not a folder: move the file, or choose another output folder")
    assert files_of(tmp_path) == before


def test_a_folder_the_user_cannot_write_is_refused_before_training():
    import tempfile

    prefix = as_user(65534)
    tmp_path = Path(tempfile.mkdtemp(prefix="cnnreg-uid-"))  # pytest's folders are private to root
    tmp_path.chmod(0o755)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    path = write_recipe(tmp_path, output_dir=str(locked / "runs"))
    path.chmod(0o644)
    try:
        done = run_child(["run", str(path)], tmp_path, prefix=prefix)
        assert_clean(done, 2, f"{locked} is not writable by this user (uid 65534)")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
        shutil.rmtree(tmp_path)


def test_an_output_folder_on_a_read_only_file_system_is_refused_before_training(tmp_path):
    """A read-only tmpfs mounted in a mount namespace of its own (unshare), where the machine permits it."""
    mount_point = tmp_path / "readonly"
    mount_point.mkdir()
    path = write_recipe(tmp_path, output_dir=str(mount_point / "runs"))
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs {mount_point} || exit 99; "
              f"exec {sys.executable} -m cnnreg run {path}")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a read-only file system")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    if done.returncode == 99 or "unshare failed" in done.stderr:
        pytest.skip(f"this machine does not let the tests mount a file system: {done.stderr.strip()}")
    assert_clean(done, 2, f"{mount_point} is on a read-only file system: choose an output folder on a writable disk")


def test_a_full_disk_at_last_pt_stops_the_run_keeps_the_previous_one_and_says_so(tmp_path):
    # 1 MB: the run's JSON files and best.safetensors (~0.6 MB) fit, last.pt (~2 MB, with Adam's state) does not
    path = write_recipe(tmp_path, model={"name": "simple_cnn"}, trainer__epochs=2,
                        callbacks=[{"name": "checkpoint", "monitor": "val_accuracy"}])
    done = run_child(["run", str(path)], tmp_path, file_limit=1_000_000)
    assert_clean(done, 1, "training stopped: could not write", "last.pt: the file size limit (1,000,000 bytes",
                 "no last.pt was kept", "Training stops rather than go on without a way back")
    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"].startswith("stopped: could not write") and summary["epochs_run"] == 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # the partial write is gone
    assert (run_dir / "best.safetensors").is_file() and not (run_dir / "last.pt").exists()


def test_a_full_disk_at_the_best_weights_is_a_warning_and_training_goes_on(tmp_path):
    path = write_recipe(tmp_path, model={"name": "simple_cnn"}, trainer__epochs=2, trainer__checkpoint_every=0,
                        callbacks=[{"name": "checkpoint", "monitor": "val_accuracy"}])
    done = run_child(["run", str(path)], tmp_path, file_limit=300_000)  # best.safetensors (~0.6 MB) cannot be written
    assert "best.safetensors: the file size limit (ulimit -f) was reached" in done.stderr
    assert "Training goes on" in done.stderr
    assert "Traceback" not in done.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2  # both epochs trained; then last.pt, at the end, was too big too
    assert done.returncode == 1 and "last.pt: the file size limit (300,000 bytes" in done.stderr


# -- resume ---------------------------------------------------------------------------------------


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    """A run interrupted after its first epoch of three (last.pt holds epoch 1)."""
    path = write_recipe(tmp_path, trainer__epochs=1)
    assert main(["run", str(path)]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "stopped": "interrupted"}))
    return run_dir


def test_an_empty_last_pt_is_refused_and_nothing_is_rewritten(stopped_run, capsys):
    (stopped_run / "last.pt").write_bytes(b"")
    before = files_of(stopped_run)
    assert main(["run", "--resume", str(stopped_run), "--set", "trainer.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "last.pt is not a readable checkpoint (it is empty (0 bytes))" in err and "Traceback" not in err
    assert files_of(stopped_run) == before


def test_a_recipe_edited_to_another_model_is_refused_with_what_differs(stopped_run, capsys):
    recipe = json.loads((stopped_run / "recipe.json").read_text())
    recipe["model"]["widths"] = [16, 16, 16]
    (stopped_run / "recipe.json").write_text(json.dumps(recipe))
    before = files_of(stopped_run)
    assert main(["run", "--resume", str(stopped_run), "--set", "trainer.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "was saved by another recipe than" in err and "of another shape:" in err and "[8, 3, 3, 3] in last.pt" in err
    assert "Nothing was changed" in err and "Traceback" not in err
    assert files_of(stopped_run) == before


def test_a_resume_that_fits_keeps_the_runs_start_in_its_records(stopped_run, capsys):
    created = json.loads((stopped_run / "run.json").read_text())["created"]
    assert main(["run", "--resume", str(stopped_run), "--set", "trainer.epochs=3"]) == 0
    info = json.loads((stopped_run / "run.json").read_text())
    assert info["created"] == created and len(info["resumed"]) == 1
    summary = json.loads((stopped_run / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["train_seconds"] > 0  # the first epoch's time counts too


# -- numerics -------------------------------------------------------------------------------------


def test_a_diverging_loss_stops_like_a_nan_with_the_rule_it_broke(tmp_path, capsys):
    path = write_recipe(tmp_path, optimizer={"name": "sgd", "lr": 1e6}, trainer__epochs=3)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "training stopped: the loss diverged to" in err or "became NaN or infinite" in err
    assert "more than 1000 times the run's first loss (trainer.divergence)" in err or "NaN" in err
    assert "no checkpoint was saved before it" in err or "last.pt holds epoch" in err
    run_dir = next((tmp_path / "runs").iterdir())
    assert json.loads((run_dir / "summary.json").read_text())["stopped"].startswith("stopped: the loss")


def test_the_divergence_rule_flags_a_finite_explosion_and_can_be_turned_off():
    guard = step.LossGuard(1000, torch.device("cpu"))
    assert not bool(guard.bad(torch.tensor(2.3)))  # the first loss sets the reference
    assert not bool(guard.bad(torch.tensor(2000.0)))  # under 1000 x 2.3
    assert bool(guard.bad(torch.tensor(3e21)))  # finite, but diverged
    assert bool(guard.bad(torch.tensor(float("nan"))))
    off = step.LossGuard(0, torch.device("cpu"))
    off.bad(torch.tensor(2.3))
    assert not bool(off.bad(torch.tensor(3e21))) and bool(off.bad(torch.tensor(float("inf"))))


# -- plugins misbehaving during a run ---------------------------------------------------------------

HOOKS = {
    "cnnreg_fit_start": "run, start_epoch",
    "cnnreg_epoch_start": "run, epoch",
    "cnnreg_train_progress": "run, progress",
    "cnnreg_optimizer_step": "run, epoch, step, total_steps",
    "cnnreg_evaluate_start": "run, split",
    "cnnreg_epoch_end": "run, record",
    "cnnreg_should_stop": "run, record",
    "cnnreg_fit_end": "run, result",
    "cnnreg_run_plugins": "run",
}


def faulty_plugin(tmp_path: Path, monkeypatch, hook: str, body: str) -> None:
    source = f"""
        import cnnreg

        @cnnreg.hookimpl
        def {hook}({HOOKS[hook]}):
            {body}
    """
    module = f"faulty_plugin_{hook}_{abs(hash(body))}"  # a module of its own: Python keeps imported ones
    root = make_distribution(tmp_path / "site", "faulty-plugin", {module: source}, {"faulty": module}, version="2.5")
    monkeypatch.syspath_prepend(str(root))


@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_plugin_that_raises_during_a_run_is_named_and_the_run_recorded(hook, tmp_path, monkeypatch, capsys):
    faulty_plugin(tmp_path, monkeypatch, hook, 'raise ValueError("boom")')
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", 0.0)  # progress events at every step
    path = write_recipe(tmp_path, trainer__epochs=2)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"training stopped: plugin 'faulty' (faulty-plugin 2.5) failed in {hook}: ValueError: boom" in err, err
    assert "Traceback" not in err
    run_dir = next((tmp_path / "runs").iterdir())
    if hook != "cnnreg_run_plugins":  # that one fails before training: nothing to record but the start
        summary = json.loads((run_dir / "summary.json").read_text())
        assert f"plugin 'faulty' (faulty-plugin 2.5) failed in {hook}" in summary["stopped"]
        assert main(["runs", str(tmp_path / "runs")]) == 0
        assert "running or interrupted" not in capsys.readouterr().out


def test_a_plugin_failing_at_an_epochs_end_leaves_that_epoch_resumable(tmp_path, monkeypatch, capsys):
    faulty_plugin(tmp_path, monkeypatch, "cnnreg_epoch_end", 'raise ValueError("boom")')
    path = write_recipe(tmp_path, trainer__epochs=3, trainer__checkpoint_every=0)  # no periodic last.pt
    assert main(["run", str(path)]) == 1
    run_dir = next((tmp_path / "runs").iterdir())
    assert "last.pt holds epoch 1: resume from epoch 1 with: cnnreg run --resume" in capsys.readouterr().err
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1


def test_a_should_stop_returning_a_bool_is_named_with_what_it_should_return(tmp_path, monkeypatch, capsys):
    faulty_plugin(tmp_path, monkeypatch, "cnnreg_should_stop", "return True")
    path = write_recipe(tmp_path, trainer__epochs=2)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "plugin 'faulty' (faulty-plugin 2.5) failed in cnnreg_should_stop: it returned bool True, but " \
           "cnnreg_should_stop takes a reason (a str saying why training stops) or None" in err


def test_the_traceback_is_there_on_request(tmp_path, monkeypatch, capsys):
    faulty_plugin(tmp_path, monkeypatch, "cnnreg_epoch_end", 'raise ValueError("boom")')
    path = write_recipe(tmp_path, trainer__epochs=1)
    assert main(["run", "--traceback", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise ValueError("boom")' in err and "faulty_plugin_cnnreg_epoch_end" in err


# -- display and files ------------------------------------------------------------------------------


def test_class_names_with_rich_markup_show_as_written(tmp_path, capsys):
    write_image_folder(tmp_path / "photos", ("[red]dog", "[bold]cat"), per_class=4, size=(12, 12))
    path = write_recipe(tmp_path, data={"name": "imagefolder", "root": str(tmp_path / "photos"), "batch_size": 4,
                                        "val_fraction": 0.25, "cache": False}, trainer__epochs=1)
    assert main(["run", str(path)]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "[red]dog" in out and "[bold]cat" in out


def test_a_truncated_mnist_file_is_named(tmp_path, capsys):
    write_mnist(tmp_path / "data", gz=True)
    images = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    path = write_recipe(tmp_path, data={"name": "mnist", "root": str(tmp_path / "data"), "batch_size": 8})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {images}" in err and "cut short or damaged" in err and "Traceback" not in err


# -- overrides --------------------------------------------------------------------------------------


def test_set_indexes_lists_as_hydra_does(tmp_path, capsys):
    path = write_recipe(tmp_path, trainer__epochs=1, callbacks=[{"name": "checkpoint"}],
                        transforms={"train": [{"name": "random_horizontal_flip"},
                                              {"name": "random_crop", "size": 12, "padding": 1}], "eval": []})
    assert main(["run", str(path), "--set", "callbacks.0.monitor=val_loss", "--set", "transforms.train.1.padding=2"]) == 0
    written = json.loads(next((tmp_path / "runs").iterdir()).joinpath("recipe.json").read_text())
    assert written["callbacks"][0]["monitor"] == "val_loss" and written["transforms"]["train"][1]["padding"] == 2
    assert main(["validate", str(path), "--set", "callbacks.3.monitor=val_loss"]) == 2
    assert "cannot set callbacks.3.monitor: callbacks has 1 item (0 to 0); there is no item 3" in capsys.readouterr().err


def test_a_sweep_over_a_list_item(tmp_path):
    from cnnreg.workflows.sweep import load_trials

    recipe = tiny_recipe(tmp_path, transforms={"train": [{"name": "random_horizontal_flip"}], "eval": []},
                         sweep={"parameters": {"transforms.train.0.p": [0.2, 0.8]}})
    _, trials = load_trials(recipe)
    assert [t.recipe.transforms.train[0].p for t in trials] == [0.2, 0.8]


def test_a_recipe_callback_that_raises_is_named_by_its_place_in_the_recipe(tmp_path):
    import cnnreg
    from cnnreg.core.stops import PluginFailed

    class Boom:
        @cnnreg.hookimpl
        def cnnreg_epoch_end(self, run, record):
            raise KeyError("missing")

    class Callbacks:
        @cnnreg.hookimpl
        def cnnreg_callbacks(self):
            def boom():
                """A callback that fails at an epoch's end."""
                return Boom()
            return {"boom": boom}

    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=1, callbacks=[{"name": "metrics_logger"},
                                                                                   {"name": "boom"}]),
                                extra=[Callbacks()])
    with pytest.raises(PluginFailed, match=r"plugin 'boom' \(the recipe's callbacks\[1\]\) failed in "
                                           r"cnnreg_epoch_end: KeyError: 'missing'"):
        cnnreg.fit(cnnreg.build(recipe))
