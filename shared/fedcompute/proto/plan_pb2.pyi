from fedcompute.proto import eligibility_pb2 as _eligibility_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorShape(_message.Message):
    __slots__ = ("dim", "unknown_rank")
    class Dim(_message.Message):
        __slots__ = ("size", "name")
        SIZE_FIELD_NUMBER: _ClassVar[int]
        NAME_FIELD_NUMBER: _ClassVar[int]
        size: int
        name: str
        def __init__(self, size: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...
    DIM_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_RANK_FIELD_NUMBER: _ClassVar[int]
    dim: _containers.RepeatedCompositeFieldContainer[TensorShape.Dim]
    unknown_rank: bool
    def __init__(self, dim: _Optional[_Iterable[_Union[TensorShape.Dim, _Mapping]]] = ..., unknown_rank: bool = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: TensorShape
    dtype: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Union[TensorShape, _Mapping]] = ..., dtype: _Optional[int] = ...) -> None: ...

class TensorflowSpec(_message.Message):
    __slots__ = ("dataset_token_tensor_name", "input_tensor_specs", "output_tensor_specs", "target_node_names", "example_selector")
    DATASET_TOKEN_TENSOR_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_TENSOR_SPECS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TENSOR_SPECS_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_NAMES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    dataset_token_tensor_name: str
    input_tensor_specs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    output_tensor_specs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    target_node_names: _containers.RepeatedScalarFieldContainer[str]
    example_selector: _eligibility_pb2.ExampleSelector
    def __init__(self, dataset_token_tensor_name: _Optional[str] = ..., input_tensor_specs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., output_tensor_specs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., target_node_names: _Optional[_Iterable[str]] = ..., example_selector: _Optional[_Union[_eligibility_pb2.ExampleSelector, _Mapping]] = ...) -> None: ...

class FederatedComputeIORouter(_message.Message):
    __slots__ = ("input_filepath_tensor_name", "output_filepath_tensor_name")
    INPUT_FILEPATH_TENSOR_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FILEPATH_TENSOR_NAME_FIELD_NUMBER: _ClassVar[int]
    input_filepath_tensor_name: str
    output_filepath_tensor_name: str
    def __init__(self, input_filepath_tensor_name: _Optional[str] = ..., output_filepath_tensor_name: _Optional[str] = ...) -> None: ...

class ClientPhase(_message.Message):
    __slots__ = ("tensorflow_spec", "federated_compute")
    TENSORFLOW_SPEC_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_COMPUTE_FIELD_NUMBER: _ClassVar[int]
    tensorflow_spec: TensorflowSpec
    federated_compute: FederatedComputeIORouter
    def __init__(self, tensorflow_spec: _Optional[_Union[TensorflowSpec, _Mapping]] = ..., federated_compute: _Optional[_Union[FederatedComputeIORouter, _Mapping]] = ...) -> None: ...

class ClientOnlyPlan(_message.Message):
    __slots__ = ("graph", "phase", "tflite_graph", "fedcompute_plan", "flex_ops", "tflite_graph_sha256")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TFLITE_GRAPH_FIELD_NUMBER: _ClassVar[int]
    FEDCOMPUTE_PLAN_FIELD_NUMBER: _ClassVar[int]
    FLEX_OPS_FIELD_NUMBER: _ClassVar[int]
    TFLITE_GRAPH_SHA256_FIELD_NUMBER: _ClassVar[int]
    graph: bytes
    phase: ClientPhase
    tflite_graph: bytes
    fedcompute_plan: bytes
    flex_ops: _containers.RepeatedScalarFieldContainer[str]
    tflite_graph_sha256: bytes
    def __init__(self, graph: _Optional[bytes] = ..., phase: _Optional[_Union[ClientPhase, _Mapping]] = ..., tflite_graph: _Optional[bytes] = ..., fedcompute_plan: _Optional[bytes] = ..., flex_ops: _Optional[_Iterable[str]] = ..., tflite_graph_sha256: _Optional[bytes] = ...) -> None: ...
