"""The recipe's options that do not depend on installed plugins: plain pydantic models.

The engine reads these (``run.recipe.trainer``, ``run.recipe.data``); the
component slots (``model``, ``optimizer``, ...) are added to
:class:`RecipeBase` by :mod:`cnnreg.config.recipe` from the catalog of
installed plugins. A new trainer option is one field of
:class:`TrainerOptions` (its description is its documentation: the README's
reference and the JSON Schema are generated from it) and the code that reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths in a recipe mean: relative to the recipe's folder."""
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if value.is_absolute() or base is None:
        return value
    # Lexically normalised, so messages say /work/data, not /work/recipes/../data (the
    # base is already resolved; a shipped recipe's base need not even exist).
    return Path(os.path.normpath(Path(base) / value))


def _not_empty(value: Any) -> Any:
    # Path("") is ".", the recipe's own folder: an empty string is a slip, never that.
    if isinstance(value, str) and not value.strip():
        raise ValueError('an empty path; give a file or folder (".", written out, is the recipe\'s own folder)')
    return value


RecipePath = Annotated[Path, BeforeValidator(_not_empty), AfterValidator(_resolve_path)]


class Strict(BaseModel):
    """Unknown keys are errors; validated values do not change afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), populate_by_name=True)


class TrainerOptions(Strict):
    """How the engine trains: length, device, precision and speed options, safety."""

    epochs: int = Field(10, ge=1, le=1_000_000, description="Number of passes over the training split.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto picks cuda, then mps, then cpu.")
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-true"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a gradient scaler; "
        "bf16-true: weights and activations in bf16, normalisation layers in fp32 (no autocast casts).")
    channels_last: bool | None = Field(None, description="Channels-last memory format; default on for CUDA.")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "off", description="torch.compile mode for the model; reduce-overhead uses CUDA graphs.")
    cudnn_benchmark: bool = Field(True, description="Let cuDNN pick the fastest convolution algorithms.")
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip the gradients' total norm to this.")
    grad_clip_value: float | None = Field(None, gt=0, description="Clip each gradient element to +-this.")
    accumulate: int = Field(1, ge=1, le=1024, description="Batches whose gradients add up to one optimizer step.")
    deterministic: bool = Field(False, description="Deterministic algorithms: bit-identical reruns and resumes, slower.")
    eval_every: int = Field(1, ge=1, description="Evaluate the validation split every N epochs (and at the last).")
    monitor: str | None = Field(None, description="Metric that picks the best epoch, e.g. val_accuracy; "
                                "default: the checkpoint callback's, else val_accuracy (train_accuracy without val).")
    mode: Literal["min", "max"] | None = Field(None, description="Whether the monitor is better low or high; inferred.")
    checkpoint_every: int = Field(1, ge=0, description="Save the resumable training state (last.pt) every N epochs; "
                                  "0 only at the end and on interruption.")
    on_nan: Literal["stop", "skip"] = Field("stop", description="A bad loss (NaN, infinite, or diverged) stops the "
                                           "run, or skips that step.")
    divergence: float = Field(1000.0, ge=0, description="A step whose loss exceeds this many times the run's first "
                              "loss (taken as at least 1) has diverged, and is handled as on_nan says; 0 turns the "
                              "check off.")
    progress: Literal["auto", "rich", "plain", "off"] = Field(
        "auto", description="auto: rich bars on a terminal, one plain line per epoch otherwise.")
    sync_batchnorm: bool = Field(False, description="With several processes (torchrun), compute BatchNorm statistics "
                                 "over the global batch (torch SyncBatchNorm; CUDA only).")


class DataOptions(Strict):
    """Options every dataset takes: batching, splitting, channels."""

    batch_size: int = Field(128, ge=1, le=1_000_000, description="Training batch size.")
    eval_batch_size: int | None = Field(None, ge=1, le=1_000_000, description="Evaluation batch size; default 2x batch_size.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Validation fraction carved (stratified) from train "
                                "when the source has no validation split; 0 for none.")
    subset: Annotated[float, Field(gt=0, le=1)] | Annotated[int, Field(ge=1)] | None = Field(
        None, description="Train on a stratified subset: a fraction in (0, 1] or a count.")
    channels: Literal[1, 3] | None = Field(None, description="Convert images to 1 or 3 channels (e.g. MNIST into an RGB backbone).")
    num_workers: int | None = Field(None, ge=0, le=256, description="DataLoader workers for image files; default: cores.")
    shuffle: bool = Field(True, description="Reshuffle the training split every epoch.")
    drop_last: bool = Field(False, description="Drop the last incomplete training batch.")
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle", description='How each epoch draws the training split: "shuffle" visits every image once; '
        '"balanced" draws as many with replacement, each class equally often (1 / class count, as '
        "WeightedRandomSampler), for imbalanced data.")

    @pydantic.model_validator(mode="after")
    def _sampler_draws(self) -> "DataOptions":
        if self.sampler == "balanced" and not self.shuffle:
            raise ValueError('sampler "balanced" draws a random order every epoch, so shuffle false cannot hold; '
                             'remove shuffle: false, or use sampler "shuffle"')
        return self


class CrossValidation(Strict):
    """k-fold cross-validation: train once per fold, report each metric's mean and std."""

    folds: int = Field(5, ge=2, le=100, description="Number of folds: each trains on the others and validates on itself.")
    stratified: bool = Field(True, description="Give every fold each class in proportion.")
    seed: int | None = Field(None, ge=0, description="Seed of the fold assignment; default: the recipe's seed.")


