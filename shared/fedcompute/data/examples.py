"""The seed's two `tf.train.Example` layouts, and the parsing spec that devices use.

Input type 1 — the model's input spec is ``(features TensorSpec, label TensorSpec)``; each
example holds feature ``x`` (float_list, the features flattened) and ``y`` (int64_list).

Input type 2 — the input spec is ``(OrderedDict[name, TensorSpec], label TensorSpec)``; each
example holds one feature per name (float_list) and the label under the task config's
``label_name`` (int64_list).

(The list kind follows the dtype: floating → float_list, integer/bool → int64_list, so an
integer feature or a float regression label is encoded the way ``tf.io.parse_example``
expects it.)

:class:`ExampleSpec` is the small JSON-serializable description of such a layout that the
task builder derives from the model (:meth:`ExampleSpec.from_input_spec`) and stores in the
client plan; :func:`parse_examples` turns a batch of serialized examples back into tensors
shaped as the model's input spec (labels ``[batch, 1]`` int64 for the seed's spec).

Encoding (:func:`encode_examples`) and the reference decoder (:func:`decode_example`) are
pure numpy: they write the protobuf wire format directly, so producing a device's examples
neither imports TensorFlow nor builds a Python list per float. Only :func:`parse_examples`,
:meth:`ExampleSpec.feature_description` and :meth:`ExampleSpec.to_input_spec` import
TensorFlow, on call.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcompute.errors import ArtifactBuildError

TYPE1_FEATURE_NAME = "x"
TYPE1_LABEL_NAME = "y"
SPEC_FORMAT_VERSION = 1

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
INT_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"})

_SPARSE_HINT = ("TFLite does not support tf.sparse.SparseTensor or tf.RaggedTensor yet: "
                "build the model on dense tf.Tensor inputs with fixed per-example shapes")


class InputSpecError(ArtifactBuildError, ValueError):
    """The model's input spec cannot be fed from `tf.train.Example` (or a spec is malformed)."""


