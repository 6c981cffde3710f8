"""The ``report`` callback: write the run report (``RUN_DIR/report.html``) when training ends.

``{"name": "report"}`` in a recipe's callbacks does at fit end what
``cnnreg report RUN_DIR`` does afterwards (the same page: the best weights
on the test split), without rebuilding the run: the model and data are
still in memory. Rank 0 writes it, and only for a run with a directory.

A report that cannot be drawn is a warning, not a failed run: the training
is done and saved by then, and ``cnnreg report`` can try again.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

from pydantic import Field

import cnnreg
from cnnreg import hookimpl
from cnnreg.core.records import FitResult

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.run import Run

PLOTS_HINT = "pip install 'cnnreg-framework[plots]'"


class ReportWriter:
    def __init__(self, top_losses: int):
        self.top_losses = top_losses
        self.path: Path | None = None  # the report written, once it is

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        if run.run_dir is None or not run.is_main or result.stopped == "interrupted":
            return
        if run.dist.world_size > 1:
            # Each process evaluates its own shard: rank 0 alone would report a fraction of the split.
            print(f"cnnreg: warning: report: not written under torchrun (each process holds a shard of the "
                  f"test split); write it afterwards with: cnnreg report {run.run_dir}", file=sys.stderr, flush=True)
            return
        try:
            self.path = cnnreg.write_run_report(run, result.records, top_losses=self.top_losses)
        except Exception as exc:  # noqa: BLE001 - the run is trained and saved; the page is not worth failing it
            print(f"cnnreg: warning: report: could not write report.html: {type(exc).__name__}: {exc}; "
                  f"try again with: cnnreg report {run.run_dir}", file=sys.stderr, flush=True)


def report(top_losses: Annotated[int, Field(ge=0, le=256)] = 16) -> ReportWriter:
    """Write report.html into the run directory at the end of training (as `cnnreg report` does).

    Args:
        top_losses: how many of the highest-loss test images the gallery shows.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"the report callback draws its figures with matplotlib: {PLOTS_HINT}")
    return ReportWriter(top_losses)


@hookimpl
def cnnreg_callbacks() -> dict[str, Callable[..., object]]:
    return {"report": report}
