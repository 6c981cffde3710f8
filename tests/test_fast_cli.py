"""A CLI that answers without importing torch where it can, from a manifest cached per
environment that follows what is installed; terminal text for people, JSON for scripts."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

from conftest import make_distribution

REPO = Path(__file__).resolve().parent.parent
PLUGIN = '''
    def {name}(num_classes: int, depth: int = 2):
        """A ``{name}`` network built on :class:`~torch.nn.Module` (**fast**)."""
        raise NotImplementedError
    def cnnreg_models():
        return {{"{name}": {name}}}
'''


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "COLUMNS": "200", **(env or {})}
    full.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "cnnreg", *args], env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


MODULES_AFTER = """
import json, sys
from cnnreg.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
open(sys.argv[1], "w").write(json.dumps(sorted(sys.modules)))
sys.exit(code)
"""


def modules_after(tmp_path: Path, *args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the command in a fresh process; what it printed, and every module it had imported."""
    record = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    full = {**os.environ, "COLUMNS": "200", **env}
    done = subprocess.run([sys.executable, "-c", MODULES_AFTER, str(record), *args], env=full, capture_output=True,
                          text=True, timeout=300)
    return done, set(json.loads(record.read_text()))


HEAVY = ("torch", "torchvision", "timm", "pydantic", "cnnreg_plugins")


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY}


