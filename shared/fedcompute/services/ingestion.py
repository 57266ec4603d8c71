"""Result ingestion: count each device upload exactly once and close the round at its goal.

Triggered by the storage object-finalize event. Light: no TensorFlow (uploads are checked
with the numpy/protobuf codec).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcompute import layout
from fedcompute.errors import InvalidRequestError, NotFoundError, PreconditionFailedError
from fedcompute.ports import BlobStore, RoundEvents, TaskStore
from fedcompute.settings import Settings
from fedcompute.tasks.records import ACCEPTED, DUPLICATE, NOT_UPLOADABLE, ROUND_CLOSED, AssignmentStatus, IterationStatus, RoundKey, TaskRecord, TaskStatus

log = logging.getLogger(__name__)

# Outcomes (also the ``reason`` recorded for rejections).
OUTCOME_ACCEPTED = "ACCEPTED"
OUTCOME_DUPLICATE = "DUPLICATE"
OUTCOME_FOREIGN = "FOREIGN_OBJECT"
OUTCOME_LATE = "LATE_UPLOAD"
OUTCOME_UNKNOWN_ASSIGNMENT = "UNKNOWN_ASSIGNMENT"
OUTCOME_NOT_UPLOADABLE = "ASSIGNMENT_NOT_UPLOADABLE"
OUTCOME_INVALID = "INVALID_UPLOAD"
OUTCOME_MISSING = "OBJECT_MISSING"
OUTCOME_TASK_NOT_OPEN = "TASK_NOT_OPEN"

Validator = Callable[[bytes, TaskRecord], None]


@dataclass(frozen=True)
class ObjectFinalized:
    """The parts of a storage object-finalize event ingestion needs."""

    event_id: str
    bucket: str
    name: str
    size: int = 0
    generation: str = ""


@dataclass(frozen=True)
class IngestionResult:
    outcome: str
    reason: str = ""
    count: int = 0
    round_closed: bool = False


def ingest_upload(
    store: TaskStore,
    blobs: BlobStore,
    events: RoundEvents,
    settings: Settings,
    event: ObjectFinalized,
    *,
    validate: Validator,
    max_upload_bytes: int = 64 * 1024 * 1024,
    now: Callable[[], float] = time.time,
) -> IngestionResult:
    """Accept, count and maybe close. Idempotent: re-delivered events change nothing."""
    if event.bucket != settings.gradient_bucket:
        return _ignored(OUTCOME_FOREIGN, f"bucket {event.bucket!r} is not the gradient bucket")
    parsed = layout.parse_gradient_path(event.name)
    if parsed is None:
        return _ignored(OUTCOME_FOREIGN, f"{event.name!r} is not {{pop}}/{{task}}/{{round}}/d/{{assignment}}/gradient")
    key = RoundKey(parsed.population, parsed.task_id, parsed.round_number)
    task = store.get_task(parsed.population, parsed.task_id)
    iteration = store.get_iteration(key) if task else None
    if task is None or iteration is None:
        return _ignored(OUTCOME_FOREIGN, f"no round {key.round_number} of task {key.population}/{key.task_id}")
    assignment = store.get_assignment(key, parsed.assignment_id)
    if assignment is None:
        return _reject(store, key, event, OUTCOME_UNKNOWN_ASSIGNMENT, f"no assignment {parsed.assignment_id}", now)
    if assignment.status == AssignmentStatus.UPLOAD_COMPLETED:
        # A redelivery. If the round closed, settle whether the first delivery counted
        # (it may have crashed between accepting and finding out it was too late).
        if iteration.status != IterationStatus.COLLECTING and store.accept_upload(key, parsed.assignment_id) == ROUND_CLOSED:
            return _reject(store, key, event, OUTCOME_LATE, f"round {key.round_number} closed before it counted", now)
        count, closed = _close_if_goal_reached(store, events, task, key, now, repair=True)
        return IngestionResult(OUTCOME_DUPLICATE, "already counted", count, closed)
    if iteration.status != IterationStatus.COLLECTING:
        return _reject(store, key, event, OUTCOME_LATE, f"round {key.round_number} is {iteration.status.value}", now)
    # After the duplicate and late checks: a redelivery keeps its first verdict after the task ends.
    if task.status != TaskStatus.OPEN:
        return _reject(store, key, event, OUTCOME_TASK_NOT_OPEN, f"task is {task.status.value}", now)
    if assignment.status != AssignmentStatus.LOCAL_COMPLETED:
        return _reject(store, key, event, OUTCOME_NOT_UPLOADABLE,
                       f"assignment is {assignment.status.value}, not LOCAL_COMPLETED", now)
    if event.size > max_upload_bytes:
        return _invalid(store, key, event, assignment.slot, f"{event.size} bytes exceeds {max_upload_bytes}", now)
    try:
        data = blobs.read(event.bucket, event.name)
    except NotFoundError:
        return _ignored(OUTCOME_MISSING, f"{event.name} was deleted before ingestion")
    if len(data) > max_upload_bytes:
        return _invalid(store, key, event, assignment.slot, f"{len(data)} bytes exceeds {max_upload_bytes}", now)
    try:
        validate(data, task)
    except InvalidRequestError as error:
        return _invalid(store, key, event, assignment.slot, str(error), now)
    outcome = store.accept_upload(key, parsed.assignment_id)
    if outcome == ROUND_CLOSED:
        return _reject(store, key, event, OUTCOME_LATE, f"round {key.round_number} closed meanwhile", now)
    if outcome == NOT_UPLOADABLE:
        return _reject(store, key, event, OUTCOME_NOT_UPLOADABLE, "assignment changed meanwhile", now)
    count, closed = _close_if_goal_reached(store, events, task, key, now, repair=outcome == DUPLICATE)
    if outcome == DUPLICATE:
        return IngestionResult(OUTCOME_DUPLICATE, "already counted", count, closed)
    assert outcome == ACCEPTED
    log.info("accepted %s (%d/%d)", event.name, count, task.report_goal)
    return IngestionResult(OUTCOME_ACCEPTED, "", count, closed)


def _close_if_goal_reached(
    store: TaskStore, events: RoundEvents, task: TaskRecord, key: RoundKey, now: Callable[[], float],
    *, repair: bool = False,
) -> tuple[int, bool]:
    """Close the round once the accepted count reaches the goal; publish round-ready.

    Exactly one caller wins the COLLECTING -> AGGREGATING flip (a conditional write) and
    then freezes the round's accepted set (:meth:`TaskStore.accepted_ids`). Publishing
    comes after the flip and is recorded with ``round_ready_published``; a crash between the
    two is repaired by a redelivered upload event (``repair``: the duplicate path) and by
    the scheduler tick (:func:`publish_pending_round_ready`). Callers that lose the flip to
    a concurrent one leave publishing to the winner: each extra round-ready runs a whole
    aggregation (idempotent, so a duplicate is harmless, only wasteful).
    """
    count = store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)
    if count < task.report_goal:
        return count, False
    won = False
    try:
        store.update_iteration(key, {"status": IterationStatus.AGGREGATING, "aggregating_time": now()},
                               expected=[IterationStatus.COLLECTING])
        won = True
        log.info("round %s/%s/%s reached its goal (%d): closed", key.population, key.task_id, key.round_number, count)
        store.accepted_ids(key)  # freeze now: uploads still in flight count only if already written
    except PreconditionFailedError:
        pass  # another instance closed it (and publishes round-ready)
    if won or repair:
        publish_pending_round_ready(store, events, key)
    return count, True


def publish_pending_round_ready(store: TaskStore, events: RoundEvents, key: RoundKey) -> bool:
    """Publish round-ready for an AGGREGATING round not yet marked published. True if published."""
    iteration = store.get_iteration(key)
    if iteration is None or iteration.status != IterationStatus.AGGREGATING or iteration.round_ready_published:
        return False
    events.round_ready(key)
    try:
        store.update_iteration(key, {"round_ready_published": True}, expected=[IterationStatus.AGGREGATING])
    except PreconditionFailedError:
        pass  # already aggregated: fine
    return True


def _ignored(outcome: str, reason: str) -> IngestionResult:
    log.warning("ignored upload: %s: %s", outcome, reason)
    return IngestionResult(outcome, reason)


def _reject(store: TaskStore, key: RoundKey, event: ObjectFinalized, outcome: str, reason: str,
            now: Callable[[], float]) -> IngestionResult:
    log.warning("rejected upload %s: %s: %s", event.name, outcome, reason)
    store.record_rejection(key, _rejection_id(event), {"object": event.name, "outcome": outcome, "reason": reason,
                                                       "time": now()})
    return IngestionResult(outcome, reason)


def _invalid(store: TaskStore, key: RoundKey, event: ObjectFinalized, slot: int, reason: str,
             now: Callable[[], float]) -> IngestionResult:
    """An undecodable or mis-shaped update: the assignment is rejected and its slot freed."""
    parsed = layout.parse_gradient_path(event.name)
    assert parsed is not None
    try:
        store.transition_assignment(key, parsed.assignment_id, expected=[AssignmentStatus.LOCAL_COMPLETED],
                                    new_status=AssignmentStatus.UPLOAD_REJECTED, reason=reason[:500])
        store.release_slot(key, slot, parsed.assignment_id)
    except PreconditionFailedError:
        pass
    return _reject(store, key, event, OUTCOME_INVALID, reason, now)


def _rejection_id(event: ObjectFinalized) -> str:
    raw = event.event_id or f"{event.name}#{event.generation}"
    return raw.replace("/", "_")[:1400]
