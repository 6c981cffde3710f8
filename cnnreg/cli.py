"""The ``cnnreg`` command.

Errors a user can fix are printed without a traceback and exit with status 2;
an interrupted run exits 130 (SIGINT) or 143 (SIGTERM) after saving a
resumable checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console

from cnnreg.core.errors import RecipeError, UserError
from cnnreg.core.tables import PlainTable
from cnnreg.core.version import version

EXAMPLES = """\
examples:
  cnnreg run quickstart                          train the shipped quickstart (offline, synthetic data)
  cnnreg recipes                                 the shipped recipes; cnnreg cp NAME [DEST] copies one to edit
  cnnreg run recipes/quickstart.json             a recipe file
  cnnreg run recipes/mnist-cnn.json --set trainer.epochs=2 --set data.root=../shared/data
  cnnreg run --resume runs/quickstart-20261122-101500
  cnnreg validate recipes/*.json                 check recipes and dry-run them on the CPU
  cnnreg ls models                               list registered models
  cnnreg ls models 'timm:res*'                   list timm architectures
  cnnreg schema > recipe.schema.json             JSON Schema for editors
  cnnreg ls --json                               any listing as JSON (NO_COLOR=1: no colours)
  cnnreg evaluate runs/quickstart-... --split test
  cnnreg report runs/quickstart-...              report.html: curves, confusions, top losses, Grad-CAM
  cnnreg calibrate runs/quickstart-...           fit a temperature on the val split; evaluate/predict/export use it
  cnnreg predict runs/quickstart-... cat.png --top-k 3
  cnnreg export runs/quickstart-... --format onnx
  cnnreg runs                                    list the runs under ./runs
  cnnreg sweep recipe.json                       one run per point of the recipe's sweep section
  torchrun --nproc-per-node 2 -m cnnreg run recipe.json   data parallel (or: cnnreg run --nproc 2 ...)
"""

KIND_ALIASES = {"models": "model", "datasets": "dataset", "data": "dataset", "transforms": "transform",
                "losses": "loss", "optimizers": "optimizer", "optim": "optimizer", "schedulers": "scheduler",
                "metrics": "metric", "callbacks": "callback"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnnreg`` console script; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    err = _console(stderr=True)
    with warnings.catch_warnings():
        # Each command shows each warning once (a fresh filter also forgets what an earlier
        # command in this process showed), as one line without Python's source quote.
        warnings.filterwarnings("default", category=UserWarning)
        warnings.showwarning = _warning_printer(err)
        try:
            status = _run_command(args, err)
        finally:
            left_group = _leave_process_group()
    if left_group:
        from cnnreg.core import distributed

        distributed.end_worker_process(status)
    return status


def _leave_process_group() -> bool:
    """Leave the torchrun process group this command joined, if it joined one
    (whatever the outcome: every rank must leave, or the others wait at exit)."""
    if "torch.distributed" not in sys.modules:  # never imported: no group, and keep --version free of torch
        return False
    from cnnreg.core import distributed

    return distributed.teardown()


def _run_command(args: argparse.Namespace, err: Console) -> int:
    """The command, with every error a user (or a machine fault, or a plugin) causes as a message.

    Exit status: 0 done; 1 training stopped (diverged, out of memory, last.pt
    not writable, a plugin failed: the run's summary says which); 2 a problem
    found before training (recipe, data, output folder, a resume that does
    not fit); 128 + the signal when interrupted (130, 143), after saving.
    ``--traceback`` (or ``CNNREG_TRACEBACK=1``) also prints where it came from.
    """
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if getattr(args, "traceback", False) or os.environ.get("CNNREG_TRACEBACK"):
            _print_traceback(err, exc)
        return _report(err, exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort for interruptions raised as exceptions
        from cnnreg.core.stops import Interrupted

        if isinstance(exc, Interrupted):
            err.print(_escape(str(exc)))
            return exc.exit_code
        raise


def _print_traceback(err: Console, exc: BaseException) -> None:
    import traceback

    err.print("".join(traceback.format_exception(exc)), markup=False, end="")


def _report(err: Console, exc: UserError) -> int:
    if isinstance(exc, RecipeError):
        for problem in exc.problems:
            err.print(f"[bold red]error[/]: {_escape(str(problem))}")
        count = len(exc.problems)
        err.print(f"{count} error{'s' if count != 1 else ''}; nothing was run")
        return 2
    from cnnreg.core.stops import TrainingStopped

    if isinstance(exc, TrainingStopped):
        err.print(f"[bold red]training stopped[/]: {_escape(str(exc))}")
        return 1
    err.print(f"[bold red]error[/]: {_escape(str(exc))}")
    return 2


def _warning_printer(err: Console) -> Callable[..., None]:
    """Warnings as one ``warning: ...`` line each, without the source line Python would quote."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        err.print(f"[yellow]warning[/]: {_escape(str(message))}")

    return show


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnreg", description="Train convolutional networks from JSON recipes, with plugins.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--disable", action="append", default=[], metavar="PLUGIN",
                        help="block a plugin by name (repeatable)")
    common.add_argument("--traceback", action="store_true",
                        help="with an error, also print where it came from (or set CNNREG_TRACEBACK=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                json_output: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func, json=False)
        if json_output:
            p.add_argument("--json", action="store_true", help=f"print {json_output} as JSON on stdout")
        return p

    p = command("run", cmd_run, "train a recipe (or resume a run)",
                json_output="the run's outcome (progress goes to stderr)")
    p.add_argument("recipe", nargs="?", type=Path, help="recipe JSON file, or a shipped recipe's name (cnnreg recipes)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe value, e.g. trainer.epochs=3 (VALUE is JSON, or a plain string)")
    p.add_argument("--device", help="override trainer.device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--output-dir", type=Path, help="where run directories go (default ./runs)")
    p.add_argument("--nproc", type=int, metavar="N", help="run N processes with torch.distributed.run")

    p = command("sweep", cmd_sweep, "train every point of a recipe's sweep section and rank them",
                json_output="the ranked trials (progress goes to stderr)")
    p.add_argument("recipe", type=Path, help="recipe JSON file with a sweep section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe value for every trial")
    p.add_argument("--device", help="override trainer.device")
    p.add_argument("--output-dir", type=Path, help="where the sweep folder goes (default ./runs)")

    p = command("lr-find", cmd_lr_find, "the learning-rate range test: sweep the lr up over a fresh model, "
                "plot the loss, suggest an optimizer.lr", json_output="the suggestion and the curve")
    p.add_argument("recipe", help="recipe JSON file, or a shipped recipe's name (cnnreg recipes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe value, e.g. data.batch_size=64 (VALUE is JSON, or a plain string)")
    p.add_argument("--device", help="override trainer.device")
    p.add_argument("--start-lr", type=float, default=1e-7, help="the first learning rate (default 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="the last learning rate (default 10)")
    p.add_argument("--steps", type=int, default=200,
                   help="optimizer steps, over as many epochs as they take (default 200)")
    p.add_argument("-o", "--output", type=Path, default=Path("lr_find.png"),
                   help="the plot's PNG file (default ./lr_find.png)")
    p.add_argument("--apply", nargs="?", const="", default=None, metavar="DEST",
                   help="write a copy of the recipe with optimizer.lr set to the suggestion "
                        "(default ./RECIPE.lr-find.json; an existing file is never overwritten)")

    p = command("runs", cmd_runs, "list run directories: progress, best metric, why they stopped",
                json_output="the runs")
    p.add_argument("dir", nargs="?", type=Path, default=Path("runs"), help="folder holding runs (default ./runs)")

    p = command("validate", cmd_validate, "check recipes as `run` assembles them, on the CPU, without training",
                json_output="one result per recipe (problems included)")
    p.add_argument("recipes", nargs="+", type=Path, help="recipe files or shipped recipes' names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    p.add_argument("--strict", action="store_true",
                   help="what is absent here (data, weights) is an error, not a 'not checked' note")

    p = command("ls", cmd_ls, "list registered components", json_output="the components")
    p.add_argument("kind", nargs="?", help="models, datasets, transforms, losses, optimizers, schedulers, metrics, callbacks")
    p.add_argument("pattern", nargs="?", default="*", help="glob on names, e.g. 'tutorial_*' or 'timm:resnet*'")

    p = command("schema", cmd_schema, "print the recipe JSON Schema (draft 2020-12) of the installed plugins")
    p.add_argument("-o", "--output", type=Path, help="write to a file instead of stdout")
    p.add_argument("--json", action="store_true", help="accepted for symmetry: the schema is JSON")

    p = command("recipes", cmd_recipes, "list the recipes shipped with cnnreg", json_output="the recipes")

    p = command("cp", cmd_cp, "copy a shipped recipe to edit, with recipe.schema.json beside it",
                json_output="what was written")
    p.add_argument("name", help="a shipped recipe (cnnreg recipes)")
    p.add_argument("dest", nargs="?", help="file or folder (an existing one, or one ending in /) to write "
                   "(default ./NAME.json)")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")

    p = command("evaluate", cmd_evaluate, "evaluate a finished run's checkpoint",
                json_output="the metrics and the per-class results")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device")

    p = command("report", cmd_report, "write RUN_DIR/report.html: one self-contained page about a run (or "
                "a sweep or k-fold folder's runs side by side)", json_output="the report's path")
    p.add_argument("run_dir", type=Path, help="a run directory, or a sweep or k-fold folder")
    p.add_argument("--device", help="where to evaluate (default: the recipe's trainer.device)")
    p.add_argument("--top-losses", type=int, default=16, metavar="N",
                   help="highest-loss test images in the gallery (default 16)")

    p = command("calibrate", cmd_calibrate, "fit a finished run's temperature on its validation split "
                "(RUN_DIR/calibration.json, which evaluate, predict and export then apply)",
                json_output="the temperature and the calibration error before and after")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device")

    p = command("predict", cmd_predict, "classify images with a run's model", json_output="one line per image")
    p.add_argument("run_dir", type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device")

    p = command("export", cmd_export, "export a run's model and check it gives the same outputs")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", required=True, choices=["onnx", "pt2", "torchscript", "safetensors"],
                   help="onnx; pt2 (torch.export); torchscript (where torch still supports it); "
                        "safetensors (the network's weights, loadable into timm/torchvision as they are)")
    p.add_argument("--preprocessing", action="store_true",
                   help="onnx and pt2: take uint8 images of any size and resize them as the run does "
                        "(instead of [0, 1] floats at the run's size)")
    p.add_argument("-o", "--output", type=Path, help="output file (default: in the run directory)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    return parser


# -- commands -----------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    from cnnreg.plugin.kinds import KINDS, PLURALS
    from cnnreg.config.manifest import lists_family, manifest, search

    kind = None
    if args.kind:
        kind = KIND_ALIASES.get(args.kind, args.kind)
        if kind not in KINDS:
            raise UserError(f"unknown kind {args.kind!r}; use one of: {', '.join(PLURALS.values())}")
    found = manifest(disable=args.disable)
    if lists_family(found.entries, kind, args.pattern):
        rows = _family_members(args, kind)  # a family's members: only its plugin can list them
    else:
        rows = [(e.key, e.kind, e.plugin, e.origin, e.summary) for e in search(found.entries, kind, args.pattern)]
    broken = [(b.name, b.origin, b.stage, b.error) for b in found.broken]
    if args.json:
        _print_json({"components": [dict(zip(("name", "kind", "plugin", "distribution", "summary"), row))
                                    for row in rows],
                     "broken": [dict(zip(("plugin", "distribution", "stage", "error"), b)) for b in broken]})
        return 0
    console = _console()
    table = PlainTable(title=f"cnnreg {PLURALS[kind] if kind else 'components'}", title_justify="left")
    for column in ("name", "kind", "plugin", "distribution"):
        table.add_column(column, no_wrap=True)  # names stay whole; the summary takes what is left
    table.add_column("summary", overflow="fold", ratio=1)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if broken:
        failed = PlainTable(title="plugins that failed to load", title_justify="left", style="red")
        for column in ("plugin", "distribution", "stage", "error"):
            failed.add_column(column, overflow="fold")
        for row in broken:
            failed.add_row(*row)
        console.print(failed)
    if not rows:
        console.print(f"nothing matches {_escape(args.pattern)}")
    return 0


def _family_members(args: argparse.Namespace, kind: str | None) -> list[tuple[str, ...]]:
    from cnnreg.plugin.catalog import build_catalog
    from cnnreg.plugin.manager import plugin_manager

    catalog = build_catalog(plugin_manager(disable=args.disable))
    try:
        found = catalog.search(kind, args.pattern)
    except ImportError as exc:
        raise UserError(f"cannot list {args.pattern!r}: {exc}") from None
    return [(key, c.kind, c.plugin, str(c.origin), c.summary) for key, c in found]


def cmd_schema(args: argparse.Namespace) -> int:
    from cnnreg.config.manifest import manifest

    text = json.dumps(manifest(disable=args.disable).schema, indent=2)
    if args.output:
        _write_text(args.output, text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from cnnreg.config.shipped import shipped_recipes

    recipes = shipped_recipes()
    if args.json:
        _print_json([{"name": r.name, "summary": r.summary, "description": r.description, "path": str(r.path)}
                     for r in recipes])
        return 0
    table = PlainTable(title="shipped recipes: cnnreg run NAME, or cnnreg cp NAME to edit a copy", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("summary", overflow="fold", ratio=1)
    for r in recipes:
        table.add_row(r.name, r.summary)
    _console().print(table)
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from cnnreg.config.recipe_copy import copy_shipped
    from cnnreg.config.manifest import manifest

    copied = copy_shipped(args.name, args.dest, schema=manifest(disable=args.disable).schema, force=args.force,
                          disable=tuple(args.disable))
    if args.json:
        _print_json({"recipe": str(copied.recipe), "schema": str(copied.schema) if copied.schema else None,
                     "rewritten": [{"key": k, "shipped": a, "copy": b} for k, a, b in copied.rewritten]})
        return 0
    console = _console()
    console.print(f"wrote {_escape(str(copied.recipe))}" + (
        f" and {_escape(str(copied.schema))} (its $schema, for editors)" if copied.schema else
        f"; left the {_escape(str(copied.recipe.parent / 'recipe.schema.json'))} already there alone"))
    for key, shipped, copy in copied.rewritten:
        console.print(f"  {_escape(key)}: {_escape(shipped)} -> {_escape(copy)} (the same place, seen from the copy)")
    console.print(f"run it with: cnnreg run {_escape(str(copied.recipe))}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from cnnreg.config.recipe import load_recipe
    from cnnreg.config.shipped import is_schema_file
    from cnnreg.workflows.validation import validate_recipe

    problems: list[Any] = []
    results: list[dict[str, Any]] = []
    console = _console()
    for path in args.recipes:
        if len(args.recipes) > 1 and is_schema_file(path):  # `validate recipes/*.json` also finds the schema
            if not args.json:
                console.print(f"skipped {_escape(str(path))}: the recipe schema (for editors), not a recipe")
            continue
        try:
            recipe = load_recipe(path, disable=args.disable, overrides=parse_overrides(args.overrides))
            result = validate_recipe(recipe, strict=args.strict)
        except RecipeError as exc:
            problems.extend(exc.problems)
            results.append({"recipe": str(path), "ok": False, "problems": [_problem_json(p) for p in exc.problems]})
            continue
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        results.append({"recipe": str(path), "ok": True, "summary": result.summary,
                        "chosen": [str(c) for c in result.choices], "not_checked": [str(u) for u in result.unchecked],
                        "warnings": list(result.warnings)})
        if not args.json:
            console.print(f"[green]ok[/] {_escape(str(path))}: {_escape(result.summary)}")
            for choice in result.choices:
                console.print(f"  chosen {_escape(str(choice))}")
            for unchecked in result.unchecked:
                console.print(f"  [yellow]not checked[/]: {_escape(str(unchecked))}; --strict makes this an error")
        for text in result.warnings:
            warnings.warn(text, stacklevel=1)  # as the run warns: one "warning:" line on stderr
    if args.json:
        _print_json(results)
    if problems:
        raise RecipeError(problems)
    return 0


def _problem_json(problem: Any) -> dict[str, Any]:
    from cnnreg.core.errors import format_path

    return {"file": str(problem.file) if problem.file else None, "line": problem.line, "column": problem.column,
            "key": format_path(problem.path), "message": problem.message}


def cmd_run(args: argparse.Namespace) -> int:
    if args.nproc:
        return _launch_distributed(args)
    import time

    started = time.time()
    with _progress_to_stderr(args.json):
        outcome = _run(args)
    reports = _reports_written(outcome, started)
    if args.json and outcome is not None:
        _print_json({**outcome, "reports": reports} if reports else outcome)
    elif reports:
        for path in reports:
            _console().print(f"report: {_escape(path)}")
    return 0


def _reports_written(outcome: dict[str, Any] | None, since: float) -> list[str]:
    """The report.html files this run's ``report`` callback wrote (one per fold of a k-fold)."""
    folders = [outcome.get("run_dir")] + [fold.get("run_dir") for fold in outcome.get("folds", [])] if outcome else []
    paths = [Path(f) / "report.html" for f in folders if f]
    return [str(p) for p in paths if p.is_file() and p.stat().st_mtime >= since - 1]


def _run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train; returns the outcome as JSON data (what ``--json`` prints)."""
    from cnnreg.assemble.build import build
    from cnnreg.engine.loop import fit
    from cnnreg.config.recipe import load_recipe

    overrides = parse_overrides(args.overrides)
    if args.output_dir is not None:
        overrides["output_dir"] = str(args.output_dir.resolve())
    if args.resume is not None:
        run_dir = args.resume
        recipe_file = run_dir / "recipe.json"
        if not recipe_file.is_file():
            raise UserError(f"{run_dir} is not a run directory (no recipe.json); give the folder `cnnreg run` created")
        recipe = load_recipe(recipe_file, disable=args.disable, overrides=overrides)
        if not (run_dir / "last.pt").is_file():
            raise UserError(f"{run_dir} has no last.pt to resume from; the run stopped before its first checkpoint. "
                            f"Start it again with: cnnreg run {recipe_file}")
        run = build(recipe, run_dir=run_dir, device=args.device)
        return _fit_json(fit(run, resume=True))
    if args.recipe is None:
        raise UserError("give a recipe file (or a shipped recipe's name: cnnreg recipes), or --resume RUN_DIR")
    recipe = load_recipe(args.recipe, disable=args.disable, overrides=overrides)
    if recipe.sweep is not None:
        # Training only the base values would look like a finished sweep; say what to run instead.
        raise UserError(f"{args.recipe} has a sweep section: run it with `cnnreg sweep {args.recipe}`, "
                        "or remove the section (or --set sweep=null) to train it once")
    if recipe.cross_validation is not None:
        from cnnreg.workflows.crossval import cross_validate

        cv = cross_validate(recipe, device=args.device)
        return {"run_dir": str(cv.run_dir) if cv.run_dir else None, "mean": cv.mean, "std": cv.std,
                "folds": [_fit_json(fold) for fold in cv.folds]}
    run = build(recipe, device=args.device)
    return _fit_json(fit(run))


def _fit_json(result: Any) -> dict[str, Any]:
    best, last = result.best, result.last
    return {"run_dir": str(result.run_dir) if result.run_dir else None, "stopped": result.stopped,
            "epochs": len(result.records), "monitor": result.monitor, "mode": result.mode,
            "best_epoch": result.best_epoch, "best": dict(best.metrics) if best else None,
            "last": dict(last.metrics) if last else None, "train_seconds": result.train_seconds,
            "compile_seconds": result.compile_seconds}


def cmd_sweep(args: argparse.Namespace) -> int:
    from cnnreg.workflows.sweep import run_sweep, sweep_data

    overrides = parse_overrides(args.overrides)
    if args.output_dir is not None:
        overrides["output_dir"] = str(args.output_dir.resolve())
    with _progress_to_stderr(args.json):
        result = run_sweep(args.recipe, disable=args.disable, overrides=overrides, device=args.device)
    if args.json:
        _print_json({**sweep_data(result), "run_dir": str(result.run_dir) if result.run_dir else None})
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from cnnreg.config.recipe import load_recipe
    from cnnreg.workflows.lr_find import apply_suggestion, lr_find, save_plot

    recipe = load_recipe(args.recipe, disable=args.disable, overrides=parse_overrides(args.overrides))
    dest = None
    if args.apply is not None:
        dest = Path(args.apply) if args.apply else Path(f"{Path(args.recipe).stem}.lr-find.json")
        if dest.exists():  # before the sweep: refusing afterwards would waste it
            raise UserError(f"{dest} exists and is left as it is; give another destination to --apply")
    with _progress_to_stderr(args.json):
        result = lr_find(recipe, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, device=args.device)
    png: Path | None = args.output
    try:
        save_plot(result, args.output)
    except UserError as exc:
        if "matplotlib" not in str(exc):
            raise
        warnings.warn(f"{exc}; no plot was drawn", stacklevel=1)
        png = None
    applied = apply_suggestion(recipe, result.suggestion, dest, disable=tuple(args.disable)) if dest else None
    if args.json:
        def finite(values: Sequence[float]) -> list[float | None]:  # NaN and inf are not JSON: null
            return [v if abs(v) < float("inf") else None for v in values]

        _print_json({"suggestion": result.suggestion, "method": result.method, "lr_at_min": result.lr_at_min,
                     "steps": result.steps, "stopped": result.stopped, "lrs": list(result.lrs),
                     "losses": finite(result.losses), "smoothed": finite(result.smoothed),
                     "png": str(png) if png else None, "applied": str(applied) if applied else None})
        return 0
    console = _console()
    console.print(f"suggested learning rate: [bold]{result.suggestion:.3g}[/] ({_escape(result.method)})")
    console.print(f"  {result.steps} steps from {result.start_lr:g} to {result.lrs[-1]:.3g}: "
                  f"{_escape(result.stopped)}; the lowest loss was at {result.lr_at_min:.3g}")
    if png:
        console.print(f"plot: {_escape(str(png))}")
    if applied:
        console.print(f"wrote {_escape(str(applied))}; train it with: cnnreg run {_escape(str(applied))}")
    else:
        console.print(f"use it with: cnnreg run {_escape(str(args.recipe))} "
                      f"--set optimizer.lr={result.suggestion:.3g}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    root = args.dir
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the folder that holds run directories (default ./runs)")
    from cnnreg.runs.listing import find_runs

    rows = find_runs(root)
    if args.json:
        _print_json(rows)
        return 0
    console = _console()
    if not rows:
        console.print(f"no runs under {_escape(str(root))}")
        return 0
    table = PlainTable(title=f"runs under {root}", title_justify="left")
    for column, justify in (("name", "left"), ("date", "left"), ("epochs", "right"), ("best", "left"),
                            ("stopped", "left"), ("path", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("name", "date", "epochs", "best", "stopped", "path")))
    console.print(table)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnreg.engine.loop import evaluate
    from cnnreg.workflows.predict import load_run
    from cnnreg.core.tables import print_evaluation

    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device, disable=args.disable)
    result = evaluate(run, args.split)  # with the run's calibration temperature, when it has one
    if args.json:
        _print_json({"split": result.split, "metrics": dict(result.metrics), "classes": list(result.classes),
                     "per_class": {k: list(v) for k, v in result.per_class.items()},
                     "confusion": [list(row) for row in result.confusion],
                     **_calibration_json(args.run_dir, run.temperature)})
        return 0
    console = _console()
    _say_calibrated(console, args.run_dir, run.temperature)
    print_evaluation(console, result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cnnreg.workflows.report import write_report

    if args.top_losses < 0:
        raise UserError(f"--top-losses must be 0 or more, not {args.top_losses}")
    path = write_report(args.run_dir, device=args.device, top_losses=args.top_losses, disable=args.disable)
    if args.json:
        _print_json({"report": str(path)})
        return 0
    _console().print(f"report: {_escape(str(path))}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cnnreg.workflows.calibrate import calibrate_run

    with _progress_to_stderr(args.json):
        done = calibrate_run(args.run_dir, checkpoint=args.checkpoint, device=args.device, disable=args.disable)
    if args.json:
        _print_json(done.to_json())
        return 0
    console = _console()
    console.print(f"temperature [bold]{done.temperature:.4g}[/] fitted on the {done.split} split "
                  f"({done.samples} images, {done.checkpoint} checkpoint); wrote {_escape(str(done.path))}")
    table = PlainTable(title=f"calibration ({done.split}, {done.bins} bins)", title_justify="left")
    for column, justify in (("", "left"), ("before", "right"), ("after", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_row("ECE", f"{done.ece_before:.2%}", f"{done.ece_after:.2%}")
    table.add_row("classwise ECE", f"{done.classwise_ece_before:.2%}", f"{done.classwise_ece_after:.2%}")
    table.add_row("NLL", f"{done.nll_before:.4f}", f"{done.nll_after:.4f}")
    table.add_row("accuracy", f"{done.accuracy:.2%}", f"{done.accuracy:.2%}")
    console.print(table)
    console.print("evaluate, predict and export now apply it; delete the file to go back to the raw logits")
    return 0


def _calibration_json(run_dir: Path, temperature: float | None) -> dict[str, Any]:
    """What --json outputs say about calibration: the temperature applied and its file (null: none)."""
    from cnnreg.runs.calibration_file import calibration_path

    return {"temperature": temperature,
            "calibration": str(calibration_path(run_dir)) if temperature is not None else None}


def _say_calibrated(console: Console, run_dir: Path, temperature: float | None) -> None:
    """One line when a calibration temperature is applied, so a calibrated number is never mistaken for a raw one."""
    if temperature is not None:
        from cnnreg.runs.calibration_file import calibration_path

        console.print(f"calibrated: temperature {temperature:.4g} ({_escape(str(calibration_path(run_dir)))})")


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnreg.workflows.predict import predict
    from cnnreg.workflows.predict import load_predictor

    run = load_predictor(args.run_dir, checkpoint=args.checkpoint, device=args.device, disable=args.disable)
    predictions = predict(run, args.images, top_k=args.top_k)  # calibrated confidences, when the run has a T
    if args.json:
        calibrated = _calibration_json(args.run_dir, run.temperature)
        for p in predictions:
            sys.stdout.write(json.dumps({"image": p.source, "classes": list(p.classes),
                                         "confidences": [round(c, 6) for c in p.confidences], **calibrated}) + "\n")
        return 0
    table = PlainTable(title_justify="left")
    table.add_column("image", overflow="fold")
    for k in range(args.top_k):
        table.add_column("class" if args.top_k == 1 else f"#{k + 1}")
        table.add_column("confidence", justify="right")
    for p in predictions:
        cells = []
        for name, conf in zip(p.classes, p.confidences):
            cells += [name, f"{conf:.1%}"]
        table.add_row(p.source, *cells)
    console = _console()
    _say_calibrated(console, args.run_dir, run.temperature)
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnnreg.workflows.export import export
    from cnnreg.workflows.predict import load_predictor

    predictor = load_predictor(args.run_dir, checkpoint=args.checkpoint, device="cpu", disable=args.disable)
    done = export(predictor, args.format, args.output, args.run_dir, preprocessing=args.preprocessing)
    if args.json:
        print(json.dumps(done.to_json()))
        return 0
    sizes = ", ".join(f"{h}x{w}" for h, w in done.checked_sizes)
    also = "" if done.max_abs_diff_vs_predict is None else (
        f" and cnnreg predict's resize (max abs diff {done.max_abs_diff_vs_predict:.2e})")
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"exported {_escape(str(done.path))}; outputs match the model (max abs diff {done.max_abs_diff:.2e}"
        f"{', images ' + sizes if done.preprocessing else ''}){also}")
    if done.temperature is not None:
        _say_calibrated(console, args.run_dir, done.temperature)
        console.print("  the weights hold the raw logits: divide them by the temperature (in the file's metadata)"
                      if done.format == "safetensors" else "  the file's outputs are the logits divided by it")
    return 0


# -- helpers ------------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is parsed as JSON when it is JSON, else kept as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, e.g. trainer.epochs=3; got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _launch_distributed(args: argparse.Namespace) -> int:
    from torch.distributed import run as torchrun

    forwarded = [str(args.recipe)] if args.recipe else []
    if args.resume:
        forwarded += ["--resume", str(args.resume)]
    for item in args.overrides:
        forwarded += ["--set", item]
    for name in args.disable:
        forwarded += ["--disable", name]
    if args.device:
        forwarded += ["--device", args.device]
    if args.output_dir:
        forwarded += ["--output-dir", str(args.output_dir)]
    if args.traceback:
        forwarded += ["--traceback"]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "cnnreg", "run", *forwarded])
    except SignalException as exc:
        # Ctrl-C or SIGTERM reached the launcher: torchrun has passed it on to the
        # workers, which stopped at one step together and saved (rank 0 said where).
        Console(stderr=True, highlight=False).print(f"interrupted by {signal.Signals(exc.sigval).name}: the "
                                                    f"{args.nproc} processes stopped at the same step")
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        # each rank has printed its own error; torch's report of it adds a traceback, not information
        failures = exc.failures
        # the rank that failed first exits with a status; torchrun then stops the others with a signal
        codes = [f.exitcode for _, f in sorted(failures.items()) if f.exitcode > 0]
        code = codes[0] if codes else 1
        Console(stderr=True, highlight=False).print(f"[bold red]error[/]: {len(failures)} of {args.nproc} "
                                                    f"processes failed (exit status {code})")
        return code
    return 0


def _console(stderr: bool = False) -> Console:
    """Rich output for people: as wide as the terminal, and without colours under
    ``NO_COLOR`` (rich reads it). Piped into a file or a pager, tables keep their
    natural width instead of folding at 80 columns (``COLUMNS`` still sets one)."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 100_000
    return console


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _progress_to_stderr(enabled: bool):
    """With ``--json``, stdout carries only the JSON: the run's progress and tables go to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; choose a folder you can write to") from None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
