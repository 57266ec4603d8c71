"""The tree (DP-FTRL) mechanisms: tree aggregation with a fixed clip, and with an adaptive clip.

* :class:`TreeAggregationAggregator`: tensorflow_privacy's ``TreeResidualSumQuery``.
* :class:`AdaptiveTreeAggregator`: ``QAdaClipTreeResSumQuery`` in a ``RestartQuery``.

Each class builds its own query and sample state; :func:`release_tree` is the release both
run (restore the tree from the DP state, noise the round's sum, store the tree back), called
with the class's query and state accessors as arguments rather than through inheritance.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from fedcompute.dp import DpMechanism, DpParams, mechanism_name
from fedcompute.errors import ConfigError, InvariantError
from fedcompute.learning.accumulator import RoundAccumulator, add_update, clipped_sum, start_accumulator
from fedcompute.learning.dp_core import (
    METRIC_CLIP_NORM,
    METRIC_CLIPPED_COUNT_STDDEV,
    METRIC_CUMULATIVE_NOISE_STDDEV,
    METRIC_MEAN_NOISE_STDDEV,
    METRIC_NEXT_CLIP_NORM,
    METRIC_NOISE_MULTIPLIER,
    METRIC_NOISE_STDDEV,
    METRIC_TREE_LEAVES,
    METRIC_VALUE_NOISE_MULTIPLIER,
    DpState,
    adaptive_noise_split,
    check_state,
    clip_value,
    counter_metrics_with_unclipped_fraction,
    need_seed,
    start_at_state_clip,
    validate_adaptive,
    validate_clip,
    validate_noise,
    validate_restart,
)
from fedcompute.learning.tensor_codec import ClientUpdate, SpecLike, normalize_spec

ADAPTIVE_TREE_RESTART_PERIOD = 1024  # TFF tree_adaptive defaults
ADAPTIVE_TREE_RESTART_WARMUP = 128
_TREE_SEED_MASK = 2**62 - 1  # the tree's stateless seeds are incremented per node: keep int64 headroom
_TREE_STATE_PREFIX = "tree/"

Restart = tuple[int, int | None] | None  # (period, warmup) of the tree restarts, or None


def tree_noise_seeds(seed: int) -> tuple[int, int]:
    """(sum tree seed, clipped-count tree seed) derived from a round's noise seed.

    The trees draw stateless noise from seed pairs that advance by one per node and
    tensor, so the seeds are kept below 2**62 and the count tree's seed is hashed away
    from the sum tree's (overlapping ranges would correlate the two noises).
    """
    seed = int(seed)
    digest = hashlib.sha256(f"clipped_count/{seed}".encode()).digest()
    return seed & _TREE_SEED_MASK, int.from_bytes(digest[:8], "big") & _TREE_SEED_MASK


def efficient_tree_cumsum_noise_std(leaves: int, node_stddev: float) -> float:
    """Stddev of one coordinate of the efficient tree's noise on a cumulative sum of ``leaves``
    releases (Honaker 2015 as in tensorflow_privacy's EfficientTreeAggregator).

    A complete subtree of height l has node variance v_l = sigma^2 (2 - 2^-l) and weight
    1 / (2 - 2^-l); the cumulative sum uses one subtree per set bit of ``leaves``.
    """
    var, level, n = 0.0, 0, int(leaves)
    while n:
        if n & 1:
            var += 1.0 / (2.0 - 0.5**level)
        n >>= 1
        level += 1
    return float(node_stddev) * math.sqrt(var)


_QUERY_CACHE: dict[Any, Any] = {}
_QUERY_CACHE_LOCK = threading.Lock()
_QUERY_CACHE_SIZE = 8


def _cached_query(key: Any, build: Callable[[], Any]) -> Any:
    """A process-wide cache of built tree queries: their ``tf.function``s trace once per
    query object (~1 s), so a warm aggregator reuses the query of its task and model."""
    with _QUERY_CACHE_LOCK:
        hit = _QUERY_CACHE.get(key)
        if hit is None:
            hit = build()
            while len(_QUERY_CACHE) >= _QUERY_CACHE_SIZE:
                _QUERY_CACHE.pop(next(iter(_QUERY_CACHE)))
            _QUERY_CACHE[key] = hit
        return hit


def flatten_query_state(global_state: Any, prefix: str = _TREE_STATE_PREFIX) -> tuple[tuple[str, np.ndarray], ...]:
    """A tensorflow_privacy global state (tf.nest structure) as named numpy arrays for DpState.tensors."""
    from tensorflow.python.util import nest  # public tf.nest has no path variant (pinned TF 2.14.1)

    return tuple((prefix + path, np.array(t)) for path, t in nest.flatten_with_joined_string_paths(global_state))


def restore_query_state(
    template: Any, tensors: Sequence[tuple[str, np.ndarray]], prefix: str = _TREE_STATE_PREFIX
) -> Any:
    """Inverse of :func:`flatten_query_state` given a state of the same structure (shapes may differ)."""
    import tensorflow as tf
    from tensorflow.python.util import nest

    paths = [(prefix + path, t) for path, t in nest.flatten_with_joined_string_paths(template)]
    stored = {name: a for name, a in tensors if name.startswith(prefix)}
    names = [n for n, _ in paths]
    if set(names) != set(stored):
        missing = sorted(set(names) - set(stored))
        extra = sorted(set(stored) - set(names))
        raise ConfigError(
            f"DP tree state does not match the task's DP configuration (missing {missing[:3]}, unexpected {extra[:3]})",
            hint="the restart settings or the model changed mid-task; start a new task",
        )
    flat = [tf.convert_to_tensor(np.asarray(stored[n]), dtype=t.dtype) for n, t in paths]
    return tf.nest.pack_sequence_as(template, flat)


def _with_restart(query: Any, restart: Restart) -> Any:
    if restart is None:
        return query
    from tensorflow_privacy.privacy.dp_query import restart_query

    period, warmup = restart
    return restart_query.RestartQuery(query, restart_query.PeriodicRoundRestartIndicator(period, warmup))


def _record_specs(spec: SpecLike) -> list[Any]:
    import tensorflow as tf

    return [tf.TensorSpec(s.shape, tf.float32) for s in normalize_spec(spec)]


def _float32_sums(sums: Sequence[np.ndarray]) -> list[Any]:
    import tensorflow as tf

    return [tf.convert_to_tensor(np.asarray(s, np.float32)) for s in sums]


def release_tree(
    *,
    mechanism: DpMechanism,
    params: DpParams,
    acc: RoundAccumulator,
    state: DpState,
    report_goal: int,
    seed: int | None,
    noise_split: tuple[float, float],
    build_query: Callable[[SpecLike, int, int | None], Any],
    sample_state: Callable[[Any, Sequence[np.ndarray], RoundAccumulator], Any],
    sum_state_of: Callable[[Any], Any],
    scalars_of: Callable[[Any], dict[str, float]],
) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
    """One tree release: the noised residual mean, the next DP state (tree stored in
    ``DpState.tensors``), and the round's metrics. ``sum_state_of`` finds the sum tree's state
    inside the query's global state; ``scalars_of`` reads the extra scalars to keep."""
    check_state(mechanism, state)
    if report_goal < 1:
        raise InvariantError(f"report_goal must be >= 1, got {report_goal}")
    value_z, sigma_b = noise_split
    noisy = value_z > 0 or sigma_b > 0
    clip = clip_value(state.clip_norm)
    metrics = counter_metrics_with_unclipped_fraction(acc, report_goal)
    sums = clipped_sum(acc)

    def build() -> tuple[Any, Any]:
        q = build_query(acc.spec, report_goal, None)
        return q, q.initial_global_state()

    query, template = _cached_query((mechanism, params, acc.spec, report_goal), build)
    if any(name.startswith(_TREE_STATE_PREFIX) for name, _ in state.tensors):
        global_state = restore_query_state(template, state.tensors)
        used_seed = None
    else:  # first release: plant the tree from this round's seed
        used_seed = need_seed(seed, noisy, mechanism)
        global_state = build_query(acc.spec, report_goal, used_seed).initial_global_state()
    sum_state = sum_state_of(global_state)
    if abs(float(sum_state.clip_value.numpy()) - clip) > 1e-6 * clip:
        raise ConfigError(
            f"DP state clip {clip} disagrees with the tree's clip {float(sum_state.clip_value.numpy())}",
            hint="the checkpoint's DP state is inconsistent; start a new task",
        )
    node_std = float(sum_state.tree_state.value_generator_state.stddev.numpy())
    leaves = int(sum(2 ** int(i) for i in sum_state.tree_state.level_buffer_idx.numpy()))
    result, new_global, _event = query.get_noised_result(sample_state(query, sums, acc), global_state)
    new_clip = float(sum_state_of(new_global).clip_value.numpy())
    mean = tuple(
        (np.asarray(r.numpy(), np.float64) / report_goal).astype(s.dtype) for r, s in zip(result, acc.spec)
    )
    new_state = replace(
        state,
        clip_norm=new_clip,
        release_count=state.release_count + 1,
        last_seed=used_seed if (used_seed is not None and seed is not None and noisy) else state.last_seed,
        tensors=flatten_query_state(new_global),
        scalars=scalars_of(new_global),
    )
    metrics.update({
        METRIC_CLIP_NORM: clip,
        METRIC_NEXT_CLIP_NORM: new_clip,
        METRIC_NOISE_MULTIPLIER: float(state.noise_multiplier),
        METRIC_VALUE_NOISE_MULTIPLIER: value_z,
        METRIC_NOISE_STDDEV: node_std,
        METRIC_MEAN_NOISE_STDDEV: node_std / report_goal,
        METRIC_TREE_LEAVES: float(leaves),
        METRIC_CUMULATIVE_NOISE_STDDEV: efficient_tree_cumsum_noise_std(leaves, node_std),
    })
    if sigma_b > 0 or mechanism is DpMechanism.ADAPTIVE_TREE:
        metrics[METRIC_CLIPPED_COUNT_STDDEV] = sigma_b
    return mean, new_state, metrics


@dataclass(frozen=True)
class TreeAggregationAggregator:
    """DP-FTRL noise (Kairouz et al. 2021): tensorflow_privacy's ``TreeResidualSumQuery``
    (efficient tree, Gaussian node noise z * clip), optionally in a ``RestartQuery``.

    The release of round t is the noised *residual* x_t + N_t - N_{t-1}, where N_t is the
    tree's noise on the cumulative sum of rounds 1..t. Summed over rounds the releases are
    the tree-noised cumulative sum, so the server's plain SGD on ``-release / report_goal``
    (what :func:`finish_round` does) gives w_t = w_0 + lr * (S_t + N_t) / report_goal: the
    DP-FTRL update. (Server momentum or adaptive optimizers then act on the residuals.)

    The tree (noise buffers, node seeds, previous noise) lives in ``DpState.tensors`` under
    ``tree/``; it is created at the first release from that round's noise seed, and every
    later node's noise is a function of the stored seeds (later rounds' seeds are unused).
    """

    params: DpParams
    mechanism: ClassVar[DpMechanism] = DpMechanism.TREE_AGGREGATION

    def __post_init__(self) -> None:
        if self.params.mechanism is not DpMechanism.TREE_AGGREGATION:
            raise ConfigError(f"TreeAggregationAggregator built with mechanism {mechanism_name(self.params.mechanism)}")
        self._validate()

    def _validate(self) -> tuple[float, Restart]:
        """(initial clip, restart schedule) after checking the parameters."""
        clip = validate_clip(self.params.clip_norm, "clip_norm", self.mechanism)
        validate_noise(self.params)
        return clip, validate_restart(self.params, None)

    def initial_state(self) -> DpState:
        return DpState(self.mechanism, self._validate()[0], float(self.params.noise_multiplier))

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator:
        return start_at_state_clip(self.mechanism, spec, state)

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator:
        return add_update(acc, update)

    def build_query(self, spec: SpecLike, report_goal: int, noise_seed: int | None) -> Any:
        """The tensorflow_privacy query this aggregator runs (public so tests can run it directly)."""
        from tensorflow_privacy.privacy.dp_query.tree_aggregation_query import TreeResidualSumQuery

        query = TreeResidualSumQuery.build_l2_gaussian_query(
            clip_norm=clip_value(self.params.clip_norm),
            noise_multiplier=float(self.params.noise_multiplier),
            record_specs=_record_specs(spec),
            noise_seed=None if noise_seed is None else tree_noise_seeds(noise_seed)[0],
            use_efficient=True,
        )
        return _with_restart(query, self._validate()[1])

    def sample_state(self, query: Any, sums: Sequence[np.ndarray], acc: RoundAccumulator) -> Any:
        """The query's sample state for the round's clipped sums (float32, as the tree's noise)."""
        return _float32_sums(sums)

    def _sum_state(self, global_state: Any) -> Any:
        return global_state.inner_query_state if self._validate()[1] is not None else global_state

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        return release_tree(
            mechanism=self.mechanism, params=self.params, acc=acc, state=state, report_goal=report_goal, seed=seed,
            noise_split=(float(self.params.noise_multiplier), 0.0), build_query=self.build_query,
            sample_state=self.sample_state, sum_state_of=self._sum_state, scalars_of=lambda _: {},
        )


@dataclass(frozen=True)
class AdaptiveTreeAggregator:
    """DP-FTRL with adaptive clipping: tensorflow_privacy's ``QAdaClipTreeResSumQuery`` in a
    ``RestartQuery`` (TFF's ``tree_adaptive``). The clipped count is tree-noised too; the
    clip estimate moves every round but the sum's clip (and noise) only adopt it when
    the tree restarts (every ``restart_period`` releases, first after ``restart_warmup``).
    """

    params: DpParams
    mechanism: ClassVar[DpMechanism] = DpMechanism.ADAPTIVE_TREE

    def __post_init__(self) -> None:
        if self.params.mechanism is not DpMechanism.ADAPTIVE_TREE:
            raise ConfigError(f"AdaptiveTreeAggregator built with mechanism {mechanism_name(self.params.mechanism)}")
        self._validate()

    def _validate(self) -> tuple[float, Restart]:
        """(initial clip, restart schedule: TFF's tree_adaptive defaults unless set)."""
        clip = validate_adaptive(self.params)
        return clip, validate_restart(self.params, (ADAPTIVE_TREE_RESTART_PERIOD, ADAPTIVE_TREE_RESTART_WARMUP))

    def initial_state(self) -> DpState:
        return DpState(self.mechanism, self._validate()[0], float(self.params.noise_multiplier))

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator:
        # The estimator counts norms <= its current estimate, not <= the (older) clip in use.
        check_state(self.mechanism, state)
        return start_accumulator(spec, state.clip_norm, state.scalars.get("quantile_estimate", state.clip_norm))

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator:
        return add_update(acc, update)

    def _noise_split(self, report_goal: int) -> tuple[float, float]:
        return adaptive_noise_split(self.params.noise_multiplier, report_goal, self.params.clipped_count_stddev)

    def build_query(self, spec: SpecLike, report_goal: int, noise_seed: int | None) -> Any:
        """The tensorflow_privacy query this aggregator runs (public so tests can run it directly)."""
        from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_tree_query import QAdaClipTreeResSumQuery

        p = self.params
        value_z, sigma_b = self._noise_split(report_goal)
        seeds = None if noise_seed is None else tree_noise_seeds(noise_seed)
        query = QAdaClipTreeResSumQuery(
            initial_l2_norm_clip=self._validate()[0],
            noise_multiplier=value_z,
            record_specs=_record_specs(spec),
            target_unclipped_quantile=p.target_unclipped_quantile,
            learning_rate=p.clip_learning_rate,
            clipped_count_stddev=sigma_b,
            expected_num_records=report_goal,
            geometric_update=True,
            noise_seed=None if seeds is None else seeds[0],
        )
        if seeds is not None:
            # TFP 0.9.0 builds the clipped-count tree with a clock seed; seed it (private attributes, pinned).
            count_tree = query._quantile_estimator_query._below_estimate_query._numerator._tree_aggregator
            count_tree.value_generator._seed = seeds[1]
        return _with_restart(query, self._validate()[1])

    def sample_state(self, query: Any, sums: Sequence[np.ndarray], acc: RoundAccumulator) -> Any:
        import tensorflow as tf
        from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_tree_query import QAdaClipTreeResSumQuery

        if acc.count_threshold is None:
            raise InvariantError("ADAPTIVE_TREE needs an accumulator from its own start()")
        below = float(acc.below_threshold) - 0.5 * acc.accepted
        return QAdaClipTreeResSumQuery._SampleState(_float32_sums(sums), tf.constant(below, tf.float32))

    def _query_state(self, global_state: Any) -> Any:
        return global_state.inner_query_state if self._validate()[1] is not None else global_state

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        def quantile_estimate(global_state: Any) -> dict[str, float]:
            estimate = self._query_state(global_state).quantile_estimator_state.current_estimate
            return {"quantile_estimate": float(estimate.numpy())}

        return release_tree(
            mechanism=self.mechanism, params=self.params, acc=acc, state=state, report_goal=report_goal, seed=seed,
            noise_split=self._noise_split(report_goal), build_query=self.build_query, sample_state=self.sample_state,
            sum_state_of=lambda g: self._query_state(g).sum_state, scalars_of=quantile_estimate,
        )
