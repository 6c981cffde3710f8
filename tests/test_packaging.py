"""cnnreg as a user installs it from the index: a wheel built from the sdist, in a fresh
virtual environment, run from an empty folder with no checkout in sight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tracked_package_files() -> set[str]:
    """The files the wheel must hold, named as installed (plugins/ is cnnreg_plugins/,
    recipes/ is cnnreg/recipes/), from git's list of the checkout."""
    listed = subprocess.run(["git", "ls-files", "cnnreg", "plugins", "recipes"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "cnnreg", "plugins", "recipes"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    installed = set()
    for name in listed + untracked:
        if not (REPO / name).is_file():
            continue  # deleted in the working tree
        if name.startswith("plugins/"):
            name = "cnnreg_plugins/" + name.removeprefix("plugins/")
        elif name.startswith("recipes/"):
            name = "cnnreg/recipes/" + name.removeprefix("recipes/")
        installed.add(name)
    return installed


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``: the sdist, then the wheel built from the unpacked sdist (so a
    file missing from the sdist breaks the wheel too). Offline: the build uses this
    environment's setuptools instead of downloading one."""
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("source") / "cnnreg"
    # build writes build/ and *.egg-info beside the sources: build a clean copy
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed (not editable). The
    dependencies (torch and the rest, gigabytes) are this environment's, seen through a
    .pth file, which does not run the .pth files (the editable cnnreg) of the folder it adds."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = Path(subprocess.run([str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    [wheel] = dist.glob("*.whl")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install",
                           "--quiet", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def _in_venv(venv: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FORCE_COLOR")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", COLUMNS="200", PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_the_wheel_holds_every_module_recipe_and_the_schema_and_the_sdist_the_license(dist):
    [wheel] = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _tracked_package_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "cnnreg/recipes/quickstart.json" in names and "cnnreg/recipes/recipe.schema.json" in names
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    for field in ("License-Expression: Apache-2.0", "Author: The cnnreg authors", "Keywords: ",
                  "Classifier: Programming Language :: Python :: 3", "Project-URL: Source, "):
        assert field in metadata, field
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    [sdist] = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml", "recipes/quickstart.json", "plugins/transforms.py"} <= members
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()


@pytest.mark.slow
def test_the_installed_wheel_runs_the_shipped_quickstart_from_an_empty_folder(venv, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    where = _in_venv(venv, "python", "-c", "import cnnreg, cnnreg_plugins; print(cnnreg.__file__); "
                     "print(cnnreg_plugins.__file__)", cwd=folder)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(venv), f"imported from {line}, not from the installed wheel"
    version = _in_venv(venv, "cnnreg", "--version", cwd=folder)
    assert version.stdout.strip() == "cnnreg 0.1.0"
    listed = _in_venv(venv, "cnnreg", "recipes", "--json", cwd=folder)
    assert listed.returncode == 0, listed.stderr
    names = {r["name"] for r in json.loads(listed.stdout)}
    assert {"quickstart", "cifar10-simple-cnn", "mnist-cnn", "imagefolder-transfer"} <= names
    installed = _files(venv)
    run = _in_venv(venv, "cnnreg", "run", "quickstart", "--json", cwd=folder)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    outcome = json.loads(run.stdout)
    assert outcome["stopped"] == "completed"
    assert outcome["best"]["val_accuracy"] > 0.8  # the README promises about 0.89; chance is 0.1
    run_dir = Path(outcome["run_dir"])
    assert run_dir.parent == folder / "runs" and (run_dir / "best.safetensors").is_file()
    assert _files(venv) == installed, "the run wrote into the installed package"
    # a copy to edit validates where it was written, with the schema beside it
    copied = _in_venv(venv, "cnnreg", "cp", "quickstart", cwd=folder)
    assert copied.returncode == 0, copied.stderr
    recipe = json.loads((folder / "quickstart.json").read_text())
    assert recipe["$schema"] == "recipe.schema.json"
    schema = json.loads((folder / "recipe.schema.json").read_text())
    assert "ModelSimpleCnn" in schema["$defs"]
    checked = _in_venv(venv, "cnnreg", "validate", "quickstart.json", cwd=folder)
    assert checked.returncode == 0 and checked.stdout.startswith("ok quickstart.json"), checked.stdout + checked.stderr
