"""The Gaussian DP mechanisms: no DP, a fixed clip, and an adaptive clip. Each reads on its own.

* :class:`NoDpAggregator`: no clipping, no noise; the mean over the accepted updates.
* :class:`FixedGaussianAggregator`: clip, sum, ``GaussianSumQuery`` noise, divide by the
  report goal.
* :class:`AdaptiveGaussianAggregator`: ``QuantileAdaptiveClipSumQuery`` (the clip follows a
  target quantile of update norms, geometric update, as TFF's ``gaussian_adaptive``).

Every mechanism: ``initial_state()``, ``start`` (an accumulator at the state's clip),
``add`` (one update), ``finish`` (the noised mean, the next DP state, the round's metrics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from fedcompute.dp import DpMechanism, DpParams, mechanism_name
from fedcompute.errors import ConfigError, InvariantError
from fedcompute.learning.accumulator import RoundAccumulator, add_update, clipped_sum
from fedcompute.learning.dp_core import (
    METRIC_CLIP_NORM,
    METRIC_CLIPPED_COUNT_STDDEV,
    METRIC_MEAN_NOISE_STDDEV,
    METRIC_NEXT_CLIP_NORM,
    METRIC_NOISE_MULTIPLIER,
    METRIC_NOISE_STDDEV,
    METRIC_NOISED_UNCLIPPED_FRACTION,
    METRIC_VALUE_NOISE_MULTIPLIER,
    DpState,
    adaptive_noise_split,
    check_state,
    clip_value,
    counter_metrics,
    counter_metrics_with_unclipped_fraction,
    gaussian_sum_query_noise,
    need_seed,
    start_at_state_clip,
    tf_global_seed,
    validate_adaptive,
)
from fedcompute.learning.tensor_codec import ClientUpdate, SpecLike


@dataclass(frozen=True)
class NoDpAggregator:
    """No DP: no clipping, no noise; the mean is over the accepted updates (TFF's unweighted mean)."""

    params: DpParams
    mechanism: ClassVar[None] = None

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator:
        return start_at_state_clip(self.mechanism, spec, state)

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator:
        return add_update(acc, update)

    def __post_init__(self) -> None:
        p = self.params
        if p.mechanism is not None:
            raise ConfigError(f"NoDpAggregator built with mechanism {mechanism_name(p.mechanism)}")
        if p.noise_multiplier != 0.0:
            raise ConfigError(
                f"noise_multiplier {p.noise_multiplier} needs a DP mechanism",
                location="differential_privacy.type",
                hint="set type: FIXED_GAUSSIAN with a clip_norm",
            )
        if p.clip_norm is not None and not (math.isfinite(p.clip_norm) and p.clip_norm > 0):
            raise ConfigError(f"clip_norm must be > 0, got {p.clip_norm}", location="differential_privacy.clip_norm")

    def initial_state(self) -> DpState:
        return DpState(None, self.params.clip_norm, 0.0)

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None = None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        check_state(self.mechanism, state)
        metrics = counter_metrics(acc, report_goal)
        denominator = max(acc.accepted, 1)
        sums = clipped_sum(acc)
        mean = tuple((t / denominator).astype(s.dtype) for t, s in zip(sums, acc.spec))
        metrics.update({METRIC_CLIP_NORM: float(state.clip_norm or 0.0), METRIC_NOISE_MULTIPLIER: 0.0,
                        METRIC_NOISE_STDDEV: 0.0, METRIC_MEAN_NOISE_STDDEV: 0.0})
        return mean, state, metrics


@dataclass(frozen=True)
class FixedGaussianAggregator:
    """Central DP with a fixed clip: clip, sum, add N(0, (z*C)^2) per coordinate via
    ``GaussianSumQuery``, divide by the report goal (not the realized count; DESIGN §5)."""

    params: DpParams
    mechanism: ClassVar[DpMechanism] = DpMechanism.FIXED_GAUSSIAN

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator:
        return start_at_state_clip(self.mechanism, spec, state)

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator:
        return add_update(acc, update)

    def __post_init__(self) -> None:
        p = self.params
        if p.mechanism is not DpMechanism.FIXED_GAUSSIAN:
            raise ConfigError(f"FixedGaussianAggregator built with mechanism {mechanism_name(p.mechanism)}")
        if p.clip_norm is None or not (math.isfinite(p.clip_norm) and p.clip_norm > 0):
            raise ConfigError(
                f"FIXED_GAUSSIAN needs clip_norm > 0, got {p.clip_norm}",
                location="differential_privacy.clip_norm",
                hint="e.g. clip_norm: 0.1",
            )
        if not (math.isfinite(p.noise_multiplier) and p.noise_multiplier >= 0):
            raise ConfigError(
                f"noise_multiplier must be >= 0, got {p.noise_multiplier}",
                location="differential_privacy.noise_multiplier",
            )

    def initial_state(self) -> DpState:
        return DpState(DpMechanism.FIXED_GAUSSIAN, clip_value(self.params.clip_norm), float(self.params.noise_multiplier))

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        check_state(self.mechanism, state)
        if report_goal < 1:
            raise InvariantError(f"report_goal must be >= 1, got {report_goal}")
        clip = clip_value(state.clip_norm)
        stddev = state.noise_multiplier * clip
        metrics = counter_metrics(acc, report_goal)
        sums = clipped_sum(acc)
        if stddev > 0:
            if seed is None:
                raise InvariantError("a noise seed is required when noise_multiplier > 0 (see derive_noise_seed)")
            noised, _event = gaussian_sum_query_noise(sums, clip_norm=clip, stddev=stddev, seed=seed)
        else:  # zero noise: the query would add exactly 0.0; skip loading TensorFlow
            noised = list(sums)
        mean = tuple((n / report_goal).astype(s.dtype) for n, s in zip(noised, acc.spec))
        new_state = replace(
            state,
            release_count=state.release_count + 1,
            last_seed=int(seed) if (seed is not None and stddev > 0) else state.last_seed,
        )
        metrics.update({
            METRIC_CLIP_NORM: clip,
            METRIC_NOISE_MULTIPLIER: float(state.noise_multiplier),
            METRIC_NOISE_STDDEV: stddev,
            METRIC_MEAN_NOISE_STDDEV: stddev / report_goal,
        })
        return mean, new_state, metrics


@dataclass(frozen=True)
class AdaptiveGaussianAggregator:
    """Gaussian sum with the clip adapted to a target quantile of update norms
    (tensorflow_privacy's ``QuantileAdaptiveClipSumQuery``, geometric update, as TFF's
    ``DifferentiallyPrivateFactory.gaussian_adaptive``).

    Round t clips at ``state.clip_norm`` and its sum gets noise z_v * clip_t (see
    :func:`adaptive_noise_split`); the noised fraction of unclipped updates moves the clip
    for round t+1, which the returned DpState carries (it is the quantile estimator's whole
    mutable state: the other fields of the query's state follow from the parameters).
    """

    params: DpParams
    mechanism: ClassVar[DpMechanism] = DpMechanism.ADAPTIVE_GAUSSIAN

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator:
        return start_at_state_clip(self.mechanism, spec, state)

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator:
        return add_update(acc, update)

    def __post_init__(self) -> None:
        if self.params.mechanism is not DpMechanism.ADAPTIVE_GAUSSIAN:
            raise ConfigError(f"AdaptiveGaussianAggregator built with mechanism {mechanism_name(self.params.mechanism)}")
        validate_adaptive(self.params)

    def initial_state(self) -> DpState:
        return DpState(DpMechanism.ADAPTIVE_GAUSSIAN, validate_adaptive(self.params), float(self.params.noise_multiplier))

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        check_state(self.mechanism, state)
        if report_goal < 1:
            raise InvariantError(f"report_goal must be >= 1, got {report_goal}")
        p = self.params
        value_z, sigma_b = adaptive_noise_split(state.noise_multiplier, report_goal, p.clipped_count_stddev)
        noisy = value_z > 0 or sigma_b > 0
        tf_seed = need_seed(seed, noisy, self.mechanism)
        clip = clip_value(state.clip_norm)
        metrics = counter_metrics_with_unclipped_fraction(acc, report_goal)
        sums = clipped_sum(acc)

        import tensorflow as tf
        from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_sum_query import (
            QuantileAdaptiveClipSumQuery,
        )

        query = QuantileAdaptiveClipSumQuery(
            initial_l2_norm_clip=clip,
            noise_multiplier=value_z,
            target_unclipped_quantile=p.target_unclipped_quantile,
            learning_rate=p.clip_learning_rate,
            clipped_count_stddev=sigma_b,
            expected_num_records=report_goal,
            geometric_update=True,
        )
        global_state = query.initial_global_state()
        # The estimator's per-record value is 1[norm <= clip] - 0.5 (our ``clipped`` is norm > clip).
        below = float(acc.accepted - acc.clipped) - 0.5 * acc.accepted
        sample_state = query._SampleState(  # the query's own sample-state type (private name, TFP 0.9.0)
            [tf.convert_to_tensor(s) for s in sums], tf.constant(below, tf.float32)
        )
        with tf_global_seed(tf_seed):
            result, new_global, _event = query.get_noised_result(sample_state, global_state)
        new_clip = float(new_global.sum_state.l2_norm_clip.numpy())
        if not (math.isfinite(new_clip) and new_clip > 0):
            raise InvariantError(f"adaptive clip became {new_clip}; check clip_learning_rate")
        mean = tuple((r.numpy() / report_goal).astype(s.dtype) for r, s in zip(result, acc.spec))
        new_state = replace(
            state,
            clip_norm=new_clip,
            release_count=state.release_count + 1,
            last_seed=tf_seed if (seed is not None and noisy) else state.last_seed,
            scalars={"quantile_estimate": new_clip},
        )
        metrics.update({
            METRIC_CLIP_NORM: clip,
            METRIC_NEXT_CLIP_NORM: new_clip,
            METRIC_NOISE_MULTIPLIER: float(state.noise_multiplier),
            METRIC_VALUE_NOISE_MULTIPLIER: value_z,
            METRIC_CLIPPED_COUNT_STDDEV: sigma_b,
            METRIC_NOISE_STDDEV: value_z * clip,
            METRIC_MEAN_NOISE_STDDEV: value_z * clip / report_goal,
        })
        if p.clip_learning_rate > 0:  # the DP estimate the clip moved on: clip' = clip exp(-lr (b - q))
            metrics[METRIC_NOISED_UNCLIPPED_FRACTION] = float(np.clip(
                p.target_unclipped_quantile - math.log(new_clip / clip) / p.clip_learning_rate, 0.0, 1.0
            ))
        return mean, new_state, metrics
