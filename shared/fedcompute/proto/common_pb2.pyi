from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResourceCompressionFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESOURCE_COMPRESSION_FORMAT_UNSPECIFIED: _ClassVar[ResourceCompressionFormat]
    RESOURCE_COMPRESSION_FORMAT_GZIP: _ClassVar[ResourceCompressionFormat]
RESOURCE_COMPRESSION_FORMAT_UNSPECIFIED: ResourceCompressionFormat
RESOURCE_COMPRESSION_FORMAT_GZIP: ResourceCompressionFormat

class ClientVersion(_message.Message):
    __slots__ = ("version_code",)
    VERSION_CODE_FIELD_NUMBER: _ClassVar[int]
    version_code: str
    def __init__(self, version_code: _Optional[str] = ...) -> None: ...

class ResourceCapabilities(_message.Message):
    __slots__ = ("supported_compression_formats", "supports_confidential_aggregation")
    SUPPORTED_COMPRESSION_FORMATS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_CONFIDENTIAL_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    supported_compression_formats: _containers.RepeatedScalarFieldContainer[ResourceCompressionFormat]
    supports_confidential_aggregation: bool
    def __init__(self, supported_compression_formats: _Optional[_Iterable[_Union[ResourceCompressionFormat, str]]] = ..., supports_confidential_aggregation: bool = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("uri", "inline_resource", "client_cache_id", "max_age", "compression_format")
    class InlineResource(_message.Message):
        __slots__ = ("data", "compression_format")
        DATA_FIELD_NUMBER: _ClassVar[int]
        COMPRESSION_FORMAT_FIELD_NUMBER: _ClassVar[int]
        data: bytes
        compression_format: ResourceCompressionFormat
        def __init__(self, data: _Optional[bytes] = ..., compression_format: _Optional[_Union[ResourceCompressionFormat, str]] = ...) -> None: ...
    URI_FIELD_NUMBER: _ClassVar[int]
    INLINE_RESOURCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CACHE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FORMAT_FIELD_NUMBER: _ClassVar[int]
    uri: str
    inline_resource: Resource.InlineResource
    client_cache_id: str
    max_age: _duration_pb2.Duration
    compression_format: ResourceCompressionFormat
    def __init__(self, uri: _Optional[str] = ..., inline_resource: _Optional[_Union[Resource.InlineResource, _Mapping]] = ..., client_cache_id: _Optional[str] = ..., max_age: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., compression_format: _Optional[_Union[ResourceCompressionFormat, str]] = ...) -> None: ...

class RejectionReason(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[RejectionReason.Enum]
        NO_TASK_AVAILABLE: _ClassVar[RejectionReason.Enum]
        UNAUTHORIZED: _ClassVar[RejectionReason.Enum]
        UNAUTHENTICATED: _ClassVar[RejectionReason.Enum]
        CLIENT_VERSION_MISMATCH: _ClassVar[RejectionReason.Enum]
        NO_ACTIVE_TASK_EXISTS: _ClassVar[RejectionReason.Enum]
    UNKNOWN: RejectionReason.Enum
    NO_TASK_AVAILABLE: RejectionReason.Enum
    UNAUTHORIZED: RejectionReason.Enum
    UNAUTHENTICATED: RejectionReason.Enum
    CLIENT_VERSION_MISMATCH: RejectionReason.Enum
    NO_ACTIVE_TASK_EXISTS: RejectionReason.Enum
    def __init__(self) -> None: ...

class RetryWindow(_message.Message):
    __slots__ = ("delay_min", "delay_max")
    DELAY_MIN_FIELD_NUMBER: _ClassVar[int]
    DELAY_MAX_FIELD_NUMBER: _ClassVar[int]
    delay_min: _duration_pb2.Duration
    delay_max: _duration_pb2.Duration
    def __init__(self, delay_min: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., delay_max: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AuthenticationMetadata(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RejectionInfo(_message.Message):
    __slots__ = ("reason", "retry_window", "auth_metadata")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    AUTH_METADATA_FIELD_NUMBER: _ClassVar[int]
    reason: RejectionReason.Enum
    retry_window: RetryWindow
    auth_metadata: AuthenticationMetadata
    def __init__(self, reason: _Optional[_Union[RejectionReason.Enum, str]] = ..., retry_window: _Optional[_Union[RetryWindow, _Mapping]] = ..., auth_metadata: _Optional[_Union[AuthenticationMetadata, _Mapping]] = ...) -> None: ...
