"""The position-tracking JSON parser: values, positions, and errors at line:col."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnreg.config.jsonpos import MAX_DEPTH, JsonSyntaxError, SourceMap, parse

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
    ('{\n  "a": 1\n', 3, 1, "unexpected end of file; the '{' at 1:1 is never closed"),
    ('{"a": 1, "a": 2}', 1, 10, "duplicate key 'a' (first at line 1, column 2)"),
    ('{"a": NaN}', 1, 7, "NaN is not valid JSON; use a number or null"),
    ('{"a": Infinity}', 1, 7, "Infinity is not valid JSON; use a (large) number"),
    ('{"a": 1e400}', 1, 7, "the number 1e400 is too large"),
    ("{'a': 1}", 1, 2, "JSON strings use double quotes"),
    ('// note\n{}', 1, 1, 'JSON has no comments; move the note into a "description"'),
    ('{"a": 1 "b": 2}', 1, 9, "expected ',' or '}' after a member; is a comma missing?"),
    ('{"a": True}', 1, 7, "JSON spells it true"),
    ('', 1, 1, "the file is empty; a recipe is a JSON object"),
    ('{"a": 1} x', 1, 10, "unexpected text after the end of the JSON value"),
    ('{"a": "line\nbreak"}', 1, 12, "a raw line break or tab inside a string; write \\n or \\t"),
    ('{"a": "tab\there"}', 1, 11, "a raw line break or tab inside a string; write \\n or \\t"),
    ('{"a": "never closed}', 1, 7, "this string is never closed with a double quote"),
    ('["bad \\x escape"]', 1, 7, "invalid \\escape"),
    ('{"a": [1, 2', 1, 12, "unexpected end of file; the '[' at 1:7 is never closed"),
    ('{"a": {\n  "b": 1\n', 3, 1, "unexpected end of file; the '{' at 1:7 is never closed"),
    ('{\n', 2, 1, "unexpected end of file; the '{' at 1:1 is never closed"),
    ('[1 2]', 1, 4, "expected ',' or ']' after an element; is a comma missing?"),
    ('{"a": 1,\n "b": 2 "c": 3}', 2, 9, "expected ',' or '}' after a member; is a comma missing?"),
    ('{"a" 1}', 1, 6, "expected ':' after the key 'a'"),
    ('{a: 1}', 1, 2, "expected a key in double quotes, found 'a'"),
    ('{,}', 1, 2, "expected a key in double quotes, found ','"),
    ('{"a": }', 1, 7, "expected a value, found '}'"),
    ('[,1]', 1, 2, "expected a value, found ','"),
    ('nul', 1, 1, "expected a value, found 'n'"),
    ('-', 1, 1, "expected a value, found '-'"),
    ('{"a": ', 1, 7, "unexpected end of file; a value is missing"),
    ('[1,', 1, 4, "unexpected end of file; a value is missing"),
    ('{"a": 1,\n "b": 2,\n}', 2, 8, "trailing comma before '}'"),
    ('[1,\n 2 ,  ]', 2, 4, "trailing comma before ']'"),
    ('{"a": -Infinity}', 1, 7, "-Infinity is not valid JSON; use a number"),
    ('[Infinity]', 1, 2, "Infinity is not valid JSON; use a (large) number"),
    ('[1, NaN]', 1, 5, "NaN is not valid JSON; use a number or null"),
    ('{"a":\n  -1e400}', 2, 3, "the number -1e400 is too large"),
    ('[False]', 1, 2, "JSON spells it false"),
    ('{"a": None}', 1, 7, "JSON spells it null"),
    ('{"a": /* note */ 1}', 1, 7, 'JSON has no comments; move the note into a "description"'),
    ('{"a": 1, // note\n "b": 2}', 1, 10, 'JSON has no comments; move the note into a "description"'),
    ("['a']", 1, 2, "JSON strings use double quotes"),
    ('  \n\t ', 1, 1, "the file is empty; a recipe is a JSON object"),
    ('01', 1, 2, "unexpected text after the end of the JSON value"),
    ('{"a": 1}\n\n  x', 3, 3, "unexpected text after the end of the JSON value"),
])
def test_errors_point_at_line_and_column(text, line, column, message):
    with pytest.raises(JsonSyntaxError) as info:
        parse(text)
    assert (info.value.line, info.value.column) == (line, column)
    assert info.value.message == message  # the whole message: the place and what to write instead


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(JsonSyntaxError, match="nested deeper than"):
        parse("[" * 10_000 + "]" * 10_000)


def test_error_text_is_line_colon_column_then_the_message():
    with pytest.raises(JsonSyntaxError) as info:
        parse('{"a": 1,\n}')
    assert str(info.value) == "1:8: trailing comma before '}'"
    assert isinstance(info.value, ValueError)  # callers that catch ValueError see it too


def test_numbers_keep_their_json_type_and_whitespace_is_allowed_everywhere():
    text = '\t{\r\n "ints": [-0, 7, -12],\r\n "floats" :\t[1.5, 2E3, -0.25e-1, 1e+2, 3.0] , "lit": [true, false, null] }\n'
    value, _ = parse(text)
    assert value == {"ints": [0, 7, -12], "floats": [1.5, 2000.0, -0.025, 100.0, 3.0], "lit": [True, False, None]}
    assert [type(v) for v in value["ints"]] == [int] * 3
    assert [type(v) for v in value["floats"]] == [float] * 5
    assert parse("[]")[0] == [] and parse("{ }")[0] == {} and parse('[ "x" ]')[0] == ["x"]
    # empty containers inside others end where they close, so what follows them is read
    assert parse('[[], {}, [ ], { }, 1]')[0] == [[], {}, [], {}, 1]
    assert parse('{"a": [], "b": {}, "c": 2}')[0] == {"a": [], "b": {}, "c": 2}


def test_positions_count_columns_from_each_line_start_whatever_the_line_endings():
    text = '\n\n  {\r\n  "a": [10,\r\n\t20],\r\n  "b": {}}'
    _, source = parse(text)
    assert source.values[()] == (3, 3)
    assert source.keys[("a",)] == (4, 3) and source.values[("a",)] == (4, 8)
    assert source.values[("a", 0)] == (4, 9) and source.values[("a", 1)] == (5, 2)
    assert source.keys[("b",)] == (6, 3) and source.values[("b",)] == (6, 8)


def test_locate_prefers_the_key_only_for_the_path_itself():
    text = '{\n  "data": {"name": "mnist",\n           "batch_size": 64},\n  "list": [1, {"k": true}]\n}'
    _, source = parse(text)
    assert source.locate(("data", "batch_size"), prefer_key=True) == (3, 12)  # the key
    assert source.locate(("data", "batch_size")) == (3, 26)  # the value
    # a missing path falls back to its nearest ancestor's value, never to the ancestor's key
    assert source.locate(("data", "missing", "deeper"), prefer_key=True) == (2, 11)
    assert source.locate(["list", 1, "k"]) == (4, 21)  # a list is a path too
    assert source.locate(("list", 5)) == (4, 11)
    assert source.locate((), prefer_key=True) == (1, 1)
    assert SourceMap({}, {}).locate(("a", "b")) is None


@pytest.mark.parametrize("open_, close, width", [("[", "]", 1), ('{"a":', "}", 5)])
def test_nesting_is_allowed_to_max_depth_and_no_deeper(open_, close, width):
    value, _ = parse(open_ * MAX_DEPTH + "1" + close * MAX_DEPTH)
    for _ in range(MAX_DEPTH):
        value = value[0] if isinstance(value, list) else value["a"]
    assert value == 1 and MAX_DEPTH == 64
    with pytest.raises(JsonSyntaxError) as info:
        parse(open_ * (MAX_DEPTH + 1) + "1" + close * (MAX_DEPTH + 1))
    # pointed at the bracket that is one level too deep
    assert (info.value.line, info.value.column) == (1, width * MAX_DEPTH + 1)
    assert info.value.message == "nested deeper than 64 levels"
