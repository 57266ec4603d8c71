"""Parse task configs from protobuf text format (as in the seed) or JSON.

The format is detected from the content: JSON documents start with ``{``; anything else
(including ``#`` comments) is text format. Parse errors become :class:`ConfigSyntaxError`
naming ``file:line:col``, the bad token and, for an unknown field or enum value, the
closest valid name of *that* message or enum.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pool, json_format, text_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from fedcompute.config.issues import ConfigSyntaxError
from fedcompute.config.locations import json_locations, json_path_key, text_locations, text_path_at
from fedcompute.errors import ConfigError
from fedcompute.proto import task_config_pb2

TaskConfig = task_config_pb2.TaskConfig

TEXT = "text"
JSON = "json"


@dataclass(frozen=True)
class ParsedConfig:
    """A parsed config with where it came from.

    ``locations`` maps proto field paths (``policies.model_release_policy.dp_delta``,
    ``federated_learning.learning_process.metrics[0].name``) to 1-based line numbers, so
    validation errors can name lines.
    """

    config: task_config_pb2.TaskConfig
    source: str = "<config>"
    format: str = TEXT
    locations: dict[str, int] = field(default_factory=dict)


def detect_format(text: str) -> str:
    """``"json"`` when the first non-blank character is ``{``, else ``"text"``."""
    return JSON if text.lstrip().startswith("{") else TEXT


def parse_config_document(text: str | bytes, *, source: str = "<config>") -> ParsedConfig:
    """Parse ``text`` (text format or JSON, auto-detected) keeping field line numbers."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigSyntaxError(
                f"task config is not UTF-8 text ({err.reason} at byte {err.start})",
                source=source,
                hint="save the file as UTF-8",
            ) from err
    descriptor = TaskConfig.DESCRIPTOR
    if detect_format(text) == JSON:
        config = _parse_json(text, source)
        locations, _ = json_locations(text, descriptor)
        return ParsedConfig(config, source, JSON, locations)
    config = _parse_text(text, source)
    return ParsedConfig(config, source, TEXT, text_locations(text, descriptor))


def parse_task_config(text: str | bytes, *, source: str = "<config>") -> task_config_pb2.TaskConfig:
    """Parse a task config (text format or JSON, auto-detected). Raises ConfigSyntaxError."""
    return parse_config_document(text, source=source).config


def load_config_document(path: str | Path) -> ParsedConfig:
    """Read and parse the config file at ``path`` (see :func:`parse_config_document`)."""
    return parse_config_document(read_config_file(path), source=str(path))


def load_task_config(path: str | Path) -> task_config_pb2.TaskConfig:
    """Read and parse the config file at ``path``."""
    return load_config_document(path).config


