"""Every real-data figure the issues ask for, in one command, on one GPU.

    python bench/gpu_suite.py --data DATA --out OUT [--smoke]

DATA holds cifar10-jpg.tar.gz (or cifar10-jpg/ unpacked), MNIST/raw/*.gz and
weights/tf_efficientnet_lite0.imagenet.safetensors (../shared/data and
../shared/weights have them). Each step runs in its own process under a time
limit, so one failure does not hide the rest; results go to OUT/results.jsonl
and a table is printed at the end. --smoke runs every step for one short
epoch on a small subset (a CPU check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    cifar = data / "cifar10-jpg"
    if not cifar.is_dir():
        with tarfile.open(data / "cifar10-jpg.tar.gz") as archive:
            archive.extractall(data, filter="data")
    weights = data / "weights" / "tf_efficientnet_lite0.imagenet.safetensors"
    runs = args.out / "runs"
    smoke = ["--set", "trainer.epochs=1", "--set", "data.subset=0.02"] if args.smoke else []

    def accuracy(recipe: str, *extra: str) -> list[str]:
        return [sys.executable, str(HERE / "accuracy.py"), str(REPO / "recipes" / recipe), "--output-dir", str(runs),
                *extra, *smoke]

    lite0 = ["--data", str(cifar), "--set", f"model.pretrained={weights}"]
    steps = [
        ("data-throughput", [sys.executable, str(HERE / "data_throughput.py"), "--data", str(cifar),
                             "--epochs", "1" if args.smoke else "3"], 90),
        ("cifar10-tutorial-cnn", accuracy("cifar10-tutorial-cnn.json", "--data", str(cifar)), 150),
        ("mnist-cnn", accuracy("mnist-cnn.json", "--data", str(data)), 70),
        ("cifar10-simple-cnn", accuracy("cifar10-simple-cnn.json", "--data", str(cifar)), 110),
        ("lite0-pretrained", accuracy("cifar10-efficientnet-lite0.json", *lite0), 110),
        ("lite0-scratch", accuracy("cifar10-efficientnet-lite0.json", "--data", str(cifar), "--set",
                                   "model.pretrained=false"), 110),
        ("tutorial-loop", [sys.executable, str(HERE / "tutorial_loop.py"), "--data", str(cifar), "--output-dir",
                           str(runs), "--epochs", "1" if args.smoke else "3", "--tutorial-epochs",
                           "1" if args.smoke else "2"], 120),
        ("mnist-fast", accuracy("mnist-fast.json", "--data", str(data)), 40),
        ("cifar10-fast", accuracy("cifar10-fast.json", "--data", str(cifar)), 60),
        ("speedrun", [sys.executable, str(HERE / "speedrun.py"), "--data", str(cifar),
                      "--runs", "1" if args.smoke else "5", *smoke], 300),
        ("profile-tutorial-cnn", [sys.executable, str(HERE / "profile_step.py"),
                                  str(REPO / "recipes" / "cifar10-tutorial-cnn.json"), "--data", str(cifar),
                                  "--out", str(args.out), *(["--skip", "2", "--active", "2"] if args.smoke else [])],
         120),
        ("torchrun-1", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "-m", "cnnreg", "run", str(REPO / "recipes" / "mnist-fast.json"), "--set",
                        f"data.root={data}", "--set", "data.download=false", "--set", "trainer.epochs=1",
                        "--set", "trainer.progress=plain", "--output-dir", str(runs)], 60),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results = args.out / "results.jsonl"
    for name, command, limit in steps:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit, env=env, cwd=REPO)
            status, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            status, output = "timeout", (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        wall = time.perf_counter() - started
        (args.out / f"{name}.log").write_text(output if isinstance(output, str) else str(output))
        row = {"step": name, "status": status, "process_wall_seconds": round(wall, 1)}
        last_json = next((line for line in reversed(output.splitlines()) if line.startswith(("{", "["))), None)
        if last_json:
            try:
                row["result"] = json.loads(last_json)
            except json.JSONDecodeError:
                pass
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        tail = "\n    ".join(output.strip().splitlines()[-6:])
        print(f"== {name}: status {status}, {wall:.1f}s\n    {tail}", flush=True)


if __name__ == "__main__":
    main()
