"""Rich tables of results, shared by the progress display and the CLI."""

from __future__ import annotations

from typing import Mapping

from rich.console import Console
from rich.table import Table

from cnnreg.core.records import EvalResult

PER_CLASS_ORDER = ("precision", "recall", "f1", "support")


def metrics_table(metrics: Mapping[str, float], title: str = "") -> Table:
    """Scalar metrics, one row each."""
    table = Table(title=title or None, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, format_value(name, value))
    return table


def per_class_table(result: EvalResult, max_rows: int = 100) -> Table:
    """Precision, recall, F1 and support for each class of one split."""
    columns = [c for c in PER_CLASS_ORDER if c in result.per_class]
    columns += [c for c in result.per_class if c not in columns]
    table = Table(title=f"per-class results ({result.split})", title_justify="left")
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
