"""The Firestore adapter of the :class:`~fedcompute.ports.TaskStore` port.

:class:`FirestoreTaskStore` keeps tasks, rounds and assignments in Firestore (or its
emulator) with the port's conditional-write semantics (see :class:`~fedcompute.ports.TaskStore`);
:class:`~fedcompute.tasks.memory_store.InMemoryTaskStore` is the fake with the same semantics
that unit tests use.

Exactly-once counting without a hot transaction (Firestore): an upload is accepted by a
conditional write of its assignment alone (LOCAL_COMPLETED -> UPLOAD_COMPLETED), then the
round is re-read. If the round still collects, the upload counts: whoever closes the round
later freezes a set that includes it. If the round closed meanwhile, the round's *accepted
set* decides: it is frozen once, create-only, from the UPLOAD_COMPLETED assignments
visible after the close (:meth:`TaskStore.accepted_ids`, which whoever needs it first
creates). An upload outside that set was too late and its acceptance is undone. The
aggregator aggregates exactly the frozen set, so every accepted report is aggregated and
nothing else is. (Reading the round inside the accept transaction did the same, but under
~100 concurrent uploads the Firestore emulator's lock manager aborted the round's writers
with "Transaction lock timeout".)
"""
from __future__ import annotations

import random
import time
from typing import Any

from fedcompute.errors import ConflictError, NotFoundError, PreconditionFailedError, TransientError
from fedcompute.tasks.records import (
    ACCEPTED,
    DUPLICATE,
    NOT_UPLOADABLE,
    ROUND_CLOSED,
    UNKNOWN_ASSIGNMENT,
    AcceptOutcome,
    AssignmentRecord,
    AssignmentStatus,
    IterationRecord,
    IterationStatus,
    RoundKey,
    TaskKind,
    TaskRecord,
    check_exclusive_training,
    plain_changes,
)

_OPTIMISTIC_ATTEMPTS = 25


def _backoff(attempt: int) -> None:
    """Short jittered sleep between optimistic retries."""
    time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))


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
                        check_exclusive_training([TaskRecord.from_dict(current.to_dict())], record)
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
            transaction.update(ref, plain_changes(changes))
            return TaskRecord.from_dict({**data, **plain_changes(changes)})

        return apply(self._db.transaction())

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

    def get_iteration(self, key):
        snapshot = self._round(key).get()
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
                ref.update(plain_changes(changes), option=self._db.write_option(last_update_time=snapshot.update_time))
            except exceptions.FailedPrecondition:
                _backoff(attempt)  # changed since we read it: decide again on the new version
                continue
            return IterationRecord.from_dict({**data, **plain_changes(changes)})
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
            transaction.update(iteration_ref, plain_changes(iteration_changes))
            if task_changes:
                transaction.update(task_ref, plain_changes(task_changes))
            if next_ref is not None:
                transaction.create(next_ref, next_iteration.to_dict())
            return True

        return apply(self._db.transaction())

    # -- assignments -------------------------------------------------------------------
    def claim_slot(self, key, slot, assignment_id):
        from google.api_core import exceptions

        try:
            self._slot(key, slot).create({"assignment_id": assignment_id, "time": time.time()})
            return True
        except exceptions.Conflict:
            return False

    def release_slot(self, key, slot, assignment_id):
        ref = self._slot(key, slot)
        snapshot = ref.get()
        if snapshot.exists and snapshot.to_dict().get("assignment_id") == assignment_id:
            from google.api_core import exceptions

            try:
                ref.delete(option=self._db.write_option(last_update_time=snapshot.update_time))
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

    def accept_upload(self, key, assignment_id):
        """Count one upload exactly once; see the module docstring for why this is safe."""
        from google.api_core import exceptions

        ref = self._assignment(key, assignment_id)
        for attempt in range(_OPTIMISTIC_ATTEMPTS):
            snapshot = ref.get()
            if not snapshot.exists:
                return UNKNOWN_ASSIGNMENT
            status = snapshot.to_dict()["status"]
            if status == AssignmentStatus.UPLOAD_COMPLETED.value:
                return self._settle_accept(key, assignment_id, DUPLICATE)
            iteration = self.get_iteration(key)
            if iteration is None or iteration.status != IterationStatus.COLLECTING:
                return ROUND_CLOSED
            if status != AssignmentStatus.LOCAL_COMPLETED.value:
                return NOT_UPLOADABLE
            try:
                ref.update({"status": AssignmentStatus.UPLOAD_COMPLETED.value, "updated_time": time.time()},
                           option=self._db.write_option(last_update_time=snapshot.update_time))
            except exceptions.FailedPrecondition:
                _backoff(attempt)  # a concurrent delivery or a timeout moved it: decide again
                continue
            return self._settle_accept(key, assignment_id, ACCEPTED)
        raise TransientError(f"assignment {assignment_id} kept changing concurrently", hint="retry")

    def _settle_accept(self, key: RoundKey, assignment_id: str, outcome: AcceptOutcome) -> AcceptOutcome:
        """``outcome`` if the UPLOAD_COMPLETED assignment counts; else undo it: ROUND_CLOSED.

        Read after the assignment's write: a round still COLLECTING closes later, and its
        accepted set (listed after the close) includes this assignment.
        """
        iteration = self.get_iteration(key)
        if iteration is not None and iteration.status == IterationStatus.COLLECTING:
            return outcome
        if assignment_id in set(self.accepted_ids(key)):
            return outcome
        try:
            self.transition_assignment(key, assignment_id, expected=[AssignmentStatus.UPLOAD_COMPLETED],
                                       new_status=AssignmentStatus.LOCAL_COMPLETED,
                                       reason=f"upload arrived after round {key.round_number} closed")
        except (PreconditionFailedError, NotFoundError):
            pass  # a concurrent delivery of the same upload undid it already
        return ROUND_CLOSED

    def accepted_ids(self, key):
        """The round's accepted set, frozen on first use after the round stopped collecting.

        Create-only, so every caller (late accepts, the aggregator, its re-runs) sees the
        same set. One document holds the ids: fine up to ~25,000 reports per round.
        """
        from google.api_core import exceptions

        ref = self._round(key).collection("frozen").document("accepted")
        snapshot = ref.get()
        if snapshot.exists:
            return list(snapshot.to_dict()["assignment_ids"])
        iteration = self.get_iteration(key)
        if iteration is None or iteration.status == IterationStatus.COLLECTING:
            raise PreconditionFailedError(f"round {key.round_number} of task {key.population}/{key.task_id} is not "
                                          "closed: its accepted set is not final")
        query = self._assignments_query(key, AssignmentStatus.UPLOAD_COMPLETED).select([])
        ids = sorted(doc.id for doc in query.stream())
        try:
            ref.create({"assignment_ids": ids, "time": time.time()})
        except exceptions.Conflict:
            return list(ref.get().to_dict()["assignment_ids"])
        return ids

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
