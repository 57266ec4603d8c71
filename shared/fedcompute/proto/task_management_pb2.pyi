from google.protobuf import timestamp_pb2 as _timestamp_pb2
from fedcompute.proto import eligibility_pb2 as _eligibility_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[TaskStatus.Enum]
        OPEN: _ClassVar[TaskStatus.Enum]
        COMPLETED: _ClassVar[TaskStatus.Enum]
        CREATED: _ClassVar[TaskStatus.Enum]
        CANCELED: _ClassVar[TaskStatus.Enum]
        FAILED: _ClassVar[TaskStatus.Enum]
    UNKNOWN: TaskStatus.Enum
    OPEN: TaskStatus.Enum
    COMPLETED: TaskStatus.Enum
    CREATED: TaskStatus.Enum
    CANCELED: TaskStatus.Enum
    FAILED: TaskStatus.Enum
    def __init__(self) -> None: ...

class Task(_message.Message):
    __slots__ = ("population_name", "task_id", "total_iteration", "min_aggregation_size", "max_aggregation_size", "status", "created_time", "started_time", "stop_time", "start_task_no_earlier_than", "do_not_create_iteration_after", "max_parallel", "correlation_id", "min_client_version", "max_client_version", "client_only_plan_url", "server_phase_url", "init_checkpoint_url", "metrics_url", "info", "status_reason", "current_round", "epsilon_spent", "population_size")
    POPULATION_NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITERATION_FIELD_NUMBER: _ClassVar[int]
    MIN_AGGREGATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_AGGREGATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    STARTED_TIME_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TASK_NO_EARLIER_THAN_FIELD_NUMBER: _ClassVar[int]
    DO_NOT_CREATE_ITERATION_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ONLY_PLAN_URL_FIELD_NUMBER: _ClassVar[int]
    SERVER_PHASE_URL_FIELD_NUMBER: _ClassVar[int]
    INIT_CHECKPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    population_name: str
    task_id: int
    total_iteration: int
    min_aggregation_size: int
    max_aggregation_size: int
    status: TaskStatus.Enum
    created_time: _timestamp_pb2.Timestamp
    started_time: _timestamp_pb2.Timestamp
    stop_time: _timestamp_pb2.Timestamp
    start_task_no_earlier_than: _timestamp_pb2.Timestamp
    do_not_create_iteration_after: _timestamp_pb2.Timestamp
    max_parallel: int
    correlation_id: str
    min_client_version: str
    max_client_version: str
    client_only_plan_url: _containers.RepeatedScalarFieldContainer[str]
    server_phase_url: _containers.RepeatedScalarFieldContainer[str]
    init_checkpoint_url: _containers.RepeatedScalarFieldContainer[str]
    metrics_url: _containers.RepeatedScalarFieldContainer[str]
    info: TaskInfo
    status_reason: str
    current_round: int
    epsilon_spent: float
    population_size: int
    def __init__(self, population_name: _Optional[str] = ..., task_id: _Optional[int] = ..., total_iteration: _Optional[int] = ..., min_aggregation_size: _Optional[int] = ..., max_aggregation_size: _Optional[int] = ..., status: _Optional[_Union[TaskStatus.Enum, str]] = ..., created_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., started_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., stop_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., start_task_no_earlier_than: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., do_not_create_iteration_after: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., max_parallel: _Optional[int] = ..., correlation_id: _Optional[str] = ..., min_client_version: _Optional[str] = ..., max_client_version: _Optional[str] = ..., client_only_plan_url: _Optional[_Iterable[str]] = ..., server_phase_url: _Optional[_Iterable[str]] = ..., init_checkpoint_url: _Optional[_Iterable[str]] = ..., metrics_url: _Optional[_Iterable[str]] = ..., info: _Optional[_Union[TaskInfo, _Mapping]] = ..., status_reason: _Optional[str] = ..., current_round: _Optional[int] = ..., epsilon_spent: _Optional[float] = ..., population_size: _Optional[int] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("traffic_weight", "training_info", "evaluation_info")
    TRAFFIC_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_INFO_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_INFO_FIELD_NUMBER: _ClassVar[int]
    traffic_weight: int
    training_info: TrainingInfo
    evaluation_info: EvaluationInfo
    def __init__(self, traffic_weight: _Optional[int] = ..., training_info: _Optional[_Union[TrainingInfo, _Mapping]] = ..., evaluation_info: _Optional[_Union[EvaluationInfo, _Mapping]] = ...) -> None: ...

class TrainingInfo(_message.Message):
    __slots__ = ("eligibility_task_info",)
    ELIGIBILITY_TASK_INFO_FIELD_NUMBER: _ClassVar[int]
    eligibility_task_info: _eligibility_pb2.EligibilityTaskInfo
    def __init__(self, eligibility_task_info: _Optional[_Union[_eligibility_pb2.EligibilityTaskInfo, _Mapping]] = ...) -> None: ...

class EvaluationInfo(_message.Message):
    __slots__ = ("check_point_selector", "training_population_name", "training_task_id")
    CHECK_POINT_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TRAINING_POPULATION_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    check_point_selector: CheckPointSelector
    training_population_name: str
    training_task_id: int
    def __init__(self, check_point_selector: _Optional[_Union[CheckPointSelector, _Mapping]] = ..., training_population_name: _Optional[str] = ..., training_task_id: _Optional[int] = ...) -> None: ...

class CheckPointSelector(_message.Message):
    __slots__ = ("iteration_selector", "duration_selector")
    class IterationSelector(_message.Message):
        __slots__ = ("size",)
        SIZE_FIELD_NUMBER: _ClassVar[int]
        size: int
        def __init__(self, size: _Optional[int] = ...) -> None: ...
    class DurationSelector(_message.Message):
        __slots__ = ("hours",)
        HOURS_FIELD_NUMBER: _ClassVar[int]
        hours: int
        def __init__(self, hours: _Optional[int] = ...) -> None: ...
    ITERATION_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    DURATION_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    iteration_selector: CheckPointSelector.IterationSelector
    duration_selector: CheckPointSelector.DurationSelector
    def __init__(self, iteration_selector: _Optional[_Union[CheckPointSelector.IterationSelector, _Mapping]] = ..., duration_selector: _Optional[_Union[CheckPointSelector.DurationSelector, _Mapping]] = ...) -> None: ...

class CreateTaskRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class CreateTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class GetTaskByIdResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...
