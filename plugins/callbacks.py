"""Recipe callbacks: best checkpoint, early stopping, metric logs, TensorBoard, learning-rate monitor.

Each factory returns an object whose ``@hookimpl`` methods handle the run
events it cares about; the engine registers it on the run's own plugin
manager. Callbacks with ``state_dict()``/``load_state_dict()`` (checkpoint,
early stopping, lr monitor) have their state saved in ``last.pt`` and
restored on ``--resume``. A callback's ``monitor`` is checked against the
metrics the run reports when the run is built, so a misspelt name fails
before training.

Every file is written inside the run directory, by rank 0 only; a run
without a directory (``build(output=False)``) writes nothing.

Failures to write are not fatal: a full disk while saving ``best.safetensors``
or appending a log line prints a warning on stderr and training goes on,
since the files already written are intact (atomic writes) and the
resumable ``last.pt`` is the engine's to protect.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Mapping, Sequence

import torch
from pydantic import Field

from cnnreg.core import checkpoint as ckpt
from cnnreg import hookimpl
from cnnreg.core.records import EpochRecord, EvalResult, FitResult, infer_mode
from cnnreg.core.tables import format_value
from cnnreg_plugins._figures import confusion_figure, last_evaluation

if TYPE_CHECKING:  # pragma: no cover
    from cnnreg.core.run import Run

Mode = Literal["min", "max"]
LAST_WEIGHTS = "last.safetensors"
TENSORBOARD_HINT = "pip install 'cnnreg-framework[tensorboard]'"


# -- shared helpers ----------------------------------------------------------------------------


def warn(message: str) -> None:
    """A warning on stderr (through the live progress display, when there is one)."""
    # sys.stderr is looked up at call time: rich's live display swaps it for a proxy.
    print(f"cnnreg: warning: {message}", file=sys.stderr, flush=True)


def resolve_mode(run: Run, monitor: str, mode: Mode | None) -> Mode:
    """An explicit mode; else the run's own when watching the run's monitor
    (so ``trainer.mode`` is honoured); else inferred from the name."""
    if mode is not None:
        return mode
    if monitor == run.monitor:
        return run.mode  # type: ignore[return-value]
    return infer_mode(monitor)


def improves(value: float, best: float | None, mode: Mode, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta``; NaN never does."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def writes_files(run: Run) -> bool:
    return run.run_dir is not None and run.is_main


def check_relative_name(value: str, what: str, allow_folders: bool) -> str:
    """A file or folder name that stays inside the run directory."""
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if not value or value.strip() != value:
        raise ValueError(f"{what} must be a non-empty name without surrounding spaces, not {value!r}")
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise ValueError(f"{what} must be relative to the run directory, not the absolute path {value!r}")
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"{what} must stay inside the run directory; {value!r} climbs out of it with '..'")
    if not allow_folders and ("/" in value or "\\" in value):
        raise ValueError(f"{what} must be a file name in the run directory, without folders: {value!r}")
    return value


def append_lines(path: Path, text: str) -> None:
    """Append whole lines with a single write(2) on an O_APPEND descriptor, then fsync.

    A SIGKILL cannot split one write() to a regular file, so a killed run
    leaves whole lines only; a power cut might leave half of the last one,
    which :func:`rewrite_kept_lines` drops on resume.
    """
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # only after a short write (a nearly full disk)
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_kept_lines(path: Path, keep: Callable[[str], bool], header: bool = False) -> list[str]:
    """Keep the complete lines of ``path`` that ``keep`` accepts (and its header
    line), rewriting the file atomically; returns the kept lines."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    lines = [line for line in lines if line.endswith("\n")]  # a half line from a cut write
    kept = lines[:1] if header and lines else []
    kept += [line for line in lines[len(kept):] if keep(line)]
    ckpt.atomic_write_text(path, "".join(kept))
    return kept


def _before(epoch: int | None, start_epoch: int) -> bool:
    return epoch is not None and epoch < start_epoch