# --------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class FeatureSpec:
    """One `tf.train.Example` feature: its name, per-example shape (no batch dim), dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputSpecError(f"feature name must be a non-empty string, got {self.name!r}")
        try:
            shape = tuple(int(d) for d in self.shape)
        except (TypeError, ValueError) as err:
            raise InputSpecError(
                f"feature {self.name!r}: shape must be a list of non-negative ints, got "
                f"{self.shape!r}", hint="every dimension except the batch one must be fixed") from err
        if any(d < 0 for d in shape):
            raise InputSpecError(f"feature {self.name!r}: negative dimension in {shape}")
        object.__setattr__(self, "shape", shape)
        dtype = _dtype_name(self.dtype)
        if dtype not in FLOAT_DTYPES | INT_DTYPES:
            raise InputSpecError(
                f"feature {self.name!r}: dtype {dtype} cannot be stored in a tf.train.Example "
                "float_list/int64_list",
                hint=f"use one of {sorted(FLOAT_DTYPES | INT_DTYPES)}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def size(self) -> int:
        """Number of values per example."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def list_kind(self) -> str:
        """``"float_list"`` or ``"int64_list"``."""
        return "float_list" if self.dtype in FLOAT_DTYPES else "int64_list"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ExampleSpec:
    """How a model's batch is stored in, and parsed from, serialized `tf.train.Example`.

    ``input_type`` is 1 (one feature ``x``, label ``y``) or 2 (named features in the order of
    the model's OrderedDict, label under ``label.name``).
    """

    input_type: int
    features: tuple[FeatureSpec, ...]
    label: FeatureSpec

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        if self.input_type not in (1, 2):
            raise InputSpecError(f"input_type must be 1 or 2, got {self.input_type!r}")
        names = [f.name for f in self.features]
        if not names:
            raise InputSpecError("an ExampleSpec needs at least one feature")
        if self.input_type == 1 and (names != [TYPE1_FEATURE_NAME]
                                     or self.label.name != TYPE1_LABEL_NAME):
            raise InputSpecError(
                f"input type 1 stores one feature {TYPE1_FEATURE_NAME!r} and the label "
                f"{TYPE1_LABEL_NAME!r}; got features {names} and label {self.label.name!r}")
        if len(set(names)) != len(names):
            raise InputSpecError(f"duplicate feature names in {names}")
        if self.label.name in names:
            raise InputSpecError(
                f"label_name {self.label.name!r} is also a feature name",
                hint="choose a label_name that differs from every model input name")

    # ---- constructors
    @classmethod
    def type1(cls, feature_shape: Sequence[int], label_shape: Sequence[int] = (1,),
              feature_dtype: str = "float32", label_dtype: str = "int64") -> ExampleSpec:
        """Type 1 spec from per-example shapes (no batch dim), e.g. ``type1((28, 28, 1))``."""
        return cls(1, (FeatureSpec(TYPE1_FEATURE_NAME, tuple(feature_shape), feature_dtype),),
                   FeatureSpec(TYPE1_LABEL_NAME, tuple(label_shape), label_dtype))

    @classmethod
    def type2(cls, features: Mapping[str, tuple[Sequence[int], str]] | Iterable[tuple[str, Sequence[int], str]],
              label_name: str, label_shape: Sequence[int] = (1,),
              label_dtype: str = "int64") -> ExampleSpec:
        """Type 2 spec from an ordered ``name -> (shape, dtype)`` mapping (or triples)."""
        items: list[tuple[str, Sequence[int], str]] = (
            [(n, s, d) for n, (s, d) in features.items()] if isinstance(features, Mapping)
            else [(n, s, d) for n, s, d in features])
        return cls(2, tuple(FeatureSpec(n, tuple(s), d) for n, s, d in items),
                   FeatureSpec(_require_label_name(label_name), tuple(label_shape), label_dtype))

    @classmethod
    def from_input_spec(cls, input_spec: Any, label_name: str | None = None) -> ExampleSpec:
        """Derive the spec from a functional model's ``input_spec``.

        ``input_spec`` is ``(x, y)`` where ``x`` is a ``tf.TensorSpec`` (type 1) or a mapping
        name → ``tf.TensorSpec`` (type 2) and ``y`` the label ``tf.TensorSpec``. The first
        dimension of every spec is the batch dimension; all others must be fixed.
        ``label_name`` is required for type 2 and ignored for type 1 (whose label is ``y``).
        Sparse and ragged specs are rejected.
        """
        x_spec, y_spec = _split_input_spec(input_spec)
        if isinstance(x_spec, Mapping):
            if not x_spec:
                raise InputSpecError("the model's feature dict in input_spec is empty")
            name = _require_label_name(label_name)
            feats = []
            for key, spec in x_spec.items():
                if isinstance(spec, Mapping) or _is_sequence(spec):
                    raise InputSpecError(
                        f"input_spec feature {key!r} is nested; type 2 models take a flat "
                        "OrderedDict[name, tf.TensorSpec]")
                feats.append(_feature_from_tensor_spec(str(key), spec))
            return cls(2, tuple(feats), _feature_from_tensor_spec(name, y_spec))
        if _is_sequence(x_spec):
            raise InputSpecError(
                "the features part of input_spec is a sequence; use one tf.TensorSpec "
                "(input type 1) or an OrderedDict[name, tf.TensorSpec] (input type 2)")
        return cls(1, (_feature_from_tensor_spec(TYPE1_FEATURE_NAME, x_spec),),
                   _feature_from_tensor_spec(TYPE1_LABEL_NAME, y_spec))

    @classmethod
    def coerce(cls, value: ExampleSpec | Mapping[str, Any] | str | bytes) -> ExampleSpec:
        """An ExampleSpec from itself, its dict form or its JSON text."""
        if isinstance(value, ExampleSpec):
            return value
        if isinstance(value, (str, bytes)):
            return cls.from_json(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"cannot make an ExampleSpec from {type(value).__name__}")

    # ---- (de)serialization
    @property
    def label_name(self) -> str:
        return self.label.name

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def to_dict(self) -> dict[str, Any]:
        return {"version": SPEC_FORMAT_VERSION, "input_type": self.input_type,
                "features": [f.to_dict() for f in self.features], "label": self.label.to_dict()}

    def to_json(self) -> str:
        """Compact, key-sorted JSON (stable bytes for the plan)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExampleSpec:
        try:
            version = data.get("version", SPEC_FORMAT_VERSION)
            if version != SPEC_FORMAT_VERSION:
                raise InputSpecError(
                    f"ExampleSpec format version {version} is not supported (this build reads "
                    f"version {SPEC_FORMAT_VERSION})", hint="rebuild the task's artifacts")

            def feat(d: Mapping[str, Any]) -> FeatureSpec:
                return FeatureSpec(d["name"], tuple(d["shape"]), d["dtype"])

            return cls(int(data["input_type"]), tuple(feat(f) for f in data["features"]),
                       feat(data["label"]))
        except (KeyError, TypeError, AttributeError) as err:
            raise InputSpecError(f"malformed ExampleSpec {dict(data)!r}: missing or wrong field "
                                 f"{err}") from err

    @classmethod
    def from_json(cls, text: str | bytes) -> ExampleSpec:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise InputSpecError(f"ExampleSpec JSON does not parse: {err}") from err
        if not isinstance(data, Mapping):
            raise InputSpecError("ExampleSpec JSON must be an object")
        return cls.from_dict(data)

    # ---- TensorFlow views (TF imported on call)
    def feature_description(self) -> dict[str, Any]:
        """The ``tf.io.parse_example`` features dict (FixedLenFeature per name)."""
        import tensorflow as tf

        def fixed(f: FeatureSpec) -> Any:
            kind = tf.float32 if f.list_kind == "float_list" else tf.int64
            return tf.io.FixedLenFeature(shape=list(f.shape), dtype=kind)

        desc = {f.name: fixed(f) for f in self.features}
        desc[self.label.name] = fixed(self.label)
        return desc

    def to_input_spec(self, batch_size: int | None = None) -> tuple[Any, Any]:
        """The model input spec this layout feeds: ``(TensorSpec | OrderedDict, TensorSpec)``."""
        import tensorflow as tf

        def ts(f: FeatureSpec) -> Any:
            return tf.TensorSpec([batch_size, *f.shape], tf.dtypes.as_dtype(f.dtype))

        x = ts(self.features[0]) if self.input_type == 1 else OrderedDict(
            (f.name, ts(f)) for f in self.features)
        return x, ts(self.label)


def _require_label_name(label_name: str | None) -> str:
    if not label_name or not isinstance(label_name, str):
        raise InputSpecError(
            "input type 2 (a dict of features) needs label_name",
            hint='set label_name in the task config, e.g. label_name: "my_label"')
    return label_name


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (tuple, list))


def _split_input_spec(input_spec: Any) -> tuple[Any, Any]:
    if isinstance(input_spec, Mapping) and set(input_spec) == {"x", "y"}:
        return input_spec["x"], input_spec["y"]
    try:
        x_spec, y_spec = input_spec
    except (TypeError, ValueError) as err:
        raise InputSpecError(
            f"input_spec must be a pair (features, label), got {type(input_spec).__name__}",
            hint="type 1: (tf.TensorSpec, tf.TensorSpec); "
                 "type 2: (OrderedDict[name, tf.TensorSpec], tf.TensorSpec)") from err
    if isinstance(y_spec, Mapping) or _is_sequence(y_spec):
        raise InputSpecError("the label part of input_spec must be a single tf.TensorSpec")
    return x_spec, y_spec


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError as err:
        raise InputSpecError(f"unknown dtype {dtype!r}") from err


def _feature_from_tensor_spec(name: str, spec: Any) -> FeatureSpec:
    kind = type(spec).__name__
    if "Sparse" in kind or "Ragged" in kind:
        raise InputSpecError(f"input_spec {name!r} is a {kind}", hint=_SPARSE_HINT)
    shape = getattr(spec, "shape", None)
    dtype = getattr(spec, "dtype", None)
    if dtype is None or shape is None:
        raise InputSpecError(f"input_spec {name!r} is a {kind}, not a tf.TensorSpec")
    if shape is None or getattr(shape, "rank", 0) is None:
        raise InputSpecError(f"input_spec {name!r} has unknown rank",
                             hint="give the TensorSpec a full shape, e.g. [None, 28, 28, 1]")
    dims = list(shape.as_list() if hasattr(shape, "as_list") else shape)
    if not dims:
        raise InputSpecError(f"input_spec {name!r} is a scalar; its first dimension must be "
                             "the batch dimension, e.g. tf.TensorSpec([None, 1])")
    per_example = dims[1:]
    if any(d is None for d in per_example):
        raise InputSpecError(
            f"input_spec {name!r} has shape {dims}: only the batch (first) dimension may be None",
            hint="tf.train.Example features are fixed-length here; pad variable-length "
                 "features (ragged/sparse inputs are not supported by TFLite)")
    return FeatureSpec(name, tuple(int(d) for d in per_example), _dtype_name(dtype))


# --------------------------------------------------------------------------- encoding

def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 → two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varints(values: np.ndarray) -> bytes:
    """Concatenated varints of int64 values (vectorized)."""
    v = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64).ravel()
    if v.size == 0:
        return b""
    if int(v.max()) < 0x80:
        return v.astype(np.uint8).tobytes()
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = ((v[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)  # [n, 10]
    # Bytes per value: 1 + how many of 2^7, 2^14, ..., 2^63 it reaches.
    thresholds = np.uint64(1) << (np.arange(1, 10, dtype=np.uint64) * np.uint64(7))
    nbytes = 1 + (v[:, None] >= thresholds[None, :]).sum(axis=1)
    k = np.arange(10)
    keep = k[None, :] < nbytes[:, None]
    cont = k[None, :] < (nbytes[:, None] - 1)
    groups = groups | (cont.astype(np.uint8) << np.uint8(7))
    return groups[keep].tobytes()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited (wire type 2) field."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _feature_bytes(kind: str, values: np.ndarray) -> bytes:
    if kind == "float_list":
        packed = np.ascontiguousarray(values, dtype="<f4").tobytes()
        inner = _field(1, packed) if packed else b""
        return _field(2, inner)  # Feature.float_list = 2
    packed = _varints(values)
    inner = _field(1, packed) if packed else b""
    return _field(3, inner)  # Feature.int64_list = 3


def _example_bytes(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Example{features: Features{feature: map<string, Feature>}} from (key, Feature bytes)."""
    features = b"".join(_field(1, _field(1, key) + _field(2, feat)) for key, feat in entries)
    return _field(1, features)