@pytest.fixture
def cache(tmp_path) -> dict[str, str]:
    return {"CNNREG_CACHE_DIR": str(tmp_path / "cache")}


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"], ["recipes"]])
def test_version_help_and_recipes_import_no_torch(args, cache, tmp_path):
    done, modules = modules_after(tmp_path, *args, env=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cnnreg.cli" in modules and not heavy(modules)


def test_ls_and_schema_answer_from_the_cache_without_importing_plugins(cache, tmp_path):
    cold, first = modules_after(tmp_path, "ls", "--json", env=cache)
    assert cold.returncode == 0, cold.stderr[-2000:]
    # the positive control: the first call imports the plugins (and torch) to build the manifest
    assert {"torch", "cnnreg_plugins.transforms", "pydantic"} <= heavy(first)
    warm, second = modules_after(tmp_path, "ls", "--json", env=cache)
    assert not heavy(second)
    live = run("ls", "--json", env={**cache, "CNNREG_NO_CACHE": "1"})
    assert json.loads(warm.stdout) == json.loads(cold.stdout) == json.loads(live.stdout)
    schema, third = modules_after(tmp_path, "schema", env=cache)
    assert not heavy(third)
    live_schema = run("schema", env={**cache, "CNNREG_NO_CACHE": "1"})
    assert json.loads(schema.stdout) == json.loads(live_schema.stdout)
    assert json.loads(live_schema.stdout) == json.loads((REPO / "recipes" / "recipe.schema.json").read_text())


def test_the_cache_follows_installs_changes_and_removals_of_plugins(tmp_path, cache):
    site = tmp_path / "site"
    env = {**cache, "PYTHONPATH": str(site)}

    def models() -> set[str]:
        done = run("ls", "models", "--json", env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return {c["name"] for c in json.loads(done.stdout)["components"]}

    before = models()
    assert "alpha_net" not in before
    make_distribution(site, "cnnreg-alpha", {"alpha_models": PLUGIN.format(name="alpha_net")}, {"alpha": "alpha_models"})
    assert models() == before | {"alpha_net"}  # installed
    edited = PLUGIN.format(name="alpha_net").replace('{"alpha_net": alpha_net}', '{"alpha_net": alpha_net, "beta_net": alpha_net}')
    (site / "alpha_models.py").write_text(textwrap.dedent(edited))
    assert models() == before | {"alpha_net", "beta_net"}  # its file edited, the same version (an editable install)
    assert "alpha_net" not in run("ls", "models", "--json", "--disable", "alpha", env=env).stdout
    shutil.rmtree(next(site.glob("cnnreg_alpha-*.dist-info")))
    assert models() == before  # uninstalled


def test_a_broken_plugin_is_reported_every_time_and_never_cached(tmp_path, cache):
    site = make_distribution(tmp_path / "site", "cnnreg-bad", {"bad_models": "raise RuntimeError('half installed')\n"},
                             {"bad": "bad_models"})
    env = {**cache, "PYTHONPATH": str(site)}
    for _ in range(2):
        done = run("ls", "--json", env=env)
        assert done.returncode == 0
        [broken] = json.loads(done.stdout)["broken"]
        assert broken["plugin"] == "bad" and "RuntimeError: half installed" in broken["error"]
    assert not list((tmp_path / "cache").glob("manifest-*.json"))


@pytest.mark.parametrize("damage", ["not a folder", "truncated", "another key"])
def test_a_cache_that_cannot_be_written_or_is_damaged_costs_only_speed(tmp_path, damage):
    folder = tmp_path / "cache"
    if damage == "not a folder":
        folder.write_text("")  # mkdir fails: as a read-only or full disk would
    env = {"CNNREG_CACHE_DIR": str(folder)}
    expected = json.loads(run("ls", "--json", env={"CNNREG_NO_CACHE": "1"}).stdout)
    first = run("ls", "--json", env=env)
    assert first.returncode == 0 and json.loads(first.stdout) == expected
    if damage != "not a folder":
        [manifest] = folder.glob("manifest-*.json")
        text = manifest.read_text()
        manifest.write_text(text[: len(text) // 2] if damage == "truncated" else text.replace('"key": "', '"key": "x'))
    again = run("ls", "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout) == expected


def test_summaries_show_docstring_markup_as_plain_text(tmp_path, cache):
    site = make_distribution(tmp_path / "site", "cnnreg-alpha", {"alpha_models": PLUGIN.format(name="alpha_net")},
                             {"alpha": "alpha_models"})
    done = run("ls", "models", "alpha*", env={**cache, "PYTHONPATH": str(site)})
    assert "A alpha_net network built on Module (fast)." in done.stdout
    assert "``" not in done.stdout and ":class:" not in done.stdout
    schema = json.loads(run("schema", env={**cache, "PYTHONPATH": str(site)}).stdout)
    assert schema["$defs"]["ModelAlphaNet"]["properties"]["name"]["description"] == \
        "A alpha_net network built on Module (fast)."
    shipped = (REPO / "recipes" / "recipe.schema.json").read_text()
    assert "``" not in shipped and ":class:`" not in shipped and ":func:`" not in shipped


def in_terminal(*args: str, columns: int, env: dict[str, str]) -> str:
    """Run cnnreg on a real pseudo-terminal of ``columns`` columns; what it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    full = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR")}
    full.update(TERM="xterm-256color", **env)
    process = subprocess.Popen([sys.executable, "-m", "cnnreg", *args], stdin=slave, stdout=slave, stderr=slave,
                               env=full, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=300)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-9]|9[0-7]|38;)[0-9;]*m")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_tables_fit_the_terminal_and_keep_names_whole(cache):
    drawn = in_terminal("ls", columns=90, env=cache)
    lines = [ANSI.sub("", line) for line in drawn.replace("\r\n", "\n").splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 90
    assert any(re.search(r"│ random_resized_crop\s+│", line) for line in lines)  # a name is never folded
    wide = in_terminal("ls", columns=220, env=cache)
    assert max(len(ANSI.sub("", line)) for line in wide.replace("\r\n", "\n").splitlines()) > 90


def test_piped_tables_are_not_folded_at_80_columns(cache):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "cnnreg", "ls", "models"], env={**env, **cache},
                          capture_output=True, text=True, timeout=300)
    assert "Small CIFAR CNN: three 3x3 conv + ReLU + max-pool blocks (16, 32, 64), FC 128." in done.stdout


def test_no_color_is_honoured_on_a_terminal(cache):
    coloured = in_terminal("validate", "quickstart", columns=120, env=cache)
    assert COLOUR.search(coloured), "the positive control: colours on a terminal"
    plain = in_terminal("validate", "quickstart", columns=120, env={**cache, "NO_COLOR": "1"})
    assert "ok quickstart" in ANSI.sub("", plain)
    assert not COLOUR.search(plain)
    error = in_terminal("validate", "quikstart", columns=120, env={**cache, "NO_COLOR": "1"})
    assert "error" in error and not COLOUR.search(error)


def test_validate_json_gives_each_result_and_each_problem_with_its_place(tmp_path, capsys):
    from cnnreg.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "name": "bad",\n  "data": {"name": "synthetic"},\n  "model": {"name": "simple_cnn", "widht": 2}\n}\n')
    assert main(["validate", "--json", "quickstart", str(bad)]) == 2
    captured = capsys.readouterr()
    ok, failed = json.loads(captured.out)
    assert ok["recipe"] == "quickstart" and ok["ok"] and ok["summary"].startswith("simple_cnn")
    [problem] = failed["problems"]
    assert (problem["file"], problem["line"], problem["key"]) == (str(bad), 4, "model.widht")
    assert "unknown parameter" in problem["message"]
    assert "error" in captured.err  # people still read the error on stderr


def test_runs_json_lists_the_runs(tmp_path, capsys):
    from cnnreg.cli import main

    assert main(["runs", "--json", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == []
