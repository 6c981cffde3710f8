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