def _values_per_example(name: str, array: Any, f: FeatureSpec, n: int | None) -> np.ndarray:
    a = np.asarray(array)
    if f.list_kind == "int64_list":
        if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(f"{name!r} is stored as int64_list but the data has dtype {a.dtype}")
    elif not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ValueError(f"{name!r} must be numeric, got dtype {a.dtype}")
    if a.ndim == 0 or (n is not None and a.shape[0] != n):
        raise ValueError(f"{name!r} has shape {a.shape}; expected {n} examples on axis 0")
    per = int(np.prod(a.shape[1:], dtype=np.int64))
    if per != f.size:
        raise ValueError(f"{name!r}: each example has {per} values ({a.shape[1:]}) but the spec "
                         f"says shape {f.shape} ({f.size} values)")
    return a.reshape(a.shape[0], per)


def encode_examples(spec: ExampleSpec | Mapping[str, Any] | str,
                    features: Any, labels: Any) -> list[bytes]:
    """Serialize N examples as `tf.train.Example` bytes in ``spec``'s layout.

    ``features``: type 1 — an array ``[N, ...]`` with ``prod(...) == prod(feature shape)``
    (it is flattened, as the seed's ``x`` float_list); type 2 — a mapping name → array
    ``[N, ...]`` with every feature of the spec. ``labels``: ``[N]`` or ``[N, *label shape]``.
    """
    spec = ExampleSpec.coerce(spec)
    y = np.asarray(labels)
    if y.ndim == 0:
        raise ValueError("labels must have one entry per example (shape [N, ...])")
    n = int(y.shape[0])
    if spec.input_type == 1:
        if isinstance(features, Mapping):
            raise ValueError("input type 1 takes one feature array, not a dict")
        columns = [_values_per_example(TYPE1_FEATURE_NAME, features, spec.features[0], n)]
    else:
        if not isinstance(features, Mapping):
            raise ValueError("input type 2 takes a dict name → array of features")
        missing = [f.name for f in spec.features if f.name not in features]
        extra = sorted(set(features) - set(spec.feature_names))
        if missing or extra:
            raise ValueError(f"features do not match the spec: missing {missing}, unexpected {extra}")
        columns = [_values_per_example(f.name, features[f.name], f, n) for f in spec.features]
    label_col = _values_per_example(spec.label.name, y.reshape(n, -1) if y.ndim == 1 else y,
                                    spec.label, n)
    fields = (*spec.features, spec.label)
    keys = [f.name.encode("utf-8") for f in fields]
    cols = (*columns, label_col)
    return [_example_bytes([(k, _feature_bytes(f.list_kind, c[i]))
                            for k, f, c in zip(keys, fields, cols)])
            for i in range(n)]


