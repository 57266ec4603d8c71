from fedcompute.proto import eligibility_pb2 as _eligibility_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskMode(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[TaskMode.Enum]
        TRAINING_ONLY: _ClassVar[TaskMode.Enum]
        TRAINING_AND_EVAL: _ClassVar[TaskMode.Enum]
        EVAL_ONLY: _ClassVar[TaskMode.Enum]
    UNKNOWN: TaskMode.Enum
    TRAINING_ONLY: TaskMode.Enum
    TRAINING_AND_EVAL: TaskMode.Enum
    EVAL_ONLY: TaskMode.Enum
    def __init__(self) -> None: ...

class ModelReleaseManagementPolicy(_message.Message):
    __slots__ = ("dp_target_epsilon", "dp_delta", "num_max_training_rounds", "population_size")
    DP_TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    NUM_MAX_TRAINING_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    dp_target_epsilon: float
    dp_delta: float
    num_max_training_rounds: int
    population_size: int
    def __init__(self, dp_target_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., num_max_training_rounds: _Optional[int] = ..., population_size: _Optional[int] = ...) -> None: ...

class DatasetPolicy(_message.Message):
    __slots__ = ("batch_size", "max_training_batches_per_client", "num_epochs")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAINING_BATCHES_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    NUM_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    max_training_batches_per_client: int
    num_epochs: int
    def __init__(self, batch_size: _Optional[int] = ..., max_training_batches_per_client: _Optional[int] = ..., num_epochs: _Optional[int] = ...) -> None: ...

class Policies(_message.Message):
    __slots__ = ("min_separation_policy", "data_availability_policy", "model_release_policy", "dataset_policy")
    MIN_SEPARATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    DATA_AVAILABILITY_POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_RELEASE_POLICY_FIELD_NUMBER: _ClassVar[int]
    DATASET_POLICY_FIELD_NUMBER: _ClassVar[int]
    min_separation_policy: _eligibility_pb2.MinimumSeparationPolicy
    data_availability_policy: _eligibility_pb2.DataAvailabilityPolicy
    model_release_policy: ModelReleaseManagementPolicy
    dataset_policy: DatasetPolicy
    def __init__(self, min_separation_policy: _Optional[_Union[_eligibility_pb2.MinimumSeparationPolicy, _Mapping]] = ..., data_availability_policy: _Optional[_Union[_eligibility_pb2.DataAvailabilityPolicy, _Mapping]] = ..., model_release_policy: _Optional[_Union[ModelReleaseManagementPolicy, _Mapping]] = ..., dataset_policy: _Optional[_Union[DatasetPolicy, _Mapping]] = ...) -> None: ...

class LearningAlgo(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[LearningAlgo.Enum]
        FED_AVG: _ClassVar[LearningAlgo.Enum]
        FED_SGD: _ClassVar[LearningAlgo.Enum]
    UNKNOWN: LearningAlgo.Enum
    FED_AVG: LearningAlgo.Enum
    FED_SGD: LearningAlgo.Enum
    def __init__(self) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[Optimizer.Enum]
        SGD: _ClassVar[Optimizer.Enum]
        ADAM: _ClassVar[Optimizer.Enum]
    UNKNOWN: Optimizer.Enum
    SGD: Optimizer.Enum
    ADAM: Optimizer.Enum
    def __init__(self) -> None: ...

class DpAggregator(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[DpAggregator.Enum]
        FIXED_GAUSSIAN: _ClassVar[DpAggregator.Enum]
        TREE_AGGREGATION: _ClassVar[DpAggregator.Enum]
        TREE: _ClassVar[DpAggregator.Enum]
        ADAPTIVE_GAUSSIAN: _ClassVar[DpAggregator.Enum]
        ADAPTIVE_TREE: _ClassVar[DpAggregator.Enum]
    UNKNOWN: DpAggregator.Enum
    FIXED_GAUSSIAN: DpAggregator.Enum
    TREE_AGGREGATION: DpAggregator.Enum
    TREE: DpAggregator.Enum
    ADAPTIVE_GAUSSIAN: DpAggregator.Enum
    ADAPTIVE_TREE: DpAggregator.Enum
    def __init__(self) -> None: ...

class RuntimeConfig(_message.Message):
    __slots__ = ("report_goal", "over_selection_rate", "example_selector_uri")
    REPORT_GOAL_FIELD_NUMBER: _ClassVar[int]
    OVER_SELECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_SELECTOR_URI_FIELD_NUMBER: _ClassVar[int]
    report_goal: int
    over_selection_rate: float
    example_selector_uri: str
    def __init__(self, report_goal: _Optional[int] = ..., over_selection_rate: _Optional[float] = ..., example_selector_uri: _Optional[str] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "parameter")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    name: str
    parameter: str
    def __init__(self, name: _Optional[str] = ..., parameter: _Optional[str] = ...) -> None: ...

class ArtifactBuilding(_message.Message):
    __slots__ = ("plan_url", "client_plan_url", "checkpoint_url")
    PLAN_URL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PLAN_URL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    plan_url: str
    client_plan_url: str
    checkpoint_url: str
    def __init__(self, plan_url: _Optional[str] = ..., client_plan_url: _Optional[str] = ..., checkpoint_url: _Optional[str] = ...) -> None: ...

class LearningProcess(_message.Message):
    __slots__ = ("type", "client_optimizer", "client_learning_rate", "server_optimizer", "server_learning_rate", "runtime_config", "metrics", "artifact_building")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SERVER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_CONFIG_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_BUILDING_FIELD_NUMBER: _ClassVar[int]
    type: LearningAlgo.Enum
    client_optimizer: Optimizer.Enum
    client_learning_rate: float
    server_optimizer: Optimizer.Enum
    server_learning_rate: float
    runtime_config: RuntimeConfig
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    artifact_building: ArtifactBuilding
    def __init__(self, type: _Optional[_Union[LearningAlgo.Enum, str]] = ..., client_optimizer: _Optional[_Union[Optimizer.Enum, str]] = ..., client_learning_rate: _Optional[float] = ..., server_optimizer: _Optional[_Union[Optimizer.Enum, str]] = ..., server_learning_rate: _Optional[float] = ..., runtime_config: _Optional[_Union[RuntimeConfig, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ..., artifact_building: _Optional[_Union[ArtifactBuilding, _Mapping]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("source_training_population", "checkpoint_selector", "evaluation_traffic", "report_goal", "over_selection_rate", "example_selector_uri", "artifact_building", "source_training_task_id")
    SOURCE_TRAINING_POPULATION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    REPORT_GOAL_FIELD_NUMBER: _ClassVar[int]
    OVER_SELECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_SELECTOR_URI_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_BUILDING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TRAINING_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    source_training_population: str
    checkpoint_selector: str
    evaluation_traffic: float
    report_goal: int
    over_selection_rate: float
    example_selector_uri: str
    artifact_building: ArtifactBuilding
    source_training_task_id: int
    def __init__(self, source_training_population: _Optional[str] = ..., checkpoint_selector: _Optional[str] = ..., evaluation_traffic: _Optional[float] = ..., report_goal: _Optional[int] = ..., over_selection_rate: _Optional[float] = ..., example_selector_uri: _Optional[str] = ..., artifact_building: _Optional[_Union[ArtifactBuilding, _Mapping]] = ..., source_training_task_id: _Optional[int] = ...) -> None: ...

class FederatedLearning(_message.Message):
    __slots__ = ("learning_process", "evaluation")
    LEARNING_PROCESS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    learning_process: LearningProcess
    evaluation: Evaluation
    def __init__(self, learning_process: _Optional[_Union[LearningProcess, _Mapping]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class DifferentialPrivacy(_message.Message):
    __slots__ = ("type", "noise_multiplier", "clip_norm", "init_clip_norm", "target_unclipped_quantile", "clip_learning_rate", "clipped_count_stddev", "noise_seed")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    INIT_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_UNCLIPPED_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    CLIP_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_COUNT_STDDEV_FIELD_NUMBER: _ClassVar[int]
    NOISE_SEED_FIELD_NUMBER: _ClassVar[int]
    type: DpAggregator.Enum
    noise_multiplier: float
    clip_norm: float
    init_clip_norm: float
    target_unclipped_quantile: float
    clip_learning_rate: float
    clipped_count_stddev: float
    noise_seed: int
    def __init__(self, type: _Optional[_Union[DpAggregator.Enum, str]] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., init_clip_norm: _Optional[float] = ..., target_unclipped_quantile: _Optional[float] = ..., clip_learning_rate: _Optional[float] = ..., clipped_count_stddev: _Optional[float] = ..., noise_seed: _Optional[int] = ...) -> None: ...

class TaskConfig(_message.Message):
    __slots__ = ("mode", "population_name", "label_name", "policies", "federated_learning", "differential_privacy", "use_daf")
    MODE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_LEARNING_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIAL_PRIVACY_FIELD_NUMBER: _ClassVar[int]
    USE_DAF_FIELD_NUMBER: _ClassVar[int]
    mode: TaskMode.Enum
    population_name: str
    label_name: str
    policies: Policies
    federated_learning: FederatedLearning
    differential_privacy: DifferentialPrivacy
    use_daf: bool
    def __init__(self, mode: _Optional[_Union[TaskMode.Enum, str]] = ..., population_name: _Optional[str] = ..., label_name: _Optional[str] = ..., policies: _Optional[_Union[Policies, _Mapping]] = ..., federated_learning: _Optional[_Union[FederatedLearning, _Mapping]] = ..., differential_privacy: _Optional[_Union[DifferentialPrivacy, _Mapping]] = ..., use_daf: bool = ...) -> None: ...
