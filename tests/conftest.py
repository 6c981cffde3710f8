"""Shared fixtures: tiny recipes, real plugin distributions, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch

HERE = Path(__file__).parent
REPO = HERE.parent

# The image-folder cache goes to $XDG_CACHE_HOME/cnnreg: keep the tests' out of the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cnnreg-test-cache-")

if os.environ.get("PYTEST_XDIST_WORKER") or (os.cpu_count() or 1) <= 2:
    # Two workers (or a busy machine) on two cores: one thread each, or they
    # fight over the cores (measured: single-thread fits ran 3.5x faster under load).
    torch.set_num_threads(1)


def factory_schema(factory):
    """The recipe schema the registry builds from a factory's signature."""
    hints = typing.get_type_hints(factory, include_extras=True)
    fields = {name: (hints[name], param.default) for name, param in inspect.signature(factory).parameters.items()}
    return pydantic.create_model(factory.__name__, __config__=pydantic.ConfigDict(extra="forbid"), **fields)


def tiny_recipe(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """A recipe that trains in about a second on a CPU: synthetic 12x12 images, 3 classes."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "synthetic", "num_classes": 3, "image_size": 12, "train_size": 192, "val_size": 48,
                 "test_size": 48, "batch_size": 32},
        "transforms": {"train": [{"name": "random_horizontal_flip"}, {"name": "normalize"}],
                       "eval": [{"name": "normalize"}]},
        "model": {"name": "simple_cnn", "widths": [8, 8, 8]},
        "optimizer": {"name": "adam", "lr": 0.01},
        "trainer": {"epochs": 2, "progress": "off"},
        "output_dir": str(tmp_path / "runs"),
    }
    for dotted, value in changes.items():
        node = recipe
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return recipe


@pytest.fixture
def recipe_file(tmp_path: Path):
    """Write a recipe dict as a JSON file; returns its path."""

    def write(recipe: dict[str, Any], name: str = "recipe.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(recipe, indent=2))
        return path

    return write


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python -m cnnreg ARGS`` in a fresh process, output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    full_env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "cnnreg", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def make_distribution(root: Path, name: str, modules: dict[str, str], entry_points: dict[str, str],
                      version: str = "0.1") -> Path:
    """A real installed distribution under ``root``: module files and a
    ``.dist-info`` folder with METADATA and entry_points.txt, as pip writes them.
    Put ``root`` on sys.path (or PYTHONPATH) and importlib.metadata finds it."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{ep} = {target}" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[cnnreg]\n{lines}\n")
    return root


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/example_plugin installed with pip into a folder of its own."""
    target = tmp_path_factory.mktemp("example-plugin-site")
    # pip builds in the source folder: build a copy, so the tests write nothing into the repository
    source = tmp_path_factory.mktemp("example-plugin-source") / "example_plugin"
    shutil.copytree(HERE / "example_plugin", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True)
    return target
