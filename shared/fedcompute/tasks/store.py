"""Persistence of tasks, rounds and assignments.

:class:`TaskStore` is the port the services use; :class:`FirestoreTaskStore` is the real
adapter (Firestore, or its emulator) and :class:`InMemoryTaskStore` the fake used by unit
tests. Both implement the same conditional-write semantics:

* creates are create-if-absent (idempotent on ids);
* status moves are conditional on the current status (lost races raise
  :class:`PreconditionFailedError`);
* the hot paths (many devices checking in and reporting at once) never query a growing
  collection and never run a transaction: each assignment, slot and accepted report is
  its own document, and their numbers come from sharded counters
  (:mod:`fedcompute.tasks.quota`); only completing a round (round, task and next round
  together) runs in a transaction.

Exactly ``report_goal`` accepted uploads, in O(1) per upload (Firestore): an upload takes
an *accept position* ``0 .. report_goal - 1`` from a sharded counter (an atomic
increment, no count query), then one atomic batch creates the position's marker document
``accepted/{position}``, moves its assignment LOCAL_COMPLETED -> UPLOAD_COMPLETED
(conditional on the version read) and counts the position as filled. An upload that finds
every counter exhausted is late: the surplus beyond the goal is rejected, never summed, so
the DP divisor (the report goal) is the number of reports summed. The round is full when
every shard's filled count reached its capacity; whoever fills the last position sees it
and closes the round. The accepted set is the markers (one document each: no size limit);
:meth:`TaskStore.accepted_ids` reads it once the round stopped collecting and first voids
(create-only) any position still empty (a position whose holder crashed, or a round
closed early by the scheduler), so an upload still in flight for it loses its batch and
is late. Every reader sees the same set.

Slots (the over-selection cap of live assignments) work the same way: a sharded counter
grants slot numbers, one batch creates the slot document and the assignment; released
slots go to a small free pool that claimers use once the counters are exhausted.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from fedcompute.errors import ConflictError, NotFoundError, PreconditionFailedError, TransientError
from fedcompute.tasks.quota import ShardedQuota
from fedcompute.tasks.records import (
    AssignmentRecord,
    AssignmentStatus,
    IterationRecord,
    IterationStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

_OPTIMISTIC_ATTEMPTS = 25


def _backoff(attempt: int) -> None:
    """Short jittered sleep between optimistic retries."""
    time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))


class AcceptOutcome(str):
    """Result of :meth:`TaskStore.accept_upload` (a string constant)."""


ACCEPTED = AcceptOutcome("ACCEPTED")
DUPLICATE = AcceptOutcome("DUPLICATE")  # already UPLOAD_COMPLETED
ROUND_CLOSED = AcceptOutcome("ROUND_CLOSED")  # round no longer COLLECTING, or its goal already reached
NOT_UPLOADABLE = AcceptOutcome("NOT_UPLOADABLE")  # assignment not LOCAL_COMPLETED
UNKNOWN_ASSIGNMENT = AcceptOutcome("UNKNOWN_ASSIGNMENT")


@dataclass(frozen=True)
class RoundKey:
    population: str
    task_id: int
    round_number: int


@dataclass(frozen=True)
class AcceptResult:
    """What :meth:`TaskStore.accept_upload` decided; ``round_full``: this call filled the last position."""

    outcome: AcceptOutcome
    round_full: bool = False


@dataclass(frozen=True)
class AcceptanceState:
    """How far a round's accept positions went: all handed out, all filled (or voided)."""

    issued_all: bool
    full: bool


@dataclass(frozen=True)
class SlotClaim:
    """An assignment created in a free slot (``record``, None when the round is full) and the
    counter shards found exhausted on the way (a hint the caller may cache for the round)."""

    record: AssignmentRecord | None
    exhausted: frozenset[int] = frozenset()
    round_stopped: bool = False  # the round stopped collecting (the caller's view of it is stale)


class _RoundStopped(Exception):
    """A slot counter pushed past ``_CLOSED_OFFSET``: the round stopped collecting."""


_CLOSED_OFFSET = 1 << 40


