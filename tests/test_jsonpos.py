"""The position-tracking JSON parser: values, positions, and errors at line:col."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnreg.config.jsonpos import JsonSyntaxError, parse

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from([None, 2]))
def test_parses_what_the_standard_library_writes(value, indent):
    text = json.dumps(value, indent=indent)
    parsed, _ = parse(text)
    assert parsed == json.loads(text)


def test_positions_of_keys_and_values():
    text = '{\n  "data": {"name": "mnist",\n           "batch_size": 64},\n  "list": [1, {"k": true}]\n}'
    _, source = parse(text)
    assert source.keys[("data",)] == (2, 3)
    assert source.values[("data",)] == (2, 11)
    assert source.keys[("data", "batch_size")] == (3, 12)
    assert source.values[("data", "batch_size")] == (3, 26)
    assert source.values[("list", 1, "k")] == (4, 21)
    # a path that does not exist falls back to its nearest ancestor
    assert source.locate(("data", "missing")) == (2, 11)


@pytest.mark.parametrize("text, line, column, message", [
    ('{"a": 1,}', 1, 8, "trailing comma before '}'"),
    ('{\n  "a": [1, 2,]\n}', 2, 13, "trailing comma before ']'"),
    ('{\n  "a": 1\n', 3, 1, "the '{' at 1:1 is never closed"),
    ('{"a": 1, "a": 2}', 1, 10, "duplicate key 'a' (first at line 1, column 2)"),
    ('{"a": NaN}', 1, 7, "NaN is not valid JSON"),
    ('{"a": Infinity}', 1, 7, "Infinity is not valid JSON"),
    ('{"a": 1e400}', 1, 7, "too large"),
    ("{'a': 1}", 1, 2, "double quotes"),
    ('// note\n{}', 1, 1, "JSON has no comments"),
    ('{"a": 1 "b": 2}', 1, 9, "is a comma missing?"),
    ('{"a": True}', 1, 7, "JSON spells it true"),
    ('', 1, 1, "the file is empty"),
    ('{"a": 1} x', 1, 10, "unexpected text after the end"),
    ('{"a": "line\nbreak"}', 1, 12, "raw line break"),
])
def test_errors_point_at_line_and_column(text, line, column, message):
    with pytest.raises(JsonSyntaxError) as info:
        parse(text)
    assert (info.value.line, info.value.column) == (line, column)
    assert message in info.value.message


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(JsonSyntaxError, match="nested deeper than"):
        parse("[" * 10_000 + "]" * 10_000)
