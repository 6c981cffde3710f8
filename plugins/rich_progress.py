"""The progress display, as a plugin: ``cnnreg run --disable rich_progress`` silences it.

``trainer.progress`` picks the display: ``"rich"`` live bars, ``"plain"``
lines, ``"auto"`` (rich when stdout is a terminal, plain otherwise) or
``"off"``. Both write to stdout; warnings go to stderr.

Rich: a header (device, precision, model size, data, run directory), a bar
per epoch with the latest loss, images/s and the time left, a summary row
per epoch printed above the bar (``*`` marks a new best), and at the end the
best epoch, why training stopped, the per-class table of the last validation
and the run directory.

Plain, for logs and CI: no escape codes, and exactly
``1 + E + 2`` lines for a fit that runs ``E`` epochs in this process,
whatever ends it (completed, early stopping, interrupted, NaN):

* 1 header line: ``run NAME: device=... precision=... model=... params=... ...``
* 1 line per epoch: ``epoch 3/10 train_loss=0.5123 train_accuracy=0.8123 ...
  lr=0.001 time=1.2s 41230 img/s``
* 2 footer lines: ``best epoch ...`` and ``stopped: REASON; ... run directory: ...``
"""

from __future__ import annotations

import atexit
import math
import sys
from typing import TYPE_CHECKING, Literal, TextIO

import torch
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from cnnreg import hookimpl
from cnnreg.core.records import EpochRecord, FitResult, ProgressRecord
from cnnreg.core.tables import per_class_table

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.run import Run

PLAIN_FOOTER_LINES = 2
SHOWN_APART = ("lr", "epoch_seconds")  # printed in their own format, after the metrics


# -- what both displays say ---------------------------------------------------------------------


def run_facts(run: Run, start_epoch: int) -> dict[str, str]:
    """The header: what runs where, on what data, written to which folder."""
    params = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    sizes = {name: len(split) for name in ("train", "val", "test") if (split := run.data.split(name)) is not None}
    height, width = run.data.image_size
    facts = {"device": str(run.device)}
    if run.device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(run.device)
    facts.update({
        "precision": run.precision,
        "model": run.recipe.model.name,  # type: ignore[attr-defined]
        "params": f"{params:,}",
        **({"trainable": f"{trainable:,}"} if trainable != params else {}),
        "data": run.recipe.data.name,  # type: ignore[attr-defined]
        "classes": str(run.data.num_classes),
        "images": f"{height}x{width}x{run.context.channels}",
        **{name: str(size) for name, size in sizes.items()},
        "epochs": str(run.epochs),
    })
    if run.dist.world_size > 1:
        facts["ranks"] = str(run.dist.world_size)
    if start_epoch > 1:
        facts["resume_at_epoch"] = str(start_epoch)
    for choice in run.choices:  # what the recipe left out: what was chosen, why, how to choose otherwise
        facts[f"chosen {choice.key}"] = str(choice).split(" = ", 1)[1]
    facts["run_dir"] = str(run.run_dir) if run.run_dir is not None else "none"
    return facts


