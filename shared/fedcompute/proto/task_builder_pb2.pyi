from fedcompute.proto import common_pb2 as _common_pb2
from fedcompute.proto import task_config_pb2 as _task_config_pb2
from fedcompute.proto import task_management_pb2 as _task_management_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BuildTaskRequest(_message.Message):
    __slots__ = ("saved_model", "task_config", "flags")
    SAVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_CONFIG_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    saved_model: _common_pb2.Resource
    task_config: _task_config_pb2.TaskConfig
    flags: ExperimentFlags
    def __init__(self, saved_model: _Optional[_Union[_common_pb2.Resource, _Mapping]] = ..., task_config: _Optional[_Union[_task_config_pb2.TaskConfig, _Mapping]] = ..., flags: _Optional[_Union[ExperimentFlags, _Mapping]] = ...) -> None: ...

class ExperimentFlags(_message.Message):
    __slots__ = ("skip_flex_ops_check", "skip_dp_check", "skip_dp_aggregator", "non_private_test_run")
    SKIP_FLEX_OPS_CHECK_FIELD_NUMBER: _ClassVar[int]
    SKIP_DP_CHECK_FIELD_NUMBER: _ClassVar[int]
    SKIP_DP_AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    NON_PRIVATE_TEST_RUN_FIELD_NUMBER: _ClassVar[int]
    skip_flex_ops_check: bool
    skip_dp_check: bool
    skip_dp_aggregator: bool
    non_private_test_run: bool
    def __init__(self, skip_flex_ops_check: bool = ..., skip_dp_check: bool = ..., skip_dp_aggregator: bool = ..., non_private_test_run: bool = ...) -> None: ...

class BuildTaskResponse(_message.Message):
    __slots__ = ("task_group", "error_info", "task_report")
    TASK_GROUP_FIELD_NUMBER: _ClassVar[int]
    ERROR_INFO_FIELD_NUMBER: _ClassVar[int]
    TASK_REPORT_FIELD_NUMBER: _ClassVar[int]
    task_group: TaskGroup
    error_info: ErrorInfo
    task_report: TaskReport
    def __init__(self, task_group: _Optional[_Union[TaskGroup, _Mapping]] = ..., error_info: _Optional[_Union[ErrorInfo, _Mapping]] = ..., task_report: _Optional[_Union[TaskReport, _Mapping]] = ...) -> None: ...

class TaskGroup(_message.Message):
    __slots__ = ("training_task", "eval_task")
    TRAINING_TASK_FIELD_NUMBER: _ClassVar[int]
    EVAL_TASK_FIELD_NUMBER: _ClassVar[int]
    training_task: _task_management_pb2.Task
    eval_task: _task_management_pb2.Task
    def __init__(self, training_task: _Optional[_Union[_task_management_pb2.Task, _Mapping]] = ..., eval_task: _Optional[_Union[_task_management_pb2.Task, _Mapping]] = ...) -> None: ...

class ErrorType(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[ErrorType.Enum]
        INVALID_REQUEST: _ClassVar[ErrorType.Enum]
        TASK_MANAGEMENT_ERROR: _ClassVar[ErrorType.Enum]
        ARTIFACT_BUILDING_ERROR: _ClassVar[ErrorType.Enum]
    UNKNOWN: ErrorType.Enum
    INVALID_REQUEST: ErrorType.Enum
    TASK_MANAGEMENT_ERROR: ErrorType.Enum
    ARTIFACT_BUILDING_ERROR: ErrorType.Enum
    def __init__(self) -> None: ...

class ErrorInfo(_message.Message):
    __slots__ = ("error_type", "error_message")
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    error_type: ErrorType.Enum
    error_message: str
    def __init__(self, error_type: _Optional[_Union[ErrorType.Enum, str]] = ..., error_message: _Optional[str] = ...) -> None: ...

class TaskReport(_message.Message):
    __slots__ = ("applied_algorithms", "metric_results", "dp_hyperparameters", "privacy_assumptions", "non_private_test_run")
    class AppliedAlgorithms(_message.Message):
        __slots__ = ("learning_algo", "client_optimizer", "server_optimizer", "dp_aggregator")
        LEARNING_ALGO_FIELD_NUMBER: _ClassVar[int]
        CLIENT_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
        SERVER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
        DP_AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
        learning_algo: _task_config_pb2.LearningAlgo.Enum
        client_optimizer: _task_config_pb2.Optimizer.Enum
        server_optimizer: _task_config_pb2.Optimizer.Enum
        dp_aggregator: _task_config_pb2.DpAggregator.Enum
        def __init__(self, learning_algo: _Optional[_Union[_task_config_pb2.LearningAlgo.Enum, str]] = ..., client_optimizer: _Optional[_Union[_task_config_pb2.Optimizer.Enum, str]] = ..., server_optimizer: _Optional[_Union[_task_config_pb2.Optimizer.Enum, str]] = ..., dp_aggregator: _Optional[_Union[_task_config_pb2.DpAggregator.Enum, str]] = ...) -> None: ...
    class MetricResults(_message.Message):
        __slots__ = ("accepted_metrics", "rejected_metrics")
        ACCEPTED_METRICS_FIELD_NUMBER: _ClassVar[int]
        REJECTED_METRICS_FIELD_NUMBER: _ClassVar[int]
        accepted_metrics: str
        rejected_metrics: str
        def __init__(self, accepted_metrics: _Optional[str] = ..., rejected_metrics: _Optional[str] = ...) -> None: ...
    class DPHyperparameters(_message.Message):
        __slots__ = ("dp_delta", "dp_epsilon", "noise_multiplier", "dp_clip_norm", "num_training_rounds")
        DP_DELTA_FIELD_NUMBER: _ClassVar[int]
        DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
        NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
        DP_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
        NUM_TRAINING_ROUNDS_FIELD_NUMBER: _ClassVar[int]
        dp_delta: float
        dp_epsilon: float
        noise_multiplier: float
        dp_clip_norm: float
        num_training_rounds: int
        def __init__(self, dp_delta: _Optional[float] = ..., dp_epsilon: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., dp_clip_norm: _Optional[float] = ..., num_training_rounds: _Optional[int] = ...) -> None: ...
    APPLIED_ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    METRIC_RESULTS_FIELD_NUMBER: _ClassVar[int]
    DP_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_ASSUMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NON_PRIVATE_TEST_RUN_FIELD_NUMBER: _ClassVar[int]
    applied_algorithms: TaskReport.AppliedAlgorithms
    metric_results: TaskReport.MetricResults
    dp_hyperparameters: TaskReport.DPHyperparameters
    privacy_assumptions: str
    non_private_test_run: bool
    def __init__(self, applied_algorithms: _Optional[_Union[TaskReport.AppliedAlgorithms, _Mapping]] = ..., metric_results: _Optional[_Union[TaskReport.MetricResults, _Mapping]] = ..., dp_hyperparameters: _Optional[_Union[TaskReport.DPHyperparameters, _Mapping]] = ..., privacy_assumptions: _Optional[str] = ..., non_private_test_run: bool = ...) -> None: ...
