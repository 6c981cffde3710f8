"""The kinds of component and their registration hooks (no imports: the fast CLI reads these)."""

from __future__ import annotations

KINDS: dict[str, str] = {
    "model": "cnnreg_models",
    "dataset": "cnnreg_datasets",
    "transform": "cnnreg_transforms",
    "loss": "cnnreg_losses",
    "optimizer": "cnnreg_optimizers",
    "scheduler": "cnnreg_schedulers",
    "metric": "cnnreg_metrics",
    "callback": "cnnreg_callbacks",
}
PLURALS = {"model": "models", "dataset": "datasets", "transform": "transforms", "loss": "losses",
           "optimizer": "optimizers", "scheduler": "schedulers", "metric": "metrics", "callback": "callbacks"}
ARTICLES = {kind: ("an" if kind[0] in "aeiou" else "a") for kind in KINDS}