def metric_text(name: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if name == "lr":
        return f"{value:.4g}"
    if name.endswith("seconds"):
        return f"{value:.1f}s"
    return f"{value:.4f}"


def best_line(result: FitResult, sep: str = "=") -> str:
    best = result.best
    if best is None:
        return f"best epoch: none ({result.monitor} was never measured)"
    value = metric_text(result.monitor, best.metrics[result.monitor])
    return f"best epoch {best.epoch}/{best.epochs}: {result.monitor}{sep}{value}"


def epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- plain --------------------------------------------------------------------------------------


class PlainProgress:
    """One line per epoch on stdout, between a header line and two footer lines."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out  # None: sys.stdout at the time of writing (so redirections apply)

    def _write(self, line: str) -> None:
        out = self.out or sys.stdout
        out.write(one_line(line) + "\n")
        out.flush()

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        facts = " ".join(f'{k.replace(" ", "_")}="{v}"' if " " in v else f"{k}={v}"
                         for k, v in run_facts(run, start_epoch).items())
        self._write(f"run {run.recipe.name}: {facts}")

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        metrics = " ".join(f"{k}={metric_text(k, v)}" for k, v in record.metrics.items() if k not in SHOWN_APART)
        lr = record.metrics.get("lr")
        tail = f" lr={metric_text('lr', lr)}" if lr is not None else ""
        self._write(f"epoch {record.epoch}/{record.epochs} {metrics}{tail} time={record.seconds:.1f}s "
                    f"{record.images_per_second:.0f} img/s")

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        self._write(best_line(result))
        where = str(result.run_dir) if result.run_dir is not None else "none"
        self._write(f"stopped: {result.stopped}; {epochs(len(result.records))}, {result.train_seconds:.1f}s; "
                    f"run directory: {where}")


# -- rich ---------------------------------------------------------------------------------------


class RichProgress:
    """Live bars on a terminal, with a summary row per epoch and tables at the end."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.columns: list[str] = []
        self.labels: list[str] = []
        self.widths: list[int] = []
        self.rows = 0
        self.best: float | None = None

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        facts = run_facts(run, start_epoch)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        split_sizes = " · ".join(f"{s} {facts[s]}" for s in ("train", "val", "test") if s in facts)
        device = facts["device"] + (f" ({facts['gpu']})" if "gpu" in facts else "")
        grid.add_row("device", f"{escape(device)} · {facts['precision']}"
                     + (f" · {facts['ranks']} ranks" if "ranks" in facts else ""))
        trainable = f" ({facts['trainable']} trainable)" if "trainable" in facts else ""
        grid.add_row("model", f"{escape(facts['model'])} · {facts['params']} parameters{trainable}")
        grid.add_row("data", f"{escape(facts['data'])} · {facts['classes']} classes · {facts['images']} · "
                     f"{split_sizes}")
        for key, value in facts.items():
            if key.startswith("chosen "):
                grid.add_row(key, escape(value))
        grid.add_row("epochs", facts["epochs"] + (f" (resuming at epoch {start_epoch})" if start_epoch > 1 else ""))
        grid.add_row("run dir", escape(facts["run_dir"]))
        self.console.print(Group(Text(f"cnnreg run {run.recipe.name}", style="bold"), grid))

        has_accuracy = any("accuracy" in metric.names for _, metric in run.metrics)
        splits = ["train", "val"] if "val" in run.batches else ["train"]
        self.columns = [f"{s}_{m}" for s in splits for m in ("loss", "accuracy") if m == "loss" or has_accuracy]
        if run.monitor not in self.columns and run.monitor not in SHOWN_APART:
            self.columns.append(run.monitor)
        self.columns += ["lr", "epoch_seconds"]
        self.labels = ["time" if c == "epoch_seconds" else c for c in self.columns]
        self.widths = [max(len(label), 8) for label in self.labels]
        self.rows, self.best = 0, None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[eta]}"),
            console=self.console, auto_refresh=False, transient=True)
        # Refreshed by the hook calls (a few a second), so no refresh thread.
        self.task = self.progress.add_task(f"epoch {start_epoch}/{run.epochs}", total=len(run.batches["train"]),
                                           loss="", speed="", eta="")
        self.progress.start()
        atexit.register(self._stop)  # a crash that skips fit end must still give the cursor back

    @hookimpl
    def cnnreg_epoch_start(self, run: Run, epoch: int) -> None:
        if self.progress is None:
            return
        self.progress.reset(self.task, total=len(run.batches["train"]), description=f"epoch {epoch}/{run.epochs}",
                            loss="loss —", speed="", eta="")
        self.progress.refresh()

    @hookimpl
    def cnnreg_train_progress(self, run: Run, progress: ProgressRecord) -> None:
        if self.progress is None:
            return
        loss = "loss —" if progress.loss is None else f"loss {progress.loss:.4f}"
        speed = f"{progress.images / progress.seconds:,.0f} img/s" if progress.seconds > 0 else ""
        left = progress.seconds / max(progress.step, 1) * (progress.steps - progress.step)
        self.progress.update(self.task, completed=progress.step, total=progress.steps, loss=loss, speed=speed,
                             eta=f"ETA {_clock(left)}")
        self.progress.refresh()

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if self.progress is None:
            return
        loss = record.metrics.get("train_loss")
        self.progress.update(self.task, completed=len(run.batches["train"]),
                             loss="" if loss is None else f"loss {loss:.4f}",
                             speed=f"{record.images_per_second:,.0f} img/s", eta=f"{record.seconds:.1f}s")
        self.progress.refresh()
        if self.rows == 0:
            self.console.print(Text(self._row(["epoch", *self.labels]), style="bold"))
        value = record.metrics.get(run.monitor)
        improved = value is not None and math.isfinite(value) and (
            self.best is None or (value < self.best if run.mode == "min" else value > self.best))
        if improved:
            self.best = value
        cells = [f"{record.epoch}/{record.epochs}"]
        cells += [metric_text(c, record.metrics[c]) if c in record.metrics else "—" for c in self.columns]
        self.console.print(Text(self._row(cells) + (" *" if improved else "")))
        self.rows += 1

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        self._stop()
        style = "green" if result.stopped == "completed" else "yellow" if result.stopped.startswith("early") else "red"
        self.console.print(escape(best_line(result, sep=" ")), highlight=False)
        self.console.print(f"stopped: [{style}]{escape(result.stopped)}[/] · {epochs(len(result.records))} in "
                           f"{result.train_seconds:.1f}s", highlight=False)
        last = next((r.evals["val"] for r in reversed(result.records) if "val" in r.evals), None)
        if last is not None and len(last.per_class) > 1:
            self.console.print(per_class_table(last))
        if result.run_dir is not None:
            self.console.print(f"run directory: {escape(str(result.run_dir))}", highlight=False)

    def _row(self, cells: list[str]) -> str:
        widths = [7, *self.widths]
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))

    def _stop(self) -> None:
        progress, self.progress = self.progress, None
        atexit.unregister(self._stop)
        if progress is not None:
            progress.stop()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0) + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# -- the plugin ---------------------------------------------------------------------------------


def display_mode(setting: Literal["auto", "rich", "plain", "off"], console: Console) -> str:
    """``auto``: rich on a terminal, plain when stdout goes to a file or a pipe."""
    if setting == "auto":
        return "rich" if console.is_terminal else "plain"
    return setting


@hookimpl
def cnnreg_run_plugins(run: Run) -> list[object]:
    setting = run.recipe.trainer.progress
    if setting == "off" or not run.is_main:
        return []
    # "rich" is a request: bars and colours even where stdout is not a terminal (a CI log that renders them).
    console = Console(force_terminal=True) if setting == "rich" else Console()
    if display_mode(setting, console) == "rich":
        return [RichProgress(console)]
    return [PlainProgress()]
