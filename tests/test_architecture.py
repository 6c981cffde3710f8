"""The core's layers, read from the source: imports go down only, and nothing imports in a circle.

core <- plugin <- config, inputs, runs <- assemble, engine <- workflows <- cli (and the package's API).
Type-only imports (under ``TYPE_CHECKING``) and imports inside functions count like any other.
The built-in plugins use what a third-party plugin may: ``cnnreg`` itself,
``cnnreg.core`` and ``cnnreg.inputs``, and the shared ``cnnreg_plugins._*`` helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
PACKAGE = REPO / "cnnreg"
PLUGINS = REPO / "plugins"

LAYERS = {"core": 0, "plugin": 1, "config": 2, "inputs": 2, "runs": 2, "assemble": 3, "engine": 3, "workflows": 4}
TOP = 5  # cli.py, the package's __init__ (the API) and the 0.1 import paths kept for plugins
PLUGIN_MAY_IMPORT = ("cnnreg", "cnnreg.core", "cnnreg.inputs")


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import in a file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def internal_targets(module: str, names: list[str], known: set[str]) -> list[str]:
    """The cnnreg modules an import statement loads (``from cnnreg.core import checkpoint`` loads cnnreg.core.checkpoint)."""
    if not (module == "cnnreg" or module.startswith("cnnreg.")):
        return []
    targets = [module] if module in known else []
    targets += [f"{module}.{name}" for name in names if f"{module}.{name}" in known]
    return targets or ([module] if module != "cnnreg" else [])


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


MODULES = {module_name(p, PACKAGE, "cnnreg"): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: sorted({t for _, module, names in imports(path) for t in internal_targets(module, names, set(MODULES))
                       if t != name and t in MODULES})
         for name, path in MODULES.items()}


def test_every_import_in_the_core_goes_down_a_layer_or_stays_in_its_package():
    wrong = []
    for name, path in MODULES.items():
        here = name.split(".")[1] if layer(name) < TOP else "<top>"
        for line, module, names in imports(path):
            for target in internal_targets(module, names, set(MODULES)):
                there = target.split(".")[1] if layer(target) < TOP else "<top>"
                if target == "cnnreg" or there == here:
                    continue
                if layer(target) >= layer(name):
                    wrong.append(f"{path.relative_to(REPO)}:{line} {name} (layer {layer(name)}) imports {target} "
                                 f"(layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_in_a_circle():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for target in GRAPH[node]:
            if seen.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in seen:
                visit(target, path + [target])
        seen[node] = 2

    for node in GRAPH:
        if node not in seen:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_the_layer_test_sees_the_imports_it_judges():
    """Positive controls: a downward import, a type-only one and one inside a function are all found."""
    assert "cnnreg.core.run" in GRAPH["cnnreg.plugin.hookspecs"]  # under TYPE_CHECKING
    assert "cnnreg.engine.loop" in GRAPH["cnnreg.cli"]  # inside a command function
    assert "cnnreg.core.checkpoint" in GRAPH["cnnreg.engine.loop"]  # `from cnnreg.core import checkpoint`
    assert len(MODULES) > 30


@pytest.mark.parametrize("path", sorted(PLUGINS.glob("*.py")), ids=lambda p: p.name)
def test_built_in_plugins_use_only_what_a_third_party_plugin_may(path):
    wrong = []
    for line, module, names in imports(path):
        if module == "cnnreg_plugins" and all(n.startswith("_") for n in names):
            continue  # shared private helpers
        if module.startswith("cnnreg_plugins."):
            if module.split(".")[1].startswith("_"):
                continue
            wrong.append(f"{path.name}:{line} imports another plugin's module {module}")
        elif module == "cnnreg" or module.startswith("cnnreg."):
            if not any(module == allowed or module.startswith(allowed + ".") for allowed in PLUGIN_MAY_IMPORT[1:]) \
                    and module != "cnnreg":
                wrong.append(f"{path.name}:{line} imports {module}: use cnnreg, cnnreg.core or cnnreg.inputs")
    assert not wrong, "\n".join(wrong)


def test_a_plugin_written_against_the_0_1_import_paths_still_loads(tmp_path, monkeypatch):
    """Plugins in the wild import cnnreg.data, .errors, .records, .hookspecs and .registry."""
    from conftest import make_distribution

    import cnnreg

    source = '''
        import torch
        from cnnreg.data import DataSource, ImageSplit
        from cnnreg.errors import UserError
        from cnnreg.hookspecs import hookimpl
        from cnnreg.records import Metric
        from cnnreg.registry import Family

        def old_style(count: int = 8) -> DataSource:
            """A dataset as a 0.1 plugin wrote one."""
            if count < 2:
                raise UserError("count must be at least 2")
            images = torch.zeros(count, 3, 8, 8, dtype=torch.uint8)
            return DataSource(train=ImageSplit(labels=torch.arange(count) % 2, images=images),
                              classes=("a", "b"), image_size=(8, 8), channels=3)

        @hookimpl
        def cnnreg_datasets():
            return {"old_style": old_style}
    '''
    root = make_distribution(tmp_path / "site", "old-style-plugin", {"old_style_plugin": source},
                             {"old_style": "old_style_plugin"})
    monkeypatch.syspath_prepend(str(root))
    recipe = {"name": "old", "data": {"name": "old_style", "val_fraction": 0.25, "batch_size": 2},
              "model": {"name": "simple_cnn", "widths": [4, 4, 4]},
              "trainer": {"epochs": 1, "progress": "off"}, "output_dir": str(tmp_path / "runs")}
    assert "2 classes" in cnnreg.validate(recipe).summary
    assert cnnreg.fit(cnnreg.build(cnnreg.load_recipe(recipe))).stopped == "completed"