class TaskStore(Protocol):
    """What the services need from storage. See module docstring for semantics."""

    # Tasks
    def create_task(
        self, population: str, build: Callable[[int], TaskRecord], *, exclusive_training: bool = True
    ) -> TaskRecord: ...
    def get_task(self, population: str, task_id: int) -> TaskRecord | None: ...
    def list_tasks(self, population: str | None = None) -> list[TaskRecord]: ...
    def open_rounds(self, population: str) -> list[tuple[TaskRecord, IterationRecord | None]]: ...
    def update_task(
        self, population: str, task_id: int, changes: dict[str, Any], *, expected: Iterable[TaskStatus] | None = None
    ) -> TaskRecord: ...
    def delete_task(self, population: str, task_id: int) -> None: ...

    # Iterations
    def create_iteration(self, record: IterationRecord) -> bool: ...
    def get_iteration(self, population: str, task_id: int, round_number: int) -> IterationRecord | None: ...
    def list_iterations(self, population: str, task_id: int) -> list[IterationRecord]: ...
    def update_iteration(
        self, key: RoundKey, changes: dict[str, Any], *, expected: Iterable[IterationStatus]
    ) -> IterationRecord: ...
    def finish_round(
        self,
        key: RoundKey,
        iteration_changes: dict[str, Any],
        task_changes: dict[str, Any],
        next_iteration: IterationRecord | None,
    ) -> bool: ...

    # Assignments
    def claim_assignment(
        self, record: AssignmentRecord, capacity: int, *, exhausted: Iterable[int] = (), rng: random.Random | None = None
    ) -> SlotClaim: ...
    def release_slot(self, key: RoundKey, slot: int, assignment_id: str) -> None: ...
    def claimed_slots(self, key: RoundKey) -> set[int]: ...
    def create_assignment(self, record: AssignmentRecord) -> None: ...
    def get_upload_context(
        self, key: RoundKey, assignment_id: str
    ) -> tuple[TaskRecord | None, IterationRecord | None, AssignmentRecord | None]: ...
    def get_assignment(self, key: RoundKey, assignment_id: str) -> AssignmentRecord | None: ...
    def transition_assignment(
        self,
        key: RoundKey,
        assignment_id: str,
        *,
        expected: Iterable[AssignmentStatus],
        new_status: AssignmentStatus,
        reason: str = "",
    ) -> AssignmentRecord: ...
    def accept_upload(self, key: RoundKey, assignment_id: str) -> AcceptResult: ...
    def acceptance_state(self, key: RoundKey, report_goal: int) -> AcceptanceState: ...
    def accepted_ids(self, key: RoundKey) -> list[str]: ...
    def count_assignments(self, key: RoundKey, status: AssignmentStatus | None = None) -> int: ...
    def list_assignments(self, key: RoundKey, status: AssignmentStatus | None = None) -> list[AssignmentRecord]: ...
    def record_rejection(self, key: RoundKey, event_id: str, data: dict[str, Any]) -> bool: ...
    def list_rejections(self, key: RoundKey) -> list[dict[str, Any]]: ...


def _check_exclusive(existing: Iterable[TaskRecord], new: TaskRecord) -> None:
    if new.kind != TaskKind.TRAINING:
        return
    for task in existing:
        if task.kind == TaskKind.TRAINING and task.status.is_active:
            raise ConflictError(
                f"population {new.population!r} already has an active training task {task.task_id} "
                f"({task.status.value})",
                hint=f"cancel it first (fedcompute task cancel --population {new.population} --task {task.task_id}) "
                "or use another population_name",
            )


# --------------------------------------------------------------------------------------
# In-memory fake (unit tests). Thread-safe so concurrency tests can drive it.
# --------------------------------------------------------------------------------------


