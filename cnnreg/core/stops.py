"""Why training ends early: the exceptions ``fit`` raises to its caller.

``Interrupted`` is a signal (SIGINT, SIGTERM) after a resumable checkpoint
was saved; ``TrainingStopped`` is a fault of the run itself (the loss
diverged, the device ran out of memory), never of its input.
"""

from __future__ import annotations

import signal
from pathlib import Path

from cnnreg.core.errors import UserError


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, signum: int, run_dir: Path | None):
        self.signum, self.run_dir = signum, run_dir
        name = signal.Signals(signum).name
        where = f"; resume with: cnnreg run --resume {run_dir}" if run_dir else ""
        super().__init__(f"interrupted by {name}; a resumable checkpoint was saved{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TrainingStopped(UserError):
    """Training could not go on (a fault of the run, not of its input); the last
    good checkpoint is kept."""


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite."""


class OutOfMemory(TrainingStopped):
    """The device ran out of memory."""


class StateNotSaved(TrainingStopped):
    """The resumable state (last.pt) could not be written: training stops
    rather than go on without a way back."""


class PluginFailed(TrainingStopped):
    """A plugin raised, or returned what its hook does not take, during a run.

    :param plugin: the plugin's name; ``origin``: the distribution it came from.
    :param hook: the hook it failed in.
    """

    def __init__(self, plugin: str, origin: str, hook: str, message: str):
        self.plugin, self.origin, self.hook = plugin, origin, hook
        super().__init__(f"plugin {plugin!r} ({origin}) failed in {hook}: {message}")
