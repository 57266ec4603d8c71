"""A round never sits in AGGREGATING because of its inputs: a lost update.

Through the stack's public interfaces: uploads to the gradient bucket, round-ready on its
Pub/Sub topic, results read from the model bucket. Statistics whose round sum would overflow
never reach the aggregator: ingestion refuses them (contribution bounds,
``test_hostile_devices.py::test_two_hostile_devices_cannot_stall_a_round_or_set_its_accuracy``);
the aggregator's own guard behind that is a unit test
(``test_round_races_and_idempotency.py::test_a_metric_whose_round_sum_overflows_is_left_out_and_counted``).
"""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedcompute.adapters.events import encode_round_event
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundStatus, TaskStatus
from support.helpers import unique
from support.tasks import create_numpy_task, gradient_object, make_update, random_delta, seal_for_stack

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
        name = gradient_object(task, 1, aid)
        task.blobs.write(local_stack.settings.gradient_bucket, name,
                         seal_for_stack(local_stack, aid, make_update(task, delta, seed=i)[0]), create_only=True)
        # ... once ingestion has seen it (else its notification may race the accept below) ...
        needle = f"ingestion of gs://{local_stack.settings.gradient_bucket}/{name}: "
        assert "UNKNOWN_ASSIGNMENT" in local_stack.wait_for_log("result_ingestion", needle, 60)
        now = time.time()
        store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                 AssignmentStatus.LOCAL_COMPLETED, "1", i, now, now))
        assert store.accept_upload(key, aid).outcome == "ACCEPTED"  # ... then it is accepted
    task.blobs.delete(local_stack.settings.gradient_bucket, gradient_object(task, 1, ids[1]))  # and lost
    store.update_round(key, {"status": RoundStatus.AGGREGATING, "aggregating_time": time.time()},
                           expected=[RoundStatus.COLLECTING])
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

