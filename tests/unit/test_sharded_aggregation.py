"""Sharded aggregation on in-memory ports: K partial jobs + one combine equal the single job.

Drives the aggregator's messages by hand (round-ready -> K aggregation-shard -> round-ready
from the last shard -> combine) and re-delivers, duplicates and kills each stage.
"""
from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.dp import DpMechanism, DpParams
from fedcompute.errors import InvariantError, TransientError
from fedcompute.learning import checkpoint, upload_contract
from fedcompute.learning.sharding import PER_OBJECT_COST_BYTES, shard_count, shard_positions, streamed_shards
from fedcompute.learning.tensor_codec import encode_client_update
from fedcompute.memory import InMemoryBlobStore, InMemoryRoundEvents, InMemoryTaskStore
from fedcompute.plans import ServerPhase
from fedcompute.services import aggregator, ingestion
from fedcompute.services import task_management as tm
from fedcompute.settings import Settings
from fedcompute.taskbuilder.artifacts import artifacts_from_weights, publish_artifacts, weight_specs
from fedcompute.tasks.quota import ShardedQuota
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundKey, RoundStatus, TaskKind

POP = "sharded"
GOAL = 13  # not a multiple of K: uneven slices
UNSHARDED = Settings(aggregation_shards=1)
SHARDED = Settings(aggregation_shards=4)
DP = DpParams(DpMechanism.FIXED_GAUSSIAN, noise_multiplier=0.7, clip_norm=3.0, noise_seed=1234)


def _round(dp: DpParams = DP) -> tuple[InMemoryTaskStore, InMemoryBlobStore, InMemoryRoundEvents, RoundKey]:
    """A task whose round 1 holds GOAL uploads (some clipped, one non-finite), now AGGREGATING."""
    store, blobs, events = InMemoryTaskStore(), InMemoryBlobStore(), InMemoryRoundEvents()
    task = tm.create_task(store, tm.NewTask(population=POP, kind=TaskKind.TRAINING, total_rounds=3,
                                            report_goal=GOAL, max_aggregation_size=GOAL))
    weights = [np.linspace(-1, 1, 40, dtype=np.float32).reshape(8, 5), np.zeros(5, np.float32)]
    phase = ServerPhase("FED_AVG", "ADAM", 0.1, GOAL, 0.0, 3, 1000, 10.0, 1e-6, dp, weight_specs(weights),
                        ("loss",))
    publish_artifacts(blobs, UNSHARDED, POP, task.task_id, artifacts_from_weights(phase, weights))
    tm.open_task(store, blobs, UNSHARDED, POP, task.task_id)
    key = RoundKey(POP, task.task_id, 1)
    rng = np.random.default_rng(7)
    stats_spec = upload_contract.metric_statistics_spec(("loss",))
    for i in range(GOAL):
        aid = f"device-{i:03d}"
        store.create_assignment(AssignmentRecord(aid, POP, task.task_id, 1, AssignmentStatus.UPLOAD_COMPLETED, "1",
                                                 i, 0, 0))
        scale = 5.0 if i % 3 == 0 else 0.2  # every third update is clipped
        delta = [("trainable/0", (rng.standard_normal((8, 5)) * scale).astype(np.float32)),
                 ("trainable/1", (rng.standard_normal(5) * scale).astype(np.float32))]
        stats = {name: np.full(shape, 1.0 + i) for name, shape, _ in stats_spec}
        blobs.write(UNSHARDED.gradient_bucket, layout.gradient_path(POP, task.task_id, 1, aid),
                    encode_client_update(delta, 10 + i, stats, metadata={"non_finite": "1"} if i == 5 else None))
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    return store, blobs, events, key


def _checkpoint(blobs: InMemoryBlobStore, key: RoundKey) -> checkpoint.ServerState:
    return checkpoint.decode_checkpoint(blobs.read(UNSHARDED.model_bucket, layout.checkpoint_path(
        key.population, key.task_id, key.round_number)))


def _metrics(blobs: InMemoryBlobStore, key: RoundKey) -> dict[str, float]:
    return json.loads(blobs.read(UNSHARDED.model_bucket, layout.metrics_path(key.population, key.task_id,
                                                                              key.round_number)))


