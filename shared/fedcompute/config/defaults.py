"""Defaults applied to unset config fields (ODP's where ODP has one) and :func:`normalize`."""
from __future__ import annotations

from fedcompute.proto import task_config_pb2 as pb

# ODP defaults.
DEFAULT_OVER_SELECTION_RATE = 0.3
DEFAULT_BATCH_SIZE = 3
DEFAULT_LABEL_NAME = "y"
DEFAULT_CLIENT_LEARNING_RATE = 0.1
DEFAULT_SERVER_LEARNING_RATE = 1.0
DEFAULT_DP_TARGET_EPSILON = 10.0
DEFAULT_POPULATION_SIZE = 3_000_000  # ODP's assumed population; dp_delta defaults to 1/this
DEFAULT_LEARNING_ALGO = pb.LearningAlgo.FED_AVG
DEFAULT_OPTIMIZER = pb.Optimizer.SGD

# fedcompute defaults.
DEFAULT_NUM_EPOCHS = 1
DEFAULT_TARGET_UNCLIPPED_QUANTILE = 0.5  # Andrew et al. 2019
DEFAULT_CLIP_LEARNING_RATE = 0.2  # Andrew et al. 2019
DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION = 0.05  # x report_goal, as TFF's adaptive DP factories
DEFAULT_EVALUATION_TRAFFIC = 0.1
DEFAULT_CHECKPOINT_SELECTOR = "every_1_round"

ADAPTIVE_DP_TYPES = frozenset({pb.DpAggregator.ADAPTIVE_GAUSSIAN, pb.DpAggregator.ADAPTIVE_TREE})
TREE_DP_TYPES = frozenset({pb.DpAggregator.TREE_AGGREGATION, pb.DpAggregator.ADAPTIVE_TREE})


def normalize(config: pb.TaskConfig) -> pb.TaskConfig:
    """A copy of ``config`` with every unset defaultable field filled explicitly.

    Explicitly set values, even invalid ones, are kept (validation reports them). The
    result is stable: ``normalize(normalize(c)) == normalize(c)``. Fills:
    label_name "y"; learning process: type FED_AVG,
    optimizers SGD, client/server learning rates 0.1/1.0, over_selection_rate 0.3;
    batch_size 3, num_epochs 1; population_size 3,000,000, dp_target_epsilon 10,
    dp_delta 1/population_size; evaluation (when present): checkpoint_selector
    "every_1_round", evaluation_traffic 0.1, over_selection_rate 0.3,
    source_training_population = population_name; DP of adaptive types: init_clip_norm =
    clip_norm, target_unclipped_quantile 0.5, clip_learning_rate 0.2,
    clipped_count_stddev 0.05 x report_goal.
    """
    out = pb.TaskConfig()
    out.CopyFrom(config)
    if not out.label_name:
        out.label_name = DEFAULT_LABEL_NAME

    learning = out.federated_learning.learning_process
    if learning.type == pb.LearningAlgo.UNKNOWN:
        learning.type = DEFAULT_LEARNING_ALGO
    if learning.client_optimizer == pb.Optimizer.UNKNOWN:
        learning.client_optimizer = DEFAULT_OPTIMIZER
    if learning.server_optimizer == pb.Optimizer.UNKNOWN:
        learning.server_optimizer = DEFAULT_OPTIMIZER
    if not learning.HasField("client_learning_rate"):
        learning.client_learning_rate = DEFAULT_CLIENT_LEARNING_RATE
    if not learning.HasField("server_learning_rate"):
        learning.server_learning_rate = DEFAULT_SERVER_LEARNING_RATE
    if not learning.runtime_config.HasField("over_selection_rate"):
        learning.runtime_config.over_selection_rate = DEFAULT_OVER_SELECTION_RATE

    dataset = out.policies.dataset_policy
    if not dataset.HasField("batch_size"):
        dataset.batch_size = DEFAULT_BATCH_SIZE
    if not dataset.HasField("num_epochs"):
        dataset.num_epochs = DEFAULT_NUM_EPOCHS

    release = out.policies.model_release_policy
    if not release.HasField("population_size"):
        release.population_size = DEFAULT_POPULATION_SIZE
    if not release.HasField("dp_target_epsilon"):
        release.dp_target_epsilon = DEFAULT_DP_TARGET_EPSILON
    if not release.HasField("dp_delta") and release.population_size > 0:
        release.dp_delta = 1.0 / release.population_size

    if out.federated_learning.HasField("evaluation"):
        evaluation = out.federated_learning.evaluation
        if not evaluation.checkpoint_selector:
            evaluation.checkpoint_selector = DEFAULT_CHECKPOINT_SELECTOR
        if not evaluation.HasField("evaluation_traffic"):
            evaluation.evaluation_traffic = DEFAULT_EVALUATION_TRAFFIC
        if not evaluation.HasField("over_selection_rate"):
            evaluation.over_selection_rate = DEFAULT_OVER_SELECTION_RATE
        if not evaluation.source_training_population:
            evaluation.source_training_population = out.population_name

    if out.HasField("differential_privacy") and out.differential_privacy.type in ADAPTIVE_DP_TYPES:
        dp = out.differential_privacy
        if not dp.HasField("init_clip_norm") and dp.HasField("clip_norm"):
            dp.init_clip_norm = dp.clip_norm
        if not dp.HasField("target_unclipped_quantile"):
            dp.target_unclipped_quantile = DEFAULT_TARGET_UNCLIPPED_QUANTILE
        if not dp.HasField("clip_learning_rate"):
            dp.clip_learning_rate = DEFAULT_CLIP_LEARNING_RATE
        report_goal = learning.runtime_config.report_goal
        if not dp.HasField("clipped_count_stddev") and report_goal > 0:
            dp.clipped_count_stddev = DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION * report_goal
    return out
