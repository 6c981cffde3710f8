"""Train a recipe on real data and report final accuracy, best accuracy and time.

    python bench/accuracy.py recipes/mnist-cnn.json --data ../shared/data
    python bench/accuracy.py recipes/cifar10-tutorial-cnn.json --data /tmp/cifar10-jpg --set trainer.epochs=5

The test split is evaluated twice: with the weights of the last epoch and
with the best checkpoint (the recipe's monitor). Prints one JSON line too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import cnnreg  # noqa: E402
from cnnreg.core import checkpoint
from cnnreg.cli import parse_overrides  # noqa: E402
from _common import data_overrides  # noqa: E402


def train_and_score(recipe_path: Path, data: Path | None, overrides: dict, output_dir: Path | None = None) -> dict:
    raw = json.loads(Path(recipe_path).read_text())
    changes = dict(data_overrides(raw["data"], data) if data else {})
    changes.update(overrides)
    if output_dir is not None:
        changes["output_dir"] = str(output_dir)
    started = time.perf_counter()
    recipe = cnnreg.load_recipe(recipe_path, overrides=changes)
    run = cnnreg.build(recipe)
    built = time.perf_counter()
    result = cnnreg.fit(run)
    trained = time.perf_counter()
    final = cnnreg.evaluate(run, "test").metrics["accuracy"] if "test" in run.batches else None
    best = final
    best_file = run.run_dir / checkpoint.WEIGHTS if run.run_dir else None
    if best_file is not None and best_file.exists() and "test" in run.batches:
        checkpoint.load_weights(run.model, best_file)
        best = cnnreg.evaluate(run, "test").metrics["accuracy"]
    return {
        "recipe": recipe.name, "epochs": len(result.records), "device": str(run.device),
        "final_test_accuracy": final, "best_test_accuracy": best, "best_epoch": result.best_epoch,
        "build_seconds": round(built - started, 2), "train_seconds": round(result.train_seconds, 2),
        "compile_seconds": round(result.compile_seconds, 2), "fit_wall_seconds": round(trained - built, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "images_per_second": round(sum(r.images_per_second for r in result.records) / len(result.records)),
        "run_dir": str(run.run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--data", type=Path, help="the dataset: torchvision root (MNIST) or image folder (CIFAR JPEG)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--output-dir", type=Path)
    args = parser.parse_args()
    row = train_and_score(args.recipe, args.data, parse_overrides(args.overrides), args.output_dir)
    print(f"{row['recipe']}: final test accuracy {row['final_test_accuracy']:.4f}, best {row['best_test_accuracy']:.4f} "
          f"(epoch {row['best_epoch']}), training {row['train_seconds']}s (+{row['compile_seconds']}s compile), "
          f"wall {row['wall_seconds']}s on {row['device']}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