def read_config_file(path: str | Path) -> str:
    """The file's text; a ConfigError (not OSError) when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"task config file {str(path)!r} does not exist", hint="check the path") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"task config file {str(path)!r} is not UTF-8 text", hint="save it as UTF-8") from err
    except OSError as err:
        raise ConfigError(f"cannot read task config file {str(path)!r}: {err.strerror or err}") from err


def closest(name: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    """The candidate closest to ``name`` (difflib), or None when nothing is close."""
    if not candidates:
        return None
    lowered = {c.lower(): c for c in candidates}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[matches[0]] if matches else None


# ---------------------------------------------------------------- text format

_NO_FIELD = re.compile(r'Message type "(?P<type>[\w.]+)" has no field named "(?P<name>[^"]+)"')
_NO_ENUM = re.compile(r'Enum type "(?P<type>[\w.]+)" has no value named (?P<name>\S+?)\.?$')
_PREFIX = re.compile(r"^(\d+):(\d+) : ")


def _parse_text(text: str, source: str) -> task_config_pb2.TaskConfig:
    config = TaskConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise _text_error(err, text, source) from err
    return config


def _strip_context(detail: str, text: str, line: int | None) -> str:
    """Drop the ``"<line:col> : '<source line>': "`` prefix protobuf puts on messages."""
    detail = _PREFIX.sub("", detail)
    if line is not None and 0 < line <= len(text.splitlines()):
        source_line = text.splitlines()[line - 1]
        for quoted in (source_line, source_line.strip()):
            prefix = f"'{quoted}': "
            if detail.startswith(prefix):
                return detail[len(prefix):]
    return detail


def _text_error(err: text_format.ParseError, text: str, source: str) -> ConfigSyntaxError:
    line, column = err.GetLine(), err.GetColumn()
    detail = _strip_context(str(err), text, line)
    path = None
    if line is not None and column is not None:
        path = text_path_at(text, TaskConfig.DESCRIPTOR, line, column) or None
    pool = descriptor_pool.Default()

    if (match := _NO_FIELD.search(detail)) is not None:
        name = match["name"]
        message_type = pool.FindMessageTypeByName(match["type"])
        fields = [f.name for f in message_type.fields]
        suggestion = closest(name, fields)
        where = f"{message_type.name} at {path}" if path else message_type.name
        hint = None if suggestion else "valid fields: " + ", ".join(fields)
        owner = _enclosing_owner(path or "", name)
        if owner is not None and suggestion is None:
            hint = (f'"{name}" is a field of {owner}: is a closing }} missing before line {line}? '
                    f"(valid fields here: {', '.join(fields)})")
        field_path = f"{path}.{name}" if path else name
        return ConfigSyntaxError(
            f'unknown field "{name}" in {where}',
            source=source, line=line, column=column, token=name,
            suggestion=suggestion, path=field_path, hint=hint,
        )
    if (match := _NO_ENUM.search(detail)) is not None:
        value = match["name"]
        enum_type = pool.FindEnumTypeByName(match["type"])
        names = [v.name for v in enum_type.values]
        suggestion = closest(value, names)
        enum_name = _enum_display_name(enum_type)
        where = f" for {path}" if path else ""
        hint = None if suggestion else "valid values: " + ", ".join(names)
        return ConfigSyntaxError(
            f"unknown {enum_name} value {value}{where}",
            source=source, line=line, column=column, token=value,
            suggestion=suggestion, path=path, hint=hint,
        )
    token = _token_at(text, line, column)
    return ConfigSyntaxError(
        f"syntax error at {token!r}: {detail}" if token else f"syntax error: {detail}",
        source=source, line=line, column=column, token=token, path=path,
        hint=_syntax_hint(detail, token),
    )


def _syntax_hint(detail: str, token: str | None) -> str:
    if detail.startswith("Expected string"):
        return f'quote the value: "{token}"' if token else "quote the value"
    if detail.startswith(("Couldn't parse integer", "Expected integer")):
        return "use a whole number"
    if detail.startswith(("Couldn't parse float", "Expected double", "Expected float")):
        return "use a number such as 0.1"
    if "should not have multiple" in detail:
        return "keep one occurrence of the field"
    if detail.startswith('Expected "}"') or detail.startswith('Expected ">"'):
        return "close every `name {` block with `}`"
    return "text format is `name: value` for scalars and `name { ... }` for messages; # starts a comment"


def _enclosing_owner(path: str, name: str) -> str | None:
    """The enclosing message (outermost first) that does have field ``name``, if any:
    a field that belongs further out usually means a ``}`` is missing."""
    desc: Descriptor | None = TaskConfig.DESCRIPTOR
    chain: list[Descriptor] = []
    for segment in filter(None, path.split(".")):
        if desc is None:
            break
        chain.append(desc)
        field = desc.fields_by_name.get(segment.split("[", 1)[0])
        desc = field.message_type if field is not None else None
    for owner in chain:
        if name in owner.fields_by_name:
            return owner.name
    return None


def _enum_display_name(enum_type: EnumDescriptor) -> str:
    # ODP wraps enums as `DpAggregator.Enum`: name the wrapper, which users recognise.
    if enum_type.name == "Enum" and enum_type.containing_type is not None:
        return enum_type.containing_type.name
    return enum_type.name


def _token_at(text: str, line: int | None, column: int | None) -> str | None:
    if line is None or column is None:
        return None
    lines = text.splitlines()
    if not 0 < line <= len(lines):
        return None
    rest = lines[line - 1][max(column - 1, 0):]
    match = re.match(r'\s*("(?:[^"\\]|\\.)*"?|[\w.+\-]+|\S)', rest)
    return match.group(1) if match else None


# ---------------------------------------------------------------- JSON

def _parse_json(text: str, source: str) -> task_config_pb2.TaskConfig:
    try:
        document = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as dup:
        raise ConfigSyntaxError(
            f'duplicate JSON key "{dup.key}"', source=source, token=dup.key,
            hint="keep one occurrence of each key",
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigSyntaxError(
            f"invalid JSON: {err.msg}", source=source, line=err.lineno, column=err.colno,
            token=_token_at(text, err.lineno, err.colno),
        ) from err
    _, json_lines = json_locations(text, TaskConfig.DESCRIPTOR)
    _check_json(document, TaskConfig.DESCRIPTOR, "$", source, json_lines)
    config = TaskConfig()
    try:
        json_format.ParseDict(document, config)
    except json_format.ParseError as err:  # the pre-walk should catch everything; keep a safety net
        raise ConfigSyntaxError(f"invalid task config JSON: {err}", source=source, path="$") from err
    return config


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


_INT_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
_JSON_TYPE = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


def _check_json(value: Any, desc: Descriptor, path: str, source: str, lines: dict[str, int]) -> None:
    """Walk a decoded JSON object against ``desc`` and raise on the first unknown key,
    unknown enum value or wrongly typed value, naming its JSON path."""

    def fail(message: str, at: str, **kwargs: Any) -> ConfigSyntaxError:
        return ConfigSyntaxError(message + f" at {at}", source=source, line=lines.get(at), path=at, **kwargs)

    if not isinstance(value, dict):
        raise fail(f"expected an object for {desc.name}, got {_describe(value)}", path)
    by_camel = desc.fields_by_camelcase_name  # type: ignore[attr-defined]  # missing from the stubs
    for key, item in value.items():
        child = path + json_path_key(key)
        field = desc.fields_by_name.get(key) or by_camel.get(key)
        if field is None:
            names = [f.name for f in desc.fields]
            suggestion = closest(key, names)
            raise fail(
                f'unknown field "{key}" in {desc.name}', child, token=key, suggestion=suggestion,
                hint=None if suggestion else "valid fields: " + ", ".join(names),
            )
        if item is None:
            continue
        if field.label == FieldDescriptor.LABEL_REPEATED:
            if not isinstance(item, list):
                raise fail(f'"{key}" must be a list, got {_describe(item)}', child, token=key)
            for index, element in enumerate(item):
                _check_json_value(element, field, f"{child}[{index}]", source, lines, fail)
        else:
            _check_json_value(item, field, child, source, lines, fail)


def _check_json_value(value: Any, field: FieldDescriptor, path: str, source: str,
                      lines: dict[str, int], fail: Any) -> None:
    if field.message_type is not None:
        if field.message_type.full_name.startswith("google.protobuf."):
            return  # well-known types have their own JSON forms; json_format checks them
        _check_json(value, field.message_type, path, source, lines)
        return
    if field.enum_type is not None:
        names = [v.name for v in field.enum_type.values]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise fail(f"expected an enum name for {field.name}, got {_describe(value)}", path,
                       hint="valid values: " + ", ".join(names))
        if isinstance(value, str) and value not in names:
            suggestion = closest(value, names)
            raise fail(
                f"unknown {_enum_display_name(field.enum_type)} value {value}", path, token=value,
                suggestion=suggestion, hint=None if suggestion else "valid values: " + ", ".join(names),
            )
        return
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise fail(f"{field.name} must be true or false, got {_describe(value)}", path, token=str(value))
    elif kind in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        if not isinstance(value, str):
            raise fail(f"{field.name} must be a string, got {_describe(value)}", path, token=str(value),
                       hint=f'quote it: "{value}"')
    elif kind in _INT_TYPES:
        if not _is_json_int(value):
            raise fail(f"{field.name} must be an integer, got {_describe(value)}", path, token=str(value))
    elif kind in _FLOAT_TYPES and not _is_json_float(value):
        raise fail(f"{field.name} must be a number, got {_describe(value)}", path, token=str(value))


def _is_json_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    if isinstance(value, str):
        return re.fullmatch(r"-?\d+", value.strip()) is not None
    return False


def _is_json_float(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        if value in ("NaN", "Infinity", "-Infinity"):
            return True
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _describe(value: Any) -> str:
    kind = _JSON_TYPE.get(type(value), type(value).__name__)
    return f"{kind} {json.dumps(value)}" if not isinstance(value, (dict, list)) else kind