def _deliver_shards(store, blobs, events, key, *, twice: bool = False) -> list[str]:
    """Deliver every published shard message (each twice when asked); the outcomes."""
    outcomes = []
    pending, events.shards[:] = list(events.shards), []
    for shard_key, shard, shards in pending:
        for _ in range(2 if twice else 1):
            outcomes.append(aggregator.aggregate_shard(store, blobs, events, SHARDED, shard_key, shard, shards).status)
    return outcomes


def test_sharded_round_equals_the_single_job_with_the_same_noise_seed():
    single = _round()
    assert aggregator.aggregate_round(*single[:3], UNSHARDED, single[3]).status == "AGGREGATED"

    store, blobs, events, key = _round()
    assert aggregator.aggregate_round(store, blobs, events, SHARDED, key).status == "SHARDS_PUBLISHED"
    assert [s for _, s, _ in events.shards] == [0, 1, 2, 3] and events.ready == []
    outcomes = _deliver_shards(store, blobs, events, key)
    assert outcomes == ["SHARD_DONE"] * 3 + ["SHARD_DONE_COMBINE_PUBLISHED"]  # the last one triggers the combine
    assert events.ready == [key]
    assert aggregator.aggregate_round(store, blobs, events, SHARDED, key).status == "AGGREGATED"

    expected, got = _checkpoint(single[1], single[3]), _checkpoint(blobs, key)
    for a, b in zip(expected.weights, got.weights):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert not np.allclose(got.weights[0], _initial(blobs, key)[0])  # the round moved the model
    assert got.dp_state.last_seed == expected.dp_state.last_seed is not None  # noised once, same seed
    assert _metrics(blobs, key) == pytest.approx(_metrics(single[1], single[3]), abs=1e-9)
    metrics = _metrics(blobs, key)
    assert metrics["server/aggregator/num_reports"] == GOAL - 1  # the non-finite one is excluded, counted
    assert metrics["server/aggregator/clipped_updates"] == 5.0
    assert blobs.list(SHARDED.aggregate_bucket, "") == []  # partials deleted after the round
    assert len(events.completed) == 1 and store.get_round(key).status == RoundStatus.COMPLETED


def _initial(blobs: InMemoryBlobStore, key: RoundKey) -> tuple[np.ndarray, ...]:
    return checkpoint.decode_checkpoint(blobs.read(UNSHARDED.model_bucket, layout.checkpoint_path(
        key.population, key.task_id, 0))).weights


def test_redelivered_and_duplicated_messages_aggregate_the_round_exactly_once():
    store, blobs, events, key = _round()
    aggregator.aggregate_round(store, blobs, events, SHARDED, key)
    aggregator.aggregate_round(store, blobs, events, SHARDED, key)  # round-ready re-delivered before any shard
    assert len(events.shards) == 8  # unfinished shards are sent again; their partials are create-only
    outcomes = _deliver_shards(store, blobs, events, key, twice=True)
    # Every re-delivery after the set is complete re-triggers the combine (idempotent), none before.
    assert outcomes.count("SHARD_DONE_COMBINE_PUBLISHED") == len(events.ready) > 0
    for _ in events.ready:  # every combine message, as delivered
        aggregator.aggregate_round(store, blobs, events, SHARDED, key)
    assert len(events.completed) == 1
    reference = _round()
    aggregator.aggregate_round(*reference[:3], UNSHARDED, reference[3])
    for a, b in zip(_checkpoint(reference[1], reference[3]).weights, _checkpoint(blobs, key).weights):
        np.testing.assert_allclose(b, a, atol=1e-6)
    # A shard message arriving after the round completed does nothing.
    assert aggregator.aggregate_shard(store, blobs, events, SHARDED, key, 2, 4).status == "ALREADY_DONE"
    assert aggregator.aggregate_round(store, blobs, events, SHARDED, key).status == "ALREADY_DONE"