def _jsonl_epoch(line: str) -> int | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    epoch = value.get("epoch") if isinstance(value, dict) else None
    return epoch if isinstance(epoch, int) else None


def _csv_epoch(line: str, width: int) -> int | None:
    rows = list(csv.reader([line]))
    if len(rows) != 1 or len(rows[0]) != width:
        return None
    try:
        return int(rows[0][0])
    except ValueError:
        return None


def csv_line(values: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def reported_metrics(run: Run) -> list[str]:
    """Every scalar the run's epoch records can carry, in the engine's order:
    each split's loss and metrics (train, then val when the run has one), lr,
    epoch_seconds. Epochs without evaluation (``eval_every``) lack the val ones."""
    splits = ["train", "val"] if "val" in run.batches else ["train"]
    names = []
    for split in splits:
        names.append(f"{split}_loss")
        names += [f"{split}_{n}" for _, metric in run.metrics for n in metric.names]
    return [*dict.fromkeys(names), "lr", "epoch_seconds"]


def current_lrs(run: Run) -> list[float]:
    return [float(group["lr"]) for group in run.optimizer.param_groups]


# -- checkpoint --------------------------------------------------------------------------------


class BestCheckpoint:
    """Writes the model's weights (safetensors) when the monitored metric improves.

    ``best``/``best_epoch`` describe the weights in the file on disk: after a
    failed write the next epoch that beats the file retries.
    """

    chooses_best = True  # its monitor is the run's, unless trainer.monitor says otherwise

    def __init__(self, monitor: str | None, mode: Mode | None, save_best: bool, save_last_weights: bool,
                 filename: str) -> None:
        self.monitor = monitor  # None: the run's monitor, resolved at fit start
        self.mode = mode
        self.save_best = save_best
        self.save_last_weights = save_last_weights
        self.filename = filename
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._watch: str | None = monitor
        self._mode: Mode = mode or "max"
        self._warned = False
        self._missed: tuple[int, float] | None = None  # a better epoch whose write failed

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        self._watch = self.monitor or run.monitor
        self._mode = resolve_mode(run, self._watch, self.mode)

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if not writes_files(run):
            return
        value = record.metrics.get(self._watch)
        if self.save_best and value is not None and improves(value, self.best, self._mode):
            metadata = {"epoch": str(record.epoch), "monitor": self._watch, "value": repr(float(value)),
                        "mode": self._mode, "recipe": run.recipe.name}
            if self._write(run, self.filename, metadata, record.epoch):
                self.best, self.best_epoch, self._missed = float(value), record.epoch, None
            elif self._missed is None or improves(value, self._missed[1], self._mode):
                self._missed = (record.epoch, float(value))
        if self.save_last_weights:
            self._write(run, LAST_WEIGHTS, {"epoch": str(record.epoch), "recipe": run.recipe.name}, record.epoch)

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        if self._missed is not None and writes_files(run):
            epoch, value = self._missed
            held = (f"it holds epoch {self.best_epoch} ({self._watch}={format_value(self._watch, self.best)})"
                    if self.best_epoch is not None else "no weights were saved")
            warn(f"the best epoch {epoch} ({self._watch}={format_value(self._watch, value)}) could not be "
                 f"written to {self.filename}: {held}")

    def _write(self, run: Run, name: str, metadata: dict[str, str], epoch: int) -> bool:
        try:
            ckpt.save_weights(run.model, run.run_dir / name, metadata=metadata)
        except ckpt.CheckpointError as exc:
            # The previous file is intact (atomic write) and last.pt is the
            # engine's: losing one improvement is better than losing the run.
            if not self._warned:
                warn(f"epoch {epoch}: {exc}. Training goes on; the next improvement tries again")
                self._warned = True
            return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self._watch, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("monitor")
        if self.monitor is not None and saved is not None and saved != self.monitor:
            return  # the recipe now watches another metric: start afresh
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


def checkpoint(
    monitor: str | None = None,
    mode: Mode | None = None,
    save_best: bool = True,
    save_last_weights: bool = False,
    filename: str = ckpt.WEIGHTS,
) -> BestCheckpoint:
    """Save the model weights (safetensors) of the best epoch, and optionally of the last.

    The first epoch that reports the metric counts as an improvement; epochs
    without it (validation every few epochs) do not count. The file holds
    the weights only, with the epoch and metric value as metadata; the
    engine's last.pt holds the resumable state. `cnnreg evaluate`, `predict`
    and `export` read best.safetensors: keep the default filename for them.

    Args:
        monitor: metric to watch, e.g. val_accuracy; default the run's monitor (trainer.monitor).
        mode: "min" or "max"; inferred from the name when left out (losses low, scores high).
        save_best: write the weights whenever the monitored metric improves.
        save_last_weights: also write last.safetensors after every epoch.
        filename: name of the best weights' file in the run directory.
    """
    check_relative_name(filename, "filename", allow_folders=False)
    if not filename.endswith(".safetensors"):
        raise ValueError(f"filename must end in .safetensors (the weights are written as safetensors), "
                         f"not {filename!r}")
    if save_last_weights and filename == LAST_WEIGHTS:
        raise ValueError(f"filename {LAST_WEIGHTS!r} is where save_last_weights writes; choose another name")
    if not save_best and not save_last_weights:
        raise ValueError("save_best and save_last_weights are both false, so nothing would be saved; "
                         "set one of them or remove the callback")
    return BestCheckpoint(monitor, mode, save_best, save_last_weights, filename)


# -- early stopping -----------------------------------------------------------------------------


class EarlyStopping:
    """Stops training after ``patience`` evaluations without an improvement."""

    def __init__(self, monitor: str, patience: int, min_delta: float, mode: Mode | None) -> None:
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self._mode: Mode = mode or infer_mode(monitor)
        self._unit = "epochs"
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        self._mode = resolve_mode(run, self.monitor, self.mode)
        if self.monitor.startswith("val_") and run.recipe.trainer.eval_every > 1:
            self._unit = "evaluations"

    @hookimpl
    def cnnreg_should_stop(self, run: Run, record: EpochRecord) -> str | None:
        value = record.metrics.get(self.monitor)
        if value is None:
            return None  # not evaluated this epoch: neither better nor worse
        if improves(value, self.best, self._mode, self.min_delta):
            self.best, self.best_epoch, self.wait = float(value), record.epoch, 0
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        best = "none" if self.best is None else f"{format_value(self.monitor, self.best)} at epoch {self.best_epoch}"
        return (f"early stopping: {self.monitor} did not improve by {self.min_delta:g} for {self.patience} "
                f"{self._unit} (best {best})")

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("monitor", self.monitor) != self.monitor:
            return
        self.best, self.best_epoch, self.wait = state.get("best"), state.get("best_epoch"), int(state.get("wait", 0))


def early_stopping(
    monitor: str = "val_loss",
    patience: Annotated[int, Field(ge=1)] = 10,
    min_delta: Annotated[float, Field(ge=0)] = 0.0,
    mode: Mode | None = None,
) -> EarlyStopping:
    """Stop training when a metric has not improved for `patience` epochs.

    Epochs that do not report the metric (validation every few epochs) are
    not counted. The reason is shown at the end and kept in summary.json.

    Args:
        monitor: metric to watch, e.g. val_loss or val_accuracy.
        patience: epochs without improvement before stopping, at least 1.
        min_delta: an improvement must be larger than this to count.
        mode: "min" or "max"; inferred from the name when left out (losses low, scores high).
    """
    if patience < 1:
        raise ValueError(f"patience must be at least 1, not {patience}")
    if not min_delta >= 0:
        raise ValueError(f"min_delta must be 0 or more, not {min_delta}")
    return EarlyStopping(monitor, patience, float(min_delta), mode)


# -- metrics logger -----------------------------------------------------------------------------


class MetricsLogger:
    """``metrics.jsonl`` and ``metrics.csv``: one line per epoch, appended as it ends."""

    EXTRA = ("train_seconds", "images_per_second")

    def __init__(self, jsonl: bool, csv: bool) -> None:
        self.jsonl = jsonl
        self.csv = csv
        self._dir: Path | None = None
        self._columns: list[str] | None = None
        self._expected: list[str] = []
        self._warned = False

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        self._dir = run.run_dir if writes_files(run) else None
        if self._dir is None:
            return
        self._expected = ["epoch", *reported_metrics(run), *self.EXTRA]
        self._columns = None
        # Resuming: the engine may have logged epochs after the one last.pt
        # holds (killed before its next save); those lines are dropped here
        # and written again as the epochs run again. A fresh run starts empty.
        jsonl, table = self._dir / "metrics.jsonl", self._dir / "metrics.csv"
        header = _read_header(table) if start_epoch > 1 else None
        if self.jsonl and start_epoch > 1:
            rewrite_kept_lines(jsonl, lambda line: _before(_jsonl_epoch(line), start_epoch))
        elif self.jsonl:
            jsonl.unlink(missing_ok=True)
        if self.csv and header is not None:
            width = len(header)
            rewrite_kept_lines(table, lambda line: _before(_csv_epoch(line, width), start_epoch), header=True)
            self._columns = header
        elif self.csv:
            table.unlink(missing_ok=True)

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if self._dir is None:
            return
        row = {"epoch": record.epoch, **record.metrics, "train_seconds": record.train_seconds,
               "images_per_second": record.images_per_second}
        try:
            if self.jsonl:
                clean = {k: (v if isinstance(v, (int, str)) or math.isfinite(v) else None) for k, v in row.items()}
                append_lines(self._dir / "metrics.jsonl", json.dumps(clean) + "\n")
            if self.csv:
                text = ""
                if self._columns is None:
                    # The run's full column set, so val columns exist even when
                    # the first epoch was not evaluated (eval_every), plus any
                    # extra key the first record carries.
                    self._columns = [*self._expected, *(k for k in row if k not in self._expected)]
                    text = csv_line(self._columns)
                text += csv_line(["" if row.get(c) is None else row[c] for c in self._columns])
                append_lines(self._dir / "metrics.csv", text)
        except OSError as exc:
            if not self._warned:
                warn(f"could not append epoch {record.epoch} to the metric logs in {self._dir}: "
                     f"{exc.strerror or exc}; training goes on")
                self._warned = True


def _read_header(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8", newline="") as handle:
        first = handle.readline()
    if not first.endswith("\n"):
        return None
    header = next(csv.reader([first]), None)
    return header if header and header[0] == "epoch" else None


def metrics_logger(jsonl: bool = True, csv: bool = True) -> MetricsLogger:
    """Log every epoch's metrics to metrics.jsonl and metrics.csv in the run directory.

    One line per epoch: the epoch, every metric, train_seconds and
    images_per_second. Lines are appended and synced as each epoch ends; on
    --resume the lines of epochs that will run again are removed first.

    Args:
        jsonl: write metrics.jsonl (one JSON object per line; NaN and inf as null).
        csv: write metrics.csv (a header, then one row per epoch; a val column is
            empty in epochs without validation).
    """
    if not jsonl and not csv:
        raise ValueError("jsonl and csv are both false, so nothing would be logged; set one or remove the callback")
    return MetricsLogger(jsonl, csv)


# -- tensorboard --------------------------------------------------------------------------------


class TensorBoardLogger:
    """Writes TensorBoard event files under the run directory."""

    def __init__(self, log_dir: str, images: bool) -> None:
        self.log_dir = log_dir
        self.images = images
        self._writer: Any = None
        self._lrs: list[float] = []

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        if not writes_files(run):
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote for epochs that run again are
        # hidden by TensorBoard, as metrics_logger drops their lines.
        self._writer = SummaryWriter(log_dir=str(run.run_dir / self.log_dir),
                                     purge_step=start_epoch if start_epoch > 1 else None)
        if self.images and start_epoch == 1:
            self._writer.add_image("train/augmented_batch", augmented_grid(run), global_step=0)
            self._writer.flush()

    @hookimpl
    def cnnreg_epoch_start(self, run: Run, epoch: int) -> None:
        self._lrs = current_lrs(run)  # the rates this epoch trains with (schedulers step at its end)

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        writer = self._writer
        if writer is None:
            return
        for name, value in record.metrics.items():
            if name != "lr":
                writer.add_scalar(scalar_tag(name), value, record.epoch)
        writer.add_scalar("time/images_per_second", record.images_per_second, record.epoch)
        for i, lr in enumerate(self._lrs):
            writer.add_scalar(f"lr/group{i}", lr, record.epoch)
        writer.flush()  # a crash (no fit end) keeps everything up to here

    @hookimpl
    def cnnreg_fit_end(self, run: Run, result: FitResult) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            evaluation = last_evaluation(result.records)
            if evaluation is not None:
                image = confusion_image(*evaluation)
                if image is not None:
                    writer.add_image(f"confusion/{evaluation[1].split}", image, evaluation[0], dataformats="HWC")
            metrics = final_metrics(result)
            if metrics:
                # run_name ".": the hparams session is this run, not a sibling folder.
                writer.add_hparams(flat_hparams(run.recipe.to_json()), metrics, run_name=".")
        except Exception as exc:  # noqa: BLE001 - a figure is not worth losing the run's summary
            warn(f"tensorboard: could not write the final summaries: {type(exc).__name__}: {exc}")
        finally:
            writer.close()


def scalar_tag(name: str) -> str:
    """``val_accuracy`` -> ``accuracy/val``: each metric's splits side by side."""
    split, sep, metric = name.partition("_")
    if sep and split in ("train", "val", "test"):
        return f"{metric}/{split}"
    if name.endswith("seconds"):
        return f"time/{name}"
    return name


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A recipe's values as ``{"optimizer.lr": 0.001, ...}`` (lists as text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, list) and all(isinstance(v, Mapping) and "name" in v for v in value):
            for i, item in enumerate(value):
                out.update(flat_hparams(item, f"{name}.{i}."))
        else:
            out[name] = json.dumps(value)
    return out


def final_metrics(result: FitResult) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if result.best is not None:
        metrics[f"hparam/best_{result.monitor}"] = float(result.best.metrics[result.monitor])
    if result.last is not None:
        metrics.update({f"hparam/final_{k}": float(v) for k, v in result.last.metrics.items()
                        if k not in ("lr", "epoch_seconds") and math.isfinite(v)})
    return metrics


def augmented_grid(run: Run, count: int = 32) -> torch.Tensor:
    """A grid ``[3, H, W]`` in [0, 1] of the first training batch's images after
    the train transforms, with normalisation undone so the colours are true.

    Normalisation is recognised by its ``mean``/``std`` attributes (the
    built-in normalize); undoing it after later transforms is exact for the
    usual pipelines, since they move or erase pixels but do not rescale them.
    """
    from torchvision.utils import make_grid

    from cnnreg.inputs.prepare import prepare_batch

    # The preview must not move the random streams training uses.
    devices = [run.device.index or 0] if run.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=run.device.type if devices else "cuda"), torch.no_grad():
        images, _ = next(iter(run.batches["train"]))
        x = prepare_batch(images[:count], run.train_transforms, channels_last=False)
        for transform in reversed(run.train_transforms):
            mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
            if _numbers(mean) and _numbers(std):
                shape = (1, -1, 1, 1)
                x = x * torch.tensor(std, device=x.device).view(shape) + torch.tensor(mean, device=x.device).view(shape)
        x = x.clamp(0, 1).contiguous().cpu()
    return make_grid(x, nrow=8, padding=1)


def _numbers(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, (int, float)) for v in value)


