"""Header-only check of a device upload: everything but the model delta's tensor bytes.

Result ingestion must decide whether an upload is an update of the task's shapes before it
counts, but the aggregator decodes every accepted update anyway. So ingestion walks the
protobuf wire format of the ClientUpdate and, inside ``model_delta``, of each TensorProto,
and never parses (or copies) a tensor's ``data``: it only records its length. Everything
small goes through the real protobuf parser (the ClientUpdate without its ``model_delta``,
each TensorProto without its ``data``), so those fields get protobuf's exact semantics
(unknown fields, repeated scalars, UTF-8 names). The two big fields are stricter than
protobuf: ``model_delta`` and each tensor's ``data`` must occur once (protobuf would merge or
keep the last occurrence; no honest client writes them twice). Hence whatever passes here
decodes with :func:`~fedcompute.learning.tensor_codec.decode_client_update` to the same
names, shapes, example count and metric statistics (a unit test checks this on mutated
uploads).

Numbers: see BENCHMARKS.md ("Ingestion: header-only validation").
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from fedcompute.errors import InvalidRequestError
from fedcompute.learning.tensor_codec import (
    FORMAT_VERSION,
    SpecLike,
    bundle_from_proto,
    check_bundle_header,
    check_client_update_fields,
    client_update_bytes,
    default_max_bytes,
    normalize_spec,
)
from fedcompute.proto import tensors_pb2
from fedcompute.tensor_spec import TensorSpec

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MODEL_DELTA = 2  # ClientUpdate.model_delta
_TENSORS = 2  # TensorBundle.tensors
_DATA = 4  # TensorProto.data


@dataclass(frozen=True)
class UpdateHeader:
    """What ingestion learns from an upload without reading its tensors."""

    names: tuple[str, ...]
    num_examples: int
    metric_statistics: Mapping[str, np.ndarray]
    metadata: Mapping[str, str]


class _Malformed(Exception):
    """The wire format is broken (reported as the full decode reports an unparsable upload)."""


def _malformed(what: str) -> _Malformed:
    return _Malformed(what)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, int, int, int, int]]:
    """``(field number, wire type, start, value start, end)`` of each field of one message."""
    out = []
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _malformed("field number 0")
        value = pos
        if wire == _VARINT:
            _, pos = _varint(buf, pos)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LEN:
            length, value = _varint(buf, pos)
            pos = value + length
        else:
            raise _malformed(f"wire type {wire} (groups are not used)")
        if pos > len(buf):
            raise _malformed("truncated field")
        out.append((number, wire, start, value, pos))
    return out


def _without(buf: memoryview, fields: list[tuple[int, int, int, int, int]], number: int) -> tuple[bytes, list[memoryview]]:
    """(the message's bytes without its length-delimited field ``number``, that field's values)."""
    rest, values = bytearray(), []
    for n, wire, start, value, end in fields:
        if n == number and wire == _LEN:
            values.append(buf[value:end])
        else:
            rest += buf[start:end]
    return bytes(rest), values


def _parse(message: type, data: bytes, what: str):  # noqa: ANN202 - returns an instance of message
    msg = message()
    try:
        msg.ParseFromString(data)
    except DecodeError as err:
        raise _malformed(f"{what}: {err}") from err
    return msg


def check_client_update_header(
    data: bytes,
    *,
    expected_spec: SpecLike,
    max_bytes: int | None = None,
    expected_metric_spec: SpecLike | None = None,
) -> UpdateHeader:
    """Validate a device upload like :func:`~fedcompute.learning.tensor_codec.decode_client_update`
    without parsing its tensor data: format version, example count, tensor names, dtypes,
    shapes and data lengths against ``expected_spec``, and the metric statistics (decoded:
    they are small). Raises InvalidRequestError (PayloadTooLargeError when oversized)."""
    spec = normalize_spec(expected_spec)
    raw = client_update_bytes(data, default_max_bytes(spec) if max_bytes is None else int(max_bytes))
    try:
        return _check(raw, spec, expected_metric_spec)
    except _Malformed as err:
        raise InvalidRequestError(
            f"upload is neither gzip nor a ClientUpdate protobuf ({err}; starts with {bytes(raw[:8])!r})",
            hint="upload the gzip'd ClientUpdate bytes from fedcompute.learning.tensor_codec",
        ) from err


def _check(raw: bytes, spec: tuple[TensorSpec, ...], expected_metric_spec: SpecLike | None) -> UpdateHeader:
    buf = memoryview(raw)
    top = _fields(buf)
    rest, deltas = _without(buf, top, _MODEL_DELTA)
    msg = _parse(tensors_pb2.ClientUpdate, rest, "client update")
    check_client_update_fields(msg, raw)
    if len(deltas) > 1:
        raise _malformed("model_delta occurs more than once")
    delta = deltas[0] if deltas else memoryview(b"")
    bundle_fields = _fields(delta)
    bundle_rest, tensors = _without(delta, bundle_fields, _TENSORS)
    bundle = _parse(tensors_pb2.TensorBundle, bundle_rest, "model_delta")
    lengths = []
    for tensor in tensors:
        tensor_rest, datas = _without(tensor, _fields(tensor), _DATA)
        if len(datas) > 1:
            raise _malformed("a tensor's data occurs more than once")
        bundle.tensors.append(_parse(tensors_pb2.TensorProto, tensor_rest, "model_delta tensor"))
        lengths.append(len(datas[0]) if datas else 0)
    check_bundle_header(bundle, expected_spec=spec, what="model_delta", data_lengths=lengths)
    if msg.HasField("metric_statistics"):
        metrics = bundle_from_proto(msg.metric_statistics, expected_spec=expected_metric_spec, what="metric_statistics")
    else:
        metrics = bundle_from_proto(tensors_pb2.TensorBundle(format_version=FORMAT_VERSION),
                                    expected_spec=expected_metric_spec, what="metric_statistics")
    return UpdateHeader(names=tuple(t.name for t in bundle.tensors), num_examples=int(msg.num_examples),
                        metric_statistics=dict(metrics), metadata=dict(msg.metadata))
