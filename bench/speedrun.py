"""The CIFAR-10 speedrun: recipes/cifar10-speedrun.json, timed over several runs.

    python bench/speedrun.py --data /tmp/cifar10-jpg [--runs 5] [--set KEY=VALUE ...]

One warm-up run first compiles the step (torch.compile, cuDNN autotuning);
its time is reported apart. Then ``--runs`` runs with seeds 0, 1, ... each
build a fresh model (whitening from the data, new weights) and train it;
every run's test accuracy is measured with the recipe's test-time
augmentation and without it. Training time is the fit's wall time with the
device synchronised, the first step included (``train_seconds +
compile_seconds`` of each run: after the warm-up nothing is left to
compile, so it is all training). Building the run (loading the decoded
images to the GPU) is not training and is reported apart. Prints a table
with mean and standard deviation, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import cnnreg  # noqa: E402
from cnnreg.cli import parse_overrides  # noqa: E402
from _common import data_overrides  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10-speedrun.json"


def one_run(recipe_path: Path, changes: dict, seed: int) -> dict:
    recipe = cnnreg.load_recipe(recipe_path, overrides={**changes, "seed": seed})
    started = time.perf_counter()
    run = cnnreg.build(recipe, output=False)
    built = time.perf_counter()
    result = cnnreg.fit(run)
    tta = cnnreg.evaluate(run, "test").metrics["accuracy"]
    without = tuple(t for t in run.eval_transforms if getattr(t, "view_weights", None) is None)
    plain = cnnreg.evaluate(replace(run, eval_transforms=without), "test").metrics["accuracy"]
    return {"seed": seed, "build_seconds": built - started, "train_seconds": result.train_seconds,
            "first_step_seconds": result.compile_seconds,
            "training_seconds": result.train_seconds + result.compile_seconds,
            "test_accuracy_tta": tta, "test_accuracy": plain, "epochs": len(result.records)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 as an image folder (train/, test/)")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    raw = json.loads(args.recipe.read_text())
    changes = {**data_overrides(raw["data"], args.data), "trainer.progress": "off",
               **parse_overrides(args.overrides)}

    warmup = one_run(args.recipe, changes, seed=1000)
    print(f"warm-up: compile and first step {warmup['first_step_seconds']:.2f}s, training "
          f"{warmup['train_seconds']:.2f}s, test accuracy {warmup['test_accuracy_tta']:.4f} with TTA", flush=True)
    rows = []
    for seed in range(args.runs):
        row = one_run(args.recipe, changes, seed)
        rows.append(row)
        print(f"run {seed}: training {row['training_seconds']:.3f}s (first step {row['first_step_seconds']:.3f}s), "
              f"test accuracy {row['test_accuracy_tta']:.4f} with TTA, {row['test_accuracy']:.4f} without; "
              f"build {row['build_seconds']:.1f}s", flush=True)
    time_mean, time_std = mean_std([r["training_seconds"] for r in rows])
    tta_mean, tta_std = mean_std([r["test_accuracy_tta"] for r in rows])
    plain_mean, plain_std = mean_std([r["test_accuracy"] for r in rows])
    print("\n| runs | training s (mean ± std) | test acc. with TTA | without TTA | warm-up compile s |")
    print("|---|---|---|---|---|")
    print(f"| {len(rows)} | {time_mean:.3f} ± {time_std:.3f} | {100 * tta_mean:.2f}% ± {100 * tta_std:.2f} "
          f"| {100 * plain_mean:.2f}% ± {100 * plain_std:.2f} | {warmup['first_step_seconds']:.1f} |")
    print(json.dumps({"recipe": raw["name"], "runs": rows, "warmup": warmup, "training_seconds_mean": time_mean,
                      "training_seconds_std": time_std, "test_accuracy_tta_mean": tta_mean,
                      "test_accuracy_tta_std": tta_std, "test_accuracy_mean": plain_mean}))


if __name__ == "__main__":
    main()
