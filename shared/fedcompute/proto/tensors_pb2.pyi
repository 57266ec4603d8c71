from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT16: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_BOOL: DType

class TensorProto(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorBundle(_message.Message):
    __slots__ = ("format_version", "tensors", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorProto]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, format_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorProto, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ClientUpdate(_message.Message):
    __slots__ = ("format_version", "model_delta", "num_examples", "metric_statistics", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DELTA_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRIC_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    model_delta: TensorBundle
    num_examples: int
    metric_statistics: TensorBundle
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, format_version: _Optional[int] = ..., model_delta: _Optional[_Union[TensorBundle, _Mapping]] = ..., num_examples: _Optional[int] = ..., metric_statistics: _Optional[_Union[TensorBundle, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DpStateInfo(_message.Message):
    __slots__ = ("mechanism", "clip_norm", "noise_multiplier", "release_count", "has_last_seed", "last_seed", "scalars")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    RELEASE_COUNT_FIELD_NUMBER: _ClassVar[int]
    HAS_LAST_SEED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEED_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    mechanism: str
    clip_norm: float
    noise_multiplier: float
    release_count: int
    has_last_seed: bool
    last_seed: int
    scalars: _containers.ScalarMap[str, float]
    def __init__(self, mechanism: _Optional[str] = ..., clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., release_count: _Optional[int] = ..., has_last_seed: bool = ..., last_seed: _Optional[int] = ..., scalars: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("format_version", "round", "model_weights", "optimizer_state", "dp_state", "dp_info", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    DP_STATE_FIELD_NUMBER: _ClassVar[int]
    DP_INFO_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    round: int
    model_weights: TensorBundle
    optimizer_state: TensorBundle
    dp_state: TensorBundle
    dp_info: DpStateInfo
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, format_version: _Optional[int] = ..., round: _Optional[int] = ..., model_weights: _Optional[_Union[TensorBundle, _Mapping]] = ..., optimizer_state: _Optional[_Union[TensorBundle, _Mapping]] = ..., dp_state: _Optional[_Union[TensorBundle, _Mapping]] = ..., dp_info: _Optional[_Union[DpStateInfo, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
