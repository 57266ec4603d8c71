"""Task management and scheduler logic on the in-memory store."""
from __future__ import annotations

import pytest

from fedcompute import layout
from fedcompute.dp import DpParams
from fedcompute.errors import ConflictError, InvalidRequestError, NotFoundError
from fedcompute.plans import ServerPhase
from fedcompute.proto import task_management_pb2
from fedcompute.services import scheduler
from fedcompute.services import task_management as tm
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    AssignmentRecord,
    AssignmentStatus,
    RoundKey,
    RoundStatus,
    TaskKind,
    TaskStatus,
)
from fedcompute.tensor_spec import TensorSpec

SETTINGS = Settings()


def _training_proto(**overrides) -> task_management_pb2.Task:
    task = task_management_pb2.Task(total_iteration=5, min_aggregation_size=10, max_aggregation_size=13,
                                    min_client_version="341812000")
    spec = task.info.training_info.eligibility_task_info.eligibility_policies.add(name="min_sep")
    spec.min_sep_policy.minimum_separation = 3
    for k, v in overrides.items():
        setattr(task, k, v)
    return task


def _phase() -> ServerPhase:
    return ServerPhase(learning_algo="FED_AVG", server_optimizer="SGD", server_learning_rate=1.0, report_goal=10,
                       over_selection_rate=0.3, total_rounds=5, population_size=3_000_000, target_epsilon=10.0,
                       delta=1e-6, dp=DpParams("FIXED_GAUSSIAN", 1.0, 0.5),
                       weights=(TensorSpec("dense/kernel", (4, 2), "float32"),
                                TensorSpec("bn/moving_mean", (2,), "float32", trainable=False)),
                       metrics=("binary_accuracy",))


def test_proto_to_new_task_reads_every_field():
    new = tm.new_task_from_proto("p", _training_proto())
    assert (new.kind, new.report_goal, new.max_aggregation_size, new.total_rounds) == (TaskKind.TRAINING, 10, 13, 5)
    assert new.min_separation == 3 and new.min_client_version == "341812000" and new.max_client_version == "999999999"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"min_aggregation_size": 0}, "min_aggregation_size"),
        ({"max_aggregation_size": 5}, "max_aggregation_size"),
        ({"total_iteration": 0}, "total_iteration"),
        ({"min_client_version": "v1"}, "min_client_version"),
        ({"min_client_version": "9", "max_client_version": "3"}, "above max_client_version"),
        ({"population_name": "other"}, "differs from the URL"),
    ],
)
def test_bad_create_requests_name_the_field(overrides, message):
    with pytest.raises(InvalidRequestError, match=message):
        tm.new_task_from_proto("p", _training_proto(**overrides))


def test_create_open_and_ids_are_max_plus_one(store, blobs):
    first = tm.create_task(store, tm.new_task_from_proto("p", _training_proto()))
    assert (first.task_id, first.status) == (1, TaskStatus.CREATED)
    with pytest.raises(ConflictError, match="already has an active training task 1"):
        tm.create_task(store, tm.new_task_from_proto("p", _training_proto()))
    blobs.write(SETTINGS.model_bucket, layout.server_phase_path("p", 1), _phase().to_json().encode())
    opened = tm.open_task(store, blobs, SETTINGS, "p", 1)
    assert opened.status == TaskStatus.OPEN and opened.current_round == 1
    assert [s.name for s in opened.update_spec] == ["dense/kernel"]
    assert store.get_round(RoundKey("p", 1, 1)).status == RoundStatus.COLLECTING
    assert tm.open_task(store, blobs, SETTINGS, "p", 1) == opened  # idempotent
    tm.cancel_task(store, "p", 1, "operator")
    second = tm.create_task(store, tm.new_task_from_proto("p", _training_proto()))
    assert second.task_id == 2
    proto = tm.task_to_proto(store.get_task("p", 1))
    assert proto.status == task_management_pb2.TaskStatus.CANCELED and proto.status_reason == "operator"


def test_evaluation_task_needs_an_existing_source(store):
    ev = task_management_pb2.Task(total_iteration=5, min_aggregation_size=2)
    ev.info.evaluation_info.training_task_id = 7
    ev.info.evaluation_info.check_point_selector.iteration_selector.size = 1
    with pytest.raises(NotFoundError, match="source training task p/7"):
        tm.create_task(store, tm.new_task_from_proto("p", ev))
    ev.info.evaluation_info.check_point_selector.Clear()
    with pytest.raises(InvalidRequestError, match="check_point_selector"):
        tm.new_task_from_proto("p", ev)


