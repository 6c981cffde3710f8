"""aten operations dispatched per training step, cnnreg against the hand-written tutorial step (CPU).

    python bench/step_ops.py

Uses the counting of tests/test_step_ops.py (TorchDispatchMode; the same
model, transform objects and optimizer; 20 steps of batch 8 at 32x32) and
prints one line per configuration with the ratio the test bounds at 1.10.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_step_ops as ops  # noqa: E402

CONFIGS = [({"name": "tutorial_cnn"}, {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4}),
           ({"name": "simple_cnn"}, {"name": "sgd", "lr": 0.01, "momentum": 0.9})]


def main() -> None:
    patch = pytest.MonkeyPatch()
    for model, optimizer in CONFIGS:
        folder = Path(tempfile.mkdtemp())
        ours = ops.cnnreg_ops(ops._run(folder / "a", model, optimizer), patch)
        theirs = ops.minimal_ops(ops._run(folder / "b", model, optimizer))
        a, b = sum(ours.values()) / ops.STEPS, sum(theirs.values()) / ops.STEPS
        print(f"{model['name']} + {optimizer['name']}: cnnreg {a:.1f} ops/step, hand-written {b:.1f}, "
              f"ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
