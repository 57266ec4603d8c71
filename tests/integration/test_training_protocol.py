"""The training-round protocol on the real local stack (emulators + functions-framework).

Devices speak HTTP to task_assignment and upload to fake-gcs-server; fake-gcs notifies
result_ingestion through Pub/Sub, which closes the round and publishes round-ready to the
aggregator. Tasks use a tiny numpy model (no TensorFlow, see ``support/tasks.py``).
"""
from __future__ import annotations

import urllib.parse
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.learning.tensor_codec import decode_bundle
from fedcompute.proto import task_assignment_pb2
from fedcompute.tasks.records import IterationStatus, TaskStatus
from support.tasks import (
    central_metrics,
    check_in,
    create_numpy_task,
    log_lines,
    make_update,
    random_delta,
    run_device,
    wait_until,
)

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration

TRAIN = "server/client_work/train/"
NON_FINITE = "server/finalizer/update_non_finite"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def object_of(url: str) -> str:
    """The object name a fake-gcs download URL (``.../b/{bucket}/o/{quoted name}?alt=media``) points to."""
    path = urllib.parse.urlparse(url).path
    return urllib.parse.unquote(path.split("/o/", 1)[1])


def device(stack: StackHandle) -> DeviceHttpClient:
    return DeviceHttpClient(stack.settings.task_assignment_url, timeout=30)


# --------------------------------------------------------------------------- happy path


def test_two_rounds_average_known_deltas_and_complete(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("happy"), report_goal=3, over_selection_rate=0.34, rounds=2)
    client = device(local_stack)
    rng = np.random.default_rng(1)
    weights = [w.copy() for w in task.initial]
    for round_number in (1, 2):
        runs, deltas, stats = [], [], []
        for i in range(task.report_goal):
            assignment = check_in(client, task.population)
            assert assignment.aggregation_id == str(round_number)
            # What a device downloads: the plan, and the weights the previous round produced.
            assert client.download(assignment.plan.uri) == task.plan_bytes
            assert object_of(assignment.plan.uri) == layout.client_plan_path(task.population, task.task_id)
            assert object_of(assignment.init_checkpoint.uri) == layout.client_checkpoint_path(
                task.population, task.task_id, round_number - 1)
            named, _ = decode_bundle(client.download(assignment.init_checkpoint.uri))
            assert [n for n, _ in named] == task.names
            for (_, got), want in zip(named, weights):
                np.testing.assert_allclose(got, want, atol=1e-6)
            delta = random_delta(task, rng)
            payload, flat = make_update(task, delta, num_examples=5 + i, seed=100 * round_number + i)
            run = run_device(client, task.population, payload, assignment=assignment)
            assert run.upload_status == 200, run
            runs.append(run)
            deltas.append(delta)
            stats.append(flat)
        iteration = task.wait_round(round_number)
        assert iteration.aggregating_time and iteration.completed_time >= iteration.aggregating_time
        assert task.count(round_number) == task.report_goal
        expected = [w + np.mean([d[j] for d in deltas], axis=0) for j, w in enumerate(weights)]
        for got, want in zip(task.checkpoint_weights(round_number), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)
        for (name, got), want in zip(task.client_checkpoint(round_number), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)
        metrics = task.round_metrics(round_number)
        central = central_metrics(task, stats)
        assert {k for k in metrics if k.startswith(TRAIN)} >= {TRAIN + m for m in task.metrics}
        for name, value in central.items():
            assert metrics[TRAIN + name] == pytest.approx(value, rel=1e-9), name
        assert metrics[NON_FINITE] == 0.0
        weights = expected
    record = task.record()
    assert record.status == TaskStatus.COMPLETED
    assert "num_max_training_rounds" in record.status_reason and record.current_round == 2
    assert task.iteration(3) is None
    assert isinstance(client.create_task_assignment(task.population, "1"), object)
