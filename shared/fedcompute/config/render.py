"""Serialize task configs: normalized text format (the seed's format) or JSON."""
from __future__ import annotations

from google.protobuf import json_format, text_format

from fedcompute.config.defaults import normalize
from fedcompute.proto import task_config_pb2 as pb


def to_text(config: pb.TaskConfig, *, normalized: bool = True) -> str:
    """Protobuf text format, defaults filled unless ``normalized=False``."""
    return text_format.MessageToString(normalize(config) if normalized else config, as_utf8=True)


def to_json(config: pb.TaskConfig, *, normalized: bool = True, indent: int = 2) -> str:
    """Protobuf JSON mapping with the proto field names (snake_case), defaults filled
    unless ``normalized=False``. int64 values are JSON strings, as the mapping requires."""
    message = normalize(config) if normalized else config
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=indent) + "\n"
