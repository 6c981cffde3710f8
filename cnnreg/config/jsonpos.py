"""JSON parsing that remembers where every key and value is.

The standard library's parser gives no positions for values, and a recipe
error must say ``file:line:col``. This is a strict RFC 8259 parser (no NaN,
no comments, no duplicate keys) that reuses the standard library's string
scanner and records, for every JSON path, the line and column of its key and
of its value.
"""

from __future__ import annotations

import bisect
import json.decoder
import re
from dataclasses import dataclass
from typing import Any

JsonPath = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based line, column

MAX_DEPTH = 64

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_LITERALS = {"true": True, "false": False, "null": None}
# Things people write in "JSON" that it does not allow, and what to say.
_NOT_JSON = {
    "NaN": "NaN is not valid JSON; use a number or null",
    "Infinity": "Infinity is not valid JSON; use a (large) number",
    "-Infinity": "-Infinity is not valid JSON; use a number",
    "True": "JSON spells it true",
    "False": "JSON spells it false",
    "None": "JSON spells it null",
    "//": "JSON has no comments; move the note into a \"description\"",
    "/*": "JSON has no comments; move the note into a \"description\"",
    "'": "JSON strings use double quotes",
}


class JsonSyntaxError(ValueError):
    """Malformed JSON, at a line and column."""

    def __init__(self, message: str, line: int, column: int):
        self.message, self.line, self.column = message, line, column
        super().__init__(f"{line}:{column}: {message}")


@dataclass(frozen=True)
class SourceMap:
    """Where each JSON path's key and value start in the text."""

    keys: dict[JsonPath, Position]
    values: dict[JsonPath, Position]

    def locate(self, path: JsonPath, prefer_key: bool = False) -> Position | None:
        """The position of ``path``, or of its nearest ancestor that exists."""
        path = tuple(path)
        while True:
            if prefer_key and path in self.keys:
                return self.keys[path]
            if path in self.values:
                return self.values[path]
            if not path:
                return None
            path = path[:-1]
            prefer_key = False


def parse(text: str) -> tuple[Any, SourceMap]:
    """Parse ``text`` as strict JSON; return the value and its source map."""
    return _Parser(text).run()


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.keys: dict[JsonPath, Position] = {}
        self.values: dict[JsonPath, Position] = {}

    def run(self) -> tuple[Any, SourceMap]:
        i = self.skip(0)
        if i == len(self.text):
            raise self.error("the file is empty; a recipe is a JSON object", 0)
        value, i = self.value(i, (), 0)
        i = self.skip(i)
        if i != len(self.text):
            raise self.error("unexpected text after the end of the JSON value", i)
        return value, SourceMap(self.keys, self.values)

    def position(self, index: int) -> Position:
        line = bisect.bisect_right(self.line_starts, index)
        return line, index - self.line_starts[line - 1] + 1

    def error(self, message: str, index: int) -> JsonSyntaxError:
        return JsonSyntaxError(message, *self.position(index))

    def skip(self, i: int) -> int:
        return _WHITESPACE.match(self.text, i).end()  # type: ignore[union-attr]

    def not_json(self, i: int) -> str | None:
        for token, advice in _NOT_JSON.items():
            if self.text.startswith(token, i):
                return advice
        return None

    def value(self, i: int, path: JsonPath, depth: int) -> tuple[Any, int]:
        text = self.text
        if i >= len(text):
            raise self.error("unexpected end of file; a value is missing", i)
        self.values[path] = self.position(i)
        ch = text[i]
        if ch == "{":
            return self.object(i, path, depth + 1)
        if ch == "[":
            return self.array(i, path, depth + 1)
        if ch == '"':
            return self.string(i)
        number = _NUMBER.match(text, i)
        if number and number.end() > i and not text.startswith("-Infinity", i):
            literal = number.group()
            value = float(literal) if number.group(1) or number.group(2) else int(literal)
            if isinstance(value, float) and value in (float("inf"), float("-inf")):
                raise self.error(f"the number {literal} is too large", i)
            return value, number.end()
        for word, value in _LITERALS.items():
            if text.startswith(word, i):
                return value, i + len(word)
        advice = self.not_json(i)
        raise self.error(advice or f"expected a value, found {text[i]!r}", i)

    def string(self, i: int) -> tuple[str, int]:
        try:
            return json.decoder.scanstring(self.text, i + 1, True)
        except json.JSONDecodeError as exc:
            if exc.msg.startswith("Invalid control character"):
                message = "a raw line break or tab inside a string; write \\n or \\t"
            elif exc.msg.startswith("Unterminated string"):
                message = "this string is never closed with a double quote"
            else:
                message = exc.msg.lower()
            raise self.error(message, exc.pos) from None

    def object(self, start: int, path: JsonPath, depth: int) -> tuple[dict[str, Any], int]:
        if depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH} levels", start)
        result: dict[str, Any] = {}
        i = self.skip(start + 1)
        if self.text.startswith("}", i):
            return result, i + 1
        comma = -1
        while True:
            if i >= len(self.text):
                raise self.error(f"unexpected end of file; the '{{' at {_fmt(self.position(start))} is never closed", i)
            if self.text[i] != '"':
                if self.text[i] == "}":
                    raise self.error("trailing comma before '}'", comma)
                advice = self.not_json(i)
                raise self.error(advice or f"expected a key in double quotes, found {self.text[i]!r}", i)
            key_at = i
            key, i = self.string(i)
            if key in result:
                first = self.keys[(*path, key)]
                raise self.error(f"duplicate key {key!r} (first at line {first[0]}, column {first[1]})", key_at)
            self.keys[(*path, key)] = self.position(key_at)
            i = self.skip(i)
            if not self.text.startswith(":", i):
                raise self.error(f"expected ':' after the key {key!r}", i)
            value, i = self.value(self.skip(i + 1), (*path, key), depth)
            result[key] = value
            i = self.skip(i)
            if self.text.startswith(",", i):
                comma, i = i, self.skip(i + 1)
                continue
            if self.text.startswith("}", i):
                return result, i + 1
            if i >= len(self.text):
                raise self.error(f"unexpected end of file; the '{{' at {_fmt(self.position(start))} is never closed", i)
            raise self.error("expected ',' or '}' after a member; is a comma missing?", i)

    def array(self, start: int, path: JsonPath, depth: int) -> tuple[list[Any], int]:
        if depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH} levels", start)
        result: list[Any] = []
        i = self.skip(start + 1)
        if self.text.startswith("]", i):
            return result, i + 1
        comma = -1
        while True:
            if self.text.startswith("]", i):
                raise self.error("trailing comma before ']'", comma)
            value, i = self.value(i, (*path, len(result)), depth)
            result.append(value)
            i = self.skip(i)
            if self.text.startswith(",", i):
                comma, i = i, self.skip(i + 1)
                continue
            if self.text.startswith("]", i):
                return result, i + 1
            if i >= len(self.text):
                raise self.error(f"unexpected end of file; the '[' at {_fmt(self.position(start))} is never closed", i)
            raise self.error("expected ',' or ']' after an element; is a comma missing?", i)


def _fmt(position: Position) -> str:
    return f"{position[0]}:{position[1]}"