class InMemoryTaskStore:
    """A dict-backed :class:`TaskStore` with the same semantics as the Firestore one."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tasks: dict[tuple[str, int], TaskRecord] = {}
        self._iterations: dict[tuple[str, int, int], IterationRecord] = {}
        self._assignments: dict[tuple[str, int, int, str], AssignmentRecord] = {}
        self._slots: dict[tuple[str, int, int, int], str] = {}
        self._rejections: dict[tuple[str, int, int, str], dict[str, Any]] = {}

    def create_task(self, population, build, *, exclusive_training=True):
        with self._lock:
            existing = [t for (p, _), t in self._tasks.items() if p == population]
            new_id = max((t.task_id for t in existing), default=0) + 1
            record = build(new_id)
            if exclusive_training:
                _check_exclusive(existing, record)
            self._tasks[(population, new_id)] = record
            return record

    def get_task(self, population, task_id):
        with self._lock:
            return self._tasks.get((population, task_id))

    def list_tasks(self, population=None):
        with self._lock:
            return sorted(
                (t for (p, _), t in self._tasks.items() if population is None or p == population),
                key=lambda t: (t.population, t.task_id),
            )

    def open_rounds(self, population):
        with self._lock:
            return [(t, self._iterations.get((population, t.task_id, t.current_round)))
                    for t in self.list_tasks(population) if t.status == TaskStatus.OPEN]

    def update_task(self, population, task_id, changes, *, expected=None):
        with self._lock:
            task = self._tasks.get((population, task_id))
            if task is None:
                raise NotFoundError(f"task {population}/{task_id} does not exist")
            if expected is not None and task.status not in set(expected):
                raise PreconditionFailedError(f"task {population}/{task_id} is {task.status.value}")
            updated = TaskRecord.from_dict({**task.to_dict(), **_plain(changes)})
            self._tasks[(population, task_id)] = updated
            return updated

    def delete_task(self, population, task_id):
        with self._lock:
            self._tasks.pop((population, task_id), None)
            stores: tuple[dict[Any, Any], ...] = (self._iterations, self._assignments, self._slots, self._rejections)
            for store in stores:
                for k in [k for k in store if k[0] == population and k[1] == task_id]:
                    del store[k]

    def create_iteration(self, record):
        with self._lock:
            k = (record.population, record.task_id, record.round_number)
            if k in self._iterations:
                return False
            self._iterations[k] = record
            return True

    def get_iteration(self, population, task_id, round_number):
        with self._lock:
            return self._iterations.get((population, task_id, round_number))

    def list_iterations(self, population, task_id):
        with self._lock:
            return sorted(
                (i for k, i in self._iterations.items() if k[:2] == (population, task_id)),
                key=lambda i: i.round_number,
            )

    def update_iteration(self, key, changes, *, expected):
        with self._lock:
            k = (key.population, key.task_id, key.round_number)
            it = self._iterations.get(k)
            if it is None:
                raise NotFoundError(f"round {key.round_number} of task {key.population}/{key.task_id} does not exist")
            if it.status not in set(expected):
                raise PreconditionFailedError(f"round {key.round_number} is {it.status.value}")
            updated = IterationRecord.from_dict({**it.to_dict(), **_plain(changes)})
            self._iterations[k] = updated
            return updated

    def finish_round(self, key, iteration_changes, task_changes, next_iteration):
        with self._lock:
            k = (key.population, key.task_id, key.round_number)
            it = self._iterations.get(k)
            if it is None or it.status != IterationStatus.AGGREGATING:
                return False
            self._iterations[k] = IterationRecord.from_dict({**it.to_dict(), **_plain(iteration_changes)})
            task = self._tasks[(key.population, key.task_id)]
            self._tasks[(key.population, key.task_id)] = TaskRecord.from_dict({**task.to_dict(), **_plain(task_changes)})
            if next_iteration is not None:
                nk = (next_iteration.population, next_iteration.task_id, next_iteration.round_number)
                self._iterations.setdefault(nk, next_iteration)
            return True

    def claim_assignment(self, record, capacity, *, exhausted=(), rng=None):
        with self._lock:
            rk = (record.population, record.task_id, record.round_number)
            iteration, task = self._iterations.get(rk), self._tasks.get(rk[:2])
            if iteration is None or iteration.status != IterationStatus.COLLECTING or task is None or \
                    not task.status.is_active:
                return SlotClaim(None, round_stopped=True)  # like the stopped counters of the Firestore store
            taken = {k[3] for k in self._slots if k[:3] == rk}
            free = [s for s in range(capacity) if s not in taken]
            if not free:
                return SlotClaim(None, frozenset(range(ShardedQuota.for_total(capacity).shards)))
            slot = (rng or random).choice(free)
            claimed = record.replace(slot=slot)
            self.create_assignment(claimed)
            self._slots[(*rk, slot)] = record.assignment_id
            return SlotClaim(claimed)

    def get_upload_context(self, key, assignment_id):
        return (self.get_task(key.population, key.task_id),
                self.get_iteration(key.population, key.task_id, key.round_number),
                self.get_assignment(key, assignment_id))

    def release_slot(self, key, slot, assignment_id):
        with self._lock:
            k = (key.population, key.task_id, key.round_number, slot)
            if self._slots.get(k) == assignment_id:
                del self._slots[k]

    def claimed_slots(self, key):
        with self._lock:
            return {k[3] for k in self._slots if k[:3] == (key.population, key.task_id, key.round_number)}

    def create_assignment(self, record):
        with self._lock:
            k = (record.population, record.task_id, record.round_number, record.assignment_id)
            if k in self._assignments:
                raise ConflictError(f"assignment {record.assignment_id} already exists")
            self._assignments[k] = record

    def get_assignment(self, key, assignment_id):
        with self._lock:
            return self._assignments.get((key.population, key.task_id, key.round_number, assignment_id))

    def transition_assignment(self, key, assignment_id, *, expected, new_status, reason=""):
        with self._lock:
            k = (key.population, key.task_id, key.round_number, assignment_id)
            rec = self._assignments.get(k)
            if rec is None:
                raise NotFoundError(f"assignment {assignment_id} does not exist in round {key.round_number}")
            if rec.status not in set(expected):
                raise PreconditionFailedError(f"assignment {assignment_id} is {rec.status.value}")
            updated = rec.replace(status=new_status, updated_time=time.time(), status_reason=reason)
            self._assignments[k] = updated
            return updated

    def accept_upload(self, key, assignment_id):
        with self._lock:
            rk = (key.population, key.task_id, key.round_number)
            it = self._iterations.get(rk)
            rec = self._assignments.get((*rk, assignment_id))
            if rec is None:
                return AcceptResult(UNKNOWN_ASSIGNMENT)
            if rec.status == AssignmentStatus.UPLOAD_COMPLETED:
                return AcceptResult(DUPLICATE)
            accepted = self.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)  # a fake: counting is fine
            if it is None or it.status != IterationStatus.COLLECTING or accepted >= it.report_goal:
                return AcceptResult(ROUND_CLOSED)
            if rec.status != AssignmentStatus.LOCAL_COMPLETED:
                return AcceptResult(NOT_UPLOADABLE)
            self._assignments[(*rk, assignment_id)] = rec.replace(status=AssignmentStatus.UPLOAD_COMPLETED,
                                                                   updated_time=time.time())
            return AcceptResult(ACCEPTED, round_full=accepted + 1 == it.report_goal)

    def acceptance_state(self, key, report_goal):
        done = self.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) >= report_goal
        return AcceptanceState(issued_all=done, full=done)

    def accepted_ids(self, key):
        """Ids of the round's counted uploads (accepts are atomic here: the UPLOAD_COMPLETED ones)."""
        with self._lock:
            it = self._iterations.get((key.population, key.task_id, key.round_number))
            if it is None or it.status == IterationStatus.COLLECTING:
                raise PreconditionFailedError(f"round {key.round_number} is not closed: its accepted set "
                                              "is not final")
            return [a.assignment_id for a in self.list_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)]

    def count_assignments(self, key, status=None):
        return len(self.list_assignments(key, status))

    def list_assignments(self, key, status=None):
        with self._lock:
            return sorted(
                (
                    a
                    for k, a in self._assignments.items()
                    if k[:3] == (key.population, key.task_id, key.round_number) and (status is None or a.status == status)
                ),
                key=lambda a: a.assignment_id,
            )

    def record_rejection(self, key, event_id, data):
        with self._lock:
            k = (key.population, key.task_id, key.round_number, event_id)
            if k in self._rejections:
                return False
            self._rejections[k] = dict(data)
            return True

    def list_rejections(self, key):
        with self._lock:
            return [v for k, v in self._rejections.items() if k[:3] == (key.population, key.task_id, key.round_number)]


