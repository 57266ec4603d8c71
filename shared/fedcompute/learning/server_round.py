"""Stage 3 of a server round: the round itself, composed TFF-style, and what follows it.

Pure, state in / state out (no I/O; TensorFlow only when a mechanism draws noise):

* :class:`ServerState` (one checkpoint) and :func:`initial_server_state`.
* :func:`build_round_machinery`: the server optimizer and DP mechanism a server phase names
  (the aggregator and the task builder both build them here).
* :func:`server_round` / :func:`finish_round`: accumulate the updates
  (:mod:`.accumulator`), release the DP mean (:mod:`.dp_mechanisms`), step the server
  optimizer on ``-mean_delta`` (TFF's convention), return the next ServerState.
* :func:`round_metrics`: the round's metrics JSON (names as in the seed's guide), with the
  ε spent so far from the privacy ledger (:func:`epsilon_after`).
* :func:`next_step`: continue with the next round or complete the task (round limit or
  privacy budget), as a typed :class:`NextStep`.
* :func:`evaluation_metrics`: an evaluation round's metrics from summed statistics.

Determinism: for the same ordered updates and the same noise seed the result is
bit-identical (crash and re-run safety); :func:`round_noise_seed` derives the seed.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedcompute.errors import FedComputeError, InvariantError
from fedcompute.learning import metric_stats
from fedcompute.learning.accumulator import RoundAccumulator
from fedcompute.learning.dp_core import METRIC_NOISE_STDDEV, DpAggregator, DpState, derive_noise_seed
from fedcompute.learning.dp_mechanisms import build_dp_aggregator
from fedcompute.learning.server_optimizer import OptimizerState, ServerOptimizer, build_server_optimizer
from fedcompute.learning.tensor_codec import ClientUpdate, NamedArrays, spec_of
from fedcompute.metric_names import NON_FINITE_METRIC, TRAIN_PREFIX
from fedcompute.plans import ServerPhase
from fedcompute.tensor_spec import TensorSpec

METRIC_UPDATE_REJECTED = "server/finalizer/update_rejected"
METRIC_NUM_EXAMPLES = TRAIN_PREFIX + "num_examples"
PRIVACY_EPSILON = "server/privacy/epsilon"
PRIVACY_DELTA = "server/privacy/delta"
NUM_REPORTS = "server/aggregator/num_reports"
EVAL_PREFIX = "server/client_work/eval/"
EVALUATED_ROUND = "server/evaluation/training_round"
METRICS_NON_FINITE = "server/aggregator/metrics_non_finite"

_log = logging.getLogger(__name__)

# Round faults the aggregator counts (never a round stuck in AGGREGATING).
MISSING_UPDATES = "server/aggregator/missing_updates"
METRICS_OVERFLOWED = "server/aggregator/metrics_overflowed"


def build_round_machinery(phase: ServerPhase) -> tuple[ServerOptimizer, DpAggregator]:
    """The server optimizer and the DP mechanism of ``phase`` (validated)."""
    optimizer = build_server_optimizer(phase.server_optimizer, phase.server_learning_rate)
    return optimizer, build_dp_aggregator(phase.dp)


def round_noise_seed(phase: ServerPhase, noise_secret_hex: str, population: str, task_id: int,
                     round_number: int) -> int:
    """The noise seed of a round: from the config's fixed ``noise_seed`` (tests, reproducible
    runs) or the task's server-side secret; the same round always gets the same seed."""
    if phase.dp.noise_seed is not None:  # noqa: SIM108 -- fixed by the config
        secret = str(int(phase.dp.noise_seed)).encode()
    else:
        secret = bytes.fromhex(noise_secret_hex) if noise_secret_hex else b""
    return derive_noise_seed(secret, round_number, label=f"{population}/{task_id}")


def epsilon_after(phase: ServerPhase, rounds: int) -> float:
    """ε spent after ``rounds`` releases (same accounting as the task builder's DP check)."""
    if phase.dp.mechanism is None or rounds <= 0:
        return 0.0 if rounds <= 0 else math.inf
    from fedcompute.privacy.accounting import compute_epsilon

    return compute_epsilon(phase.dp.mechanism, noise_multiplier=phase.dp.noise_multiplier,
                           report_goal=phase.report_goal, population_size=phase.population_size, rounds=rounds,
                           delta=phase.delta)


MetricsFinalizer = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]


