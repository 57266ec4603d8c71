"""Typed, plain-Python view of a valid, normalized task config.

Code outside the config package (task builder, management, assignment, scheduler,
aggregator, simulator) reads these frozen dataclasses instead of the protobuf, so the
defaults and derived values live in exactly one place. Build one with
:func:`fedcompute.config.validate_task_config` (``.spec``) or :func:`task_spec`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fedcompute.config.defaults import (
    ADAPTIVE_DP_TYPES,
    DEFAULT_CHECKPOINT_SELECTOR,
    DEFAULT_CLIP_LEARNING_RATE,
    DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION,
    DEFAULT_TARGET_UNCLIPPED_QUANTILE,
)
from fedcompute.dp import DpMechanism, DpParams
from fedcompute.metric_names import split_metrics
from fedcompute.proto import task_config_pb2 as pb

TRAINING_ONLY = "TRAINING_ONLY"
TRAINING_AND_EVAL = "TRAINING_AND_EVAL"
EVAL_ONLY = "EVAL_ONLY"

CHECKPOINT_SELECTOR_RE = re.compile(r"every_(?P<k>[0-9]{1,9})_(?P<kind>round|hour)")  # ASCII digits only


def max_aggregation_size(report_goal: int, over_selection_rate: float) -> int:
    """ODP's cap on live assignments per round: floor(report_goal x (1 + rate))."""
    # The epsilon absorbs binary rounding (e.g. 10 x 1.1 = 11.000000000000002 or 6.9999...).
    return int(math.floor(report_goal * (1.0 + over_selection_rate) + 1e-9))


@dataclass(frozen=True)
class CheckpointSelector:
    """``every_<k>_round`` (kind "round") or ``every_<k>_hour`` (kind "hour")."""

    kind: str
    k: int

    @property
    def text(self) -> str:
        return f"every_{self.k}_{self.kind}"


def parse_checkpoint_selector(text: str) -> CheckpointSelector | None:
    """Parse ``every_<k>_round`` / ``every_<k>_hour`` (k >= 1); None when malformed."""
    match = CHECKPOINT_SELECTOR_RE.fullmatch(text.strip())
    if match is None or int(match["k"]) < 1:
        return None
    return CheckpointSelector(kind=match["kind"], k=int(match["k"]))


