"""Where a recipe's training step spends its time: a torch.profiler summary.

    python bench/profile_step.py recipes/cifar10-tutorial-cnn.json --data /tmp/cifar10-jpg [--out DIR]

Trains the recipe for one epoch and profiles ``--active`` optimizer steps
after ``--skip`` steps of warm-up (cuDNN autotuning, compilation), through
the engine's own ``cnnreg_optimizer_step`` hook, so what is measured is the
real step. Prints the top operators by device time and one line that says
whether the step is bound by the GPU's work or by launching it: device busy
time per step against wall time per step, and kernels launched per step. A
Chrome trace goes to ``--out`` (open it in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).parent))

import cnnreg  # noqa: E402
from cnnreg.cli import parse_overrides  # noqa: E402
from _common import data_overrides  # noqa: E402


class StepMarker:
    """Advances the profiler's schedule at every optimizer step."""

    def __init__(self, profiler: profile):
        self.profiler = profiler

    @cnnreg.hookimpl
    def cnnreg_optimizer_step(self, run, epoch, step, total_steps):
        self.profiler.step()


def summary(profiler: profile, steps: int) -> dict:
    """Per step: wall time, time the device was busy, kernels launched."""
    events = profiler.events()
    step_walls = [e.time_range.elapsed_us() for e in events if e.name.startswith("ProfilerStep")]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels) if kernels else 0.0
    wall_ms = sum(step_walls) / max(len(step_walls), 1) / 1000
    return {"steps": len(step_walls) or steps, "wall_ms_per_step": wall_ms,
            "device_busy_ms_per_step": busy_us / max(len(step_walls), 1) / 1000,
            "kernels_per_step": len(kernels) / max(len(step_walls), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--skip", type=int, default=30, help="warm-up steps before profiling")
    parser.add_argument("--active", type=int, default=20, help="steps profiled")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    raw = json.loads(args.recipe.read_text())
    changes = {**(data_overrides(raw["data"], args.data) if args.data else {}), "trainer.epochs": 1,
               "trainer.progress": "off", **parse_overrides(args.overrides)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / f"{raw['name']}.trace.json"
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    found: dict = {}

    def ready(p: profile) -> None:  # when the active steps end; the profiler's events are read here
        p.export_chrome_trace(str(trace))
        found.update(table=p.key_averages().table(sort_by=sort, row_limit=25), numbers=summary(p, args.active))

    with profile(activities=activities, schedule=schedule(wait=args.skip, warmup=2, active=args.active),
                 on_trace_ready=ready) as profiler:
        recipe = cnnreg.load_recipe(args.recipe, overrides=changes, extra=[StepMarker(profiler)])
        run = cnnreg.build(recipe, output=False)
        steps = len(run.batches["train"])
        if steps < args.skip + 2 + args.active:
            sys.exit(f"the epoch has {steps} steps: lower --skip/--active to fit in it")
        cnnreg.fit(run)
    print(found["table"])
    numbers = found["numbers"]
    if not torch.cuda.is_available():
        bound = "no GPU: host times only"
    elif numbers["device_busy_ms_per_step"] < 0.8 * numbers["wall_ms_per_step"]:
        bound = "launch/host-bound: the device idles"
    else:
        bound = "device-bound"
    print(f"{raw['name']}: {numbers['wall_ms_per_step']:.2f} ms per step wall, device busy "
          f"{numbers['device_busy_ms_per_step']:.2f} ms, {numbers['kernels_per_step']:.0f} kernels per step "
          f"({bound}); trace: {trace}")
    print(json.dumps({"recipe": raw["name"], **numbers, "trace": str(trace)}))


if __name__ == "__main__":
    main()
