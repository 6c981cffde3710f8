"""No host synchronisation inside the training step.

On the GPU a ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(tensor)`` or
``float(tensor)`` in the step makes the host wait for the device every batch.
On the CPU we count those calls made by cnnreg's own code (the engine and
the built-in plugins) during ``fit``: their number must not grow with the
number of batches (a constant handful per epoch, for reading the metrics
once, is the design). Calls inside torch itself are left out: on the CPU its
Adam reads a CPU step counter, which on CUDA stays on the device (fused).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

import cnnreg
from cnnreg.engine import step

from conftest import tiny_recipe

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
OURS = (str(Path(__file__).parent.parent / "cnnreg"), str(Path(__file__).parent.parent / "plugins"))


def host_reads_during_fit(tmp_path, monkeypatch, train_size: int) -> int:
    recipe = cnnreg.load_recipe(tiny_recipe(
        tmp_path, data__train_size=train_size, data__batch_size=16, trainer__epochs=2,
        transforms={"train": [{"name": "random_horizontal_flip"}, {"name": "random_crop", "size": 12, "padding": 2},
                              {"name": "color_jitter", "brightness": 0.2}, {"name": "normalize"}],
                    "eval": [{"name": "normalize"}]},
        metrics=[{"name": "accuracy"}, {"name": "f1"}, {"name": "top_k", "k": 2}],
        scheduler={"name": "onecycle"}, trainer__grad_clip_norm=1.0))
    run = cnnreg.build(recipe, output=False)
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", math.inf)  # progress reads are throttled by time
    count = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(OURS):
                count["n"] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cnnreg.fit(run)
    monkeypatch.undo()
    return count["n"]


def test_host_reads_do_not_grow_with_the_number_of_steps(tmp_path, monkeypatch):
    few = host_reads_during_fit(tmp_path / "few", monkeypatch, train_size=48)    # 3 steps an epoch
    many = host_reads_during_fit(tmp_path / "many", monkeypatch, train_size=192)  # 12 steps an epoch
    # Positive control: the metrics are read once an epoch, so the counter must see some
    # reads at all; 0 == 0 would mean it looked at the wrong files (a non-editable install).
    assert few > 0, f"no host read counted from {OURS}: the counter watches nothing"
    assert many == few, f"{many - few} extra host reads for 18 extra steps: something syncs inside the step"
