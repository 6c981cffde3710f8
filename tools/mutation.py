"""Mutation testing of the modules whose bugs change results silently.

    python tools/mutation.py                  # every module [tool.cnnreg.mutation.tests] names
    python tools/mutation.py --changed        # those changed since origin/main (or HEAD)
    python tools/mutation.py plugins/losses.py cnnreg/engine/step.py
    python tools/mutation.py --shard 1/3      # a full run in three parts (one per machine or session)
    python tools/mutation.py --report         # the scores of the last run, nothing run

It runs mutmut (configured in pyproject.toml) and prints, per module, how
many mutants the tests kill. Needs ``pip install -e '.[mutation]'``.

Why a staged copy: mutmut names a mutant after its file's path, and the
built-in plugins live in ``plugins/`` but import as ``cnnreg_plugins``, so
mutants of ``plugins/*.py`` would never be switched on. The tool keeps a copy
of the tree under ``.mutation/<module>/`` where the folder has its import name,
and runs mutmut there on that module alone, against the tests pyproject.toml
names for it (``[tool.cnnreg.mutation.tests]``): tried against the whole suite,
a surviving mutant of the step costs minutes of training tests, and a full run
would not fit in 90 minutes on 2 cores. Results are kept between runs, so a
second run re-tests only the functions that changed and the mutants that were
not killed.

Equivalent mutants (a change no test could see, because behaviour does not
change) are listed with the reason in ``tools/equivalent_mutants/*.toml``,
matched by the lines they change, and left out of the score. So are the
mutants that only move a tensor off its device (``device=x.device`` made
``None`` or dropped): on a CPU-only machine that changes nothing, and on a
GPU it fails loudly (tensors on different devices), never silently; the
CUDA-marked tests run those paths where a GPU is present. They are counted
in their own column.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / ".mutation"
# One file per module or theme: [[equivalent]] path, original, mutant, reason.
EQUIVALENTS = REPO / "tools" / "equivalent_mutants"
GOAL = 0.90
# Staged name -> repository folder. Everything the tests read is copied too.
TREES = {"cnnreg": "cnnreg", "cnnreg_plugins": "plugins", "tests": "tests", "recipes": "recipes"}
# Folders installed inside a package (pyproject's package-dir): the shipped recipes are
# `cnnreg.recipes`, which a stage imports from its own cnnreg/ folder.
NESTED = {"cnnreg/recipes": "recipes"}
FILES = ("README.md",)
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
# Left out of the score: mutants mutmut skipped, and those not run yet (a run still going).
NOT_SCORED = {"skipped", "not checked"}


@dataclass(frozen=True)
class Equivalent:
    path: str  # repository path, e.g. plugins/losses.py
    original: str
    mutant: str
    reason: str


@dataclass
class ModuleScore:
    path: str
    counts: dict[str, int] = field(default_factory=dict)
    equivalent: int = 0
    device_only: int = 0
    survivors: list[tuple[str, str]] = field(default_factory=list)  # (mutant name, diff)

    @property
    def considered(self) -> int:
        return sum(n for status, n in self.counts.items() if status not in NOT_SCORED)

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.equivalent + self.device_only

    @property
    def killed(self) -> int:
        return sum(self.counts.get(status, 0) for status in KILLED)

    @property
    def score(self) -> float:
        return self.killed / self.considered if self.considered else 1.0

    @property
    def finished(self) -> bool:
        """Every mutant has a verdict (a run cut short leaves some "not checked")."""
        return not self.counts.get("not checked", 0)

    @property
    def shown_score(self) -> str:
        return f"{self.score:.1%}" if self.considered else "not run"


def staged(path: str) -> str:
    """``plugins/losses.py`` -> ``cnnreg_plugins/losses.py`` (and back with :func:`unstaged`)."""
    for name, folder in TREES.items():
        if path.startswith(folder + "/"):
            return name + path[len(folder):]
    return path


def unstaged(path: str) -> str:
    for name, folder in TREES.items():
        if path.startswith(name + "/"):
            return folder + path[len(name):]
    return path


def mutation_config() -> dict[str, list[str]]:
    """Module (repository path) -> the test files that judge its mutants."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["cnnreg"]["mutation"]["tests"]


def configured_modules() -> list[str]:
    return list(mutation_config())