class _FailingWrites(InMemoryBlobStore):
    """Fails the first write whose name contains ``marker`` (a process killed at that point)."""

    def __init__(self, inner: InMemoryBlobStore, marker: str) -> None:
        self.__dict__.update(inner.__dict__)
        self.marker, self.failed = marker, False

    def write(self, bucket, name, data, **kwargs):
        if self.marker in name and not self.failed:
            self.failed = True
            raise TransientError(f"killed while writing {name}")
        return super().write(bucket, name, data, **kwargs)


def test_a_killed_shard_and_a_killed_combine_are_repaired_by_redelivery():
    store, blobs, events, key = _round()
    aggregator.aggregate_round(store, blobs, events, SHARDED, key)
    killing = _FailingWrites(blobs, "/partial/4/2")
    pending, events.shards[:] = list(events.shards), []
    for shard_key, shard, shards in pending:
        try:
            aggregator.aggregate_shard(store, killing, events, SHARDED, shard_key, shard, shards)
        except TransientError:
            pass  # Pub/Sub re-delivers it
    assert events.ready == []  # shard 2 never finished: no combine
    assert aggregator.aggregate_shard(store, killing, events, SHARDED, key, 2, 4).status == \
        "SHARD_DONE_COMBINE_PUBLISHED"

    killed_combine = _FailingWrites(killing, layout.checkpoint_path(POP, key.task_id, 1))
    with pytest.raises(TransientError):
        aggregator.aggregate_round(store, killed_combine, events, SHARDED, key)
    assert store.get_round(key).status == RoundStatus.AGGREGATING
    assert aggregator.aggregate_round(store, killed_combine, events, SHARDED, key).status == "AGGREGATED"
    reference = _round()
    aggregator.aggregate_round(*reference[:3], UNSHARDED, reference[3])
    for a, b in zip(_checkpoint(reference[1], reference[3]).weights, _checkpoint(killed_combine, key).weights):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_a_partial_lost_after_its_shard_finished_is_aggregated_again():
    store, blobs, events, key = _round()
    aggregator.aggregate_round(store, blobs, events, SHARDED, key)
    _deliver_shards(store, blobs, events, key)
    blobs.delete(SHARDED.aggregate_bucket, layout.partial_aggregate_path(POP, key.task_id, 1, 4, 1))
    assert aggregator.aggregate_round(store, blobs, events, SHARDED, key).status == "SHARD_REPUBLISHED"
    assert [(s, k) for _, s, k in events.shards] == [(1, 4)]
    _deliver_shards(store, blobs, events, key)
    assert aggregator.aggregate_round(store, blobs, events, SHARDED, key).status == "AGGREGATED"


def test_the_first_round_ready_fixes_the_shard_count():
    store, blobs, events, key = _round()
    aggregator.aggregate_round(store, blobs, events, SHARDED, key)
    aggregator.aggregate_round(store, blobs, events, dataclasses.replace(SHARDED, aggregation_shards=3), key)
    assert {k for _, _, k in events.shards} == {4}
    with pytest.raises(InvariantError, match="planned in 4 shards"):
        aggregator.aggregate_shard(store, blobs, events, SHARDED, key, 0, 3)


def test_shard_slices_cover_every_accept_position_once():
    for goal, shards in ((13, 4), (28_001, 16), (5, 5), (1, 1)):
        covered = [p for shard in range(shards) for p in shard_positions(goal, shards, shard)]
        assert covered == list(range(goal))
    with pytest.raises(InvariantError):
        shard_positions(10, 4, 4)


def test_shard_count_grows_with_report_goal_times_update_bytes_within_the_instance_budget():
    cnn = 6_200_000
    assert shard_count(1000, cnn, shard_bytes=1 << 30, max_shards=16) == 7
    assert shard_count(100, cnn, shard_bytes=1 << 30, max_shards=16) == 1  # today's single job
    assert shard_count(10_000, 31_000, shard_bytes=1 << 30, max_shards=16) == 3
    assert shard_count(100_000, cnn, shard_bytes=1 << 30, max_shards=16) == 16  # capped by the budget
    assert shard_count(3, cnn, shard_bytes=1, max_shards=16) == 3  # never more shards than reports
    assert shard_count(1000, 0, shard_bytes=PER_OBJECT_COST_BYTES * 100, max_shards=64) == 10
    assert shard_count(1000, cnn, shard_bytes=1 << 30, max_shards=16, forced=4) == 4
    assert shard_count(2, cnn, shard_bytes=1 << 30, max_shards=16, forced=4) == 2