def test_failed_build_rollback_deletes_task_and_artifacts(store, blobs):
    task = tm.create_task(store, tm.new_task_from_proto("p", _training_proto()))
    blobs.write(SETTINGS.model_bucket, layout.client_plan_path("p", task.task_id), b"zip")
    blobs.write(SETTINGS.model_bucket, "other/1/0/s/0/checkpoint", b"keep")
    tm.delete_unopened_task(store, blobs, SETTINGS, "p", task.task_id)
    assert store.get_task("p", task.task_id) is None
    assert blobs.list(SETTINGS.model_bucket, "p/") == []
    assert blobs.exists(SETTINGS.model_bucket, "other/1/0/s/0/checkpoint")


def test_open_refuses_unknown_server_phase_version(store, blobs):
    task = tm.create_task(store, tm.new_task_from_proto("p", _training_proto()))
    blobs.write(SETTINGS.model_bucket, layout.server_phase_path("p", task.task_id),
                _phase().to_json().replace('"format_version": 1', '"format_version": 99').encode())
    with pytest.raises(InvalidRequestError, match="format_version 99"):
        tm.open_task(store, blobs, SETTINGS, "p", task.task_id)
    assert store.get_task("p", task.task_id).status == TaskStatus.CREATED


def test_scheduler_times_out_stale_assignments_and_frees_slots(store, blobs, events):
    tm.create_task(store, tm.new_task_from_proto("p", _training_proto()))
    blobs.write(SETTINGS.model_bucket, layout.server_phase_path("p", 1), _phase().to_json().encode())
    tm.open_task(store, blobs, SETTINGS, "p", 1)
    key = RoundKey("p", 1, 1)
    for i, (status, t) in enumerate([(AssignmentStatus.ASSIGNED, 0.0), (AssignmentStatus.ASSIGNED, 950.0),
                                     (AssignmentStatus.LOCAL_COMPLETED, 10.0)]):
        assert store.claim_assignment(AssignmentRecord(f"a{i}", "p", 1, 1, status, "1", -1, t, t), 10).record
    report = scheduler.tick(store, events, timeouts=scheduler.Timeouts(local_training=100, upload=100),
                            now=lambda: 1000.0)
    assert (report.local_timeouts, report.upload_timeouts) == (1, 1)
    assert store.get_assignment(key, "a0").status == AssignmentStatus.LOCAL_TIMEOUT
    assert store.get_assignment(key, "a1").status == AssignmentStatus.ASSIGNED
    assert store.get_assignment(key, "a2").status == AssignmentStatus.UPLOAD_TIMEOUT
    assert store.claimed_slots(key) == {store.get_assignment(key, "a1").slot}
    again = scheduler.tick(store, events, timeouts=scheduler.Timeouts(local_training=100, upload=100),
                           now=lambda: 1000.0)
    assert (again.local_timeouts, again.upload_timeouts) == (0, 0)


def test_scheduler_republishes_unpublished_and_stuck_rounds(store, blobs, events):
    tm.create_task(store, tm.new_task_from_proto("p", _training_proto()))
    blobs.write(SETTINGS.model_bucket, layout.server_phase_path("p", 1), _phase().to_json().encode())
    tm.open_task(store, blobs, SETTINGS, "p", 1)
    key = RoundKey("p", 1, 1)
    store.update_round(key, {"status": RoundStatus.AGGREGATING, "aggregating_time": 5.0},
                           expected=[RoundStatus.COLLECTING])
    assert scheduler.tick(store, events, now=lambda: 10.0).republished == [key]
    assert scheduler.tick(store, events, now=lambda: 20.0).republished == []  # published, not stuck yet
    assert scheduler.tick(store, events, now=lambda: 10_000.0).republished == [key]  # stuck
    assert events.ready == [key, key]
    # Issue 13: one re-publish per timeout, not one more aggregator run on every tick.
    assert scheduler.tick(store, events, now=lambda: 10_030.0).republished == []
    timeout = scheduler.Timeouts().aggregation
    assert scheduler.tick(store, events, now=lambda: 10_001.0 + timeout).republished == [key]
