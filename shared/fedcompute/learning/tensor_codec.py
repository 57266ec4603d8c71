"""Named numpy arrays <-> ``fedcompute.v1`` TensorBundle / ClientUpdate bytes.

numpy + protobuf only (no TensorFlow): result ingestion uses :func:`decode_client_update`
to validate a device upload before counting it, and the aggregator uses it to read the
upload back. Tensors are raw little-endian bytes in C order (see ``tensors.proto``).
Expected tensors are :class:`fedcompute.tensor_spec.TensorSpec` (or ``(name, shape, dtype)``
triples, normalized by :func:`normalize_spec`).

Upload decoding accepts gzip'd and plain bodies: GCS (and fake-gcs-server) may hand back
an object stored with ``Content-Encoding: gzip`` already decompressed, so the gzip magic
number decides, not the object metadata.
"""
from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError
from numpy.typing import DTypeLike

from fedcompute.errors import InvalidRequestError, InvariantError, PayloadTooLargeError
from fedcompute.proto import tensors_pb2
from fedcompute.tensor_spec import TensorSpec

FORMAT_VERSION = 1
# ClientUpdate metadata key a device sets to "1" when its training diverged (it uploads a
# zeroed delta, as TFF's client work does); the aggregator excludes and counts such updates.
NON_FINITE_METADATA_KEY = "non_finite"
GZIP_MAGIC = b"\x1f\x8b"
# Headroom over the model delta's own size for metric statistics, metadata and framing.
DEFAULT_OVERHEAD_BYTES = 16 * 1024 * 1024

_DTYPE_TO_PROTO: dict[np.dtype, tensors_pb2.DType] = {
    np.dtype("float32"): tensors_pb2.DTYPE_FLOAT32,
    np.dtype("float64"): tensors_pb2.DTYPE_FLOAT64,
    np.dtype("int32"): tensors_pb2.DTYPE_INT32,
    np.dtype("int64"): tensors_pb2.DTYPE_INT64,
    np.dtype("float16"): tensors_pb2.DTYPE_FLOAT16,
    np.dtype("uint8"): tensors_pb2.DTYPE_UINT8,
    np.dtype("int8"): tensors_pb2.DTYPE_INT8,
    np.dtype("bool"): tensors_pb2.DTYPE_BOOL,
}
_PROTO_TO_DTYPE: dict[int, np.dtype] = {v: k.newbyteorder("<") for k, v in _DTYPE_TO_PROTO.items()}


SpecLike = Iterable[TensorSpec | tuple[str, Sequence[int], DTypeLike]]
NamedArrays = Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]


def normalize_spec(spec: SpecLike) -> tuple[TensorSpec, ...]:
    """``spec`` as TensorSpecs with tuple shapes and canonical dtype names; names must be unique."""
    out = tuple(TensorSpec(str(n), tuple(int(d) for d in s), np.dtype(t).name) for n, s, t in spec)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise InvariantError(f"tensor names must be unique, got {names}")
    return out


def spec_of(named: NamedArrays) -> tuple[TensorSpec, ...]:
    """The TensorSpecs of named arrays, in order."""
    return normalize_spec((n, np.shape(a), np.asarray(a).dtype) for n, a in _items(named))


def spec_nbytes(spec: SpecLike) -> int:
    """Bytes of raw tensor data described by ``spec``."""
    return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in normalize_spec(spec))


def default_max_bytes(spec: SpecLike) -> int:
    """Upload size cap for a model delta of ``spec``: its raw size plus 16 MiB of headroom."""
    return spec_nbytes(spec) + DEFAULT_OVERHEAD_BYTES


def _items(named: NamedArrays) -> list[tuple[str, np.ndarray]]:
    return list(named.items()) if isinstance(named, Mapping) else list(named)


# --------------------------------------------------------------------------- tensors


def tensor_to_proto(name: str, array: np.ndarray) -> tensors_pb2.TensorProto:
    """One named array as a TensorProto (little-endian, C order)."""
    arr = np.asarray(array)
    try:
        code = _DTYPE_TO_PROTO[arr.dtype.newbyteorder("=")]
    except KeyError:
        raise InvariantError(
            f"tensor {name!r} has unsupported dtype {arr.dtype}; "
            f"supported: {', '.join(sorted(d.name for d in _DTYPE_TO_PROTO))}"
        ) from None
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    return tensors_pb2.TensorProto(name=name, dtype=code, shape=list(arr.shape), data=data)


def tensor_from_proto(tensor: tensors_pb2.TensorProto, *, what: str = "tensor") -> np.ndarray:
    """A read-only numpy view of a TensorProto's data, after checking dtype, shape and length."""
    dtype, shape = check_tensor_header(tensor, len(tensor.data), what=what)
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def check_tensor_header(tensor: tensors_pb2.TensorProto, data_length: int, *,
                        what: str = "tensor") -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of a TensorProto whose data is ``data_length`` bytes, checked to agree."""
    label = f"{what} {tensor.name!r}"
    dtype = _PROTO_TO_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise InvalidRequestError(
            f"{label} has unknown dtype code {tensor.dtype}",
            hint=f"use one of {', '.join(tensors_pb2.DType.keys()[1:])}",
        )
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"{label} has a negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if data_length != expected:
        raise InvalidRequestError(
            f"{label} has {data_length} bytes of data, expected {expected} "
            f"for shape {list(shape)} and dtype {dtype.name}",
            hint="data must be the raw little-endian elements in C order",
        )
    return dtype, shape


# --------------------------------------------------------------------------- bundles


def bundle_to_proto(named: NamedArrays, metadata: Mapping[str, str] | None = None) -> tensors_pb2.TensorBundle:
    """Named arrays (ordered) as a TensorBundle."""
    items = _items(named)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise InvariantError(f"tensor names must be unique, got {names}")
    bundle = tensors_pb2.TensorBundle(format_version=FORMAT_VERSION)
    bundle.tensors.extend(tensor_to_proto(n, a) for n, a in items)
    bundle.metadata.update(metadata or {})
    return bundle


def bundle_from_proto(
    bundle: tensors_pb2.TensorBundle,
    *,
    expected_spec: SpecLike | None = None,
    what: str = "bundle",
) -> list[tuple[str, np.ndarray]]:
    """The bundle's named arrays, checked against ``expected_spec`` (count, names, shapes, dtypes)."""
    check_bundle_header(bundle, expected_spec=expected_spec, what=what)
    return [(t.name, np.frombuffer(t.data, dtype=_PROTO_TO_DTYPE[t.dtype]).reshape(tuple(t.shape)))
            for t in bundle.tensors]


def check_bundle_header(
    bundle: tensors_pb2.TensorBundle,
    *,
    expected_spec: SpecLike | None = None,
    what: str = "bundle",
    data_lengths: Sequence[int] | None = None,
) -> None:
    """:func:`bundle_from_proto`'s checks without reading the data: ``data_lengths`` (one per
    tensor) stands for the tensors' data when it was not parsed (header-only validation)."""
    if bundle.format_version != FORMAT_VERSION:
        raise InvalidRequestError(
            f"{what} has format_version {bundle.format_version}, this server reads {FORMAT_VERSION}",
            hint="re-encode it with fedcompute.learning.tensor_codec",
        )
    names = [t.name for t in bundle.tensors]
    if len(set(names)) != len(names) or "" in names:
        raise InvalidRequestError(f"{what} tensor names must be non-empty and unique, got {names}")
    if expected_spec is not None:
        spec = normalize_spec(expected_spec)
        if len(spec) != len(names):
            raise InvalidRequestError(
                f"{what} has {len(names)} tensors, expected {len(spec)} ({[s.name for s in spec]})",
                hint="the update must hold one tensor per trainable weight, in model order",
            )
        for tensor, s in zip(bundle.tensors, spec):
            if tensor.name != s.name:
                raise InvalidRequestError(
                    f"{what} has tensor {tensor.name!r} where {s.name!r} was expected",
                    hint=f"expected names in order: {[x.name for x in spec]}",
                )
            dtype = _PROTO_TO_DTYPE.get(tensor.dtype)
            if dtype is None or dtype.name != s.dtype:
                got = dtype.name if dtype is not None else f"code {tensor.dtype}"
                raise InvalidRequestError(f"{what} tensor {s.name!r} has dtype {got}, expected {s.dtype}")
            if tuple(tensor.shape) != s.shape:
                raise InvalidRequestError(
                    f"{what} tensor {s.name!r} has shape {list(tensor.shape)}, expected {list(s.shape)}"
                )
    for i, tensor in enumerate(bundle.tensors):
        check_tensor_header(tensor, len(tensor.data) if data_lengths is None else data_lengths[i],
                            what=f"{what} tensor")