def default_metrics_finalizer(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``{metric: value}`` from the round's summed ``"<metric>/<stat>"`` statistics
    (:mod:`fedcompute.learning.metric_stats`: e.g. loss = sum / count over all examples,
    AUC from summed confusion buckets; never a mean of per-client values)."""
    return metric_stats.finalize_all(metric_stats.unflatten_stats(sums))


def task_metrics_finalizer(task_metrics: Iterable[str]) -> MetricsFinalizer:
    """A finalizer that reports only the task's configured metrics (the aggregator's choice)."""
    wanted = tuple(task_metrics)

    def finalize(sums: Mapping[str, np.ndarray]) -> Mapping[str, float]:
        grouped = metric_stats.unflatten_stats(sums) if sums else {}
        return {m: metric_stats.finalize(m, grouped[m]) for m in wanted if m in grouped}

    return finalize


@dataclass(frozen=True)
class ServerState:
    """Everything the aggregator carries between rounds (one checkpoint).

    ``round`` counts completed aggregation rounds (0 = the initial checkpoint).
    """

    round: int
    spec: tuple[TensorSpec, ...]
    weights: tuple[np.ndarray, ...]
    optimizer_state: OptimizerState
    dp_state: DpState

    def named_weights(self) -> list[tuple[str, np.ndarray]]:
        return [(s.name, w) for s, w in zip(self.spec, self.weights)]


def initial_server_state(weights: NamedArrays, optimizer: ServerOptimizer, dp: DpAggregator) -> ServerState:
    """Round-0 state from the model's initial trainable weights (ordered names -> arrays)."""
    spec = spec_of(weights)
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    return ServerState(
        round=0,
        spec=spec,
        weights=tuple(np.array(a, copy=True) for _, a in items),
        optimizer_state=optimizer.initialize(spec),
        dp_state=dp.initial_state(),
    )


@dataclass(frozen=True)
class RoundConfig:
    """Per-round inputs besides the state and the updates.

    ``noise_seed`` is required when there is noise; derive it with
    :func:`derive_noise_seed` so a re-run of the same round adds the same noise.
    """

    report_goal: int
    optimizer: ServerOptimizer
    dp: DpAggregator
    noise_seed: int | None = None
    metrics_finalizer: MetricsFinalizer | None = default_metrics_finalizer


@dataclass(frozen=True)
class RoundResult:
    """What a round produced besides the new state. ``round`` is the new state's round."""

    round: int
    mean_delta: tuple[np.ndarray, ...]
    accepted: int
    non_finite: int
    clipped: int
    num_examples: int
    metric_sums: Mapping[str, np.ndarray]
    noise_seed: int | None
    update_rejected: bool


def finish_round(
    state: ServerState, acc: RoundAccumulator, config: RoundConfig
) -> tuple[ServerState, RoundResult, dict[str, float]]:
    """Release the DP mean of ``acc`` and apply the server optimizer (for merged shards too)."""
    if config.report_goal < 1:
        raise InvariantError(f"report_goal must be >= 1, got {config.report_goal}")
    counters = (acc.accepted, acc.non_finite, acc.clipped, acc.num_examples)
    metric_sums = dict(acc.metric_sums)
    mean, dp_state, metrics = config.dp.finish(
        acc, state.dp_state, report_goal=config.report_goal, seed=config.noise_seed
    )
    # TFF's FedAvg hands the server optimizer initial-minus-trained deltas as the gradient.
    gradient = tuple(np.negative(m) for m in mean)
    rejected = not all(bool(np.isfinite(g).all()) for g in gradient)
    if rejected:  # like TFF's reject_non_finite_update: keep weights and optimizer state
        opt_state, weights = state.optimizer_state, state.weights
    else:
        opt_state, weights = config.optimizer.next(state.optimizer_state, state.weights, gradient)
    new_state = ServerState(state.round + 1, state.spec, tuple(weights), opt_state, dp_state)
    metrics[METRIC_UPDATE_REJECTED] = float(rejected)
    metrics[METRIC_NUM_EXAMPLES] = float(counters[3])
    if config.metrics_finalizer is not None:
        for name, value in config.metrics_finalizer(metric_sums).items():
            metrics[TRAIN_PREFIX + name] = float(value)
    result = RoundResult(
        round=new_state.round,
        mean_delta=mean,
        accepted=counters[0],
        non_finite=counters[1],
        clipped=counters[2],
        num_examples=counters[3],
        metric_sums=metric_sums,
        noise_seed=config.noise_seed if metrics.get(METRIC_NOISE_STDDEV, 0.0) > 0 else None,
        update_rejected=rejected,
    )
    return new_state, result, metrics


def server_round(
    state: ServerState, updates: Iterable[ClientUpdate], config: RoundConfig
) -> tuple[ServerState, RoundResult, dict[str, float]]:
    """One aggregation round: stream ``updates`` (any iterable, consumed once) through the
    DP aggregator, release the mean delta, step the server optimizer on ``-mean_delta``."""
    acc = config.dp.start(state.spec, state.dp_state)
    for update in updates:
        acc = config.dp.add(acc, update)
        del update  # hold one update at a time
    return finish_round(state, acc, config)


