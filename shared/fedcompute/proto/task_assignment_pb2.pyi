from fedcompute.proto import common_pb2 as _common_pb2
from fedcompute.proto import eligibility_pb2 as _eligibility_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateTaskAssignmentRequest(_message.Message):
    __slots__ = ("client_version", "resource_capabilities", "device_auth")
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_AUTH_FIELD_NUMBER: _ClassVar[int]
    client_version: _common_pb2.ClientVersion
    resource_capabilities: _common_pb2.ResourceCapabilities
    device_auth: DeviceAuth
    def __init__(self, client_version: _Optional[_Union[_common_pb2.ClientVersion, _Mapping]] = ..., resource_capabilities: _Optional[_Union[_common_pb2.ResourceCapabilities, _Mapping]] = ..., device_auth: _Optional[_Union[DeviceAuth, _Mapping]] = ...) -> None: ...

class DeviceAuth(_message.Message):
    __slots__ = ("public_key", "timestamp_ms", "nonce", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UploadEncryption(_message.Message):
    __slots__ = ("key_id", "public_key", "required")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_key: bytes
    required: bool
    def __init__(self, key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., required: bool = ...) -> None: ...

class CreateTaskAssignmentResponse(_message.Message):
    __slots__ = ("task_assignment", "rejection_info")
    TASK_ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    REJECTION_INFO_FIELD_NUMBER: _ClassVar[int]
    task_assignment: TaskAssignment
    rejection_info: _common_pb2.RejectionInfo
    def __init__(self, task_assignment: _Optional[_Union[TaskAssignment, _Mapping]] = ..., rejection_info: _Optional[_Union[_common_pb2.RejectionInfo, _Mapping]] = ...) -> None: ...

class TaskAssignment(_message.Message):
    __slots__ = ("population_name", "task_id", "aggregation_id", "assignment_id", "task_name", "init_checkpoint", "plan", "self_uri", "eligibility_task_info", "eligibility_task_info_signature", "upload_encryption")
    POPULATION_NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    INIT_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SELF_URI_FIELD_NUMBER: _ClassVar[int]
    ELIGIBILITY_TASK_INFO_FIELD_NUMBER: _ClassVar[int]
    ELIGIBILITY_TASK_INFO_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    population_name: str
    task_id: str
    aggregation_id: str
    assignment_id: str
    task_name: str
    init_checkpoint: _common_pb2.Resource
    plan: _common_pb2.Resource
    self_uri: str
    eligibility_task_info: _eligibility_pb2.EligibilityTaskInfo
    eligibility_task_info_signature: EligibilityTaskInfoSignature
    upload_encryption: UploadEncryption
    def __init__(self, population_name: _Optional[str] = ..., task_id: _Optional[str] = ..., aggregation_id: _Optional[str] = ..., assignment_id: _Optional[str] = ..., task_name: _Optional[str] = ..., init_checkpoint: _Optional[_Union[_common_pb2.Resource, _Mapping]] = ..., plan: _Optional[_Union[_common_pb2.Resource, _Mapping]] = ..., self_uri: _Optional[str] = ..., eligibility_task_info: _Optional[_Union[_eligibility_pb2.EligibilityTaskInfo, _Mapping]] = ..., eligibility_task_info_signature: _Optional[_Union[EligibilityTaskInfoSignature, _Mapping]] = ..., upload_encryption: _Optional[_Union[UploadEncryption, _Mapping]] = ...) -> None: ...

class EligibilityTaskInfoSignature(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportResultRequest(_message.Message):
    __slots__ = ("result", "resource_capabilities", "device_auth")
    class Result(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[ReportResultRequest.Result]
        COMPLETED: _ClassVar[ReportResultRequest.Result]
        FAILED: _ClassVar[ReportResultRequest.Result]
        NOT_ELIGIBLE: _ClassVar[ReportResultRequest.Result]
        FAILED_EXAMPLE_GENERATION: _ClassVar[ReportResultRequest.Result]
        FAILED_MODEL_COMPUTATION: _ClassVar[ReportResultRequest.Result]
        FAILED_OPS_ERROR: _ClassVar[ReportResultRequest.Result]
    UNKNOWN: ReportResultRequest.Result
    COMPLETED: ReportResultRequest.Result
    FAILED: ReportResultRequest.Result
    NOT_ELIGIBLE: ReportResultRequest.Result
    FAILED_EXAMPLE_GENERATION: ReportResultRequest.Result
    FAILED_MODEL_COMPUTATION: ReportResultRequest.Result
    FAILED_OPS_ERROR: ReportResultRequest.Result
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_AUTH_FIELD_NUMBER: _ClassVar[int]
    result: ReportResultRequest.Result
    resource_capabilities: _common_pb2.ResourceCapabilities
    device_auth: DeviceAuth
    def __init__(self, result: _Optional[_Union[ReportResultRequest.Result, str]] = ..., resource_capabilities: _Optional[_Union[_common_pb2.ResourceCapabilities, _Mapping]] = ..., device_auth: _Optional[_Union[DeviceAuth, _Mapping]] = ...) -> None: ...

class ReportResultResponse(_message.Message):
    __slots__ = ("upload_instruction", "rejection_info")
    UPLOAD_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    REJECTION_INFO_FIELD_NUMBER: _ClassVar[int]
    upload_instruction: UploadInstruction
    rejection_info: _common_pb2.RejectionInfo
    def __init__(self, upload_instruction: _Optional[_Union[UploadInstruction, _Mapping]] = ..., rejection_info: _Optional[_Union[_common_pb2.RejectionInfo, _Mapping]] = ...) -> None: ...

class UploadInstruction(_message.Message):
    __slots__ = ("upload_location", "extra_request_headers", "compression_format")
    class ExtraRequestHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPLOAD_LOCATION_FIELD_NUMBER: _ClassVar[int]
    EXTRA_REQUEST_HEADERS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FORMAT_FIELD_NUMBER: _ClassVar[int]
    upload_location: str
    extra_request_headers: _containers.ScalarMap[str, str]
    compression_format: _common_pb2.ResourceCompressionFormat
    def __init__(self, upload_location: _Optional[str] = ..., extra_request_headers: _Optional[_Mapping[str, str]] = ..., compression_format: _Optional[_Union[_common_pb2.ResourceCompressionFormat, str]] = ...) -> None: ...