def _plain(changes: dict[str, Any]) -> dict[str, Any]:
    """Enum values to strings, so changes merge into ``to_dict()`` output."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in changes.items()}


# --------------------------------------------------------------------------------------
# Firestore adapter
# --------------------------------------------------------------------------------------


class FirestoreTaskStore:
    """:class:`TaskStore` on Firestore (``google.cloud.firestore.Client``, passed in)."""

    def __init__(self, client: Any, root: str = "populations") -> None:
        self._db = client
        self._root = root

    # -- references --------------------------------------------------------------------
    def _population(self, population: str):
        return self._db.collection(self._root).document(population)

    def _task(self, population: str, task_id: int):
        return self._population(population).collection("tasks").document(str(task_id))

    def _iteration(self, population: str, task_id: int, round_number: int):
        return self._task(population, task_id).collection("iterations").document(str(round_number))

    def _round(self, key: RoundKey):
        return self._iteration(key.population, key.task_id, key.round_number)

    def _assignment(self, key: RoundKey, assignment_id: str):
        return self._round(key).collection("assignments").document(assignment_id)

    def _slot(self, key: RoundKey, slot: int):
        return self._round(key).collection("slots").document(str(slot))

    # -- tasks -------------------------------------------------------------------------
    def create_task(self, population, build, *, exclusive_training=True):
        from google.cloud import firestore

        population_ref = self._population(population)

        @firestore.transactional
        def allocate(transaction):
            snapshot = population_ref.get(transaction=transaction)
            data = snapshot.to_dict() if snapshot.exists else {}
            new_id = int(data.get("max_task_id", 0)) + 1
            record = build(new_id)
            if exclusive_training and record.kind == TaskKind.TRAINING:
                active = data.get("active_training_task_id")
                if active:
                    current = self._task(population, int(active)).get(transaction=transaction)
                    if current.exists:
                        _check_exclusive([TaskRecord.from_dict(current.to_dict())], record)
            update = {"name": population, "max_task_id": new_id}
            if record.kind == TaskKind.TRAINING:
                update["active_training_task_id"] = new_id
            transaction.set(population_ref, update, merge=True)
            transaction.create(self._task(population, new_id), record.to_dict())
            return record

        return allocate(self._db.transaction())

    def get_task(self, population, task_id):
        snapshot = self._task(population, task_id).get()
        return TaskRecord.from_dict(snapshot.to_dict()) if snapshot.exists else None

    def list_tasks(self, population=None):
        docs = self._population(population).collection("tasks").stream() if population is not None else self._db.collection_group("tasks").stream()
        records = [TaskRecord.from_dict(d.to_dict()) for d in docs]
        return sorted(records, key=lambda t: (t.population, t.task_id))

    def open_rounds(self, population):
        """The OPEN tasks (a status query: never the population's history) and their current rounds."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        query = self._population(population).collection("tasks").where(
            filter=FieldFilter("status", "==", TaskStatus.OPEN.value))
        tasks = sorted((TaskRecord.from_dict(d.to_dict()) for d in query.stream()), key=lambda t: t.task_id)
        refs = [self._iteration(population, t.task_id, t.current_round) for t in tasks]
        found = {snap.reference.path: snap for snap in self._db.get_all(refs)} if refs else {}
        rounds = []
        for task, ref in zip(tasks, refs):
            snap = found.get(ref.path)
            rounds.append((task, IterationRecord.from_dict(snap.to_dict()) if snap is not None and snap.exists else None))
        return rounds

    def update_task(self, population, task_id, changes, *, expected=None):
        from google.cloud import firestore

        ref = self._task(population, task_id)
        allowed = None if expected is None else {s.value for s in expected}

        @firestore.transactional
        def apply(transaction):
            snapshot = ref.get(transaction=transaction)
            if not snapshot.exists:
                raise NotFoundError(f"task {population}/{task_id} does not exist")
            data = snapshot.to_dict()
            if allowed is not None and data["status"] not in allowed:
                raise PreconditionFailedError(f"task {population}/{task_id} is {data['status']}")
            transaction.update(ref, _plain(changes))
            return TaskRecord.from_dict({**data, **_plain(changes)})

        updated = apply(self._db.transaction())
        if not updated.status.is_active and updated.current_round >= 1:  # canceled, failed or completed
            self._stop_slot_claims(RoundKey(population, task_id, updated.current_round), updated.max_assignments)
        return updated

    def delete_task(self, population, task_id):
        ref = self._task(population, task_id)
        self._db.recursive_delete(ref)
        population_ref = self._population(population)
        snapshot = population_ref.get()
        if snapshot.exists and snapshot.to_dict().get("active_training_task_id") == task_id:
            population_ref.update({"active_training_task_id": 0})

    # -- iterations --------------------------------------------------------------------
    def create_iteration(self, record):
        from google.api_core import exceptions

        try:
            self._iteration(record.population, record.task_id, record.round_number).create(record.to_dict())
            return True
        except exceptions.Conflict:
            return False

    def get_iteration(self, population, task_id, round_number):
        snapshot = self._iteration(population, task_id, round_number).get()
        return IterationRecord.from_dict(snapshot.to_dict()) if snapshot.exists else None

    def list_iterations(self, population, task_id):
        docs = self._task(population, task_id).collection("iterations").stream()
        return sorted((IterationRecord.from_dict(d.to_dict()) for d in docs), key=lambda i: i.round_number)

    def update_iteration(self, key, changes, *, expected):
        # Optimistic (read, then write conditional on the version read) rather than a
        # transaction: every ingestion past the goal tries to close the round and mark
        # round-ready published, and contending transactions on one document time out.
        from google.api_core import exceptions

        ref = self._round(key)
        allowed = {s.value for s in expected}
        for attempt in range(_OPTIMISTIC_ATTEMPTS):
            snapshot = ref.get()
            if not snapshot.exists:
                raise NotFoundError(f"round {key.round_number} of task {key.population}/{key.task_id} does not exist")
            data = snapshot.to_dict()
            if data["status"] not in allowed:
                raise PreconditionFailedError(f"round {key.round_number} is {data['status']}")
            try:
                ref.update(_plain(changes), option=self._db.write_option(last_update_time=snapshot.update_time))
            except exceptions.FailedPrecondition:
                _backoff(attempt)  # changed since we read it: decide again on the new version
                continue
            updated = IterationRecord.from_dict({**data, **_plain(changes)})
            if data["status"] == IterationStatus.COLLECTING.value and updated.status != IterationStatus.COLLECTING:
                self._stop_slot_claims(key, updated.max_assignments)
            return updated
        raise TransientError(f"round {key.round_number} of task {key.population}/{key.task_id} kept changing "
                             f"concurrently ({_OPTIMISTIC_ATTEMPTS} attempts)", hint="retry")

    def finish_round(self, key, iteration_changes, task_changes, next_iteration):
        from google.cloud import firestore

        iteration_ref = self._round(key)
        task_ref = self._task(key.population, key.task_id)

        @firestore.transactional
        def apply(transaction):
            snapshot = iteration_ref.get(transaction=transaction)
            if not snapshot.exists or snapshot.to_dict()["status"] != IterationStatus.AGGREGATING.value:
                return False
            next_ref = None
            if next_iteration is not None:
                next_ref = self._iteration(next_iteration.population, next_iteration.task_id, next_iteration.round_number)
                if next_ref.get(transaction=transaction).exists:
                    next_ref = None
            transaction.update(iteration_ref, _plain(iteration_changes))
            if task_changes:
                transaction.update(task_ref, _plain(task_changes))
            if next_ref is not None:
                transaction.create(next_ref, next_iteration.to_dict())
            return True

        return apply(self._db.transaction())

    # -- assignments -------------------------------------------------------------------
    def _counter(self, key: RoundKey, kind: str, shard: int):
        return self._round(key).collection("counters").document(f"{kind}-{shard}")

    def _marker(self, key: RoundKey, position: int):
        return self._round(key).collection("accepted").document(str(position))

    def _take_position(self, key: RoundKey, kind: str, quota: ShardedQuota, rng: random.Random,
                       exhausted: Iterable[int] = ()) -> tuple[int | None, int, set[int]]:
        """(position, shard, shards found exhausted): one atomic increment per shard tried."""
        from google.cloud import firestore

        found: set[int] = set()
        for shard in quota.probe_order(rng, exhausted):
            result = self._counter(key, kind, shard).set({"issued": firestore.Increment(1)}, merge=True)
            ticket = int(result.transform_results[0].integer_value)
            if ticket > _CLOSED_OFFSET:
                raise _RoundStopped()
            position = quota.position(shard, ticket)
            if position is not None:
                return position, shard, found
            found.add(shard)
        return None, -1, found

    def _stop_slot_claims(self, key: RoundKey, capacity: int) -> None:
        """Push every slot counter of the round past ``_CLOSED_OFFSET`` (one batch): a check-in
        working from a stale view of the round learns from its first increment that it closed."""
        from google.cloud import firestore

        batch = self._db.batch()
        for shard in range(ShardedQuota.for_total(capacity).shards):
            batch.set(self._counter(key, "slot", shard), {"issued": firestore.Increment(_CLOSED_OFFSET)}, merge=True)
        batch.commit()

    def claim_assignment(self, record, capacity, *, exhausted=(), rng=None):
        """A slot from the sharded slot counter (else the free pool) and the assignment, in one batch."""
        from google.api_core import exceptions

        rng = rng or random.Random()
        key = RoundKey(record.population, record.task_id, record.round_number)
        quota = ShardedQuota.for_total(capacity)
        known = set(exhausted)
        for _ in range(_OPTIMISTIC_ATTEMPTS):
            try:
                slot, _shard, found = self._take_position(key, "slot", quota, rng, known)
            except _RoundStopped:
                return SlotClaim(None, frozenset(known), round_stopped=True)
            known |= found
            if slot is None:
                slot = self._take_free_slot(key)
                if slot is None:
                    return SlotClaim(None, frozenset(known))
            claimed = record.replace(slot=slot)
            batch = self._db.batch()
            batch.create(self._slot(key, slot), {"assignment_id": record.assignment_id})
            batch.create(self._assignment(key, record.assignment_id), claimed.to_dict())
            try:
                batch.commit()
            except exceptions.Conflict as error:
                if self._assignment(key, record.assignment_id).get().exists:
                    raise ConflictError(f"assignment {record.assignment_id} already exists") from error
                continue  # a slot of the free pool that someone re-claimed meanwhile: take another
            return SlotClaim(claimed, frozenset(known))
        raise TransientError(f"round {key.round_number} of task {key.population}/{key.task_id}: slot claims kept "
                             "colliding", hint="retry")

    def _take_free_slot(self, key: RoundKey) -> int | None:
        """A released slot from the round's free pool (deleted with a precondition: one taker)."""
        from google.api_core import exceptions

        for doc in self._round(key).collection("free_slots").limit(8).stream():
            try:
                doc.reference.delete(option=self._db.write_option(exists=True))
            except (exceptions.NotFound, exceptions.FailedPrecondition):
                continue  # another claimer took it
            return int(doc.id)
        return None

    def release_slot(self, key, slot, assignment_id):
        """Free ``slot`` if ``assignment_id`` holds it: delete it and add it to the free pool, atomically."""
        from google.api_core import exceptions

        ref = self._slot(key, slot)
        snapshot = ref.get()
        if not snapshot.exists or snapshot.to_dict().get("assignment_id") != assignment_id:
            return
        batch = self._db.batch()
        batch.delete(ref, option=self._db.write_option(last_update_time=snapshot.update_time))
        batch.set(self._round(key).collection("free_slots").document(str(slot)), {"slot": slot})
        try:
            batch.commit()
        except exceptions.FailedPrecondition:
            pass  # someone else released/reclaimed it meanwhile

    def claimed_slots(self, key):
        return {int(d.id) for d in self._round(key).collection("slots").select([]).stream()}

    def create_assignment(self, record):
        from google.api_core import exceptions

        key = RoundKey(record.population, record.task_id, record.round_number)
        try:
            self._assignment(key, record.assignment_id).create(record.to_dict())
        except exceptions.Conflict as error:
            raise ConflictError(f"assignment {record.assignment_id} already exists") from error

    def get_assignment(self, key, assignment_id):
        snapshot = self._assignment(key, assignment_id).get()
        return AssignmentRecord.from_dict(snapshot.to_dict()) if snapshot.exists else None

    def transition_assignment(self, key, assignment_id, *, expected, new_status, reason=""):
        from google.api_core import exceptions

        ref = self._assignment(key, assignment_id)
        snapshot = ref.get()
        if not snapshot.exists:
            raise NotFoundError(f"assignment {assignment_id} does not exist in round {key.round_number}")
        data = snapshot.to_dict()
        if data["status"] not in {s.value for s in expected}:
            raise PreconditionFailedError(f"assignment {assignment_id} is {data['status']}")
        changes = {"status": new_status.value, "updated_time": time.time(), "status_reason": reason}
        try:
            # Conditional on the version we read: a concurrent move makes this fail.
            ref.update(changes, option=self._db.write_option(last_update_time=snapshot.update_time))
        except exceptions.FailedPrecondition as error:
            raise PreconditionFailedError(f"assignment {assignment_id} changed concurrently") from error
        return AssignmentRecord.from_dict({**data, **changes})

    def get_upload_context(self, key, assignment_id):
        """Task, round and assignment in one round trip."""
        refs = [self._task(key.population, key.task_id), self._round(key), self._assignment(key, assignment_id)]
        found = {snap.reference.path: snap for snap in self._db.get_all(refs)}
        task, iteration, assignment = (found.get(ref.path) for ref in refs)
        return (TaskRecord.from_dict(task.to_dict()) if task is not None and task.exists else None,
                IterationRecord.from_dict(iteration.to_dict()) if iteration is not None and iteration.exists else None,
                AssignmentRecord.from_dict(assignment.to_dict()) if assignment is not None and assignment.exists
                else None)

    def _accept_snapshots(self, key: RoundKey, assignment_id: str) -> tuple[Any, Any]:
        """The round and the assignment as they are now (one round trip)."""
        refs = [self._round(key), self._assignment(key, assignment_id)]
        found = {snap.reference.path: snap for snap in self._db.get_all(refs)}
        return found[refs[0].path], found[refs[1].path]

    def accept_upload(self, key, assignment_id):
        """Count one upload exactly once, O(1): see the module docstring."""
        from google.api_core import exceptions
        from google.cloud import firestore

        round_snapshot, snapshot = self._accept_snapshots(key, assignment_id)
        if not snapshot.exists:
            return AcceptResult(UNKNOWN_ASSIGNMENT)
        status = snapshot.to_dict()["status"]
        if status == AssignmentStatus.UPLOAD_COMPLETED.value:
            return AcceptResult(DUPLICATE)
        if not round_snapshot.exists or round_snapshot.to_dict()["status"] != IterationStatus.COLLECTING.value:
            return AcceptResult(ROUND_CLOSED)
        if status != AssignmentStatus.LOCAL_COMPLETED.value:
            return AcceptResult(NOT_UPLOADABLE)
        quota = ShardedQuota.for_total(int(round_snapshot.to_dict()["report_goal"]))
        position, shard, _ = self._take_position(key, "accept", quota, random.Random())
        if position is None:
            return AcceptResult(ROUND_CLOSED)  # the goal is reached: this upload is surplus
        t = time.time()
        batch = self._db.batch()
        batch.create(self._marker(key, position), {"assignment_id": assignment_id, "time": t})
        batch.update(self._assignment(key, assignment_id),
                     {"status": AssignmentStatus.UPLOAD_COMPLETED.value, "updated_time": t, "accepted_position": position},
                     option=self._db.write_option(last_update_time=snapshot.update_time))
        batch.set(self._counter(key, "accept", shard), {"filled": firestore.Increment(1)}, merge=True)
        try:
            results = batch.commit()
        except exceptions.Conflict:
            return AcceptResult(ROUND_CLOSED)  # the position was voided: the round closed without it
        except exceptions.FailedPrecondition:
            # A concurrent delivery of the same upload (or a timeout) moved the assignment:
            # give the position up so the round still fills, then report what happened.
            full = self._void_position(key, quota, shard, position, "assignment moved during its accept")
            current = self.get_assignment(key, assignment_id)
            if current is not None and current.status == AssignmentStatus.UPLOAD_COMPLETED:
                return AcceptResult(DUPLICATE, full)
            return AcceptResult(NOT_UPLOADABLE, full)
        filled = int(results[2].transform_results[0].integer_value)
        full = filled >= quota.capacity(shard) and self.acceptance_state(key, quota.total).full
        return AcceptResult(ACCEPTED, full)

    def _void_position(self, key: RoundKey, quota: ShardedQuota, shard: int, position: int, reason: str) -> bool:
        """Mark an accept position used-up without a report; True if that made the round full."""
        from google.api_core import exceptions
        from google.cloud import firestore

        batch = self._db.batch()
        batch.create(self._marker(key, position), {"void": True, "reason": reason, "time": time.time()})
        batch.set(self._counter(key, "accept", shard), {"filled": firestore.Increment(1)}, merge=True)
        try:
            results = batch.commit()
        except exceptions.Conflict:
            return False
        filled = int(results[1].transform_results[0].integer_value)
        return filled >= quota.capacity(shard) and self.acceptance_state(key, quota.total).full

    def acceptance_state(self, key, report_goal):
        """One round trip over the accept counters."""
        quota = ShardedQuota.for_total(report_goal)
        refs = [self._counter(key, "accept", shard) for shard in range(quota.shards)]
        issued: dict[int, int] = {}
        filled: dict[int, int] = {}
        index = {ref.path: shard for shard, ref in enumerate(refs)}
        for snap in self._db.get_all(refs):
            data = snap.to_dict() if snap.exists else {}
            issued[index[snap.reference.path]] = int(data.get("issued", 0))
            filled[index[snap.reference.path]] = int(data.get("filled", 0))
        return AcceptanceState(issued_all=quota.is_full(issued), full=quota.is_full(filled))

    def accepted_ids(self, key):
        """The round's accepted set, final once the round stopped collecting.

        Lists the markers (one small document per report: no limit on the round's size)
        and first voids every empty position with a create-only write, so an upload still
        in flight for one of them loses its batch: every caller sees the same set.
        """
        from google.api_core import exceptions

        iteration = self.get_iteration(key.population, key.task_id, key.round_number)
        if iteration is None or iteration.status == IterationStatus.COLLECTING:
            raise PreconditionFailedError(f"round {key.round_number} of task {key.population}/{key.task_id} is not "
                                          "closed: its accepted set is not final")
        markers = {int(doc.id): doc.to_dict() for doc in self._round(key).collection("accepted").stream()}
        for position in range(iteration.report_goal):
            if position in markers:
                continue
            ref = self._marker(key, position)
            try:
                ref.create({"void": True, "reason": f"empty when round {key.round_number} closed",
                            "time": time.time()})
                markers[position] = {"void": True}
            except exceptions.Conflict:
                markers[position] = ref.get().to_dict()  # its upload landed first: it counts
        return sorted(m["assignment_id"] for m in markers.values() if not m.get("void"))

    def _assignments_query(self, key, status):
        query = self._round(key).collection("assignments")
        if status is not None:
            from google.cloud.firestore_v1.base_query import FieldFilter

            query = query.where(filter=FieldFilter("status", "==", status.value))
        return query

    def count_assignments(self, key, status=None):
        result = self._assignments_query(key, status).count(alias="n").get()
        return int(result[0][0].value)

    def list_assignments(self, key, status=None):
        docs = self._assignments_query(key, status).stream()
        return sorted((AssignmentRecord.from_dict(d.to_dict()) for d in docs), key=lambda a: a.assignment_id)

    def record_rejection(self, key, event_id, data):
        from google.api_core import exceptions

        try:
            self._round(key).collection("rejections").document(event_id).create(dict(data))
            return True
        except exceptions.Conflict:
            return False

    def list_rejections(self, key):
        return [d.to_dict() for d in self._round(key).collection("rejections").stream()]
