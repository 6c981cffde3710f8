"""Experiment trackers beyond TensorBoard: Weights & Biases and MLflow (the ``trackers`` plugin).

Both are optional. Without their package installed the callbacks stay
registered, say so in ``cnnreg ls``, and a recipe that names one fails at
build with the install command, before any training.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnreg import hookimpl
from cnnreg.core.records import EpochRecord, FitResult

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.run import Run


def installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it (start-up stays fast)."""
    return importlib.util.find_spec(package) is not None


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``; lists become strings."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    value = data if isinstance(data, (int, float, str, bool)) or data is None else str(data)
    return {prefix.rstrip("."): value}


def _scalars(record: EpochRecord) -> dict[str, float]:
    return {k: float(v) for k, v in record.metrics.items()}


class WandbLogger:
    """Logs a run to Weights & Biases: the resolved recipe as config, every
    epoch's metrics, the final summary."""

    def __init__(self, project: str, entity: str | None, mode: str, tags: list[str]):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, tags
        self._run: Any = None

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        if not run.is_main:
            return
        wandb = importlib.import_module("wandb")
        self._run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, tags=self.tags,
                               name=run.run_dir.name if run.run_dir else run.recipe.name,
                               dir=str(run.run_dir) if run.run_dir else None,
                               config=flatten(run.recipe.to_json()), resume="allow" if start_epoch > 1 else None)

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if self._run is not None:
            self._run.log(_scalars(record), step=record.epoch)

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        if self._run is None:
            return
        if result.best is not None:
            self._run.summary.update({f"best/{k}": v for k, v in _scalars(result.best).items()})
        self._run.summary["stopped"] = result.stopped
        self._run.finish()
        self._run = None


def wandb_logger(project: str = "cnnreg", entity: str | None = None,
                 mode: str = "online", tags: list[str] | None = None) -> WandbLogger:
    """Log the run to Weights & Biases (needs: pip install wandb).

    Args:
        project: the W&B project.
        entity: the W&B team or user; default: yours.
        mode: "online", "offline" (sync later with `wandb sync`) or "disabled".
        tags: tags for the run.
    """
    if not installed("wandb"):
        raise ValueError("the wandb_logger callback needs the wandb package: pip install wandb")
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"mode must be online, offline or disabled, not {mode!r}")
    return WandbLogger(project, entity, mode, list(tags or []))


class MlflowLogger:
    """Logs a run to MLflow: the resolved recipe as parameters, every epoch's
    metrics, and the run directory's summary and plots as artifacts."""

    def __init__(self, tracking_uri: str | None, experiment: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self._mlflow: Any = None

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        if not run.is_main:
            return
        mlflow = importlib.import_module("mlflow")
        uri = self.tracking_uri or (Path(run.run_dir).joinpath("mlruns").as_uri() if run.run_dir else None)
        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.experiment)
        mlflow.start_run(run_name=run.run_dir.name if run.run_dir else run.recipe.name)
        params = flatten(run.recipe.to_json())
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        self._mlflow = mlflow

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics(_scalars(record), step=record.epoch)

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        if self._mlflow is None:
            return
        if run.run_dir is not None:
            for name in ("summary.json", "curves.png", "confusion.png"):
                if (run.run_dir / name).is_file():
                    self._mlflow.log_artifact(str(run.run_dir / name))
        self._mlflow.set_tag("stopped", result.stopped)
        self._mlflow.end_run()
        self._mlflow = None


def mlflow_logger(tracking_uri: str | None = None, experiment: str = "cnnreg") -> MlflowLogger:
    """Log the run to MLflow (needs: pip install mlflow).

    Args:
        tracking_uri: the MLflow tracking server or store; default: an mlruns folder in the run directory.
        experiment: the MLflow experiment name.
    """
    if not installed("mlflow"):
        raise ValueError("the mlflow_logger callback needs the mlflow package: pip install mlflow")
    return MlflowLogger(tracking_uri, experiment)


def _note_if_missing(factory: Any, package: str) -> None:
    """Make the factory's summary (its first docstring line, which `cnnreg ls`
    shows) say so when its package is not installed. Done once, at import."""
    if not installed(package):
        first, _, rest = (factory.__doc__ or "").partition("\n")
        factory.__doc__ = f"{first} Inert: {package} is not installed.\n{rest}"


_note_if_missing(wandb_logger, "wandb")
_note_if_missing(mlflow_logger, "mlflow")


@hookimpl
def cnnreg_callbacks():
    return {"wandb_logger": wandb_logger, "mlflow_logger": mlflow_logger}