def encode_bundle(named: NamedArrays, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialized TensorBundle bytes (not compressed)."""
    return bundle_to_proto(named, metadata).SerializeToString(deterministic=True)


def decode_bundle(
    data: bytes, *, expected_spec: SpecLike | None = None
) -> tuple[list[tuple[str, np.ndarray]], dict[str, str]]:
    """(named arrays, metadata) from TensorBundle bytes."""
    bundle = tensors_pb2.TensorBundle()
    try:
        bundle.ParseFromString(data)
    except DecodeError as err:
        raise InvalidRequestError(f"not a TensorBundle protobuf: {err}") from err
    return bundle_from_proto(bundle, expected_spec=expected_spec), dict(bundle.metadata)


# --------------------------------------------------------------------------- gzip


def gunzip_capped(data: bytes, *, max_bytes: int) -> bytes:
    """Decompress a (possibly multi-member) gzip stream, refusing to produce more than ``max_bytes``.

    The cap is enforced while inflating, so a decompression bomb costs at most ``max_bytes``.
    """
    chunks: list[bytes] = []
    total = 0
    rest = memoryview(data)
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
        buf: bytes | memoryview = rest
        try:
            while True:
                chunk = inflater.decompress(buf, max_bytes + 1 - total)
                total += len(chunk)
                if total > max_bytes:
                    raise PayloadTooLargeError(
                        f"upload decompresses to more than {max_bytes} bytes",
                        hint="the update is larger than the model allows, or a decompression bomb",
                    )
                chunks.append(chunk)
                if inflater.eof:
                    break
                buf = inflater.unconsumed_tail
                if not buf:
                    raise InvalidRequestError("upload is a truncated gzip stream", hint="re-upload the whole file")
        except zlib.error as err:
            raise InvalidRequestError(f"upload is not a valid gzip stream: {err}") from err
        rest = memoryview(inflater.unused_data)
        if not rest or bytes(rest[:2]) != GZIP_MAGIC:
            if any(rest):  # gzip writers may pad with zeros; anything else is garbage
                raise InvalidRequestError("upload has trailing bytes after the gzip stream")
            return b"".join(chunks)


# --------------------------------------------------------------------------- client updates


@dataclass(frozen=True)
class ClientUpdate:
    """A decoded device update: read-only views over the upload's bytes.

    ``delta`` follows ``names`` (the model's trainable weights, in order) and is
    trained-minus-initial weights. Non-finite values are allowed here (the aggregator
    excludes and counts them): check :meth:`is_finite`.
    """

    names: tuple[str, ...]
    delta: tuple[np.ndarray, ...]
    num_examples: int
    metric_statistics: Mapping[str, np.ndarray] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def is_finite(self) -> bool:
        """True when every element of the model delta is finite."""
        return all(bool(np.isfinite(a).all()) for a in self.delta if a.dtype.kind == "f")

    def metrics_finite(self) -> bool:
        """True when every metric statistic is finite."""
        return all(bool(np.isfinite(a).all()) for a in self.metric_statistics.values() if a.dtype.kind == "f")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.delta)

    @classmethod
    def from_arrays(
        cls,
        delta: NamedArrays,
        num_examples: int,
        metric_statistics: Mapping[str, np.ndarray] | None = None,
    ) -> ClientUpdate:
        """An in-memory update (tests, benchmarks, the simulator) without encoding."""
        items = _items(delta)
        return cls(
            names=tuple(n for n, _ in items),
            delta=tuple(np.asarray(a) for _, a in items),
            num_examples=int(num_examples),
            metric_statistics={k: np.asarray(v) for k, v in (metric_statistics or {}).items()},
        )


def encode_client_update(
    delta: NamedArrays,
    num_examples: int,
    metric_statistics: Mapping[str, np.ndarray] | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    compress: bool = True,
    compresslevel: int = 6,
) -> bytes:
    """A device upload: the ClientUpdate protobuf, gzip'd unless ``compress`` is False.

    ``delta`` is trained-minus-initial weights, one named array per trainable weight in
    model order. The gzip header carries no timestamp, so equal inputs give equal bytes.
    """
    if int(num_examples) <= 0:
        raise InvariantError(f"num_examples must be > 0, got {num_examples}")
    msg = tensors_pb2.ClientUpdate(format_version=FORMAT_VERSION, num_examples=int(num_examples))
    msg.model_delta.CopyFrom(bundle_to_proto(delta))
    msg.metric_statistics.CopyFrom(bundle_to_proto(sorted((metric_statistics or {}).items())))
    msg.metadata.update(metadata or {})
    raw = msg.SerializeToString(deterministic=True)
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0) if compress else raw


def client_update_bytes(data: bytes, cap: int) -> bytes:
    """The ClientUpdate protobuf bytes of an upload (gunzipped if gzip'd), at most ``cap`` bytes."""
    if len(data) > cap:
        raise PayloadTooLargeError(f"upload is {len(data)} bytes, more than the {cap} allowed")
    raw = gunzip_capped(data, max_bytes=cap) if bytes(data[:2]) == GZIP_MAGIC else data
    if bytes(raw[:1]) == b"{":
        raise InvalidRequestError(
            "upload is JSON, not a ClientUpdate protobuf (an encrypted ODP payload?)",
            hint="fedcompute accepts the gzip'd ClientUpdate bytes; encrypted uploads are not supported",
        )
    return raw


def check_client_update_fields(msg: tensors_pb2.ClientUpdate, raw: bytes) -> None:
    """The ClientUpdate's format version and example count are ones this server reads."""
    if msg.format_version != FORMAT_VERSION:
        if msg.format_version == 0:
            raise InvalidRequestError(
                f"upload is not a fedcompute ClientUpdate (no format_version; starts with {bytes(raw[:8])!r})",
                hint="upload the gzip'd ClientUpdate bytes from fedcompute.learning.tensor_codec",
            )
        raise InvalidRequestError(
            f"ClientUpdate has format_version {msg.format_version}, this server reads {FORMAT_VERSION}",
            hint="update the client to a version that speaks this server's format",
        )
    if msg.num_examples <= 0:
        raise InvalidRequestError(
            f"ClientUpdate reports {msg.num_examples} examples; an update must come from at least one example",
            hint="report FAILED_EXAMPLE_GENERATION instead of uploading when a device has no data",
        )


def decode_client_update(
    data: bytes,
    *,
    expected_spec: SpecLike,
    max_bytes: int | None = None,
    expected_metric_spec: SpecLike | None = None,
) -> ClientUpdate:
    """Validate and decode a device upload (gzip'd or already decompressed ClientUpdate bytes).

    ``expected_spec`` is the model's trainable weights ``[(name, shape, dtype), ...]``;
    ``max_bytes`` caps both the stored and the decompressed size (default: the delta's raw
    size + 16 MiB). Raises InvalidRequestError (PayloadTooLargeError when oversized) that
    says what is wrong; non-finite values are not an error.
    """
    spec = normalize_spec(expected_spec)
    raw = client_update_bytes(data, default_max_bytes(spec) if max_bytes is None else int(max_bytes))
    msg = tensors_pb2.ClientUpdate()
    try:
        msg.ParseFromString(raw)
    except DecodeError as err:
        raise InvalidRequestError(
            f"upload is neither gzip nor a ClientUpdate protobuf (starts with {bytes(raw[:8])!r})",
            hint="upload the gzip'd ClientUpdate bytes from fedcompute.learning.tensor_codec",
        ) from err
    check_client_update_fields(msg, raw)
    delta = bundle_from_proto(msg.model_delta, expected_spec=spec, what="model_delta")
    if msg.HasField("metric_statistics"):
        metrics = bundle_from_proto(msg.metric_statistics, expected_spec=expected_metric_spec, what="metric_statistics")
    else:  # a client that computes no metrics may leave the field out
        metrics = bundle_from_proto(
            tensors_pb2.TensorBundle(format_version=FORMAT_VERSION),
            expected_spec=expected_metric_spec,
            what="metric_statistics",
        )
    return ClientUpdate(
        names=tuple(n for n, _ in delta),
        delta=tuple(a for _, a in delta),
        num_examples=int(msg.num_examples),
        metric_statistics=dict(metrics),
        metadata=dict(msg.metadata),
    )