# --------------------------------------------------------------------------- decoding

def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in tf.train.Example bytes")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) over a message; length-delimited values are bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value = buf[pos:pos + length]
            if len(value) != length:
                raise ValueError("truncated field in tf.train.Example bytes")
            pos += length
        elif wire == 5:
            value = buf[pos:pos + 4]
            pos += 4
        elif wire == 1:
            value = buf[pos:pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def decode_example(serialized: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """Pure-numpy decoder: name → float32 / int64 array (or list of bytes for bytes_list)."""
    out: dict[str, np.ndarray | list[bytes]] = {}
    for num, _, features in _fields(serialized):
        if num != 1:
            continue
        for fnum, _, entry in _fields(features):
            if fnum != 1:
                continue
            key, feature = "", b""
            for enum, _, val in _fields(entry):
                if enum == 1:
                    key = val.decode("utf-8")
                elif enum == 2:
                    feature = val
            out[key] = _decode_feature(feature)
    return out


def _decode_feature(feature: bytes) -> np.ndarray | list[bytes]:
    for kind, _, lst in _fields(feature):
        if kind == 1:  # bytes_list
            return [v for n, _, v in _fields(lst) if n == 1]
        if kind == 2:  # float_list: packed (wire 2) or one fixed32 per value (wire 5)
            chunks = [v for n, _, v in _fields(lst) if n == 1]
            return np.frombuffer(b"".join(chunks), dtype="<f4").astype(np.float32)
        if kind == 3:  # int64_list: packed or one varint per value
            values: list[int] = []
            for n, wire, v in _fields(lst):
                if n != 1:
                    continue
                if wire == 0:
                    values.append(v)
                else:
                    pos = 0
                    while pos < len(v):
                        x, pos = _read_varint(v, pos)
                        values.append(x)
            return np.array(values, dtype=np.uint64).view(np.int64)
    return np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------- parsing (TF)

def parse_examples(serialized: Any, spec: ExampleSpec | Mapping[str, Any] | str) -> tuple[Any, Any]:
    """Parse a batch of serialized examples into the model's ``(x, y)`` batch.

    ``serialized`` is a list of bytes or a string tensor (any shape; it is flattened to
    ``[batch]``), so this also works inside ``tf.data`` maps and ``tf.function``. Returns
    ``x`` as a tensor ``[batch, *shape]`` (type 1) or an OrderedDict name → tensor (type 2),
    and ``y`` as ``[batch, *label shape]`` — ``[batch, 1]`` int64 for the seed's spec.
    """
    import tensorflow as tf

    spec = ExampleSpec.coerce(spec)
    serialized = tf.reshape(tf.convert_to_tensor(serialized, dtype=tf.string), [-1])
    parsed = tf.io.parse_example(serialized, spec.feature_description())

    def typed(f: FeatureSpec) -> Any:
        t = parsed[f.name]
        want = tf.dtypes.as_dtype(f.dtype)
        return t if t.dtype == want else tf.cast(t, want)

    if spec.input_type == 1:
        x: Any = typed(spec.features[0])
    else:
        x = OrderedDict((f.name, typed(f)) for f in spec.features)
    return x, typed(spec.label)