def changed_modules(since: str | None) -> list[str]:
    """The configured modules changed since ``since`` (committed, staged or not)."""
    if since is None:
        has_upstream = subprocess.run(["git", "rev-parse", "--verify", "-q", "origin/main"], cwd=REPO,
                                      capture_output=True).returncode == 0
        since = "origin/main" if has_upstream else "HEAD"
    diff = subprocess.run(["git", "diff", "--name-only", since, "--"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()
    return [m for m in configured_modules() if m in set(diff)]


def shard(modules: list[str], index: int, count: int) -> list[str]:
    """The modules of shard ``index`` (1-based) of ``count``: the largest files first,
    each to the lightest shard, so shards take about the same time (mutants grow with
    the code) and every module is in exactly one."""
    loads = [0] * count
    chosen: list[list[str]] = [[] for _ in range(count)]
    for module in sorted(modules, key=lambda m: (-(REPO / m).stat().st_size, m)):
        lightest = loads.index(min(loads))
        loads[lightest] += (REPO / module).stat().st_size
        chosen[lightest].append(module)
    return [m for m in modules if m in chosen[index - 1]]


def stage_dir(module: str) -> Path:
    """Each module has a stage of its own: mutmut keeps one test selection per folder,
    and forgets every verdict when the selection changes."""
    return STAGE / module.removesuffix(".py").replace("/", ".")


def sync_tree(source: Path, target: Path, keep: tuple[str, ...] = ()) -> None:
    """Make ``target`` a copy of ``source``, touching only files that differ: mutmut
    regenerates a module's mutants when its file is newer than the mutants. Names
    in ``keep`` are left in ``target`` although ``source`` has none."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == "__pycache__":
            continue
        dest = target / item.name
        if item.is_dir():
            sync_tree(item, dest)
        elif not dest.is_file() or not filecmp.cmp(item, dest, shallow=False):
            shutil.copy2(item, dest)
    for item in target.iterdir():
        if item.name not in ("__pycache__", *keep) and not (source / item.name).exists():
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def stage(module: str) -> Path:
    """Copy the tree into the module's stage, with a pyproject.toml whose [tool.mutmut]
    mutates only that module and runs only its tests."""
    target = stage_dir(module)
    for name, folder in TREES.items():
        nested = tuple(n.split("/", 1)[1] for n in NESTED if n.startswith(name + "/"))
        sync_tree(REPO / folder, target / name, keep=nested)
    for name, folder in NESTED.items():
        sync_tree(REPO / folder, target / name)
    for name in FILES:
        shutil.copy2(REPO / name, target / name)
    tests = [t for t in mutation_config()[module] if (REPO / t).is_file()]
    settings = [f"only_mutate = {json.dumps([staged(module)])}",
                f"pytest_add_cli_args_test_selection = {json.dumps(tests + ['-m', 'not compiles'])}"]
    lines = []
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        lines.append(line)
        if line.strip() == "[tool.mutmut]":
            lines.extend(settings)
    new = "\n".join(lines) + "\n"
    pyproject = target / "pyproject.toml"
    if not pyproject.is_file() or pyproject.read_text() != new:
        pyproject.write_text(new)
    return target


def meta_path(module: str) -> Path:
    return stage_dir(module) / "mutants" / (staged(module) + ".meta")


def retest_unkilled(module: str) -> int:
    """Forget the verdicts that were not kills, so mutmut tests them again: the tests may
    have changed since (mutmut itself keeps every verdict of an unchanged function)."""
    from mutmut.stats import status_by_exit_code

    path = meta_path(module)
    if not path.is_file():
        return 0
    meta = json.loads(path.read_text())
    codes = meta.get("exit_code_by_key", {})
    count = 0
    for key, code in codes.items():
        if code is not None and status_by_exit_code[code] not in KILLED:
            codes[key] = None
            count += 1
    path.write_text(json.dumps(meta, indent=4))
    return count


def run_mutmut(module: str, max_children: int) -> int:
    where = stage_dir(module)
    log = where / "mutmut.log"
    print(f"{module}: mutmut is running in {where}; its progress is in {log}", flush=True)
    with log.open("w") as out:
        return subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
                              cwd=where, stdout=out, stderr=subprocess.STDOUT).returncode


def load_equivalents() -> list[Equivalent]:
    entries = [e for f in sorted(EQUIVALENTS.glob("*.toml")) for e in tomllib.loads(f.read_text()).get("equivalent", [])]
    return [Equivalent(e["path"], e["original"].strip(), e["mutant"].strip(), e["reason"]) for e in entries]


_DEVICE_ARGUMENT = re.compile(r",?\s*device\s*=\s*(?:None|[\w.]+(?:\[[^\]]*\])?)")
_TO_DEVICE = re.compile(r"\.to\((?:[\w.]*device|None)\)")


_DEVICE_VALUE = re.compile(r"\b(?:[\w.]+\.)?device\b(?!\s*=)")


def _without_device(line: str) -> str:
    line = _DEVICE_VALUE.sub("None", line)  # a device passed by position: x.device or device -> None
    line = _TO_DEVICE.sub(".to()", _DEVICE_ARGUMENT.sub("", line)).replace(".to(None, ", ".to(")
    return re.sub(r"\s+", "", line).replace(",)", ")").replace("(,", "(")


def moves_device_only(original: str, mutant: str) -> bool:
    """Whether a mutant only drops or nulls where a tensor is made (``device=x.device``
    -> ``device=None`` or gone, ``.to(x.device)`` -> ``.to(None)``, ``f(v, x.device)``
    -> ``f(v, None)``)."""
    return "device" in original and original != mutant and _without_device(original) == _without_device(mutant)


def changed_lines(diff: str) -> tuple[str, str]:
    """The (original, mutant) lines of a one-place mutation diff, stripped."""
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " ".join(removed), " ".join(added)


def score(modules: list[str]) -> list[ModuleScore]:
    """Each module's verdicts, read from mutmut's results (run inside the stage, where
    mutmut finds its configuration)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    equivalents = load_equivalents()
    scores = []
    for module in modules:
        result = ModuleScore(module)
        path = meta_path(module)
        if stage_dir(module).is_dir():
            os.chdir(stage_dir(module))  # where mutmut finds the module's mutants
        codes = json.loads(path.read_text()).get("exit_code_by_key", {}) if path.is_file() else {}
        for name, code in sorted(codes.items()):
            status = status_by_exit_code[code]
            if status not in KILLED and status not in NOT_SCORED:
                diff = get_diff_for_mutant(name, path=staged(module))
                original, mutant = changed_lines(diff)
                if any(e.path == module and e.original == original and e.mutant == mutant for e in equivalents):
                    result.equivalent += 1
                    continue
                if moves_device_only(original, mutant):
                    result.device_only += 1
                    continue
                result.survivors.append((name, diff))
            result.counts[status] = result.counts.get(status, 0) + 1
        scores.append(result)
    os.chdir(REPO)
    return scores


def report(scores: list[ModuleScore]) -> str:
    rows = ["| module | mutants | killed | survived | no tests | equivalent | device only | not run | score |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total = ModuleScore("all")
    for s in scores:
        rows.append(f"| {s.path} | {s.total} | {s.killed} | {s.counts.get('survived', 0)} "
                    f"| {s.counts.get('no tests', 0)} | {s.equivalent} | {s.device_only} | {s.counts.get('not checked', 0)} "
                    f"| {s.shown_score} |")
        for status, n in s.counts.items():
            total.counts[status] = total.counts.get(status, 0) + n
        total.equivalent += s.equivalent
        total.device_only += s.device_only
    rows.append(f"| **all** | {total.total} | {total.killed} | "
                f"{total.counts.get('survived', 0)} | {total.counts.get('no tests', 0)} | {total.equivalent} | {total.device_only} "
                f"| {total.counts.get('not checked', 0)} | {total.shown_score} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="repository paths of modules (default: all configured)")
    parser.add_argument("--changed", nargs="?", const="", metavar="REV",
                        help="only the configured modules changed since REV (default origin/main, else HEAD)")
    parser.add_argument("--report", action="store_true", help="print the last run's scores; run nothing")
    parser.add_argument("--survivors", action="store_true", help="print each surviving mutant's diff")
    parser.add_argument("--shard", metavar="K/N", help="run shard K of N (a full run in N parts, e.g. 1/3)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--fresh", action="store_true", help="forget every kept result first")
    args = parser.parse_args(argv)

    known = configured_modules()
    if args.changed is not None:
        modules = changed_modules(args.changed or None)
        if not modules:
            print("No configured module changed.")
            return 0
    else:
        modules = args.modules or known
    if args.shard:
        index, _, count = args.shard.partition("/")
        if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
            print(f"--shard {args.shard}: give K/N with 1 <= K <= N, e.g. --shard 1/3", file=sys.stderr)
            return 2
        modules = shard(modules, int(index), int(count))
    unknown = [m for m in modules if m not in known]
    if unknown:
        print(f"not configured in pyproject.toml [tool.cnnreg.mutation.tests]: {', '.join(unknown)}", file=sys.stderr)
        return 2

    if not args.report:
        begin = time.monotonic()
        for module in modules:
            if args.fresh and stage_dir(module).exists():
                shutil.rmtree(stage_dir(module))
            stage(module)
            retest_unkilled(module)
            start = time.monotonic()
            code = run_mutmut(module, args.max_children)
            print(f"{module}: mutmut finished in {time.monotonic() - start:.0f} s (exit status {code})", flush=True)
            if code != 0:
                print((stage_dir(module) / "mutmut.log").read_text()[-3000:], file=sys.stderr)
                return code
        print(f"all {len(modules)} modules in {time.monotonic() - begin:.0f} s")

    scores = score(modules)
    if args.survivors:
        for s in scores:
            for name, diff in s.survivors:
                print(f"\n# {name}\n{diff}")
    print(report(scores))
    low = [s.path for s in scores if s.score < GOAL]
    unfinished = [s.path for s in scores if not s.finished]
    if low:
        print(f"\nBelow {GOAL:.0%} of mutants killed: {', '.join(low)}")
    if unfinished:
        print(f"\nNot every mutant has been run (run these again to finish): {', '.join(unfinished)}")
    if low or unfinished:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
