"""Streamed aggregation on the real stack: full accept counters are summed while the round collects.

The default stack (streaming on). A round of 250 reports has three accept counters; the real
ingestion accepts sealed updates, fills the counters one after another and publishes each full
counter's shard; the aggregator sums it into a partial while the round still collects. The
close publishes only the shards not done, the last one triggers the combine, and the
checkpoint equals the single-job aggregation of the same updates with the same noise seed.
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from fedcompute.dp import DpParams
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundStatus
from support.helpers import unique
from support.stack_plugin import StackHandle
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
GOAL = 250  # three accept counters of 84, 83 and 83 positions
EARLY = 200  # uploads before the rest: at least one counter is full, the round cannot close


def test_full_accept_counters_are_aggregated_while_the_round_collects_and_the_round_equals_the_single_job(
        local_stack: StackHandle) -> None:
    dp = DpParams(mechanism="FIXED_GAUSSIAN", noise_multiplier=0.5, clip_norm=0.4)
    task = create_numpy_task(local_stack, unique("streamed"), report_goal=GOAL, rounds=2, dp=dp, target_epsilon=1e6,
                             population_size=100_000)
    key, settings = task.key(1), local_stack.settings
    rng = np.random.default_rng(5)
    ids = [f"stream{i:03d}-{uuid.uuid4()}" for i in range(GOAL + 2)]
    now = time.time()
    for slot, aid in enumerate(ids):
        task.store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                      AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))

    def upload(aids: list[str]) -> None:
        for aid in aids:  # every third update is clipped
            update, _ = make_update(task, random_delta(task, rng, scale=1.0 if ids.index(aid) % 3 == 0 else 0.2))
            task.blobs.write(settings.gradient_bucket, gradient_object(task, 1, aid),
                             seal_for_stack(local_stack, aid, update), create_only=True)

    round_id = f"{key.population}/{key.task_id}/1"
    upload(ids[:EARLY])
    early = wait_until(lambda: log_lines(local_stack, "aggregator", f"{round_id} shard ", "/3: SHARD_DONE"), 120,
                       what="a shard summed while the round collects")
    assert task.round_record(1).status == RoundStatus.COLLECTING  # 200 of 250: it cannot have closed
    upload(ids[EARLY:])  # the goal and two surplus uploads
    task.wait_round(1, timeout_s=180)

    wait_until(lambda: log_lines(local_stack, "aggregator", f"{round_id}: AGGREGATED"), 60, what="the combine's log")
    done = log_lines(local_stack, "aggregator", f"{round_id} shard ", "SHARD_DONE")
    assert sorted({line.split(" shard ")[1][:3] for line in done}) == ["0/3", "1/3", "2/3"]
    assert len(early) >= 1 and len(log_lines(local_stack, "aggregator", f"{round_id}: AGGREGATED")) == 1
    assert sorted(task.store.accepted_ids(key)) == sorted(set(task.store.accepted_ids(key)))
    assert len(task.store.accepted_ids(key)) == GOAL  # exactly the goal: the surplus was refused
    assert task.blobs.list(settings.aggregate_bucket, f"{key.population}/{key.task_id}/1/") == []

    expected, result = unsharded_reference(local_stack, task, 1)
    assert result.accepted == GOAL
    for got, want in zip(task.checkpoint_weights(1), expected.weights):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert task.round_metrics(1)["server/aggregator/num_reports"] == GOAL
