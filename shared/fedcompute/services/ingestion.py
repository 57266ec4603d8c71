"""Result ingestion: count each device upload exactly once and close the round at its goal.

Triggered by the storage object-finalize event. In a streamed round (see
:mod:`fedcompute.learning.sharding`) the accept that fills an accept counter publishes that
counter's aggregation shard, which then runs while the round still collects. Light: no TensorFlow (uploads are checked
with the numpy/protobuf codec). O(1) per upload: one read of the assignment (task and round
come from :class:`RoundContextCache`, read with it at most once a second per instance),
the object read and its structural check, then the store's accept (an atomic counter
increment and one batch; see :mod:`fedcompute.adapters.firestore_store`). Exactly ``report_goal``
uploads are accepted: the surplus is rejected as LATE_UPLOAD, so the aggregator's divisor
(the report goal) is the number of reports summed and DP accounting is unchanged.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcompute import layout
from fedcompute.errors import InvalidRequestError, NotFoundError, PreconditionFailedError
from fedcompute.learning import sharding, upload_contract
from fedcompute.ports import BlobStore, RoundEvents, TaskStore
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    ACCEPTED,
    DUPLICATE,
    NOT_UPLOADABLE,
    ROUND_CLOSED,
    AssignmentRecord,
    AssignmentStatus,
    RoundKey,
    RoundRecord,
    RoundStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

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
# (stored bytes, assignment id) -> the ClientUpdate bytes; raises InvalidRequestError
# (an HPKE envelope that does not open, a plaintext upload where encryption is required).
Unsealer = Callable[[bytes, str], bytes]


@dataclass(frozen=True)
class ObjectFinalized:
    """The parts of a storage object-finalize event ingestion needs."""

    event_id: str
    bucket: str
    name: str
    size: int = 0
    generation: str = ""


class RoundContextCache:
    """The task and round records of the rounds an ingestion instance is receiving uploads for,
    each reused for ``ttl_s``: a busy round costs one read per upload (its assignment), not three.

    Stale records cannot miscount. A round never returns to COLLECTING, and an upload that a
    stale COLLECTING lets through meets the closed round in the store's accept: its accept
    counters are exhausted, or the frozen accepted set voided the empty positions, so it is
    refused as late exactly as an upload racing the close is. A task stopped less than
    ``ttl_s`` ago can still have an upload accepted into a round that will not be aggregated.
    The assignment is always read fresh: it decides duplicates and carries the version the
    accept's conditional write needs. Before refusing an upload for any other reason, ingestion
    reads the round again (:meth:`current_round`): a closed round's uploads keep the verdict
    LATE_UPLOAD they had without the cache.
    """

    MAX_ROUNDS = 256  # uploads name their round: a bound on what hostile names can make it hold

    def __init__(self, *, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self._rounds: dict[RoundKey, tuple[float, TaskRecord, RoundRecord]] = {}
        self._lock = threading.Lock()

    def upload_context(self, store: TaskStore, key: RoundKey, assignment_id: str
                       ) -> tuple[TaskRecord | None, RoundRecord | None, AssignmentRecord | None]:
        """Task, round and assignment of an upload: one round trip, of one document when cached."""
        entry = self._rounds.get(key)
        if entry is not None and self.clock() - entry[0] < self.ttl_s:
            return entry[1], entry[2], store.get_assignment(key, assignment_id)
        fetched = self.clock()
        task, round_record, assignment = store.get_upload_context(key, assignment_id)
        if task is not None and round_record is not None:
            with self._lock:
                self._rounds[key] = (fetched, task, round_record)
                while len(self._rounds) > self.MAX_ROUNDS:
                    self._rounds.pop(next(iter(self._rounds)))
        return task, round_record, assignment

    def current_round(self, store: TaskStore, key: RoundKey) -> RoundRecord | None:
        """The round as it is now (one read), kept for the uploads after this one."""
        fetched = self.clock()
        round_record = store.get_round(key)
        with self._lock:
            entry = self._rounds.get(key)
            if entry is not None and round_record is not None:
                self._rounds[key] = (fetched, entry[1], round_record)
        return round_record


@dataclass(frozen=True)
class IngestionResult:
    outcome: str
    reason: str = ""
    round_closed: bool = False


def ingest_upload(
    store: TaskStore,
    blobs: BlobStore,
    events: RoundEvents,
    settings: Settings,
    event: ObjectFinalized,
    *,
    validate: Validator,
    unseal: Unsealer | None = None,
    max_upload_bytes: int = upload_contract.DEFAULT_MAX_UPLOAD_BYTES,
    context: RoundContextCache | None = None,
    now: Callable[[], float] = time.time,
) -> IngestionResult:
    """Accept, count and maybe close. Idempotent: re-delivered events change nothing.

    ``context``: the instance's cache of task and round records (None: read all three each time).
    """
    if event.bucket != settings.gradient_bucket:
        return _ignored(OUTCOME_FOREIGN, f"bucket {event.bucket!r} is not the gradient bucket")
    parsed = layout.parse_gradient_path(event.name)
    if parsed is None:
        return _ignored(OUTCOME_FOREIGN, f"{event.name!r} is not {{pop}}/{{task}}/{{round}}/d/{{assignment}}/gradient")
    key = RoundKey(parsed.population, parsed.task_id, parsed.round_number)
    if context is None:
        task, round_record, assignment = store.get_upload_context(key, parsed.assignment_id)
    else:
        task, round_record, assignment = context.upload_context(store, key, parsed.assignment_id)

    def closed_meanwhile() -> IngestionResult | None:
        """Before another refusal judged on a cached round: LATE_UPLOAD if it closed since."""
        current = context.current_round(store, key) if context is not None else None
        if current is None or current.status == RoundStatus.COLLECTING:
            return None
        return _reject(store, key, event, OUTCOME_LATE, f"round {key.round_number} is {current.status.value}", now)
    if task is None or round_record is None:
        return _ignored(OUTCOME_FOREIGN, f"no round {key.round_number} of task {key.population}/{key.task_id}")
    if assignment is None:
        return _reject(store, key, event, OUTCOME_UNKNOWN_ASSIGNMENT, f"no assignment {parsed.assignment_id}", now)
    if assignment.status == AssignmentStatus.UPLOAD_COMPLETED:
        # A redelivery: it counted. Repair a crash of the first delivery between filling
        # the last position and closing (or publishing).
        closed = _close_if_full(store, events, key, round_record, now)
        return IngestionResult(OUTCOME_DUPLICATE, "already counted", round_closed=closed)
    if round_record.status != RoundStatus.COLLECTING:
        return _reject(store, key, event, OUTCOME_LATE, f"round {key.round_number} is {round_record.status.value}", now)
    # After the duplicate and late checks: a redelivery keeps its first verdict after the task ends.
    if task.status != TaskStatus.OPEN:
        return closed_meanwhile() or _reject(store, key, event, OUTCOME_TASK_NOT_OPEN,
                                             f"task is {task.status.value}", now)
    if assignment.status != AssignmentStatus.LOCAL_COMPLETED:
        return closed_meanwhile() or _reject(store, key, event, OUTCOME_NOT_UPLOADABLE,
                                             f"assignment is {assignment.status.value}, not LOCAL_COMPLETED", now)
    # The task's largest honest (sealed) update: judged on the event's size before any byte
    # is read; an oversized object is deleted (where the session could not bound it).
    cap = min(max_upload_bytes, upload_contract.max_upload_bytes(task))
    if event.size > cap:
        return closed_meanwhile() or _oversized(store, blobs, key, event, assignment.slot, event.size, cap, now)
    try:
        data = blobs.read(event.bucket, event.name)
    except NotFoundError:
        return _ignored(OUTCOME_MISSING, f"{event.name} was deleted before ingestion")
    if len(data) > cap:
        return closed_meanwhile() or _oversized(store, blobs, key, event, assignment.slot, len(data), cap, now)
    try:
        validate(unseal(data, parsed.assignment_id) if unseal else data, task)
    except InvalidRequestError as error:
        return closed_meanwhile() or _invalid(store, key, event, assignment.slot, str(error), now)
    result = store.accept_upload(key, parsed.assignment_id, read=(round_record, assignment))
    if result.outcome == ROUND_CLOSED:
        return _reject(store, key, event, OUTCOME_LATE,
                       f"round {key.round_number} reached its goal ({task.report_goal}) or closed meanwhile", now)
    closed = close_round(store, events, key, now) if result.round_full else False
    if result.outcome == NOT_UPLOADABLE:
        return _reject(store, key, event, OUTCOME_NOT_UPLOADABLE, "assignment changed meanwhile", now)
    if result.outcome == DUPLICATE:
        return IngestionResult(OUTCOME_DUPLICATE, "already counted", round_closed=closed)
    assert result.outcome == ACCEPTED
    log.info("accepted %s (goal %d)", event.name, task.report_goal)
    if result.filled_counter is not None and not result.round_full:
        _publish_filled_shard(events, settings, key, task, result.filled_counter)
    return IngestionResult(OUTCOME_ACCEPTED, "", round_closed=closed)


def _publish_filled_shard(events: RoundEvents, settings: Settings, key: RoundKey, task: TaskRecord,
                          counter: int) -> None:
    """A streamed round's accept counter just filled: its shard is aggregated now, while the
    round still collects (:mod:`fedcompute.learning.sharding`). Best effort: a shard not
    published here is published by the round's close, so a failure only costs time."""
    shards = sharding.streamed_shards(task.report_goal, streaming=settings.aggregation_streaming,
                                      forced=settings.aggregation_shards)
    if not shards or task.kind != TaskKind.TRAINING:
        return
    try:
        events.aggregation_shard(key, counter, shards)
    except Exception:  # noqa: BLE001 - the upload counted; the close re-sends this shard
        log.warning("round %s: shard %d/%d not published early; the close will", key, counter, shards,
                    exc_info=True)


