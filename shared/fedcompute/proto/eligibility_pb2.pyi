from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EligibilityPolicyEvalSpec(_message.Message):
    __slots__ = ("name", "min_version", "data_availability_policy", "swor_policy", "tf_custom_policy", "min_sep_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_AVAILABILITY_POLICY_FIELD_NUMBER: _ClassVar[int]
    SWOR_POLICY_FIELD_NUMBER: _ClassVar[int]
    TF_CUSTOM_POLICY_FIELD_NUMBER: _ClassVar[int]
    MIN_SEP_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    min_version: int
    data_availability_policy: DataAvailabilityPolicy
    swor_policy: SamplingWithoutReplacementPolicy
    tf_custom_policy: TfCustomPolicy
    min_sep_policy: MinimumSeparationPolicy
    def __init__(self, name: _Optional[str] = ..., min_version: _Optional[int] = ..., data_availability_policy: _Optional[_Union[DataAvailabilityPolicy, _Mapping]] = ..., swor_policy: _Optional[_Union[SamplingWithoutReplacementPolicy, _Mapping]] = ..., tf_custom_policy: _Optional[_Union[TfCustomPolicy, _Mapping]] = ..., min_sep_policy: _Optional[_Union[MinimumSeparationPolicy, _Mapping]] = ...) -> None: ...

class MinimumSeparationPolicy(_message.Message):
    __slots__ = ("current_index", "minimum_separation")
    CURRENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_SEPARATION_FIELD_NUMBER: _ClassVar[int]
    current_index: int
    minimum_separation: int
    def __init__(self, current_index: _Optional[int] = ..., minimum_separation: _Optional[int] = ...) -> None: ...

class DataAvailabilityPolicy(_message.Message):
    __slots__ = ("selector", "min_example_count")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MIN_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    selector: ExampleSelector
    min_example_count: int
    def __init__(self, selector: _Optional[_Union[ExampleSelector, _Mapping]] = ..., min_example_count: _Optional[int] = ...) -> None: ...

class ExampleSelector(_message.Message):
    __slots__ = ("criteria", "collection_uri", "resumption_token")
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_URI_FIELD_NUMBER: _ClassVar[int]
    RESUMPTION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    criteria: _any_pb2.Any
    collection_uri: str
    resumption_token: _any_pb2.Any
    def __init__(self, criteria: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., collection_uri: _Optional[str] = ..., resumption_token: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class SamplingWithoutReplacementPolicy(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TfCustomPolicy(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EligibilityTaskInfo(_message.Message):
    __slots__ = ("eligibility_policies",)
    ELIGIBILITY_POLICIES_FIELD_NUMBER: _ClassVar[int]
    eligibility_policies: _containers.RepeatedCompositeFieldContainer[EligibilityPolicyEvalSpec]
    def __init__(self, eligibility_policies: _Optional[_Iterable[_Union[EligibilityPolicyEvalSpec, _Mapping]]] = ...) -> None: ...
