"""DP aggregation core: clipping, exclusion, streaming memory, noise via GaussianSumQuery, rounds.

Only the tests taking the ``tf`` fixture import TensorFlow / tensorflow_privacy (~7 s once).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import tracemalloc
import weakref
from collections.abc import Iterator

import numpy as np
import pytest

from fedcompute.dp import DpMechanism, DpParams
from fedcompute.errors import ConfigError, InvalidRequestError
from fedcompute.learning import accumulator, dp_core, dp_gaussian, dp_mechanisms, server_round
from fedcompute.learning.server_optimizer import Adam, Sgd
from fedcompute.learning.tensor_codec import ClientUpdate, decode_client_update, encode_client_update

SPEC = [("conv/kernel", (5, 5, 1, 4), "float32"), ("conv/bias", (4,), "float32"), ("dense/kernel", (100, 10), "float32")]
NAMES = [n for n, _, _ in SPEC]


def _update(rng: np.random.Generator, scale: float = 1.0, num_examples: int = 10, **stats: float) -> ClientUpdate:
    delta = [(n, (rng.standard_normal(s) * scale).astype(np.float32)) for n, s, _ in SPEC]
    return ClientUpdate.from_arrays(delta, num_examples, {k: np.array(v) for k, v in stats.items()})


def _norm(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays))


def _reference_clipped_sum(updates, clip) -> list[np.ndarray]:
    """float64 numpy reference: tf.clip_by_global_norm semantics, then sum."""
    total = [np.zeros(s, np.float64) for _, s, _ in SPEC]
    for u in updates:
        norm = _norm(u.delta)
        scale = min(1.0, clip / norm) if clip is not None else 1.0
        for t, a in zip(total, u.delta):
            t += np.asarray(a, np.float64) * scale
    return total


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf
    import tensorflow_privacy  # noqa: F401  (import cost paid once per module)

    return tf


# --------------------------------------------------------------------------- clipping and summing


def test_each_update_is_clipped_to_clip_norm() -> None:
    rng = np.random.default_rng(0)
    clip = 0.5
    for scale in (1e-4, 0.01, 1.0, 50.0, 1e6):
        update = _update(rng, scale)
        acc = accumulator.add_update(accumulator.start_accumulator(SPEC, clip), update)
        clipped = accumulator.clipped_sum(acc)
        norm_in, norm_out = _norm(update.delta), _norm(clipped)
        if norm_in > clip:
            assert acc.clipped == 1
            assert norm_out <= clip * (1 + 1e-6)
            assert norm_out == pytest.approx(clip, rel=1e-6)
            # the direction is kept: clipping scales the whole update, not each tensor
            np.testing.assert_allclose(clipped[2], update.delta[2] * (clip / norm_in), rtol=1e-5, atol=1e-12)
        else:
            assert acc.clipped == 0
            for a, b in zip(clipped, update.delta):
                np.testing.assert_array_equal(a, b.astype(np.float64))


def test_clipped_sum_matches_float64_reference_across_flush_blocks() -> None:
    rng = np.random.default_rng(1)
    updates = [_update(rng, scale=rng.uniform(0.001, 0.05)) for _ in range(accumulator.FLUSH_EVERY * 2 + 7)]
    acc = accumulator.accumulate(accumulator.start_accumulator(SPEC, 0.3), iter(updates))
    assert acc.accepted == len(updates) and 0 < acc.clipped < len(updates)
    for got, want in zip(accumulator.clipped_sum(acc), _reference_clipped_sum(updates, 0.3)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_non_finite_updates_are_excluded_and_counted() -> None:
    rng = np.random.default_rng(2)
    good = [_update(rng, 0.01) for _ in range(3)]
    bad = []
    for value in (np.nan, np.inf, -np.inf):
        u = _update(rng, 0.01)
        delta = [np.array(a) for a in u.delta]
        delta[1][2] = value
        bad.append(dataclasses.replace(u, delta=tuple(delta)))
    huge = _update(rng, 1e36)  # finite, but its float32 squares overflow: must not count as non-finite
    acc = accumulator.accumulate(accumulator.start_accumulator(SPEC, 1.0), [good[0], bad[0], good[1], bad[1], huge, bad[2], good[2]])
    assert (acc.accepted, acc.non_finite, acc.clipped) == (4, 3, 1)
    assert acc.num_examples == 40
    for got, want in zip(accumulator.clipped_sum(acc), _reference_clipped_sum(good + [huge], 1.0)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_device_flagged_updates_and_bad_metric_statistics() -> None:
    rng = np.random.default_rng(12)
    flagged = dataclasses.replace(_update(rng, 0.0, **{"loss/sum": 0.0, "loss/count": 0.0}), metadata={"non_finite": "1"})
    bad_stats = [
        {"loss/sum": 1.0},  # a key missing
        {"loss/sum": np.nan, "loss/count": 2.0},  # non-finite
        {"recall/tp": 1.0, "recall/fn": -1.0},  # a negative count
        {"made_up/sum": 1.0, "made_up/count": 1.0},  # not an allowed metric
    ]
    good = _update(rng, 0.01, **{"loss/sum": 3.0, "loss/count": 2.0, "recall/tp": 1.0, "recall/fn": 3.0})
    updates = [flagged, good] + [_update(rng, 0.01, **stats) for stats in bad_stats]
    acc = accumulator.accumulate(accumulator.start_accumulator(SPEC, 1.0), updates)
    assert (acc.accepted, acc.non_finite, acc.metrics_rejected, acc.metric_clients) == (5, 1, 4, 2)
    values = server_round.default_metrics_finalizer(acc.metric_sums)
    assert values["loss"] == pytest.approx(1.5) and values["recall"] == pytest.approx(0.25)


def test_fixed_gaussian_divides_by_report_goal_not_count() -> None:
    rng = np.random.default_rng(3)
    updates = [_update(rng, 0.01) for _ in range(4)]
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=10.0, noise_multiplier=0.0))
    acc = accumulator.accumulate(dp.start(SPEC, dp.initial_state()), updates)
    mean, state, metrics = dp.finish(acc, dp.initial_state(), report_goal=10, seed=None)
    for got, want in zip(mean, _reference_clipped_sum(updates, 10.0)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want / 10, rtol=1e-6, atol=1e-9)
    assert state.release_count == 1 and state.last_seed is None
    assert metrics[dp_core.METRIC_ACCEPTED] == 4 and metrics[dp_core.METRIC_REPORT_GOAL] == 10


def test_no_dp_is_the_plain_mean_of_accepted_updates() -> None:
    rng = np.random.default_rng(4)
    updates = [_update(rng, 100.0) for _ in range(3)]  # large: nothing may be clipped
    dp = dp_mechanisms.build_dp_aggregator(DpParams())
    acc = accumulator.accumulate(dp.start(SPEC, dp.initial_state()), updates)
    mean, _, metrics = dp.finish(acc, dp.initial_state(), report_goal=50, seed=None)
    for i, got in enumerate(mean):
        want = np.mean([u.delta[i] for u in updates], axis=0, dtype=np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    assert metrics[dp_core.METRIC_CLIPPED] == 0 and metrics[dp_core.METRIC_NOISE_STDDEV] == 0


def test_streaming_holds_one_update_at_a_time() -> None:
    """Accumulating from a generator never keeps earlier updates alive."""
    rng = np.random.default_rng(5)
    alive: list[weakref.ref] = []
    max_alive = 0

    def updates(n: int) -> Iterator[ClientUpdate]:
        nonlocal max_alive
        for _ in range(n):
            gc.collect()
            max_alive = max(max_alive, sum(r() is not None for r in alive))
            u = _update(rng, 0.1)
            alive.append(weakref.ref(u.delta[2]))
            yield u

    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=1.0, noise_multiplier=0.0))
    state = server_round.initial_server_state([(n, np.zeros(s, np.float32)) for n, s, _ in SPEC], Sgd(1.0), dp)
    config = server_round.RoundConfig(report_goal=40, optimizer=Sgd(1.0), dp=dp)
    _, result, _ = server_round.server_round(state, updates(40), config)
    assert result.accepted == 40
    assert max_alive <= 1, f"{max_alive} earlier updates were still referenced while the next was built"


def test_peak_memory_does_not_grow_with_the_number_of_updates() -> None:
    big = [("w", (250_000,), "float32")]  # 1 MB per update
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=1.0, noise_multiplier=0.0))

    def peak(n: int) -> int:
        rng = np.random.default_rng(6)
        gen = (ClientUpdate.from_arrays([("w", rng.standard_normal(250_000).astype(np.float32))], 1) for _ in range(n))
        gc.collect()
        tracemalloc.start()
        try:
            acc = accumulator.accumulate(dp.start(big, dp.initial_state()), gen)
            dp.finish(acc, dp.initial_state(), report_goal=n, seed=None)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(10), peak(200)
    assert large < small * 1.1 + 100_000, (small, large)
    assert large < 12 * 250_000 * 4  # a few model-sized buffers, not N updates


def test_merged_shards_equal_one_pass_and_partials_round_trip() -> None:
    rng = np.random.default_rng(7)
    updates = [_update(rng, 0.05, num_examples=i + 1, **{"loss/sum": i, "loss/count": i + 1}) for i in range(45)]
    one = accumulator.accumulate(accumulator.start_accumulator(SPEC, 0.2), updates)
    a = accumulator.accumulate(accumulator.start_accumulator(SPEC, 0.2), updates[:20])
    b = accumulator.accumulate(accumulator.start_accumulator(SPEC, 0.2), updates[20:])
    b = accumulator.decode_partial(accumulator.encode_partial(b), SPEC)  # a shard's sum travels through the aggregate bucket
    merged = accumulator.merge_accumulators(a, b)
    for field in ("accepted", "non_finite", "clipped", "num_examples", "metric_clients"):
        assert getattr(merged, field) == getattr(one, field), field
    np.testing.assert_allclose(merged.metric_sums["loss/sum"], one.metric_sums["loss/sum"])
    for x, y in zip(accumulator.clipped_sum(merged), accumulator.clipped_sum(one)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="different models or clip norms"):
        accumulator.merge_accumulators(accumulator.start_accumulator(SPEC, 0.2), accumulator.start_accumulator(SPEC, 0.3))


def test_update_of_the_wrong_model_is_refused() -> None:
    acc = accumulator.start_accumulator(SPEC, 1.0)
    wrong = ClientUpdate.from_arrays([(n, np.zeros((2,), np.float32)) for n in NAMES], 1)
    with pytest.raises(InvalidRequestError, match="update tensor 'conv/kernel' is float32\\[2\\]"):
        accumulator.add_update(acc, wrong)


# --------------------------------------------------------------------------- DP parameters


@pytest.mark.parametrize(
    "params, fragment",
    [
        (DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=0.0, noise_multiplier=1.0), "clip_norm > 0"),
        (DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=None, noise_multiplier=1.0), "clip_norm > 0"),
        (DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=math.inf, noise_multiplier=1.0), "clip_norm > 0"),
        (DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=1.0, noise_multiplier=-0.1), "noise_multiplier must be >= 0"),
        (DpParams(None, noise_multiplier=0.5), "needs a DP mechanism"),
        (DpParams("ADADPTIVE_TREE", clip_norm=1.0), "unknown DP aggregator 'ADADPTIVE_TREE'"),
        (DpParams(DpMechanism.ADAPTIVE_GAUSSIAN, clip_norm=1.0, target_unclipped_quantile=2.0),
         r"target_unclipped_quantile must be in \[0, 1\]"),
    ],
)
def test_dp_params_are_validated_at_construction(params: DpParams, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        dp_mechanisms.build_dp_aggregator(params)


def test_noise_needs_a_seed_and_state_must_match_mechanism() -> None:
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=1.0, noise_multiplier=1.0))
    acc = dp.start(SPEC, dp.initial_state())
    with pytest.raises(ValueError, match="noise seed is required"):
        dp.finish(acc, dp.initial_state(), report_goal=5, seed=None)
    with pytest.raises(ConfigError, match="DP state is for NONE"):
        dp.start(SPEC, dp_mechanisms.build_dp_aggregator(DpParams()).initial_state())


def test_derived_seeds_are_deterministic_and_distinct() -> None:
    secret = dp_core.new_noise_secret()
    seeds = {dp_core.derive_noise_seed(secret, r) for r in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert dp_core.derive_noise_seed(secret, 7) == dp_core.derive_noise_seed(secret, 7)
    assert dp_core.derive_noise_seed(secret, 7) != dp_core.derive_noise_seed(dp_core.new_noise_secret(), 7)


# --------------------------------------------------------------------------- server round (no TF)


def test_server_round_applies_minus_mean_delta_as_gradient_and_metrics() -> None:
    rng = np.random.default_rng(8)
    init = [(n, rng.standard_normal(s).astype(np.float32)) for n, s, _ in SPEC]
    updates = [
        _update(rng, 0.01, num_examples=5, **{"loss/sum": 10.0, "loss/count": 5.0}),
        _update(rng, 0.01, num_examples=15, **{"loss/sum": 15.0, "loss/count": 15.0}),
    ]
    opt, dp = Sgd(1.0), dp_mechanisms.build_dp_aggregator(DpParams())
    state = server_round.initial_server_state(init, opt, dp)
    new, result, metrics = server_round.server_round(state, iter(updates), server_round.RoundConfig(report_goal=2, optimizer=opt, dp=dp))
    assert new.round == result.round == 1
    for w0, w1, m in zip(state.weights, new.weights, result.mean_delta):
        np.testing.assert_allclose(w1, w0 + m, rtol=1e-6, atol=1e-7)  # SGD(lr=1) on -mean_delta
    assert metrics[dp_core.METRIC_UPDATE_NON_FINITE] == 0.0
    assert metrics["server/client_work/train/loss"] == pytest.approx(25.0 / 20.0)  # not the mean of 2.0 and 1.0
    assert metrics["server/client_work/train/num_examples"] == 20
    assert metrics[server_round.METRIC_UPDATE_REJECTED] == 0.0
    assert result.noise_seed is None
    # the input state is untouched (state in, state out)
    np.testing.assert_array_equal(state.weights[0], init[0][1])


@dataclasses.dataclass(frozen=True)
class _NanAggregator(dp_gaussian.NoDpAggregator):
    """A plug-in aggregator (the protocol) whose release is non-finite."""

    def finish(self, acc, state, *, report_goal, seed=None):
        mean, state, metrics = super().finish(acc, state, report_goal=report_goal, seed=seed)
        return tuple(np.full_like(m, np.nan) for m in mean), state, metrics


def test_non_finite_aggregate_is_rejected_like_tff() -> None:
    rng = np.random.default_rng(9)
    opt, dp = Adam(0.1), _NanAggregator(DpParams())
    state = server_round.initial_server_state([(n, np.ones(s, np.float32)) for n, s, _ in SPEC], opt, dp)
    new, result, metrics = server_round.server_round(state, [_update(rng)], server_round.RoundConfig(report_goal=1, optimizer=opt, dp=dp))
    assert result.update_rejected and metrics[server_round.METRIC_UPDATE_REJECTED] == 1.0
    assert new.round == 1 and new.optimizer_state.step == 0
    for a, b in zip(new.weights, state.weights):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- noise (TensorFlow)


def test_equals_gaussian_sum_query_run_directly(tf) -> None:
    from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery

    rng = np.random.default_rng(10)
    records = [_update(rng, rng.uniform(0.001, 0.1)) for _ in range(9)]
    clip, z, goal, seed = 0.25, 0.8, 12, 2**62 + 12345

    query = GaussianSumQuery(l2_norm_clip=clip, stddev=z * clip)
    global_state = query.initial_global_state()
    params = query.derive_sample_params(global_state)
    sample_state = query.initial_sample_state([tf.constant(a) for a in records[0].delta])
    for r in records:
        pre = query.preprocess_record(params, [tf.constant(a) for a in r.delta])
        sample_state = query.accumulate_preprocessed_record(sample_state, pre)
    tf.random.set_seed(seed)
    direct, _, event = query.get_noised_result(sample_state, global_state)
    expected = [d.numpy() / goal for d in direct]
    assert float(event.noise_multiplier) == pytest.approx(z)

    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=clip, noise_multiplier=z))
    acc = accumulator.accumulate(dp.start(SPEC, dp.initial_state()), records)
    # the numpy clip + sum equals the query's own preprocess + accumulate
    for ours, theirs in zip(accumulator.clipped_sum(acc), sample_state):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)
    acc = accumulator.accumulate(dp.start(SPEC, dp.initial_state()), records)
    mean, state, metrics = dp.finish(acc, dp.initial_state(), report_goal=goal, seed=seed)
    assert acc.clipped > 0
    for got, want in zip(mean, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the noise is really there: the release is far from the noiseless mean
    assert _norm([m - s / goal for m, s in zip(mean, sample_state)]) > 10 * z * clip / goal
    assert state.last_seed == seed and metrics[dp_core.METRIC_NOISE_STDDEV] == pytest.approx(z * clip)


def test_same_seed_same_noise_and_tf_seed_restored(tf) -> None:
    sums = [np.zeros((300,), np.float64), np.ones((3, 4), np.float64)]
    tf.random.set_seed(42)
    a, _ = dp_core.gaussian_sum_query_noise(sums, clip_norm=1.0, stddev=2.0, seed=7)
    after_ours = tf.random.normal([5]).numpy()
    tf.random.set_seed(42)
    expected_after = tf.random.normal([5]).numpy()
    b, _ = dp_core.gaussian_sum_query_noise(sums, clip_norm=1.0, stddev=2.0, seed=7)
    c, _ = dp_core.gaussian_sum_query_noise(sums, clip_norm=1.0, stddev=2.0, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # our seeding does not disturb a caller's own seeded TF random sequence
    np.testing.assert_array_equal(after_ours, expected_after)


def test_noise_stddev_matches_noise_multiplier_times_clip_over_report_goal(tf) -> None:
    spec = [("w", (4000,), "float32"), ("b", (1000,), "float32")]
    z, clip, goal = 1.3, 0.7, 20
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=clip, noise_multiplier=z))
    secret = dp_core.new_noise_secret()
    samples = []
    state = dp.initial_state()
    for r in range(8):  # 8 rounds x 5000 coordinates of zero updates
        zeros = [("w", np.zeros(4000, np.float32)), ("b", np.zeros(1000, np.float32))]
        acc = accumulator.accumulate(dp.start(spec, state), (ClientUpdate.from_arrays(zeros, 1) for _ in range(goal)))
        mean, state, _ = dp.finish(acc, state, report_goal=goal, seed=dp_core.derive_noise_seed(secret, r))
        samples.append(np.concatenate([m.ravel() for m in mean]))
    values = np.concatenate(samples).astype(np.float64)
    target = z * clip / goal
    assert abs(values.std() / target - 1) < 0.05
    assert abs(values.mean()) < 5 * target / math.sqrt(values.size)
    assert state.release_count == 8
    assert not np.array_equal(samples[0], samples[1])  # fresh noise every round


def test_rerun_with_same_seed_is_bit_identical(tf) -> None:
    """A crashed round re-run from the same checkpoint and uploads gives the same bytes."""
    rng = np.random.default_rng(11)
    blobs = [encode_client_update(list(zip(NAMES, _update(rng, 0.2).delta)), 3) for _ in range(6)]
    opt = Adam(0.01)
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=0.5, noise_multiplier=1.0))
    state = server_round.initial_server_state([(n, np.zeros(s, np.float32)) for n, s, _ in SPEC], opt, dp)
    config = server_round.RoundConfig(report_goal=5, optimizer=opt, dp=dp, noise_seed=dp_core.derive_noise_seed(b"k" * 32, 0))

    def run(cfg):
        return server_round.server_round(state, (decode_client_update(b, expected_spec=SPEC) for b in blobs), cfg)

    first, second = run(config), run(config)
    for a, b in zip(first[0].weights + first[1].mean_delta, second[0].weights + second[1].mean_delta):
        assert a.tobytes() == b.tobytes()
    assert first[2] == second[2]
    assert first[1].noise_seed == config.noise_seed == first[0].dp_state.last_seed
    other = run(dataclasses.replace(config, noise_seed=config.noise_seed + 1))
    assert other[0].weights[2].tobytes() != first[0].weights[2].tobytes()
