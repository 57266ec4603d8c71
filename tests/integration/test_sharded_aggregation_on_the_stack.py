"""Sharded aggregation on the real stack (K = 4): equal to the single job, exactly once under redelivery.

A stack of this module's own runs with ``FEDCOMPUTE_AGGREGATION_SHARDS=4``. Devices' sealed
updates land in the gradient bucket; the real ingestion accepts them and closes the round;
the aggregator fans out 4 ``aggregation-shard`` messages over the Pub/Sub emulator, the last
shard publishes round-ready and the combine writes the checkpoint. Shard messages are
duplicated while the round aggregates, and a shard and a combine message are re-delivered
after it completed. The checkpoint is compared with the unsharded aggregation of the same
updates with the same noise seed, computed in this process.
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from fedcompute.adapters.events import encode_round_event
from fedcompute.dp import DpParams
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundStatus
from support.helpers import unique
from support.stack_plugin import StackHandle, running_stack
from support.tasks import (
    create_numpy_task,
    gradient_object,
    log_lines,
    make_update,
    random_delta,
    seal_for_stack,
    unsharded_reference,
    wait_until,
)

pytestmark = pytest.mark.integration
SHARDS = 4
GOAL = 10


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    """A stack whose aggregator splits every round in 4 shards (the functions inherit the variable)."""
    saved = os.environ.get("FEDCOMPUTE_AGGREGATION_SHARDS")
    os.environ["FEDCOMPUTE_AGGREGATION_SHARDS"] = str(SHARDS)
    try:
        yield from running_stack(tmp_path_factory)
    finally:
        if saved is None:
            os.environ.pop("FEDCOMPUTE_AGGREGATION_SHARDS", None)
        else:
            os.environ["FEDCOMPUTE_AGGREGATION_SHARDS"] = saved


def _publish(stack: StackHandle, topic: str, data: bytes) -> None:
    publisher = stack.clients.publisher
    publisher.publish(publisher.topic_path(stack.settings.project, topic), data).result(timeout=10)


def test_a_round_in_four_shards_equals_the_single_job_exactly_once_under_redelivery(local_stack: StackHandle):
    dp = DpParams(mechanism="FIXED_GAUSSIAN", noise_multiplier=0.5, clip_norm=0.4)
    task = create_numpy_task(local_stack, unique("sharded"), report_goal=GOAL, rounds=2, dp=dp, target_epsilon=1e6,
                             population_size=1_000)
    key, store, settings = task.key(1), task.store, local_stack.settings
    rng = np.random.default_rng(11)
    ids = sorted(f"shard{i:02d}-{uuid.uuid4()}" for i in range(GOAL))
    now = time.time()
    for slot, aid in enumerate(ids):
        store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                 AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))
    for i, aid in enumerate(ids):  # the real ingestion accepts them and closes the round at its goal
        update, _ = make_update(task, random_delta(task, rng, scale=0.2 if i % 2 else 1.0), seed=i)
        task.blobs.write(settings.gradient_bucket, gradient_object(task, 1, aid),
                         seal_for_stack(local_stack, aid, update), create_only=True)

    task.wait_round(1, RoundStatus.AGGREGATING, timeout_s=120)
    for shard in range(SHARDS):  # duplicated shard messages, possibly ahead of the plan (then retried)
        _publish(local_stack, settings.topics.aggregation_shard, encode_round_event(key, shard=shard, shards=SHARDS))
    task.wait_round(1, timeout_s=240)

    round_id = f"{key.population}/{key.task_id}/1"
    wait_until(lambda: log_lines(local_stack, "aggregator", f"{round_id}: AGGREGATED"), 60, what="the combine's log")
    shard_lines = " ".join(log_lines(local_stack, "aggregator", f"{round_id} shard "))
    assert all(f"shard {s}/{SHARDS}: SHARD_DONE" in shard_lines for s in range(SHARDS))

    def settled() -> int | None:  # duplicated messages still in flight answer first
        count = len(log_lines(local_stack, "aggregator", round_id))
        time.sleep(3)
        return count if count == len(log_lines(local_stack, "aggregator", round_id)) else None

    wait_until(settled, 120, what="the aggregator's answers to the duplicates")

    # Re-delivered after completion: a shard message and a combine (round-ready) message change nothing.
    def already_done() -> int:
        return len(log_lines(local_stack, "aggregator", round_id, "ALREADY_DONE"))

    before = already_done()
    _publish(local_stack, settings.topics.aggregation_shard, encode_round_event(key, shard=1, shards=SHARDS))
    _publish(local_stack, settings.topics.round_ready, encode_round_event(key))
    wait_until(lambda: already_done() >= before + 2 or None, 60, what="both re-deliveries answered")
    assert len(log_lines(local_stack, "aggregator", f"{round_id}: AGGREGATED")) == 1  # one combine completed it
    assert task.record().current_round == 2 and task.round_record(2).status == RoundStatus.COLLECTING
    assert task.blobs.list(settings.aggregate_bucket, f"{key.population}/{key.task_id}/1/") == []

    # The unsharded aggregation of the same accepted updates with the same noise seed.
    expected, result = unsharded_reference(local_stack, task, 1)
    assert result.accepted == GOAL and result.clipped > 0
    for got, want in zip(task.checkpoint_weights(1), expected.weights):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    metrics = task.round_metrics(1)
    assert metrics["server/aggregator/num_reports"] == GOAL
    assert metrics["server/aggregator/noise_stddev"] == pytest.approx(0.5 * 0.4)