def test_shard_settings_come_from_the_environment_and_bad_values_are_refused():
    from fedcompute.errors import ConfigError

    settings = Settings.from_env({"FEDCOMPUTE_AGGREGATION_SHARDS": "4", "FEDCOMPUTE_MAX_AGGREGATION_SHARDS": "8"})
    assert (settings.aggregation_shards, settings.max_aggregation_shards) == (4, 8)
    with pytest.raises(ConfigError, match="FEDCOMPUTE_AGGREGATION_SHARDS"):
        Settings.from_env({"FEDCOMPUTE_AGGREGATION_SHARDS": "four"})


def test_a_shard_message_ahead_of_its_plan_is_retried():
    store, blobs, events, key = _round()
    with pytest.raises(TransientError, match="no shard plan"):
        aggregator.aggregate_shard(store, blobs, events, SHARDED, key, 1, 4)
    aggregator.aggregate_round(store, blobs, events, SHARDED, key)  # round-ready plans 4 shards
    _deliver_shards(store, blobs, events, key)  # shard 1 reuses the partial its early message wrote
    assert aggregator.aggregate_round(store, blobs, events, SHARDED, key).status == "AGGREGATED"


STREAM_GOAL = 250  # three accept counters: positions 0-83, 84-166, 167-249


def _collecting_round(goal: int = STREAM_GOAL):
    """A task whose round 1 collects: ``goal`` + 3 devices ready to upload (LOCAL_COMPLETED)."""
    store, blobs, events = InMemoryTaskStore(), InMemoryBlobStore(), InMemoryRoundEvents()
    task = tm.create_task(store, tm.NewTask(population=POP, kind=TaskKind.TRAINING, total_rounds=3,
                                            report_goal=goal, max_aggregation_size=goal + 3))
    weights = [np.linspace(-1, 1, 40, dtype=np.float32).reshape(8, 5), np.zeros(5, np.float32)]
    phase = ServerPhase("FED_AVG", "ADAM", 0.1, goal, 3 / goal, 3, 1000, 10.0, 1e-6, DP, weight_specs(weights),
                        ("loss",))
    publish_artifacts(blobs, UNSHARDED, POP, task.task_id, artifacts_from_weights(phase, weights))
    tm.open_task(store, blobs, UNSHARDED, POP, task.task_id)
    rng = np.random.default_rng(11)
    stats_spec = upload_contract.metric_statistics_spec(("loss",))
    ids = [f"device-{i:03d}" for i in range(goal + 3)]
    for i, aid in enumerate(ids):
        store.create_assignment(AssignmentRecord(aid, POP, task.task_id, 1, AssignmentStatus.LOCAL_COMPLETED, "1",
                                                 i, 0, 0))
        scale = 5.0 if i % 3 == 0 else 0.2
        delta = [("trainable/0", (rng.standard_normal((8, 5)) * scale).astype(np.float32)),
                 ("trainable/1", (rng.standard_normal(5) * scale).astype(np.float32))]
        blobs.write(UNSHARDED.gradient_bucket, layout.gradient_path(POP, task.task_id, 1, aid),
                    encode_client_update(delta, 10 + i, {name: np.full(shape, 1.0 + i) for name, shape, _ in stats_spec}))
    return store, blobs, events, RoundKey(POP, task.task_id, 1), ids


def _ingest(store, blobs, events, settings: Settings, key: RoundKey, aid: str) -> str:
    name = layout.gradient_path(POP, key.task_id, 1, aid)
    size = len(blobs.read(settings.gradient_bucket, name))
    return ingestion.ingest_upload(store, blobs, events, settings,
                                   ingestion.ObjectFinalized(f"ev-{aid}", settings.gradient_bucket, name, size),
                                   validate=lambda data, task: None).outcome


