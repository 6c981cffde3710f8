"""Malformed recipes never give a traceback: generated junk at every place of a
good recipe, broken text and files that are not recipes all exit 2 with a
message that names the file and where in it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnreg.cli import main

from conftest import cli

# A valid recipe like tests/test_recipe.py's golden one, with a small dataset so
# that mutations which stay valid dry-run in milliseconds.
BASE: dict[str, Any] = {
    "name": "golden",
    "seed": 0,
    "data": {"name": "synthetic", "num_classes": 3, "image_size": 12, "train_size": 24, "val_size": 6,
             "test_size": 6, "batch_size": 16},
    "transforms": {"train": [{"name": "random_horizontal_flip"}, {"name": "random_crop", "size": 12, "padding": 2}],
                   "eval": [{"name": "normalize"}]},
    "model": {"name": "simple_cnn", "widths": [4, 4, 4]},
    "optimizer": {"name": "adam", "lr": 0.001},
    "scheduler": {"name": "reduce_on_plateau", "monitor": "val_loss"},
    "trainer": {"epochs": 2, "precision": "fp32", "deterministic": False},
    "metrics": [{"name": "accuracy"}],
    "callbacks": [{"name": "early_stopping", "monitor": "val_loss"}],
}


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every JSON path of ``node``, the root included."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths(value, (*prefix, i))
    return found


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


PATHS = paths(BASE)
OBJECT_PATHS = [p for p in PATHS if isinstance(_get(BASE, p), dict)]
KEYED_PATHS = [p for p in PATHS if p and isinstance(p[-1], str)]

# Numbers chosen to hit edges without allocating: sizes in the thousands would
# make the dry run draw gigabytes of images (see DATA_SIZES below), so "huge"
# means past int64, where torch and pydantic refuse at once.
INTS = st.integers(-3, 40) | st.sampled_from([-2**63, 2**63, 2**64, 10**30, 10**400, -10**30])
FLOATS = st.sampled_from([0.0, -0.0, 0.5, -1.5, 3.25, 1e308, -1e308, 5e-324, 1e-30])
TEXT = st.text(max_size=12) | st.sampled_from(["", "adam", "simple_cnn", "os.system", "torch.nn:Linear",
                                               "../../etc/passwd", "val_loss", "\u202e", "a" * 300])
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)


def deeply_nested(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


NESTED = st.builds(deeply_nested, st.integers(1, 200), st.sampled_from(["list", "dict"]))
VALUES = JUNK | NESTED | st.just([]) | st.just({})


def write(tmp_path: Path, recipe: Any) -> Path:
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(recipe, indent=2))
    return path


def check_validate(path: Path, capsys, *, must_fail: bool) -> tuple[int, str]:
    """``cnnreg validate PATH`` in-process: 0, or 2 with every error located in the file."""
    capsys.readouterr()
    status = main(["validate", str(path)])  # raising here is the failure this file looks for
    err = capsys.readouterr().err
    assert status in ((2,) if must_fail else (0, 2)), err
    if status == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert errors, err
        where = re.compile(rf"^error: {re.escape(str(path))}(:\d+:\d+[ :]|: )")
        assert all(where.match(line) for line in errors), err
        assert "Traceback" not in err
    return status, err


FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_the_base_recipe_is_valid(tmp_path, capsys):
    assert check_validate(write(tmp_path, BASE), capsys, must_fail=False)[0] == 0


@FUZZ
@given(path=st.sampled_from(PATHS), value=VALUES)
def test_junk_at_any_place_is_reported_not_raised(tmp_path, capsys, path, value):
    recipe = copy.deepcopy(BASE)
    if path:
        _get(recipe, path[:-1])[path[-1]] = value
    else:
        recipe = value
    check_validate(write(tmp_path, recipe), capsys, must_fail=not path)


@FUZZ
@given(where=st.sampled_from(OBJECT_PATHS), key=TEXT, value=JUNK)
def test_unknown_keys_anywhere_are_errors(tmp_path, capsys, where, key, value):
    recipe = copy.deepcopy(BASE)
    node = _get(recipe, where)
    if key in node or key == "$schema" or (key.isascii() and key.isidentifier()):
        key = f"{key}\u00a7"  # never a real option name, which this test would take for junk
    node[key] = value
    check_validate(write(tmp_path, recipe), capsys, must_fail=True)


@FUZZ
@given(removed=st.lists(st.sampled_from(KEYED_PATHS), min_size=1, max_size=4, unique=True))
def test_missing_fields_never_raise(tmp_path, capsys, removed):
    recipe = copy.deepcopy(BASE)
    for path in sorted(removed, key=len, reverse=True):
        parent = _get(recipe, path[:-1]) if all(_has(recipe, path[:i]) for i in range(len(path))) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    must_fail = any(p in removed for p in [("name",), ("data",), ("model",), ("data", "name"), ("model", "name")])
    check_validate(write(tmp_path, recipe), capsys, must_fail=must_fail)


def _has(node: Any, path: tuple) -> bool:
    for part in path:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


NUMBER = re.compile(r"(?<=[:\[ ,])-?\d+(\.\d+)?(?=[,\]}\s])")
TEXT_BASE = json.dumps(BASE, indent=2)
NUMBERS = [m.span() for m in NUMBER.finditer(TEXT_BASE)]


@FUZZ
@given(at=st.sampled_from(NUMBERS), literal=st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "1e999",
                                                              "0x10", "+1", "01", "1.", ".5", "True", "None"]))
def test_non_json_numbers_are_syntax_errors_at_their_place(tmp_path, capsys, at, literal):
    text = TEXT_BASE[: at[0]] + literal + TEXT_BASE[at[1]:]
    path = tmp_path / "fuzz.json"
    path.write_text(text)
    _, err = check_validate(path, capsys, must_fail=True)
    line = TEXT_BASE.count("\n", 0, at[0]) + 1
    assert f"error: {path}:{line}:" in err


@FUZZ
@given(cut=st.integers(0, len(TEXT_BASE) - 1), bad=st.binary(min_size=1, max_size=3), at=st.integers(0, len(TEXT_BASE)))
def test_cut_short_or_corrupted_bytes_are_reported(tmp_path, capsys, cut, bad, at):
    path = tmp_path / "fuzz.json"
    data = TEXT_BASE.encode()
    path.write_bytes(data[:cut])  # a file cut short (0 bytes: empty)
    check_validate(path, capsys, must_fail=True)
    path.write_bytes(data[:at] + bad + data[at:])  # stray bytes: invalid UTF-8, NUL, or JSON that breaks
    check_validate(path, capsys, must_fail=False)


@FUZZ
@given(data=st.binary(max_size=64))
def test_binary_files_are_reported(tmp_path, capsys, data):
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    check_validate(path, capsys, must_fail=True)


@pytest.mark.parametrize("content", [b"", b"   \n", b"\xef\xbb\xbf", b"\xff\xfe{\x00}\x00", b"PK\x03\x04" + bytes(60),
                                     b"\x89PNG\r\n\x1a\n" + bytes(20), b"null", b'"a string"', b"[]", b"{}"])
def test_files_that_are_not_recipes(tmp_path, capsys, content):
    path = tmp_path / "fuzz.json"
    path.write_bytes(content)
    check_validate(path, capsys, must_fail=True)


def test_a_directory_instead_of_a_file(tmp_path, capsys):
    folder = tmp_path / "fuzz.json"
    folder.mkdir()
    check_validate(folder, capsys, must_fail=True)


def test_malformed_recipe_in_a_subprocess_exits_2_without_traceback(tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_bytes(TEXT_BASE.replace('"lr": 0.001', '"lr": NaN').encode() + b"\xff")
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert re.search(rf"{re.escape(str(path))}:\d+:\d+", result.stderr), result.stderr
