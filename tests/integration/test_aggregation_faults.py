"""A round never sits in AGGREGATING because of its inputs: a lost update, an overflowing sum.

Through the stack's public interfaces: devices over HTTP, uploads to the gradient bucket,
round-ready on its Pub/Sub topic, results read from the model bucket.
"""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedcompute.adapters.events import encode_round_event
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, IterationStatus, TaskStatus
from support.helpers import unique
from support.tasks import create_numpy_task, gradient_object, make_update, random_delta, run_device

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration


def test_a_missing_accepted_update_is_left_out_and_counted(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("lost"), report_goal=2, rounds=1)
    key, store = task.key(1), task.store
    rng = np.random.default_rng(3)
    deltas = [random_delta(task, rng) for _ in range(2)]
    ids = [f"lost{i}-{uuid.uuid4()}" for i in range(2)]
    for i, (aid, delta) in enumerate(zip(ids, deltas)):
        # The update lands first (ingestion ignores an object without an assignment) ...
        task.blobs.write(local_stack.settings.gradient_bucket, gradient_object(task, 1, aid),
                         make_update(task, delta, seed=i)[0], create_only=True)
        now = time.time()
        store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                 AssignmentStatus.LOCAL_COMPLETED, "1", i, now, now))
        assert store.accept_upload(key, aid).outcome == "ACCEPTED"  # ... then it is accepted
    task.blobs.delete(local_stack.settings.gradient_bucket, gradient_object(task, 1, ids[1]))  # and lost
    store.update_iteration(key, {"status": IterationStatus.AGGREGATING, "aggregating_time": time.time()},
                           expected=[IterationStatus.COLLECTING])
    publisher = local_stack.clients.publisher
    publisher.publish(publisher.topic_path(local_stack.settings.project, local_stack.settings.topics.round_ready),
                      encode_round_event(key)).result(timeout=10)

    task.wait_round(1, timeout_s=60)
    metrics = task.round_metrics(1)
    assert metrics["server/aggregator/missing_updates"] == 1.0
    assert metrics["server/aggregator/num_reports"] == 1.0
    # Without DP the mean is over the updates summed (with DP the divisor is the report goal).
    for got, initial, kept in zip(task.checkpoint_weights(1), task.initial, deltas[0]):
        np.testing.assert_allclose(got, initial + kept, atol=1e-5)
    assert task.record().status == TaskStatus.COMPLETED


def test_an_overflowing_metric_sum_does_not_stall_the_round(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("overflow"), report_goal=2, rounds=1, metrics=("binary_accuracy",))
    client = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30)
    rng = np.random.default_rng(4)
    deltas = [random_delta(task, rng) for _ in range(2)]
    huge = {name: np.full(np.shape(value), 1e308) for name, value in make_update(task, deltas[0])[1].items()}
    for delta in deltas:  # each device's statistics are finite; their sum is not
        payload, _ = make_update(task, delta, stats=huge)
        assert run_device(client, task.population, payload).upload_status == 200

    task.wait_round(1, timeout_s=60)
    metrics = task.round_metrics(1)
    assert metrics["server/aggregator/metrics_overflowed"] >= 1.0
    assert "server/client_work/train/binary_accuracy" not in metrics
    for got, initial, d0, d1 in zip(task.checkpoint_weights(1), task.initial, deltas[0], deltas[1]):
        np.testing.assert_allclose(got, initial + (d0 + d1) / 2, atol=1e-5)  # the model still trained
    assert task.record().status == TaskStatus.COMPLETED