def test_a_streamed_round_sums_each_filled_accept_counter_while_collecting_and_equals_the_single_job():
    streamed = Settings()  # streaming is the default
    assert shard_count(STREAM_GOAL, 1 << 20, shard_bytes=1 << 30, max_shards=16, streaming=True) == 3

    store, blobs, events, key, ids = _collecting_round()
    outcomes = []
    for aid in ids[:84]:  # the first counter fills: its shard is published, the round still collects
        outcomes.append(_ingest(store, blobs, events, streamed, key, aid))
    assert outcomes == ["ACCEPTED"] * 84 and events.shards == [(key, 0, 3)] and events.ready == []
    assert _deliver_shards(store, blobs, events, key) == ["SHARD_DONE"]
    assert store.get_round(key).status == RoundStatus.COLLECTING
    assert blobs.list(streamed.aggregate_bucket, "")  # the partial is written before the close
    # A shard whose positions are not all filled does nothing while the round collects.
    assert aggregator.aggregate_shard(store, blobs, events, streamed, key, 1, 3).status == "NOT_READY"
    for aid in ids[84:167]:
        _ingest(store, blobs, events, streamed, key, aid)
    assert [s for _, s, _ in events.shards] == [1]
    assert _deliver_shards(store, blobs, events, key) == ["SHARD_DONE"]
    for aid in ids[167:STREAM_GOAL]:  # the last accept closes the round; its counter is left to the close
        _ingest(store, blobs, events, streamed, key, aid)
    assert events.shards == [] and events.ready == [key] and store.get_round(key).status == RoundStatus.AGGREGATING
    assert _ingest(store, blobs, events, streamed, key, ids[-1]) == "LATE_UPLOAD"  # the surplus is refused
    # The close publishes only the shard not done yet; the last shard triggers the combine.
    assert aggregator.aggregate_round(store, blobs, events, streamed, key).status == "SHARDS_PUBLISHED"
    assert [s for _, s, _ in events.shards] == [2]
    assert _deliver_shards(store, blobs, events, key) == ["SHARD_DONE_COMBINE_PUBLISHED"]
    assert aggregator.aggregate_round(store, blobs, events, streamed, key).status == "AGGREGATED"

    single = _collecting_round()
    unstreamed = dataclasses.replace(streamed, aggregation_streaming=False)
    for aid in single[4][:STREAM_GOAL]:
        _ingest(*single[:3], unstreamed, single[3], aid)
    assert single[2].shards == []
    assert aggregator.aggregate_round(*single[:3], unstreamed, single[3]).status == "AGGREGATED"
    expected, got = _checkpoint(single[1], single[3]), _checkpoint(blobs, key)
    for a, b in zip(expected.weights, got.weights):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert got.dp_state.last_seed == expected.dp_state.last_seed is not None
    assert _metrics(blobs, key)["server/aggregator/num_reports"] == STREAM_GOAL
    assert _metrics(blobs, key) == pytest.approx(_metrics(single[1], single[3]), abs=1e-9)


def test_accept_counters_fill_in_order_when_streamed_and_spread_otherwise():
    quota, rng = ShardedQuota.for_total(1000), random.Random(3)
    assert sorted(quota.probe_order(rng)) == list(range(10))
    for _ in range(20):
        order = quota.probe_order(rng, {0, 1, 2}, window=2)
        assert sorted(order[:2]) == [3, 4] and order[2:] == [5, 6, 7, 8, 9]
    assert any(quota.probe_order(rng)[:2] not in ([0, 1], [1, 0]) for _ in range(20))


def test_streaming_is_on_by_default_and_off_when_forced_or_for_one_counter():
    assert Settings.from_env({}).aggregation_streaming
    assert not Settings.from_env({"FEDCOMPUTE_AGGREGATION_STREAMING": "off"}).aggregation_streaming
    assert streamed_shards(1000, streaming=True) == 10 and streamed_shards(100, streaming=True) == 0
    assert streamed_shards(1000, streaming=True, forced=4) == 0
    assert streamed_shards(1000, streaming=False) == 0

