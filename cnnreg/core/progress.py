"""Progress of the slow work before the first epoch: listing, probing, decoding, caching.

A data plugin wraps each long step in :func:`step` and reports what it did
with :func:`note` (where a cache was written and how big it is). Both write
to stderr, so the training display on stdout keeps its shape:

* on a terminal, a rich bar per step with the count, the rate and the time
  left, gone when the step ends;
* in a log (stderr not a terminal), a line when a step has taken more than
  a second, and one every :data:`PLAIN_EVERY` seconds while it runs;
* nothing with ``trainer.progress`` "off".

The engine sets the display for the steps it starts (:func:`reporting`);
outside a run (a dataset factory called from Python) it is "auto".
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Callable, Iterator

PLAIN_EVERY = 30.0  # seconds between the plain lines of a step that runs long
PLAIN_AFTER = 1.0  # a step shorter than this leaves no plain line

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("cnnreg_preparation", default="auto")

Advance = Callable[[int], None]


@contextlib.contextmanager
def reporting(mode: str) -> Iterator[None]:
    """Show the steps started inside the block as ``mode`` says: "auto", "rich", "plain" or "off"."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _mode() -> str:
    mode = _MODE.get()
    if mode == "auto":
        return "rich" if sys.stderr.isatty() else "plain"
    return mode


@contextlib.contextmanager
def step(description: str, total: int | None = None, unit: str = "files") -> Iterator[Advance]:
    """A step of ``total`` items (``None`` when unknown); call the yielded function with each batch done.

    An empty ``unit`` is a step without a count: only its time is shown;
    "bytes" shows sizes and transfer rates (a download).
    """
    mode = _mode()
    if mode == "off":
        yield lambda n=1: None
    elif mode == "rich":
        with _rich_step(description, total, unit) as advance:
            yield advance
    else:
        with _plain_step(description, total, unit) as advance:
            yield advance


def note(message: str) -> None:
    """One line about the preparation (a cache's place and size), unless progress is off."""
    if _mode() != "off":
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def size_text(size: int) -> str:
    """``1234567`` -> ``"1.2 MB"``."""
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _plain_step(description: str, total: int | None, unit: str) -> Iterator[Advance]:
    start = last = time.perf_counter()
    done = 0

    def line(now: float, finished: bool) -> str:
        elapsed = now - start
        when = f"{'done in' if finished else 'running for'} {elapsed:.1f}s"
        if not unit:  # a step without a count: how long it took
            return f"{description}: {when}"
        if unit == "bytes":
            count = size_text(done) + (f" of {size_text(total)}" if total is not None and not finished else "")
            rate = f", {size_text(round(done / elapsed))}/s" if elapsed > 0 else ""
            return f"{description}: {count}, {when}{rate}"
        count = f"{done:,}" + (f"/{total:,}" if total is not None and not finished else "")
        rate = f", {done / elapsed:,.0f} {unit}/s" if elapsed > 0 else ""
        return f"{description}: {count} {unit}, {when}{rate}"

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= PLAIN_EVERY:
            last = now
            note(line(now, finished=False))

    yield advance
    now = time.perf_counter()
    if now - start >= PLAIN_AFTER:
        note(line(now, finished=True))


@contextlib.contextmanager
def _rich_step(description: str, total: int | None, unit: str) -> Iterator[Advance]:
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                               Task, TextColumn, TimeRemainingColumn, TransferSpeedColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else "", style="progress.data.speed")

    columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}")]
    if unit == "bytes":
        columns += [BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    elif total is not None:
        columns += [BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn()]
    elif unit:
        columns += [TextColumn("{task.completed:,.0f} " + unit), Rate()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