@dataclass(frozen=True)
class DpSpec:
    """Central DP settings as the config states them; :meth:`params` turns them into the one DP
    type, :class:`fedcompute.dp.DpParams`, that the server phase, checkpoint and ledger use.

    ``aggregator`` is FIXED_GAUSSIAN, TREE_AGGREGATION (also written TREE),
    ADAPTIVE_GAUSSIAN or ADAPTIVE_TREE. ``noise_multiplier`` None means "calibrate it to
    the target epsilon" (done by the task builder). For adaptive types ``clip_norm`` is the
    initial norm too and ``init_clip_norm`` the starting estimate. ``noise_seed`` is only
    for tests and reproducibility.
    """

    aggregator: str
    noise_multiplier: float | None
    clip_norm: float
    init_clip_norm: float
    target_unclipped_quantile: float
    clip_learning_rate: float
    clipped_count_stddev: float
    noise_seed: int | None

    @property
    def mechanism(self) -> DpMechanism:
        return DpMechanism.coerce(self.aggregator)

    @property
    def is_adaptive(self) -> bool:
        return self.mechanism.is_adaptive

    @property
    def is_tree(self) -> bool:
        return self.mechanism.is_tree

    def params(self, noise_multiplier: float) -> DpParams:
        """The task's :class:`DpParams` with ``noise_multiplier`` (the config's or the calibrated one)."""
        return DpParams(  # an unset clip is 0.0 in the config and None in memory
            mechanism=self.mechanism, noise_multiplier=float(noise_multiplier), clip_norm=self.clip_norm or None,
            init_clip_norm=self.init_clip_norm or None, target_unclipped_quantile=self.target_unclipped_quantile,
            clip_learning_rate=self.clip_learning_rate, clipped_count_stddev=self.clipped_count_stddev,
            noise_seed=self.noise_seed,
        )


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation task's settings (``federated_learning.evaluation``)."""

    source_training_population: str
    source_training_task_id: int  # 0 = the training task built with it (TRAINING_AND_EVAL)
    checkpoint_selector: CheckpointSelector
    traffic: float  # evaluation_traffic, in [0, 1]
    report_goal: int
    over_selection_rate: float
    example_selector_uri: str

    @property
    def max_aggregation_size(self) -> int:
        return max_aggregation_size(self.report_goal, self.over_selection_rate)


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs, as plain values, defaults applied.

    Training fields are meaningful when ``has_training`` (TRAINING_ONLY,
    TRAINING_AND_EVAL); for EVAL_ONLY they hold the defaults and ``report_goal`` may be 0
    (the evaluation's own goal is ``evaluation.report_goal``).
    ``max_training_batches_per_client`` 0 means no limit.
    """

    population_name: str
    mode: str  # TRAINING_ONLY | TRAINING_AND_EVAL | EVAL_ONLY
    label_name: str
    use_daf: bool
    # learning process
    learning_algo: str  # FED_AVG | FED_SGD
    client_optimizer: str  # SGD | ADAM
    client_learning_rate: float
    server_optimizer: str  # SGD | ADAM
    server_learning_rate: float
    report_goal: int
    over_selection_rate: float
    example_selector_uri: str
    metrics: tuple[str, ...]  # as written, in order
    # dataset policy
    batch_size: int
    max_training_batches_per_client: int
    num_epochs: int
    # model release policy
    num_rounds: int  # num_max_training_rounds
    target_epsilon: float  # dp_target_epsilon
    delta: float  # dp_delta
    population_size: int
    # eligibility
    min_separation: int  # min_separation_policy.minimum_separation
    dp: DpSpec | None  # None when the config has no differential_privacy block
    evaluation: EvalSpec | None  # None for TRAINING_ONLY

    @property
    def has_training(self) -> bool:
        return self.mode in (TRAINING_ONLY, TRAINING_AND_EVAL)

    @property
    def has_evaluation(self) -> bool:
        return self.evaluation is not None

    @property
    def max_aggregation_size(self) -> int:
        """Cap on live training assignments per round."""
        return max_aggregation_size(self.report_goal, self.over_selection_rate)

    @property
    def sampling_rate(self) -> float:
        """report_goal / population_size: the DP accounting's Poisson sampling rate."""
        return self.report_goal / self.population_size

    @property
    def accepted_metrics(self) -> tuple[str, ...]:
        return tuple(split_metrics(list(self.metrics))[0])

    @property
    def rejected_metrics(self) -> tuple[str, ...]:
        return tuple(split_metrics(list(self.metrics))[1])


def _enum_name(wrapper: type, value: int) -> str:
    return wrapper.Enum.Name(value)  # type: ignore[attr-defined]


def spec_from_normalized(config: pb.TaskConfig) -> TaskSpec:
    """Build the spec from a *normalized, valid* config (no checks here: validate first)."""
    learning = config.federated_learning.learning_process
    policies = config.policies
    release = policies.model_release_policy
    dp: DpSpec | None = None
    if config.HasField("differential_privacy"):
        raw = config.differential_privacy
        adaptive = raw.type in ADAPTIVE_DP_TYPES
        clip = raw.clip_norm if raw.HasField("clip_norm") else raw.init_clip_norm
        dp = DpSpec(
            aggregator=_enum_name(pb.DpAggregator, raw.type),
            noise_multiplier=raw.noise_multiplier if raw.HasField("noise_multiplier") else None,
            clip_norm=clip,
            init_clip_norm=raw.init_clip_norm if raw.HasField("init_clip_norm") else clip,
            target_unclipped_quantile=(
                raw.target_unclipped_quantile if raw.HasField("target_unclipped_quantile")
                else DEFAULT_TARGET_UNCLIPPED_QUANTILE
            ),
            clip_learning_rate=raw.clip_learning_rate if raw.HasField("clip_learning_rate") else DEFAULT_CLIP_LEARNING_RATE,
            clipped_count_stddev=(
                raw.clipped_count_stddev if raw.HasField("clipped_count_stddev")
                else DEFAULT_CLIPPED_COUNT_STDDEV_FRACTION * learning.runtime_config.report_goal if adaptive
                else 0.0
            ),
            noise_seed=raw.noise_seed if raw.HasField("noise_seed") else None,
        )
    evaluation: EvalSpec | None = None
    if config.mode != pb.TaskMode.TRAINING_ONLY and config.federated_learning.HasField("evaluation"):
        ev = config.federated_learning.evaluation
        selector = parse_checkpoint_selector(ev.checkpoint_selector or DEFAULT_CHECKPOINT_SELECTOR)
        assert selector is not None, "validate the config before building its spec"
        evaluation = EvalSpec(
            source_training_population=ev.source_training_population or config.population_name,
            source_training_task_id=ev.source_training_task_id,
            checkpoint_selector=selector,
            traffic=ev.evaluation_traffic,
            report_goal=ev.report_goal,
            over_selection_rate=ev.over_selection_rate,
            example_selector_uri=ev.example_selector_uri,
        )
    return TaskSpec(
        population_name=config.population_name,
        mode=_enum_name(pb.TaskMode, config.mode),
        label_name=config.label_name,
        use_daf=config.use_daf,
        learning_algo=_enum_name(pb.LearningAlgo, learning.type),
        client_optimizer=_enum_name(pb.Optimizer, learning.client_optimizer),
        client_learning_rate=learning.client_learning_rate,
        server_optimizer=_enum_name(pb.Optimizer, learning.server_optimizer),
        server_learning_rate=learning.server_learning_rate,
        report_goal=learning.runtime_config.report_goal,
        over_selection_rate=learning.runtime_config.over_selection_rate,
        example_selector_uri=learning.runtime_config.example_selector_uri,
        metrics=tuple(metric.name for metric in learning.metrics),
        batch_size=policies.dataset_policy.batch_size,
        max_training_batches_per_client=policies.dataset_policy.max_training_batches_per_client,
        num_epochs=policies.dataset_policy.num_epochs,
        num_rounds=release.num_max_training_rounds,
        target_epsilon=release.dp_target_epsilon,
        delta=release.dp_delta,
        population_size=release.population_size,
        min_separation=policies.min_separation_policy.minimum_separation,
        dp=dp,
        evaluation=evaluation,
    )