def confusion_image(epoch: int, result: EvalResult) -> Any:
    """The confusion-matrix figure as an RGB array ``[H, W, 3]``; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    import numpy as np

    figure = confusion_figure(result, epoch)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def tensorboard(log_dir: str | None = None, images: bool = True) -> TensorBoardLogger:
    """Log metrics, learning rates, augmented images and the confusion matrix for TensorBoard.

    Every epoch: each scalar metric (loss/train, accuracy/val, ...), the
    learning rate of every parameter group and the epoch time. At the start a
    grid of augmented training images (normalisation undone); at the end the
    validation confusion matrix (needs matplotlib) and the recipe's
    hyperparameters with the final metrics. View with:
    tensorboard --logdir runs/

    Args:
        log_dir: folder for the event files, inside the run directory; default "tensorboard".
        images: log a grid of augmented training images at the start.
    """
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ValueError(f"the tensorboard callback needs the tensorboard package: {TENSORBOARD_HINT}") from None
    folder = check_relative_name(log_dir, "log_dir", allow_folders=True) if log_dir is not None else "tensorboard"
    return TensorBoardLogger(folder, images)


# -- learning-rate monitor ----------------------------------------------------------------------


class LrMonitor:
    """Reports learning-rate changes and writes ``lr.csv``."""

    def __init__(self, log_to_console: bool) -> None:
        self.log_to_console = log_to_console
        self.previous: list[float] | None = None  # the rates the last started epoch trained with
        self._epoch_lrs: list[float] = []
        self._path: Path | None = None
        self._columns = 0
        self._warned = False

    @hookimpl
    def cnnreg_fit_start(self, run: Run, start_epoch: int) -> None:
        self._path = run.run_dir / "lr.csv" if writes_files(run) else None
        self._columns = len(run.optimizer.param_groups)
        if self._path is not None:
            width = self._columns + 1
            if start_epoch > 1 and _read_header(self._path) is not None:
                rewrite_kept_lines(self._path, lambda line: _before(_csv_epoch(line, width), start_epoch), header=True)
            else:
                self._path.unlink(missing_ok=True)

    @hookimpl
    def cnnreg_epoch_start(self, run: Run, epoch: int) -> None:
        lrs = current_lrs(run)
        if self.log_to_console and self.previous is not None and run.is_main:
            for group, (before, after) in enumerate(zip(self.previous, lrs)):
                if before != after:
                    print(f"epoch {epoch}: lr {before:.4g} -> {after:.4g} (group {group})", file=sys.stderr, flush=True)
        self.previous = self._epoch_lrs = lrs

    @hookimpl
    def cnnreg_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if self._path is None:
            return
        text = "" if self._path.exists() else csv_line(["epoch", *(f"lr_group{i}" for i in range(self._columns))])
        try:
            append_lines(self._path, text + csv_line([record.epoch, *self._epoch_lrs]))
        except OSError as exc:
            if not self._warned:
                warn(f"could not append to {self._path}: {exc.strerror or exc}; training goes on")
                self._warned = True

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        previous = state.get("previous")
        self.previous = [float(v) for v in previous] if previous is not None else None


def lr_monitor(log_to_console: bool = True) -> LrMonitor:
    """Report each change of the learning rate and log every epoch's rates to lr.csv.

    A change between two epochs prints "epoch N: lr 0.001 -> 0.0005 (group 0)"
    on stderr. lr.csv has one row per epoch: the rate each parameter group
    started the epoch with (per-step schedules move it within the epoch).

    Args:
        log_to_console: print changes on stderr; lr.csv is written either way.
    """
    return LrMonitor(log_to_console)


@hookimpl
def cnnreg_callbacks() -> dict[str, Callable[..., object]]:
    return {
        "checkpoint": checkpoint,
        "early_stopping": early_stopping,
        "metrics_logger": metrics_logger,
        "tensorboard": tensorboard,
        "lr_monitor": lr_monitor,
    }
