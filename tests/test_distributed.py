"""Data-parallel training with torchrun on the CPU (gloo): two processes train
like one process with the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnreg.core import distributed
from cnnreg.core.errors import UserError
from conftest import cli, tiny_recipe

VAL_SIZE = 49  # odd: the two ranks' evaluation shards differ in size (25 and 24)


def _recipe(tmp_path: Path, out: str, batch_size: int, epochs: int) -> dict:
    # No shuffling and no random augmentation: rank r of 2 takes samples r, r+2, ...,
    # so one step of two ranks with batch B sees exactly the samples of one step of
    # one process with batch 2B, and DDP averages the two gradients like that step.
    recipe = tiny_recipe(tmp_path, data__batch_size=batch_size, data__shuffle=False, data__val_size=VAL_SIZE,
                         data__eval_batch_size=10, trainer__epochs=epochs, trainer__deterministic=True,
                         optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    recipe["transforms"]["train"] = [{"name": "normalize"}]
    recipe["output_dir"] = str(tmp_path / out)
    return recipe


def _summary(root: Path) -> tuple[Path, dict]:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected one run directory under {root}, got {dirs}"
    return dirs[0], json.loads((dirs[0] / "summary.json").read_text())


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch_and_resume(tmp_path: Path) -> None:
    two = tmp_path / "two.json"
    two.write_text(json.dumps(_recipe(tmp_path, "runs2", batch_size=16, epochs=2)))
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_recipe(tmp_path, "runs1", batch_size=32, epochs=2)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    # epoch 1 through torchrun itself ...
    first = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "cnnreg", "run", str(two), "--set", "trainer.epochs=1"],
                           env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir, summary = _summary(tmp_path / "runs2")
    assert summary["epochs_run"] == 1
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2

    # ... epoch 2 resumed through `cnnreg run --nproc`: every rank reads last.pt
    second = cli("run", "--nproc", "2", "--resume", str(run_dir), "--set", "trainer.epochs=2",
                 env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert second.returncode == 0, second.stdout + second.stderr
    run_dir_again, two_summary = _summary(tmp_path / "runs2")  # still one directory: ranks > 0 wrote nothing
    assert run_dir_again == run_dir and two_summary["epochs_run"] == 2

    single = cli("run", str(one), env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    _, one_summary = _summary(tmp_path / "runs1")

    a, b = two_summary["last"], one_summary["last"]
    # Same samples, same averaged gradients: the weights differ only by float
    # summation order (gloo's all-reduce vs one batch), ~1e-7 after 12 steps.
    for name in ("train_loss", "val_loss"):
        assert a[name] == pytest.approx(b[name], rel=1e-4), name
    # accuracy can flip only for a sample sitting on a decision boundary
    for name in ("train_accuracy", "val_accuracy"):
        assert abs(a[name] - b[name]) <= 1 / VAL_SIZE + 1e-9, name
    # uneven evaluation shards, all-reduced: every validation sample counted exactly once
    assert sum(two_summary["per_class"]["val"]["support"]) == VAL_SIZE


def test_sync_batchnorm_converts_only_with_several_accelerator_processes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    params = list(model.parameters())
    assert distributed.sync_batchnorm(model, distributed.DistInfo(), True) is model  # one process: unchanged
    two_gpus = distributed.DistInfo(rank=0, world_size=2, device=torch.device("cuda", 0))
    converted = distributed.sync_batchnorm(model, two_gpus, True)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert list(converted.parameters()) == params  # the optimizer built on them stays valid
    assert distributed.sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), two_gpus, False)[0].__class__ is nn.BatchNorm2d
    with pytest.raises(UserError, match="needs CUDA"):
        distributed.sync_batchnorm(model, distributed.DistInfo(world_size=2, device=torch.device("cpu")), True)


def test_agree_is_the_identity_for_one_process() -> None:
    assert distributed.agree("early stopping", distributed.DistInfo()) == "early stopping"
    assert distributed.agree(None, distributed.DistInfo()) is None


def _long_recipe(tmp_path: Path, out: str, epochs: int) -> Path:
    """Two ranks, about 125 steps an epoch each: a signal lands in the middle of one."""
    recipe = _recipe(tmp_path, out, batch_size=16, epochs=epochs)
    recipe["data"].update(train_size=4000, val_size=48)
    recipe["trainer"]["progress"] = "plain"
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_the_resume_goes_on(tmp_path: Path) -> None:
    import signal

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    path = _long_recipe(tmp_path, "runs", epochs=3)
    launcher = subprocess.Popen([sys.executable, "-m", "cnnreg", "run", "--nproc", "2", str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in launcher.stdout:  # Ctrl-C in the middle of the second epoch, to every process as a terminal does
        if line.startswith("epoch 1/3"):
            os.killpg(launcher.pid, signal.SIGINT)
            break
    try:
        out, err = launcher.communicate(timeout=120)  # a rank left waiting for the other would hang here
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail("the ranks did not stop together")
    assert launcher.returncode == 130, out + err
    assert "the 2 processes stopped at the same step" in err and "Traceback" not in err
    run_dir, summary = _summary(tmp_path / "runs")
    assert summary["stopped"] == "interrupted"
    state = torch.load(run_dir / "last.pt", weights_only=True)
    # a step all ranks agreed on: every 16th, or the epoch's last (125 steps of 16 per rank)
    assert state["world_size"] == 2 and (state["step_in_epoch"] % 16 == 0 or state["step_in_epoch"] == 125)

    resumed = cli("run", "--nproc", "2", "--resume", str(run_dir), env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _, summary = _summary(tmp_path / "runs")
    assert summary["stopped"] == "completed" and summary["epochs_run"] == 3

    uninterrupted = cli("run", "--nproc", "2", str(_long_recipe(tmp_path, "straight", epochs=3)),
                        env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    _, straight = _summary(tmp_path / "straight")
    for name in ("train_loss", "val_loss"):  # resumed at the saved step, it ends where one run ends
        assert summary["last"][name] == pytest.approx(straight["last"][name], rel=1e-4), name


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(path: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """One torchrun agent per "node", one process each, meeting over a loopback rendezvous."""
    port, env = _free_port(), {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                                "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                                f"cnnreg-{port}", "--max-restarts", "0", "-m", "cnnreg", "run", *args],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    done = []
    for agent in agents:
        out, err = agent.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    return done


@pytest.mark.slow
def test_two_nodes_over_a_loopback_rendezvous_train_and_resume_like_one_node(tmp_path: Path) -> None:
    path = tmp_path / "two.json"
    path.write_text(json.dumps(_recipe(tmp_path, "nodes", batch_size=16, epochs=2)))
    for node in _two_nodes(path, str(path), "--set", "trainer.epochs=1"):
        assert node.returncode == 0, node.stdout + node.stderr
    run_dir, summary = _summary(tmp_path / "nodes")  # one directory: only the global rank 0 writes
    assert summary["epochs_run"] == 1 and json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    for node in _two_nodes(path, "--resume", str(run_dir), "--set", "trainer.epochs=2"):
        assert node.returncode == 0, node.stdout + node.stderr
    _, summary = _summary(tmp_path / "nodes")

    one_node = cli("run", "--nproc", "2", str(path), "--set", f"output_dir={tmp_path / 'node'}",
                   env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert one_node.returncode == 0, one_node.stderr
    _, single = _summary(tmp_path / "node")
    assert summary["epochs_run"] == single["epochs_run"] == 2
    for name in ("train_loss", "val_loss", "val_accuracy"):
        assert summary["last"][name] == pytest.approx(single["last"][name], rel=1e-6), name


def test_a_worker_ends_with_its_status_after_the_atexit_handlers_and_with_its_output_flushed(tmp_path: Path) -> None:
    # A torchrun worker ends without interpreter finalisation (gloo's threads could abort it
    # there); what finalisation would have done for the user must still happen.
    marker = tmp_path / "tracker-finished"
    script = tmp_path / "worker.py"
    script.write_text(
        "import atexit, sys\n"
        "from cnnreg.core import distributed\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('done'))  # a tracker closing its run\n"
        "sys.stdout.write('last line, still in the buffer')\n"
        "distributed.end_worker_process(3)\n"
        "print('never reached')\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "last line, still in the buffer"
    assert marker.read_text() == "done"
