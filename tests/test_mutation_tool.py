"""The mutation-testing set-up stays true to the code it tests: every configured
module exists, every equivalent mutant named still matches a line of its module,
and the staged copy gives the plugins their import name."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("mutation_tool", REPO / "tools" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def test_every_configured_module_is_a_file_of_the_repository():
    modules = tool.configured_modules()
    assert "plugins/losses.py" in modules and "cnnreg/engine/step.py" in modules
    missing = [m for m in modules if not (REPO / m).is_file()]
    assert not missing, f"[tool.cnnreg.mutation.tests] names modules that are gone: {missing}"


def test_every_module_is_judged_by_test_files_that_exist():
    for module, tests in tool.mutation_config().items():
        assert tests, module
        missing = [t for t in tests if not (REPO / t).is_file()]
        assert not missing, f"{module}: the tests named for it are gone: {missing}"


def test_staged_paths_use_the_import_name_of_the_plugins():
    assert tool.staged("plugins/losses.py") == "cnnreg_plugins/losses.py"
    assert tool.staged("cnnreg/engine/step.py") == "cnnreg/engine/step.py"
    assert tool.unstaged("cnnreg_plugins/losses.py") == "plugins/losses.py"
    # A folder whose name only starts like one of the trees is not one of them.
    assert tool.staged("plugins_extra/x.py") == "plugins_extra/x.py"


def test_mutmut_names_in_the_stage_match_the_imported_modules():
    # mutmut names a mutant by its path under source_paths; the trampolines compare
    # that with the function's __module__, so the two must agree for every module.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    for path in map(tool.staged, tool.configured_modules()):
        top = path.split("/")[0]
        assert top in config["source_paths"], path
        module = path.removesuffix(".py").replace("/", ".")
        spec = importlib.util.find_spec(module)
        assert spec is not None and Path(spec.origin).name == Path(path).name, module


def test_a_module_is_staged_alone_with_its_own_tests_and_the_rest_of_the_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "STAGE", tmp_path / "stage")
    where = tool.stage("plugins/losses.py")
    assert where == tmp_path / "stage" / "plugins.losses"
    staged = tomllib.loads((where / "pyproject.toml").read_text())
    assert staged["tool"]["mutmut"]["only_mutate"] == ["cnnreg_plugins/losses.py"]
    selection = staged["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
    assert selection[:-2] == tool.mutation_config()["plugins/losses.py"] and selection[-2:] == ["-m", "not compiles"]
    assert staged["tool"]["mutmut"]["process_isolation"] == "forkserver"
    assert staged["project"]["name"] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    assert (where / "cnnreg_plugins" / "losses.py").read_bytes() == (REPO / "plugins/losses.py").read_bytes()
    assert not (where / "plugins").exists()


def test_syncing_touches_only_what_changed_and_removes_what_is_gone(tmp_path):
    source, target = tmp_path / "src", tmp_path / "dst"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "a.py").write_text("a = 1\n")
    (source / "b.py").write_text("b = 1\n")
    tool.sync_tree(source, target)
    unchanged = (target / "b.py").stat().st_mtime_ns
    (source / "pkg" / "a.py").write_text("a = 2\n")
    (target / "stale.py").write_text("gone\n")
    tool.sync_tree(source, target)
    assert (target / "pkg" / "a.py").read_text() == "a = 2\n"
    assert (target / "b.py").stat().st_mtime_ns == unchanged  # mutmut would regenerate it otherwise
    assert not (target / "stale.py").exists()


def test_a_mutation_diff_gives_the_line_it_changes():
    diff = "\n".join([
        "--- cnnreg/engine/tallies.py", "+++ cnnreg/engine/tallies.py", "@@ -1,3 +1,3 @@",
        " def f(x):", "-    return x + 1", "+    return x - 1", " # end",
    ])
    assert tool.changed_lines(diff) == ("return x + 1", "return x - 1")


def test_a_module_scores_its_kills_over_the_mutants_that_ran():
    s = tool.ModuleScore("m.py", counts={"killed": 8, "timeout": 1, "survived": 1, "no tests": 1, "skipped": 3})
    assert (s.killed, s.considered) == (9, 11)
    running = tool.ModuleScore("m.py", counts={"killed": 1, "not checked": 5})
    assert running.score == 1.0 and not running.finished  # not run yet: not survivors, but not done
    assert tool.ModuleScore("m.py", counts={"not checked": 5}).shown_score == "not run"
    assert s.finished and s.shown_score == "81.8%"
    assert s.score == pytest.approx(9 / 11)


@pytest.mark.parametrize("entry", tool.load_equivalents(), ids=lambda e: f"{e.path}:{e.original[:30]}")
def test_every_listed_equivalent_mutant_still_matches_its_module(entry):
    assert entry.path in tool.configured_modules(), entry.path
    source = " ".join((REPO / entry.path).read_text().split())
    assert " ".join(entry.original.split()) in source, f"{entry.path} no longer has the line {entry.original!r}: drop or update the entry"
    assert entry.reason.strip(), "say why the mutant cannot change behaviour"


@pytest.mark.parametrize("original, mutant, expected", [
    ("rows = torch.arange(n, device=x.device)[None, :]", "rows = torch.arange(n, device=None)[None, :]", True),
    ("rows = torch.arange(n, device=x.device)[None, :]", "rows = torch.arange(n, )[None, :]", True),
    ("v = value.to(x.device)", "v = value.to(None)", True),
    ("return _constant(values, like.device, like.dtype)", "return _constant(values, None, like.dtype)", True),
    ("return _constant(values, like.device, like.dtype)", "return _constant(values, like.device, None)", False),
    ("h, w = ops.boxes(n, area, self.scale, device)", "h, w = ops.boxes(n, area, self.scale, None)", True),
    ('if device.type == "cuda":', 'if device.type != "cuda":', False),
    ("i = index.to(self.device, non_blocking=True)", "i = index.to(None, non_blocking=True)", True),
    ("i = index.to(self.device, non_blocking=True)", "i = index.to(non_blocking=True)", True),
    ("i = index.to(self.device, non_blocking=True)", "i = index.to(self.device, non_blocking=False)", False),
    ("g = torch.rand(b, device=images.device) < p", "g = torch.rand(b, device=images.device) <= p", False),
    ("v = value.to(x.dtype)", "v = value.to(None)", False),
    ("rows = torch.arange(n, device=x.device)", "rows = torch.arange(n + 1, device=None)", False),
])
def test_only_mutants_that_move_a_tensor_off_its_device_are_set_apart(original, mutant, expected):
    assert tool.moves_device_only(original, mutant) is expected


def test_shards_split_the_modules_so_each_is_run_exactly_once():
    modules = tool.configured_modules()
    shards = [tool.shard(modules, k, 3) for k in (1, 2, 3)]
    assert sorted(m for s in shards for m in s) == sorted(modules)
    sizes = [sum((REPO / m).stat().st_size for m in s) for s in shards]
    # Balanced: no shard carries more than the largest module over another's load.
    largest = max((REPO / m).stat().st_size for m in modules)
    assert max(sizes) - min(sizes) <= largest
    assert tool.shard(modules, 1, 1) == modules


def test_a_malformed_shard_is_refused_with_the_form_to_give(capsys):
    assert tool.main(["--report", "--shard", "4/3"]) == 2
    assert "give K/N with 1 <= K <= N" in capsys.readouterr().err