class SweepRange(Strict):
    """A continuous range a random sweep draws from."""

    low: float = Field(description="Lowest value.")
    high: float = Field(description="Highest value.")
    log: bool = Field(False, description="Draw uniformly in log space (learning rates, weight decay).")

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> "SweepRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be less than high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, not {self.low:g}")
        return self


class Sweep(Strict):
    """A hyperparameter sweep: cnnreg sweep trains one run per combination (grid) or draw (random)."""

    method: Literal["grid", "random"] = Field("grid", description="grid: every combination; random: budget draws.")
    parameters: dict[str, Annotated[list[Any], Field(min_length=1)] | SweepRange] = Field(
        min_length=1, description='Dotted recipe keys and their values, e.g. {"optimizer.lr": [0.01, 0.001]}; '
        'random sweeps also take ranges {"low": 1e-4, "high": 0.1, "log": true}.')
    budget: int | None = Field(None, ge=1, le=10_000, description="Number of random draws (random sweeps).")
    seed: int = Field(0, ge=0, description="Seed of the random draws.")

    @pydantic.model_validator(mode="after")
    def _fits_method(self) -> "Sweep":
        if self.method == "random" and self.budget is None:
            raise ValueError("a random sweep needs a budget (the number of runs)")
        if self.method == "grid":
            ranges = [k for k, v in self.parameters.items() if isinstance(v, SweepRange)]
            if ranges:
                raise ValueError(f"a grid sweep takes lists of values; {', '.join(ranges)} is a range "
                                 "(use method \"random\", or list the values)")
            if self.budget is not None:
                raise ValueError("budget is for random sweeps; a grid runs every combination")
        return self


class RecipeBase(Strict):
    """The parts of a recipe that do not depend on installed plugins."""

    schema_: str | None = Field(None, alias="$schema", description="JSON Schema for editors (cnnreg schema).")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="Run name; run directories are named after it.")
    description: str = Field("", description="What the recipe reproduces and what it should reach.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of every random draw: initialisation, shuffling, augmentation, splits.")
    trainer: TrainerOptions = Field(default_factory=TrainerOptions, description="How the engine trains (below).")
    cross_validation: CrossValidation | None = Field(None, description="k-fold cross-validation (below).")
    output_dir: RecipePath | None = Field(None, description="Where run directories go; default ./runs.")
    disable_plugins: list[str] = Field(default_factory=list, description="Plugins to block for this recipe.")
    sweep: Sweep | None = Field(None, description="Hyperparameter sweep, run with `cnnreg sweep`.")

    def to_json(self) -> dict[str, Any]:
        """The recipe with every default filled in, as JSON data."""
        return self.model_dump(mode="json", by_alias=True, exclude={"schema_"})
