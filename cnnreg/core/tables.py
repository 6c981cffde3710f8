"""Rich tables of results, shared by the progress display and the CLI.

Every table is a :class:`PlainTable`: its title and cells are shown as
written, never read as rich markup, so a class called ``[red]dog`` or a
path with brackets in it shows as itself instead of vanishing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text


class PlainTable(Table):
    """A rich ``Table`` whose string title and cells are plain text, not markup."""

    def __init__(self, *columns: Any, title: str | Text | None = None, **options: Any):
        super().__init__(*columns, title=Text(title) if isinstance(title, str) else title, **options)

    def add_row(self, *cells: Any, **options: Any) -> None:
        super().add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in cells), **options)

if TYPE_CHECKING:  # pragma: no cover - annotations only: the CLI imports this without torch
    from cnnreg.core.records import EvalResult

PER_CLASS_ORDER = ("precision", "recall", "f1", "support")


def metrics_table(metrics: Mapping[str, float], title: str = "") -> Table:
    """Scalar metrics, one row each."""
    table = PlainTable(title=title or None, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, format_value(name, value))
    return table


def per_class_table(result: EvalResult, max_rows: int = 100) -> Table:
    """Precision, recall, F1 and support for each class of one split."""
    columns = [c for c in PER_CLASS_ORDER if c in result.per_class]
    columns += [c for c in result.per_class if c not in columns]
    table = PlainTable(title=f"per-class results ({result.split})", title_justify="left")
    table.add_column("class")
    for column in columns:
        table.add_column(column, justify="right")
    for i, name in enumerate(result.classes[:max_rows]):
        cells = [format_value(c, result.per_class[c][i]) if i < len(result.per_class[c]) else "" for c in columns]
        table.add_row(name, *cells)
    if len(result.classes) > max_rows:
        table.add_row(f"... {len(result.classes) - max_rows} more", *[""] * len(columns))
    return table


def format_value(name: str, value: float) -> str:
    if name == "support" or name.endswith("count"):
        return f"{int(value)}"
    if "loss" in name or name == "lr":
        return f"{value:.4g}"
    if "seconds" in name:
        return f"{value:.1f}s"
    return f"{value:.4f}"


def print_evaluation(console: Console, result: EvalResult) -> None:
    console.print(metrics_table(result.metrics, title=f"{result.split} split"))
    if len(result.per_class) > 1:
        console.print(per_class_table(result))
