"""The ``cnnreg`` command.

Errors a user can fix are printed without a traceback and exit with status 2;
an interrupted run exits 130 (SIGINT) or 143 (SIGTERM) after saving a
resumable checkpoint.
"""

from __future__ import annotations

import argparse
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
  cnnreg run recipes/quickstart.json             train (offline, synthetic data)
  cnnreg run recipes/mnist-cnn.json --set trainer.epochs=2 --set data.root=../shared/data
  cnnreg run --resume runs/quickstart-20261122-101500
  cnnreg validate recipes/*.json                 check recipes and dry-run them on the CPU
  cnnreg ls models                               list registered models
  cnnreg ls models 'timm:res*'                   list timm architectures
  cnnreg schema > recipe.schema.json             JSON Schema for editors
  cnnreg evaluate runs/quickstart-... --split test
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
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with warnings.catch_warnings():
        # Each command shows each warning once (a fresh filter also forgets what an earlier
        # command in this process showed), as one line without Python's source quote.
        warnings.filterwarnings("default", category=UserWarning)
        warnings.showwarning = _warning_printer(err)
        return _run_command(args, err)


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

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("run", cmd_run, "train a recipe (or resume a run)")
    p.add_argument("recipe", nargs="?", type=Path, help="recipe JSON file")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe value, e.g. trainer.epochs=3 (VALUE is JSON, or a plain string)")
    p.add_argument("--device", help="override trainer.device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--output-dir", type=Path, help="where run directories go (default ./runs)")
    p.add_argument("--nproc", type=int, metavar="N", help="run N processes with torch.distributed.run")

    p = command("sweep", cmd_sweep, "train every point of a recipe's sweep section and rank them")
    p.add_argument("recipe", type=Path, help="recipe JSON file with a sweep section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe value for every trial")
    p.add_argument("--device", help="override trainer.device")
    p.add_argument("--output-dir", type=Path, help="where the sweep folder goes (default ./runs)")

    p = command("runs", cmd_runs, "list run directories: progress, best metric, why they stopped")
    p.add_argument("dir", nargs="?", type=Path, default=Path("runs"), help="folder holding runs (default ./runs)")

    p = command("validate", cmd_validate, "check recipes as `run` assembles them, on the CPU, without training")
    p.add_argument("recipes", nargs="+", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    p.add_argument("--strict", action="store_true",
                   help="what is absent here (data, weights) is an error, not a 'not checked' note")

    p = command("ls", cmd_ls, "list registered components")
    p.add_argument("kind", nargs="?", help="models, datasets, transforms, losses, optimizers, schedulers, metrics, callbacks")
    p.add_argument("pattern", nargs="?", default="*", help="glob on names, e.g. 'tutorial_*' or 'timm:resnet*'")

    p = command("schema", cmd_schema, "print the recipe JSON Schema (draft 2020-12)")
    p.add_argument("-o", "--output", type=Path, help="write to a file instead of stdout")

    p = command("evaluate", cmd_evaluate, "evaluate a finished run's checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device")

    p = command("predict", cmd_predict, "classify images with a run's model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")

    p = command("export", cmd_export, "export a run's model and check it gives the same outputs")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    p.add_argument("-o", "--output", type=Path, help="output file (default: in the run directory)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    return parser


# -- commands -----------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    from cnnreg.plugin.manager import plugin_manager
    from cnnreg.plugin.catalog import KINDS, PLURALS, build_catalog

    kind = None
    if args.kind:
        kind = KIND_ALIASES.get(args.kind, args.kind)
        if kind not in KINDS:
            raise UserError(f"unknown kind {args.kind!r}; use one of: {', '.join(PLURALS.values())}")
    catalog = build_catalog(plugin_manager(disable=args.disable))
    try:
        rows = catalog.search(kind, args.pattern)
    except ImportError as exc:
        raise UserError(f"cannot list {args.pattern!r}: {exc}") from None
    console = Console(highlight=False, soft_wrap=True)
    table = PlainTable(title=f"cnnreg {PLURALS[kind] if kind else 'components'}", title_justify="left")
    for column in ("name", "kind", "plugin", "distribution", "summary"):
        table.add_column(column, overflow="fold")
    for key, component in rows:
        table.add_row(*(_escape(cell) for cell in (key, component.kind, component.plugin, str(component.origin),
                                                    component.summary)))
    console.print(table)
    if catalog.broken:
        broken = PlainTable(title="plugins that failed to load", title_justify="left", style="red")
        for column in ("plugin", "distribution", "stage", "error"):
            broken.add_column(column, overflow="fold")
        for b in catalog.broken:
            broken.add_row(*(_escape(cell) for cell in (b.name, str(b.origin), b.stage, b.error)))
        console.print(broken)
    if not rows:
        console.print(f"nothing matches {args.pattern!r}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from cnnreg.plugin.manager import plugin_manager
    from cnnreg.config.recipe import json_schema
    from cnnreg.plugin.catalog import build_catalog

    text = json.dumps(json_schema(build_catalog(plugin_manager(disable=args.disable))), indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from cnnreg.config.recipe import load_recipe
    from cnnreg.workflows.validation import validate_recipe

    problems: list[Any] = []
    console = Console(highlight=False, soft_wrap=True)
    for path in args.recipes:
        try:
            recipe = load_recipe(path, disable=args.disable, overrides=parse_overrides(args.overrides))
            result = validate_recipe(recipe, strict=args.strict)
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        console.print(f"[green]ok[/] {_escape(str(path))}: {_escape(result.summary)}")
        for choice in result.choices:
            console.print(f"  chosen {_escape(str(choice))}")
        for unchecked in result.unchecked:
            console.print(f"  [yellow]not checked[/]: {_escape(str(unchecked))}; --strict makes this an error")
        for text in result.warnings:
            warnings.warn(text, stacklevel=1)  # as the run warns: one "warning:" line on stderr
    if problems:
        raise RecipeError(problems)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.nproc:
        return _launch_distributed(args)
    from cnnreg.core import distributed

    try:
        return _run(args)
    finally:
        distributed.teardown()  # under torchrun: leave the process group so every rank exits cleanly


def _run(args: argparse.Namespace) -> int:
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
        fit(run, resume=True)
        return 0
    if args.recipe is None:
        raise UserError("give a recipe file, or --resume RUN_DIR")
    recipe = load_recipe(args.recipe, disable=args.disable, overrides=overrides)
    if recipe.sweep is not None:
        # Training only the base values would look like a finished sweep; say what to run instead.
        raise UserError(f"{args.recipe} has a sweep section: run it with `cnnreg sweep {args.recipe}`, "
                        "or remove the section (or --set sweep=null) to train it once")
    if recipe.cross_validation is not None:
        from cnnreg.workflows.crossval import cross_validate

        cross_validate(recipe, device=args.device)
        return 0
    run = build(recipe, device=args.device)
    fit(run)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cnnreg.core import distributed
    from cnnreg.workflows.sweep import run_sweep

    overrides = parse_overrides(args.overrides)
    if args.output_dir is not None:
        overrides["output_dir"] = str(args.output_dir.resolve())
    try:
        run_sweep(args.recipe, disable=args.disable, overrides=overrides, device=args.device)
    finally:
        distributed.teardown()
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    root = args.dir
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the folder that holds run directories (default ./runs)")
    from cnnreg.runs.listing import find_runs

    rows = find_runs(root)
    console = Console(highlight=False, soft_wrap=True)
    if not rows:
        console.print(f"no runs under {_escape(str(root))}")
        return 0
    table = PlainTable(title=f"runs under {root}", title_justify="left")
    for column, justify in (("name", "left"), ("date", "left"), ("epochs", "right"), ("best", "left"),
                            ("stopped", "left"), ("path", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        table.add_row(*(_escape(str(r[k])) for k in ("name", "date", "epochs", "best", "stopped", "path")))
    console.print(table)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnreg.engine.loop import evaluate
    from cnnreg.workflows.predict import load_run
    from cnnreg.core.tables import print_evaluation

    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device, disable=args.disable)
    result = evaluate(run, args.split)
    print_evaluation(Console(highlight=False, soft_wrap=True), result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnreg.workflows.predict import predict
    from cnnreg.workflows.predict import load_predictor

    run = load_predictor(args.run_dir, checkpoint=args.checkpoint, device=args.device, disable=args.disable)
    predictions = predict(run, args.images, top_k=args.top_k)
    console = Console(highlight=False, soft_wrap=True)
    if args.json:
        for p in predictions:
            sys.stdout.write(json.dumps({"image": p.source, "classes": list(p.classes),
                                         "confidences": [round(c, 6) for c in p.confidences]}) + "\n")
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
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnnreg.workflows.export import export
    from cnnreg.workflows.predict import load_predictor

    predictor = load_predictor(args.run_dir, checkpoint=args.checkpoint, device="cpu", disable=args.disable)
    path, error = export(predictor, args.format, args.output, args.run_dir)
    Console(highlight=False, soft_wrap=True).print(f"exported {_escape(str(path))}; outputs match the model (max abs diff {error:.2e})")
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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