def _close_if_full(store: TaskStore, events: RoundEvents, key: RoundKey, round_record: RoundRecord,
                   now: Callable[[], float]) -> bool:
    """Close a COLLECTING round whose accept positions are all filled; publish a pending round-ready."""
    if round_record.status == RoundStatus.COLLECTING:
        if not store.acceptance_state(key, round_record.report_goal).full:
            return False
        return close_round(store, events, key, now)
    publish_pending_round_ready(store, events, key)
    return True


def close_round(store: TaskStore, events: RoundEvents, key: RoundKey, now: Callable[[], float],
                 reason: str = "") -> bool:
    """Flip the round COLLECTING -> AGGREGATING and publish round-ready.

    Exactly one caller wins the flip (a conditional write). Publishing comes after it and
    is recorded with ``round_ready_published``; a crash between the two is repaired by a
    redelivered upload event (the duplicate path) and by the scheduler tick
    (:func:`publish_pending_round_ready`). Each extra round-ready would run a whole
    aggregation (idempotent, so only wasteful): only the winner publishes here.
    """
    changes: dict[str, object] = {"status": RoundStatus.AGGREGATING, "aggregating_time": now()}
    if reason:
        changes["status_reason"] = reason
    try:
        store.update_round(key, changes, expected=[RoundStatus.COLLECTING])
    except PreconditionFailedError:
        return True  # another instance closed it (and publishes round-ready)
    log.info("round %s/%s/%s reached its goal: closed%s", key.population, key.task_id, key.round_number,
             f" ({reason})" if reason else "")
    publish_pending_round_ready(store, events, key)
    return True


def publish_pending_round_ready(store: TaskStore, events: RoundEvents, key: RoundKey) -> bool:
    """Publish round-ready for an AGGREGATING round not yet marked published. True if published."""
    round_record = store.get_round(key)
    if round_record is None or round_record.status != RoundStatus.AGGREGATING or round_record.round_ready_published:
        return False
    events.round_ready(key)
    try:
        store.update_round(key, {"round_ready_published": True}, expected=[RoundStatus.AGGREGATING])
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


def _oversized(store: TaskStore, blobs: BlobStore, key: RoundKey, event: ObjectFinalized, slot: int, size: int,
               cap: int, now: Callable[[], float]) -> IngestionResult:
    """Larger than any honest update of the task: rejected, its slot freed, the object deleted."""
    result = _invalid(store, key, event, slot, f"{size} bytes exceeds this task's maximum update size of {cap} bytes",
                      now)
    blobs.delete(event.bucket, event.name)
    return result


def _rejection_id(event: ObjectFinalized) -> str:
    raw = event.event_id or f"{event.name}#{event.generation}"
    return raw.replace("/", "_")[:1400]
