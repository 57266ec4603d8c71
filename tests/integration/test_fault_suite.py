"""Audit findings of issue 13 that had only unit tests, reproduced through the public
interfaces of the live local stack (device HTTP, GCS uploads, Pub/Sub-driven aggregation):

- DP type NONE had no clip: one 1e30 update destroyed the model (Medium);
- ε accounting at noise 0.01 ran > 10 min with a 5 GiB worker inside the aggregator (Medium);
- a finalize notification dead-lettered after 5 failed deliveries was never replayed (Medium).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.dp import DpParams
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.learning.dp_gaussian import DEFAULT_CLIP_NORM
from fedcompute.proto import task_assignment_pb2
from fedcompute.settings import Topics
from fedcompute.tasks.records import AssignmentStatus
from support.helpers import unique
from support.tasks import create_numpy_task, gradient_object, make_update, random_delta, run_device, seal_for_stack

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration


def test_with_dp_none_one_huge_update_moves_the_model_by_at_most_the_default_clip(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("noclip"), report_goal=2, over_selection_rate=0.5, rounds=1)
    assert task.phase.dp.mechanism is None or task.phase.dp.mechanism.value == "NONE"  # type: ignore[union-attr]
    client, rng = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30), np.random.default_rng(5)
    huge = [np.full(w.shape, 1e30, np.float32) for w in task.initial]
    honest = random_delta(task, rng)
    for delta in (huge, honest):
        run = run_device(client, task.population, make_update(task, delta, seed=1)[0])
        assert run.upload_status == 200
    task.wait_round(1)
    after = task.checkpoint_weights(1)
    assert all(np.isfinite(w).all() for w in after)
    moved = math.sqrt(sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(after, task.initial)))
    honest_norm = math.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in honest))
    # FedAvg over the report goal: (clip(huge) + honest) / 2, the huge update clipped to norm 10.
    assert moved <= (DEFAULT_CLIP_NORM + honest_norm) / 2 + 1e-3


def test_epsilon_at_noise_0_01_is_accounted_by_the_aggregator_within_seconds(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("lownoise"), report_goal=2, over_selection_rate=0.5, rounds=1,
                             dp=DpParams(mechanism="FIXED_GAUSSIAN", noise_multiplier=0.01, clip_norm=1.0),
                             target_epsilon=1e9)
    client, rng = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30), np.random.default_rng(6)
    for seed in range(2):
        assert run_device(client, task.population, make_update(task, random_delta(task, rng), seed=seed)[0]
                          ).upload_status == 200
    started = time.monotonic()
    task.wait_round(1, timeout_s=120)  # the PLD accountant took > 10 min here
    assert time.monotonic() - started < 120
    epsilon = task.record().epsilon_spent
    assert math.isfinite(epsilon) and epsilon > 0


def test_a_dead_lettered_upload_notification_is_replayed_and_the_update_counted(local_stack: StackHandle) -> None:
    """Locally a finalize notification that failed 5 times sat on a dead-letter topic nobody
    read: the device had its 200 and its update was never counted."""
    task = create_numpy_task(local_stack, unique("deadfinal"), report_goal=1, over_selection_rate=1.0, rounds=1)
    client = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30)
    assignment = client.create_task_assignment(task.population, "1")
    assert isinstance(assignment, task_assignment_pb2.TaskAssignment)
    aid, bucket = assignment.assignment_id, local_stack.settings.gradient_bucket
    name = gradient_object(task, 1, aid)
    payload = make_update(task, random_delta(task, np.random.default_rng(7)))[0]
    sealed = seal_for_stack(local_stack, aid, gzip.compress(payload))
    # The upload lands; its live notification is handled while the assignment cannot take it
    # (as if every delivery had failed): nothing is counted.
    GcsBlobStore(local_stack.clients.storage).write(bucket, name, sealed)
    needle = f"ingestion of gs://{bucket}/{name}: "
    assert local_stack.wait_for_log("result_ingestion", needle, 60).split(needle, 1)[1].startswith(
        "ASSIGNMENT_NOT_UPLOADABLE")
    task.store.transition_assignment(task.key(1), aid, expected=[AssignmentStatus.ASSIGNED],
                                     new_status=AssignmentStatus.LOCAL_COMPLETED)
    assert task.count(1) == 0
    # Where Pub/Sub puts a notification after 5 failed deliveries (fake-gcs-server's format).
    publisher = local_stack.clients.publisher
    dead = publisher.topic_path(local_stack.settings.project,
                                Topics.dead_letter(local_stack.settings.topics.gcs_notifications))
    resource = json.dumps({"bucket": bucket, "name": name, "size": str(len(sealed))}).encode()
    publisher.publish(dead, resource, eventType="OBJECT_FINALIZE", bucketId=bucket, objectId=name,
                      payloadFormat="JSON_API_V1").result(timeout=10)
    result = subprocess.run([sys.executable, "-m", "fedcompute.cli.main", "ops", "replay"],
                            env={**os.environ, **local_stack.env()}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    task.wait_round(1, timeout_s=120)  # replayed (by the CLI or the scheduler's ticker, once), counted, aggregated
    assert task.count(1) == 1
    assert task.round_metrics(1)["server/aggregator/num_reports"] == 1.0