def round_metrics(phase: ServerPhase, round_number: int, task_metrics: Iterable[str], result: RoundResult,
                  raw_metrics: Mapping[str, float]) -> dict[str, float]:
    """The round's metrics JSON: the task's training metrics, the counters, every
    ``server/aggregator/`` and ``server/finalizer/`` metric, and ε / δ when DP is on."""
    metrics: dict[str, float] = {TRAIN_PREFIX + m: raw_metrics[TRAIN_PREFIX + m] for m in task_metrics
                                 if TRAIN_PREFIX + m in raw_metrics}
    metrics[NON_FINITE_METRIC] = float(result.non_finite)
    metrics[NUM_REPORTS] = float(result.accepted)
    for name, value in raw_metrics.items():
        if name.startswith("server/aggregator/") or name.startswith("server/finalizer/"):
            metrics.setdefault(name, float(value))
    if phase.dp.is_private:
        metrics[PRIVACY_EPSILON] = epsilon_after(phase, round_number)
        metrics[PRIVACY_DELTA] = phase.delta
    return metrics


@dataclass(frozen=True)
class NextStep:
    """What follows a completed training round.

    ``epsilon_spent`` is the ε after this round (-1.0 when unbounded: DP off is 0.0);
    ``next_round`` is the round to open, or None when the task completes for ``done_reason``.
    """

    epsilon_spent: float
    next_round: int | None
    done_reason: str = ""

    @property
    def completes_task(self) -> bool:
        return self.next_round is None


def next_step(phase: ServerPhase, round_number: int, total_rounds: int) -> NextStep:
    """Open round ``round_number + 1``, or complete the task: the round limit is reached, or
    the next round would spend more than the privacy budget (unless the phase turns that off)."""
    epsilon = epsilon_after(phase, round_number)
    spent = epsilon if math.isfinite(epsilon) else -1.0
    if round_number >= total_rounds:
        return NextStep(spent, None, f"completed num_max_training_rounds ({total_rounds})")
    if phase.dp.is_private and phase.extra.get("enforce_privacy_budget", True):
        next_epsilon = epsilon_after(phase, round_number + 1)
        if next_epsilon > phase.target_epsilon:
            return NextStep(spent, None, (
                f"privacy budget reached: round {round_number + 1} would spend "
                f"epsilon={next_epsilon:.4g} > dp_target_epsilon={phase.target_epsilon:g} "
                f"(spent {epsilon:.4g} after {round_number} rounds)"))
    return NextStep(spent, round_number + 1)


def evaluation_metrics(task_metrics: Iterable[str], totals: Mapping[str, np.ndarray], *, evaluated_round: int,
                       reports: int, excluded: int) -> dict[str, float]:
    """An evaluation round's metrics from the devices' summed statistics (no noise, like ODP
    and TFF's federated evaluation), naming the training round evaluated."""
    grouped = metric_stats.unflatten_stats(totals) if totals else {}
    metrics = {EVAL_PREFIX + m: float(metric_stats.finalize(m, grouped[m])) for m in task_metrics if m in grouped}
    metrics[EVALUATED_ROUND] = float(evaluated_round)
    metrics[NUM_REPORTS] = float(reports)
    metrics[METRICS_NON_FINITE] = float(excluded)
    return metrics


def valid_metric_sums(names: Iterable[str], sums: Mapping[str, np.ndarray],
                      faults: dict[str, int]) -> dict[str, np.ndarray]:
    """The summed statistics of the metrics that finalize; the others are dropped and counted.

    Per-device statistics are finite when ingested, but their sum can still overflow
    (e.g. 1e308 from two devices): that metric is left out of the round's metrics rather
    than failing the round, which would leave it AGGREGATING on every redelivery.
    """
    by_metric: dict[str, dict[str, np.ndarray]] = {}
    for flat_name, array in sums.items():
        by_metric.setdefault(flat_name.rpartition(metric_stats.STAT_SEPARATOR)[0], {})[flat_name] = array
    valid: dict[str, np.ndarray] = {}
    for metric in names:
        if metric not in by_metric:
            continue
        try:
            stats = metric_stats.unflatten_stats(by_metric[metric])[metric]
            float(metric_stats.finalize(metric, stats))
        except (FedComputeError, ArithmeticError, ValueError) as error:
            faults[METRICS_OVERFLOWED] += 1
            _log.error("metric %s left out of the round: its summed statistics are invalid (%s)", metric, error)
            continue
        valid.update(by_metric[metric])
    return valid
