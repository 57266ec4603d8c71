"""ADAPTIVE_GAUSSIAN, TREE_AGGREGATION and ADAPTIVE_TREE aggregators against tensorflow_privacy.

Each mechanism is driven through ``server_round`` for several rounds with the server state
round-tripped through the checkpoint codec between rounds, and compared with the
tensorflow_privacy query run directly on the same per-client records and seeds.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from fedcompute.dp import DpMechanism, DpParams
from fedcompute.errors import ConfigError
from fedcompute.learning import accumulator, dp_core, dp_mechanisms, dp_tree, server_round
from fedcompute.learning.checkpoint import decode_checkpoint, encode_checkpoint
from fedcompute.learning.server_optimizer import Sgd
from fedcompute.learning.tensor_codec import ClientUpdate

SPEC = [("dense/kernel:0", (4, 3), "float32"), ("dense/bias:0", (3,), "float32")]
GOAL = 40


def _records(rng: np.random.Generator, n: int, median_norm: float) -> list[list[np.ndarray]]:
    """``n`` client deltas whose global L2 norms are lognormal around ``median_norm``."""
    out = []
    for _ in range(n):
        parts = [rng.standard_normal(shape) for _, shape, _ in SPEC]
        norm = math.sqrt(sum(float(np.sum(p * p)) for p in parts))
        target = median_norm * math.exp(0.5 * rng.standard_normal())
        out.append([(p * (target / norm)).astype(np.float32) for p in parts])
    return out


def _update(record: list[np.ndarray]) -> ClientUpdate:
    return ClientUpdate.from_arrays([(name, a) for (name, _, _), a in zip(SPEC, record)], 1)


def _split(z: float, sigma_b: float) -> float:
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def _reference_query(params: DpParams, seed0: int):
    """The tensorflow_privacy query (as TFF builds it) for ``params``, seeded as the aggregator seeds."""
    import tensorflow as tf
    from tensorflow_privacy.privacy.dp_query import restart_query
    from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_sum_query import QuantileAdaptiveClipSumQuery
    from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_tree_query import QAdaClipTreeResSumQuery
    from tensorflow_privacy.privacy.dp_query.tree_aggregation_query import TreeResidualSumQuery

    specs = [tf.TensorSpec(shape, tf.float32) for _, shape, _ in SPEC]
    z = params.noise_multiplier
    sigma_b = 0.05 * GOAL if params.clipped_count_stddev is None else params.clipped_count_stddev
    sum_seed, count_seed = dp_tree.tree_noise_seeds(seed0)
    if params.mechanism == DpMechanism.ADAPTIVE_GAUSSIAN:
        return QuantileAdaptiveClipSumQuery(
            params.init_clip_norm, _split(z, sigma_b), params.target_unclipped_quantile,
            params.clip_learning_rate, sigma_b, GOAL, geometric_update=True,
        )
    if params.mechanism == DpMechanism.TREE_AGGREGATION:
        query = TreeResidualSumQuery.build_l2_gaussian_query(
            params.clip_norm, z, specs, noise_seed=sum_seed, use_efficient=True
        )
    else:
        query = QAdaClipTreeResSumQuery(
            params.init_clip_norm, _split(z, sigma_b), specs, params.target_unclipped_quantile,
            params.clip_learning_rate, sigma_b, GOAL, geometric_update=True, noise_seed=sum_seed,
        )
        count_tree = query._quantile_estimator_query._below_estimate_query._numerator._tree_aggregator
        count_tree.value_generator._seed = count_seed
    if params.restart_period is not None:
        indicator = restart_query.PeriodicRoundRestartIndicator(params.restart_period, params.restart_warmup)
        query = restart_query.RestartQuery(query, indicator)
    return query


CASES = {
    "adaptive_gaussian": DpParams(
        DpMechanism.ADAPTIVE_GAUSSIAN, noise_multiplier=1.0, init_clip_norm=0.5, target_unclipped_quantile=0.5,
        clip_learning_rate=0.3,
    ),
    "tree": DpParams(DpMechanism.TREE_AGGREGATION, clip_norm=0.8, noise_multiplier=1.2),
    "tree_restart": DpParams(DpMechanism.TREE_AGGREGATION, clip_norm=0.8, noise_multiplier=1.2, restart_period=3),
    "adaptive_tree": DpParams(
        DpMechanism.ADAPTIVE_TREE, noise_multiplier=1.0, init_clip_norm=0.5, clip_learning_rate=0.3,
        clipped_count_stddev=3.0, restart_period=2, restart_warmup=1,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_tensorflow_privacy_over_rounds_with_checkpointed_state(case: str) -> None:
    import tensorflow as tf

    params = CASES[case]
    rounds = 5
    rng = np.random.default_rng(7)
    per_round = [_records(rng, GOAL, median_norm=1.0) for _ in range(rounds)]
    seeds = [dp_core.derive_noise_seed(b"k" * 32, r) for r in range(rounds)]

    # fedcompute: server rounds, state through the checkpoint codec between rounds.
    dp, opt = dp_mechanisms.build_dp_aggregator(params), Sgd(1.0)
    w0 = {name: np.zeros(shape, np.float32) for name, shape, _ in SPEC}
    state = server_round.initial_server_state(w0, opt, dp)
    ours, clips, states = [], [], []
    for r in range(rounds):
        state = decode_checkpoint(encode_checkpoint(state, optimizer=opt))
        clips.append(state.dp_state.clip_norm)
        config = server_round.RoundConfig(report_goal=GOAL, optimizer=opt, dp=dp, noise_seed=seeds[r], metrics_finalizer=None)
        state, result, metrics = server_round.server_round(state, (_update(rec) for rec in per_round[r]), config)
        assert metrics[dp_core.METRIC_CLIP_NORM] == pytest.approx(clips[-1])
        ours.append(result.mean_delta)
        states.append(state.dp_state)
    assert all(s.release_count == i + 1 for i, s in enumerate(states))

    # tensorflow_privacy directly: preprocess + accumulate each record, noised result, /report goal.
    query = _reference_query(params, seeds[0])
    global_state = query.initial_global_state()
    ref_clips = []
    for r in range(rounds):
        sample_params = query.derive_sample_params(global_state)
        records = [[tf.constant(a) for a in rec] for rec in per_round[r]]
        sample_state = query.initial_sample_state(records[0])
        for rec in records:
            sample_state = query.accumulate_record(sample_params, sample_state, rec)
        inner = global_state.inner_query_state if params.restart_period is not None else global_state
        clip_state = inner.sum_state if hasattr(inner, "sum_state") else inner
        ref_clips.append(float(getattr(clip_state, "l2_norm_clip", getattr(clip_state, "clip_value", None))))
        tf.random.set_seed(seeds[r])  # what the aggregator does for the stateful (non-tree) draws
        result, global_state, _ = query.get_noised_result(sample_state, global_state)
        for got, want in zip(ours[r], result):
            np.testing.assert_allclose(got, want.numpy() / GOAL, rtol=1e-4, atol=2e-6)

    np.testing.assert_allclose(clips, ref_clips, rtol=1e-5)
    if params.mechanism != DpMechanism.TREE_AGGREGATION:
        assert len(set(np.round(clips, 6))) > 1, "the adaptive clip never moved"
    # SGD(lr=1) on -residual/goal: final weights are the noised cumulative sum / goal (DP-FTRL).
    for w, parts in zip(state.weights, zip(*ours)):
        np.testing.assert_allclose(w, np.sum(parts, axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mechanism", [DpMechanism.ADAPTIVE_GAUSSIAN, DpMechanism.TREE_AGGREGATION, DpMechanism.ADAPTIVE_TREE])
def test_rerun_with_same_state_and_seed_is_bit_identical(mechanism: str) -> None:
    restart = 2 if mechanism == DpMechanism.ADAPTIVE_TREE else None
    params = DpParams(mechanism, clip_norm=1.0, noise_multiplier=1.0, restart_period=restart)
    dp = dp_mechanisms.build_dp_aggregator(params)
    records = _records(np.random.default_rng(3), GOAL, 1.0)
    state = dp.initial_state()
    acc = accumulator.accumulate(dp.start(SPEC, state), map(_update, records))
    _, state, _ = dp.finish(acc, state, report_goal=GOAL, seed=11)
    outs = []
    for _ in range(2):
        acc = accumulator.accumulate(dp.start(SPEC, state), map(_update, records))
        mean, new_state, _ = dp.finish(acc, state, report_goal=GOAL, seed=12)
        outs.append((mean, new_state))
    for a, b in zip(outs[0][0], outs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert outs[0][1].clip_norm == outs[1][1].clip_norm
    with pytest.raises(ValueError, match="noise seed is required"):
        dp.finish(dp.start(SPEC, dp.initial_state()), dp.initial_state(), report_goal=GOAL, seed=None)


@pytest.mark.parametrize(
    "params,rounds",
    [
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, noise_multiplier=0.5, init_clip_norm=0.05,
                     target_unclipped_quantile=0.8), 120),
        (DpParams(DpMechanism.ADAPTIVE_TREE, noise_multiplier=0.5, init_clip_norm=0.05, target_unclipped_quantile=0.8,
                     restart_period=1), 120),
    ],
    ids=["adaptive_gaussian", "adaptive_tree"],
)
def test_adaptive_clip_converges_to_target_quantile(params: DpParams, rounds: int) -> None:
    # Norms ~ lognormal(log 2, 0.5): the 0.8 quantile is 2 * exp(0.5 * 0.8416) = 3.04.
    goal, dim = 200, 4
    spec = [("w", (dim,), "float32")]
    target = 2.0 * math.exp(0.5 * 0.8416212335729143)
    rng = np.random.default_rng(11)
    dp = dp_mechanisms.build_dp_aggregator(params)
    state, clips = dp.initial_state(), []
    for r in range(rounds):
        directions = rng.standard_normal((goal, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        norms = 2.0 * np.exp(0.5 * rng.standard_normal(goal))
        acc = dp.start(spec, state)
        for d, n in zip(directions, norms):
            acc = dp.add(acc, ClientUpdate.from_arrays([("w", (d * n).astype(np.float32))], 1))
        _, state, metrics = dp.finish(acc, state, report_goal=goal, seed=1000 + r)
        clips.append(state.clip_norm)
    settled = float(np.mean(clips[-20:]))
    assert abs(settled - target) / target < 0.10, (settled, target, clips[::10])
    assert 0.7 < metrics[dp_core.METRIC_UNCLIPPED_FRACTION] < 0.9
    assert clips[0] < 0.1 * target  # it really travelled there


def test_tree_cumulative_noise_matches_theory() -> None:
    # Efficient tree (Honaker): a subtree of height l has node variance s^2 (2 - 2^-l) and
    # weight 1 / (2 - 2^-l); the noise on a cumulative sum of t releases uses one subtree per
    # set bit of t, so var = s^2 * sum_{bits l of t} 1 / (2 - 2^-l). Independent-tree (naive)
    # noise would be s^2 * popcount(t); without a tree (Gaussian per round) s^2 * t.
    node_std, goal, dim, runs, rounds = 0.5, 4, 600, 4, 7
    expected = {1: 1.0, 2: 2 / 3, 3: 1 + 2 / 3, 4: 4 / 7, 5: 1 + 4 / 7, 6: 2 / 3 + 4 / 7, 7: 1 + 2 / 3 + 4 / 7}
    spec = [("w", (dim,), "float32")]
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.TREE_AGGREGATION, clip_norm=2.0, noise_multiplier=node_std / 2.0))
    cumsums = {t: [] for t in range(1, rounds + 1)}
    for run in range(runs):
        state, total = dp.initial_state(), np.zeros(dim)
        for t in range(1, rounds + 1):
            acc = dp.start(spec, state)  # zero updates: the releases are pure noise
            for _ in range(goal):
                acc = dp.add(acc, ClientUpdate.from_arrays([("w", np.zeros(dim, np.float32))], 1))
            seed = dp_core.derive_noise_seed(b"t" * 32, run * 100 + t)
            mean, state, metrics = dp.finish(acc, state, report_goal=goal, seed=seed)
            total += mean[0].astype(np.float64) * goal
            cumsums[t].append(total.copy())
            theory = node_std * math.sqrt(expected[t])
            assert metrics[dp_core.METRIC_CUMULATIVE_NOISE_STDDEV] == pytest.approx(theory, rel=1e-6)
    for t, values in cumsums.items():
        std = float(np.std(np.concatenate(values)))
        want = node_std * math.sqrt(expected[t])
        assert abs(std - want) / want < 0.05, (t, std, want)


@pytest.mark.parametrize(
    "params,fragment",
    [
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, noise_multiplier=1.0), "needs clip_norm > 0"),
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, init_clip_norm=-1.0), "needs init_clip_norm > 0"),
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, clip_norm=1.0, target_unclipped_quantile=-0.1),
         "target_unclipped_quantile must be in [0, 1]"),
        (DpParams(DpMechanism.ADAPTIVE_TREE, clip_norm=1.0, target_unclipped_quantile=1.5),
         "target_unclipped_quantile must be in [0, 1]"),
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, clip_norm=1.0, clip_learning_rate=-0.2), "clip_learning_rate must be >= 0"),
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, clip_norm=1.0, clipped_count_stddev=-1.0),
         "clipped_count_stddev must be >= 0"),
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, clip_norm=1.0, noise_multiplier=2.0, clipped_count_stddev=0.9),
         "clipped_count_stddev 0.9 is too low for noise_multiplier 2.0"),
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, clip_norm=1.0, noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
        (DpParams(DpMechanism.TREE_AGGREGATION, noise_multiplier=1.0), "needs clip_norm > 0"),
        (DpParams(DpMechanism.TREE_AGGREGATION, clip_norm=1.0, restart_period=0), "restart_period must be an integer >= 1"),
        (DpParams(DpMechanism.TREE_AGGREGATION, clip_norm=1.0, restart_warmup=3), "restart_warmup needs restart_period"),
        (DpParams(DpMechanism.ADAPTIVE_TREE, clip_norm=1.0, restart_period=4, restart_warmup=4),
         "restart_warmup must be an integer in [1, restart_period - 1 = 3]"),
    ],
)
def test_bad_configurations_are_refused_with_the_reason(params: DpParams, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        dp_mechanisms.build_dp_aggregator(params)
    assert fragment in str(info.value)


@pytest.mark.parametrize("mechanism", [DpMechanism.ADAPTIVE_GAUSSIAN, DpMechanism.ADAPTIVE_TREE])
def test_impossible_noise_split_names_the_minimum_report_goal(mechanism: str) -> None:
    # Default clipped_count_stddev is 0.05 * goal: z = 1.5 needs 0.1 * goal > 1.5, i.e. goal >= 16.
    dp = dp_mechanisms.build_dp_aggregator(DpParams(mechanism, clip_norm=1.0, noise_multiplier=1.5))
    state = dp.initial_state()
    with pytest.raises(ConfigError) as info:
        dp.finish(dp.start(SPEC, state), state, report_goal=15, seed=1)
    assert "report goal of at least 16" in str(info.value)
    _, _, metrics = dp.finish(dp.start(SPEC, state), state, report_goal=16, seed=1)
    assert metrics[dp_core.METRIC_VALUE_NOISE_MULTIPLIER] == pytest.approx(_split(1.5, 0.8))
    assert metrics[dp_core.METRIC_VALUE_NOISE_MULTIPLIER] > 1.5  # the sum pays for the clipped count


def test_noise_split_matches_tff_formula_and_zero_noise_is_exact() -> None:
    value_z, sigma_b = dp_core.adaptive_noise_split(1.0, 100, None)
    assert sigma_b == pytest.approx(5.0)
    assert value_z == pytest.approx((1.0 - 0.01) ** -0.5)
    assert dp_core.adaptive_noise_split(0.0, 100, None) == (0.0, 0.0)
    # z = 0 and no count noise: the released mean is the exact clipped mean / goal.
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, clip_norm=0.5))
    records = _records(np.random.default_rng(5), 10, 1.0)
    state = dp.initial_state()
    mean, new_state, metrics = dp.finish(accumulator.accumulate(dp.start(SPEC, state), map(_update, records)), state,
                                         report_goal=10, seed=None)
    expected = [np.zeros(shape) for _, shape, _ in SPEC]
    for rec in records:
        norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in rec))
        for e, a in zip(expected, rec):
            e += a * min(1.0, 0.5 / norm)
    for got, want in zip(mean, expected):
        np.testing.assert_allclose(got, want / 10, rtol=1e-5, atol=1e-7)
    unclipped = metrics[dp_core.METRIC_UNCLIPPED_FRACTION]
    assert new_state.clip_norm == pytest.approx(0.5 * math.exp(-0.2 * (unclipped - 0.5)), rel=1e-6)


def test_adaptive_tree_counts_below_the_estimate_across_shard_partials() -> None:
    # The clip in use (0.5) and the quantile estimate (2.0) differ between tree restarts.
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.ADAPTIVE_TREE, clip_norm=0.5, restart_period=4))
    state = dp_core.DpState(DpMechanism.ADAPTIVE_TREE, 0.5, 0.0, scalars={"quantile_estimate": 2.0})
    records = _records(np.random.default_rng(9), 30, 1.0)
    norms = [math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in rec)) for rec in records]
    shards = [accumulator.accumulate(dp.start(SPEC, state), map(_update, part)) for part in (records[:12], records[12:])]
    merged = accumulator.merge_accumulators(*(accumulator.decode_partial(accumulator.encode_partial(s), SPEC) for s in shards))
    assert merged.below_threshold == sum(n <= 2.0 for n in norms)
    assert merged.accepted - merged.clipped == sum(n <= 0.5 for n in norms)
    assert merged.below_threshold > merged.accepted - merged.clipped
