"""Where each field of a config was written: field path -> 1-based line number.

The protobuf parsers do not keep positions, so these small scanners re-read the text
alongside the message descriptor. They assume the text already parsed (they are lenient
and never raise on odd input). Paths use proto field names, dotted, with ``[i]`` for
repeated fields: ``federated_learning.learning_process.metrics[1].name``. A repeated
field's bare path (``...metrics``) maps to its first occurrence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_TEXT_TOKEN = re.compile(
    r"""(?P<nl>\n)|(?P<ws>[ \t\r\f\v]+)|(?P<comment>\#[^\n]*)
      |(?P<str>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
      |(?P<word>[A-Za-z0-9_.+\-]+)|(?P<punct>[{}<>:\[\],;/])|(?P<other>.)""",
    re.X,
)
_JSON_TOKEN = re.compile(
    r"""(?P<nl>\n)|(?P<ws>[ \t\r\f\v]+)|(?P<str>"(?:[^"\\\n]|\\.)*"?)
      |(?P<word>[A-Za-z0-9_.+\-]+)|(?P<punct>[{}\[\]:,])|(?P<other>.)""",
    re.X,
)


@dataclass(frozen=True)
class _Token:
    kind: str
    value: str
    line: int
    column: int


def _tokenize(text: str, pattern: re.Pattern[str]) -> list[_Token]:
    tokens: list[_Token] = []
    line, line_start = 1, 0
    for match in pattern.finditer(text):
        kind = match.lastgroup or "other"
        if kind == "nl":
            line, line_start = line + 1, match.end()
        elif kind not in ("ws", "comment"):
            tokens.append(_Token(kind, match.group(), line, match.start() - line_start + 1))
    return tokens


class _Stop(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


def _is_repeated(field: FieldDescriptor | None) -> bool:
    return field is not None and field.label == FieldDescriptor.LABEL_REPEATED


class _TextScanner:
    def __init__(self, text: str, stop_at: tuple[int, int] | None = None) -> None:
        self.tokens = _tokenize(text, _TEXT_TOKEN)
        self.index = 0
        self.locations: dict[str, int] = {}
        self.stop_at = stop_at

    def _peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _check_stop(self, token: _Token, path: str) -> None:
        if self.stop_at is not None and (token.line, token.column) >= self.stop_at:
            raise _Stop(path)

    def _record(self, path: str, line: int) -> None:
        self.locations.setdefault(path, line)

    def body(self, desc: Descriptor | None, prefix: str, closer: str | None) -> None:
        counts: dict[str, int] = {}
        while (token := self._peek()) is not None:
            if token.value == closer and token.kind == "punct":
                self.index += 1
                return
            if token.kind != "word":
                if token.value == "[":  # extension or Any type name: skip the brackets
                    while (t := self._peek()) is not None and t.value != "]":
                        self.index += 1
                self.index += 1
                continue
            self._check_stop(token, prefix.rstrip(".") if prefix else "")
            name = token.value
            self.index += 1
            field = desc.fields_by_name.get(name) if desc is not None else None
            sub = field.message_type if field is not None else None
            bare = prefix + name

            def element_path(field: Any = field, bare: str = bare, name: str = name) -> str:
                if not _is_repeated(field):
                    return bare
                counts[name] = counts.get(name, 0) + 1
                return f"{bare}[{counts[name] - 1}]"

            self._record(bare, token.line)
            following = self._peek()
            if following is not None and following.value == ":":
                self.index += 1
                following = self._peek()
            if following is None:
                return
            if following.value in ("{", "<"):
                self.index += 1
                path = element_path()
                self._record(path, token.line)
                self.body(sub, path + ".", "}" if following.value == "{" else ">")
            elif following.value == "[":
                self.index += 1
                while (item := self._peek()) is not None and item.value != "]":
                    self.index += 1
                    if item.value in ("{", "<"):
                        path = element_path()
                        self._record(path, item.line)
                        self.body(sub, path + ".", "}" if item.value == "{" else ">")
                    elif item.value != ",":
                        path = element_path()
                        self._check_stop(item, path)
                        self._record(path, item.line)
                self.index += 1
            else:
                path = element_path()
                self._check_stop(following, path)
                self._record(path, token.line)
                self.index += 1
                # Adjacent string literals concatenate: consume them all.
                while (more := self._peek()) is not None and more.kind == "str" and following.kind == "str":
                    self.index += 1


def text_locations(text: str, descriptor: Descriptor) -> dict[str, int]:
    """Field path -> line for a protobuf text-format document of type ``descriptor``."""
    scanner = _TextScanner(text)
    scanner.body(descriptor, "", None)
    return scanner.locations


def text_path_at(text: str, descriptor: Descriptor, line: int, column: int) -> str:
    """The field path being parsed at ``line:column`` (for parse error messages).

    For a field name position this is the enclosing message's path; for a value it is
    the field's path. Empty string at the top level.
    """
    scanner = _TextScanner(text, stop_at=(line, column))
    try:
        scanner.body(descriptor, "", None)
    except _Stop as stop:
        return stop.path
    return ""


def _unquote(token: _Token) -> str:
    value = token.value
    return value[1:-1] if len(value) >= 2 and value.endswith('"') else value.strip('"')


def json_path_key(key: str) -> str:
    """The JSON path segment for ``key``: ``.key``, or ``['odd key']`` when not an identifier."""
    return f".{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"[{key!r}]"


class _JsonScanner:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text, _JSON_TOKEN)
        self.index = 0
        self.proto: dict[str, int] = {}
        self.json: dict[str, int] = {}

    def _next(self) -> _Token | None:
        token = self.tokens[self.index] if self.index < len(self.tokens) else None
        self.index += 1
        return token

    def value(self, desc: Descriptor | None, field: FieldDescriptor | None, json_path: str, proto_path: str) -> None:
        token = self._next()
        if token is None:
            return
        if token.value == "{":
            self.obj(desc, json_path, proto_path)
        elif token.value == "[":
            position = 0
            while (item := self.tokens[self.index] if self.index < len(self.tokens) else None) is not None:
                if item.value == "]":
                    self.index += 1
                    return
                if item.value == ",":
                    self.index += 1
                    continue
                self.json.setdefault(f"{json_path}[{position}]", item.line)
                self.proto.setdefault(f"{proto_path}[{position}]", item.line)
                self.value(desc, None, f"{json_path}[{position}]", f"{proto_path}[{position}]")
                position += 1

    def obj(self, desc: Descriptor | None, json_path: str, proto_path: str) -> None:
        by_camel = desc.fields_by_camelcase_name if desc is not None else {}  # type: ignore[attr-defined]  # missing from the stubs
        while (token := self._next()) is not None:
            if token.value == "}":
                return
            if token.kind != "str":
                continue
            key = _unquote(token)
            field = None
            if desc is not None:
                field = desc.fields_by_name.get(key) or by_camel.get(key)
            name = field.name if field is not None else key
            child_json = json_path + json_path_key(key)
            child_proto = f"{proto_path}.{name}" if proto_path else name
            self.json.setdefault(child_json, token.line)
            self.proto.setdefault(child_proto, token.line)
            colon = self._next()
            if colon is None or colon.value != ":":
                continue
            self.value(field.message_type if field is not None else None, field, child_json, child_proto)


def json_locations(text: str, descriptor: Descriptor) -> tuple[dict[str, int], dict[str, int]]:
    """(proto field path -> line, JSON path ``$.a.b[0]`` -> line) for a JSON document."""
    scanner = _JsonScanner(text)
    first = scanner._next()
    if first is not None and first.value == "{":
        scanner.obj(descriptor, "$", "")
    return scanner.proto, scanner.json


def line_for(locations: dict[str, int], path: str) -> int | None:
    """Line of ``path`` or of its closest written ancestor (None when nothing matches)."""
    candidate = path
    while candidate:
        if candidate in locations:
            return locations[candidate]
        cut = max(candidate.rfind("."), candidate.rfind("["))
        if cut <= 0:
            break
        candidate = candidate[:cut]
    return None

