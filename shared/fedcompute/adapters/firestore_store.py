"""The Firestore adapter of the :class:`~fedcompute.ports.TaskStore` port.

:class:`FirestoreTaskStore` keeps tasks, rounds and assignments in Firestore (or its
emulator) with the port's conditional-write semantics (see :class:`~fedcompute.ports.TaskStore`);
:class:`~fedcompute.memory.InMemoryTaskStore` is the fake with the same semantics
that unit tests use.

Exactly-once counting without a hot transaction (Firestore): an upload takes an *accept
position* from the round's sharded accept counters (one atomic increment; report_goal
positions in all), then one batch creates the position's marker, moves its assignment
LOCAL_COMPLETED -> UPLOAD_COMPLETED conditionally on the version read, and counts the
position filled. A position whose batch cannot apply is voided (a create-only marker), so
the round still fills. The round is full when every position is filled or void; whoever
needs the *accepted set* first voids the positions still empty (create-only), so an upload
in flight for one of them loses its batch and every reader sees the same set
(:meth:`FirestoreTaskStore.accepted_ids`). The aggregator aggregates exactly that set.
(Reading the round inside an accept transaction did the same, but under ~100 concurrent
uploads the Firestore emulator's lock manager aborted the round's writers with
"Transaction lock timeout".)
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedcompute.adapters.group_commit import GroupCommit
from fedcompute.errors import ConflictError, NotFoundError, PreconditionFailedError, TransientError
from fedcompute.learning.sharding import ACCEPT_WINDOW
from fedcompute.tasks.quota import ShardedQuota
from fedcompute.tasks.records import (
    ACCEPTED,
    DUPLICATE,
    NOT_UPLOADABLE,
    ROUND_CLOSED,
    UNKNOWN_ASSIGNMENT,
    UPDATED_BUCKET_FIELD,
    AcceptanceState,
    AcceptResult,
    AssignmentRecord,
    AssignmentStatus,
    RoundKey,
    RoundRecord,
    RoundStatus,
    ShardProgress,
    SlotClaim,
    TaskKind,
    TaskRecord,
    TaskStatus,
    check_exclusive_training,
    plain_changes,
    updated_bucket,
)

_OPTIMISTIC_ATTEMPTS = 25
# Rounds whose exhausted accept counters this process remembers (a counter never un-fills).
_REMEMBERED_ROUNDS = 64


class _RoundStopped(Exception):
    """A slot counter pushed past ``_CLOSED_OFFSET``: the round stopped collecting."""


_CLOSED_OFFSET = 1 << 40
# Rounds whose concurrent slot claims this process groups (one group per round and capacity).
_CLAIM_GROUP_ROUNDS = 64
# At most this many check-ins share one increment and one batch (2 writes each; a batch takes 500).
_CLAIM_GROUP_SIZE = 32


@dataclass(frozen=True)
class _ClaimRequest:
    record: AssignmentRecord
    exhausted: frozenset[int]
    rng: random.Random


def _backoff(attempt: int) -> None:
    """Short jittered sleep between optimistic retries."""
    time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))


class FirestoreTaskStore:
    """:class:`TaskStore` on Firestore (``google.cloud.firestore.Client``, passed in)."""

    def __init__(self, client: Any, root: str = "populations") -> None:
        self._db = client
        self._root = root
        # Per round, the accept counters this process found exhausted: later accepts skip them
        # instead of spending an increment each to learn it again (they fill in order).
        self._full_accept_counters: dict[RoundKey, set[int]] = {}
        # Guards both maps below: ingestion serves uploads on several threads.
        self._accept_lock = threading.Lock()
        # Accepts under way in this process, by round and assignment: see accept_upload.
        self._accepts_in_flight: dict[tuple[RoundKey, str], threading.Event] = {}
        # Check-ins claiming slots of one round at once share their storage calls (claim_assignment).
        self._claim_groups: dict[tuple[RoundKey, int], GroupCommit[_ClaimRequest, SlotClaim]] = {}
        self._claim_groups_lock = threading.Lock()

    # -- references --------------------------------------------------------------------
    def _population(self, population: str):
        return self._db.collection(self._root).document(population)

    def _task(self, population: str, task_id: int):
        return self._population(population).collection("tasks").document(str(task_id))

    def _round_ref(self, population: str, task_id: int, round_number: int):
        return self._task(population, task_id).collection("iterations").document(str(round_number))

    def _round(self, key: RoundKey):
        return self._round_ref(key.population, key.task_id, key.round_number)

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

    def open_rounds(self, population):
        """The OPEN tasks (a status query: never the population's history) and their current rounds."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        query = self._population(population).collection("tasks").where(
            filter=FieldFilter("status", "==", TaskStatus.OPEN.value))
        tasks = sorted((TaskRecord.from_dict(d.to_dict()) for d in query.stream()), key=lambda t: t.task_id)
        refs = [self._round_ref(population, t.task_id, t.current_round) for t in tasks]
        found = {snap.reference.path: snap for snap in self._db.get_all(refs)} if refs else {}
        rounds = []
        for task, ref in zip(tasks, refs):
            snap = found.get(ref.path)
            rounds.append((task, RoundRecord.from_dict(snap.to_dict()) if snap is not None and snap.exists else None))
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
            transaction.update(ref, plain_changes(changes))
            return TaskRecord.from_dict({**data, **plain_changes(changes)})

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

    # -- rounds (Firestore collection "iterations") -------------------------------------
    def create_round(self, record):
        from google.api_core import exceptions

        try:
            self._round_ref(record.population, record.task_id, record.round_number).create(record.to_dict())
            return True
        except exceptions.Conflict:
            return False

    def start_round(self, record):
        # One transaction, so a check-in never sees the task pointing at a round that does not
        # exist yet (or a created round the task never points at, after a crash in between).
        from google.cloud import firestore

        task_ref = self._task(record.population, record.task_id)
        round_ref = self._round_ref(record.population, record.task_id, record.round_number)

        @firestore.transactional
        def apply(transaction):
            task = task_ref.get(transaction=transaction)
            if not task.exists:
                return False
            data = task.to_dict()
            if data["status"] != TaskStatus.OPEN.value or int(data.get("current_round", 0)) != record.round_number - 1:
                return False
            if not round_ref.get(transaction=transaction).exists:
                transaction.create(round_ref, record.to_dict())
            transaction.update(task_ref, {"current_round": record.round_number})
            return True

        return apply(self._db.transaction())

    def get_round(self, key):
        snapshot = self._round(key).get()
        return RoundRecord.from_dict(snapshot.to_dict()) if snapshot.exists else None

    def list_rounds(self, population, task_id):
        docs = self._task(population, task_id).collection("iterations").stream()
        return sorted((RoundRecord.from_dict(d.to_dict()) for d in docs), key=lambda i: i.round_number)

    def update_round(self, key, changes, *, expected):
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
            updated = RoundRecord.from_dict({**data, **plain_changes(changes)})
            if data["status"] == RoundStatus.COLLECTING.value and updated.status != RoundStatus.COLLECTING:
                self._stop_slot_claims(key, updated.max_assignments)
            return updated
        raise TransientError(f"round {key.round_number} of task {key.population}/{key.task_id} kept changing "
                             f"concurrently ({_OPTIMISTIC_ATTEMPTS} attempts)", hint="retry")

    def finish_round(self, key, round_changes, task_changes, next_round_record):
        from google.cloud import firestore

        round_ref = self._round(key)
        task_ref = self._task(key.population, key.task_id)

        @firestore.transactional
        def apply(transaction):
            snapshot = round_ref.get(transaction=transaction)
            if not snapshot.exists or snapshot.to_dict()["status"] != RoundStatus.AGGREGATING.value:
                return False
            next_ref = None
            if next_round_record is not None:
                next_ref = self._round_ref(next_round_record.population, next_round_record.task_id, next_round_record.round_number)
                if next_ref.get(transaction=transaction).exists:
                    next_ref = None
            transaction.update(round_ref, plain_changes(round_changes))
            if task_changes:
                transaction.update(task_ref, plain_changes(task_changes))
            if next_ref is not None:
                transaction.create(next_ref, next_round_record.to_dict())
            return True

        return apply(self._db.transaction())

    # -- assignments -------------------------------------------------------------------
    def _counter(self, key: RoundKey, kind: str, shard: int):
        return self._round(key).collection("counters").document(f"{kind}-{shard}")

    def _marker(self, key: RoundKey, position: int):
        return self._round(key).collection("accepted").document(str(position))

    def _stop_slot_claims(self, key: RoundKey, capacity: int) -> None:
        """Push every slot counter of the round past ``_CLOSED_OFFSET`` (one batch): a check-in
        working from a stale view of the round learns from its first increment that it closed."""
        from google.cloud import firestore

        batch = self._db.batch()
        for shard in range(ShardedQuota.for_total(capacity).shards):
            batch.set(self._counter(key, "slot", shard), {"issued": firestore.Increment(_CLOSED_OFFSET)}, merge=True)
        batch.commit()

    def claim_assignment(self, record, capacity, *, exhausted=(), rng=None):
        """A slot from the sharded slot counter (else the free pool) and the assignment, in one batch.

        Check-ins of one round that claim at once in this process are grouped (group commit):
        one increment of a slot counter by the group's size hands out their slots, one batch
        creates every slot and assignment of the group. Two storage calls per group instead of
        two per check-in; a check-in arriving alone still costs two.
        """
        key = RoundKey(record.population, record.task_id, record.round_number)
        request = _ClaimRequest(record, frozenset(exhausted), rng or random.Random())
        with self._claim_groups_lock:
            group = self._claim_groups.get((key, capacity))
            if group is None:
                group = self._claim_groups[(key, capacity)] = GroupCommit(
                    lambda requests: self._claim_together(key, capacity, requests), max_group=_CLAIM_GROUP_SIZE)
                while len(self._claim_groups) > _CLAIM_GROUP_ROUNDS:
                    self._claim_groups.pop(next(iter(self._claim_groups)))
        return group.submit(request)

    def _claim_together(self, key: RoundKey, capacity: int,
                        requests: Sequence[_ClaimRequest]) -> list[SlotClaim | BaseException]:
        """Slots for ``requests`` (one increment per counter tried), then one batch for all of them."""
        from google.api_core import exceptions

        quota = ShardedQuota.for_total(capacity)
        known = set().union(*(r.exhausted for r in requests))
        try:
            slots, found = self._take_positions(key, "slot", quota, requests[0].rng, known, len(requests))
        except _RoundStopped:
            return [SlotClaim(None, frozenset(known), round_stopped=True) for _ in requests]
        known |= found
        # Beyond the counters' capacity: one at a time from the free pool, or none left.
        results: list[SlotClaim | BaseException] = [
            self._claim_alone(r.record, quota, known, r.rng, None) for r in requests[len(slots):]]
        claimed = [r.record.replace(slot=slot) for r, slot in zip(requests, slots)]
        batch = self._db.batch()
        for record in claimed:
            batch.create(self._slot(key, record.slot), {"assignment_id": record.assignment_id})
            batch.create(self._assignment(key, record.assignment_id), record.to_dict())
        try:
            if claimed:
                batch.commit()
        except exceptions.Conflict:
            # One of the group's ids is taken (nothing was written): each on its own, same slot.
            alone = [self._claim_alone(r.record, quota, known, r.rng, slot) for r, slot in zip(requests, slots)]
            return alone + results
        together: list[SlotClaim | BaseException] = [SlotClaim(record, frozenset(known)) for record in claimed]
        return together + results

    def _claim_alone(self, record: AssignmentRecord, quota: ShardedQuota, known: set[int], rng: random.Random,
                     slot: int | None) -> SlotClaim | BaseException:
        """One check-in's claim, starting from ``slot`` if it already holds one."""
        from google.api_core import exceptions

        key = RoundKey(record.population, record.task_id, record.round_number)
        for _ in range(_OPTIMISTIC_ATTEMPTS):
            if slot is None:
                try:
                    taken, found = self._take_positions(key, "slot", quota, rng, known, 1)
                except _RoundStopped:
                    return SlotClaim(None, frozenset(known), round_stopped=True)
                known |= found
                slot = taken[0] if taken else self._take_free_slot(key)
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
                    # This id (one per identity and round) is taken: the slot goes back to the free
                    # pool, so repeated check-ins of one identity cannot use up the round's slots.
                    self._round(key).collection("free_slots").document(str(slot)).set({"slot": slot})
                    taken_id = ConflictError(f"assignment {record.assignment_id} already exists")
                    taken_id.__cause__ = error
                    return taken_id
                slot = None  # a slot of the free pool that someone re-claimed meanwhile: take another
                continue
            return SlotClaim(claimed, frozenset(known))
        return TransientError(f"round {key.round_number} of task {key.population}/{key.task_id}: slot claims kept "
                              "colliding", hint="retry")

    def _take_positions(self, key: RoundKey, kind: str, quota: ShardedQuota, rng: random.Random,
                        exhausted: Iterable[int], count: int, *, window: int = 0) -> tuple[list[int], set[int]]:
        """Up to ``count`` positions (fewer once every counter is exhausted) and the counters
        found exhausted: one atomic increment by the number still wanted per counter tried, in
        ``quota.probe_order`` (``window``: see there)."""
        from google.cloud import firestore

        positions: list[int] = []
        found: set[int] = set()
        for shard in quota.probe_order(rng, exhausted, window=window):
            wanted = count - len(positions)
            result = self._counter(key, kind, shard).set({"issued": firestore.Increment(wanted)}, merge=True)
            last = int(result.transform_results[0].integer_value)
            if last > _CLOSED_OFFSET:
                raise _RoundStopped()
            granted = [p for p in (quota.position(shard, t) for t in range(last - wanted + 1, last + 1)) if p is not None]
            positions += granted
            if len(granted) < wanted:
                found.add(shard)
            if len(positions) == count:
                break
        return positions, found

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
        return _assignment_record(self._assignment(key, assignment_id).get())

    def transition_assignment(self, key, assignment_id, *, expected, new_status, reason="", current=None):
        """Move an assignment between statuses, conditional on the version read.

        ``current`` (a record this store read, carrying its version) saves the read: one
        round trip instead of two.
        """
        from google.api_core import exceptions

        ref = self._assignment(key, assignment_id)
        if current is None or current.version is None:
            current = _assignment_record(ref.get())
            if current is None:
                raise NotFoundError(f"assignment {assignment_id} does not exist in round {key.round_number}")
        if current.status not in set(expected):
            raise PreconditionFailedError(f"assignment {assignment_id} is {current.status.value}")
        t = time.time()
        changes = {"status": new_status.value, "updated_time": t, UPDATED_BUCKET_FIELD: updated_bucket(t),
                   "status_reason": reason}
        try:
            # Conditional on the version read: a concurrent move (or a deletion) makes this fail.
            ref.update(changes, option=self._db.write_option(last_update_time=current.version))
        except (exceptions.FailedPrecondition, exceptions.NotFound) as error:
            raise PreconditionFailedError(f"assignment {assignment_id} changed concurrently") from error
        return current.replace(status=new_status, updated_time=t, status_reason=reason, version=None)

    def expired_assignments(self, key, status, cutoff, limit):
        """Assignments in ``status`` last updated before ``cutoff``'s bucket: one bounded query
        on the composite index (status, updated_bucket) (infra/modules/firestore)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        query = (self._round(key).collection("assignments")
                 .where(filter=FieldFilter("status", "==", status.value))
                 .where(filter=FieldFilter(UPDATED_BUCKET_FIELD, "<", updated_bucket(cutoff)))
                 .limit(int(limit)))
        return [AssignmentRecord.from_dict(d.to_dict()) for d in query.stream()]

    def get_upload_context(self, key, assignment_id):
        """Task, round and assignment in one round trip."""
        refs = [self._task(key.population, key.task_id), self._round(key), self._assignment(key, assignment_id)]
        found = {snap.reference.path: snap for snap in self._db.get_all(refs)}
        task, round_record, assignment = (found.get(ref.path) for ref in refs)
        return (TaskRecord.from_dict(task.to_dict()) if task is not None and task.exists else None,
                RoundRecord.from_dict(round_record.to_dict()) if round_record is not None and round_record.exists else None,
                _assignment_record(assignment))

    def _accept_snapshots(self, key: RoundKey, assignment_id: str) -> tuple[Any, Any]:
        """The round and the assignment as they are now (one round trip)."""
        refs = [self._round(key), self._assignment(key, assignment_id)]
        found = {snap.reference.path: snap for snap in self._db.get_all(refs)}
        return found[refs[0].path], found[refs[1].path]

    def accept_upload(self, key, assignment_id, *, read=None):
        """Count one upload exactly once, O(1) (see :meth:`_accept_upload`).

        Two deliveries of the same upload at once (Pub/Sub delivers at least once; a relay or
        a restarted pull can hand one message out twice) would each take an accept position,
        and the loser would have to void its own: the round then ends a report short while an
        honest surplus upload is refused as late (measured: 4 duplicated notifications in a
        10,000-upload backlog cost 4 reports). Within a process the second delivery waits for
        the first and then reads the assignment afresh, so it finds the upload counted and
        takes no position. Deliveries on two instances at once still void one position.
        """
        token = (key, assignment_id)
        while True:
            with self._accept_lock:
                other = self._accepts_in_flight.get(token)
                if other is None:
                    mine = self._accepts_in_flight[token] = threading.Event()
                    break
            other.wait()
            read = None  # the other delivery may have moved the assignment: read it afresh
        try:
            return self._accept_upload(key, assignment_id, read)
        finally:
            with self._accept_lock:
                del self._accepts_in_flight[token]
            mine.set()

    def _accept_upload(self, key: RoundKey, assignment_id: str, read: Any) -> AcceptResult:
        """One accept: an accept position from the sharded counters, then one batch.

        ``read``: the round and the assignment as this store read them for the same upload
        (the assignment carrying its version), which saves reading them again. Nothing
        depends on the round still collecting since that read: once a closed round's accepted
        set is frozen its unfilled positions are void (the marker write below then fails),
        and a set frozen after this write includes this upload.
        """
        from google.api_core import exceptions
        from google.cloud import firestore

        if read is not None and read[1].version is not None:
            round_record, assignment = read
            round_status, report_goal = round_record.status.value, round_record.report_goal
            status, version = assignment.status.value, assignment.version
        else:
            round_snapshot, snapshot = self._accept_snapshots(key, assignment_id)
            if not snapshot.exists:
                return AcceptResult(UNKNOWN_ASSIGNMENT)
            status, version = snapshot.to_dict()["status"], snapshot.update_time
            round_data = round_snapshot.to_dict() if round_snapshot.exists else {}
            round_status, report_goal = round_data.get("status"), int(round_data.get("report_goal", 0))
        if status == AssignmentStatus.UPLOAD_COMPLETED.value:
            return AcceptResult(DUPLICATE)
        if round_status != RoundStatus.COLLECTING.value:
            return AcceptResult(ROUND_CLOSED)
        if status != AssignmentStatus.LOCAL_COMPLETED.value:
            return AcceptResult(NOT_UPLOADABLE)
        quota = ShardedQuota.for_total(int(report_goal))
        with self._accept_lock:
            known_full = self._full_accept_counters.setdefault(key, set())
            while len(self._full_accept_counters) > _REMEMBERED_ROUNDS:
                self._full_accept_counters.pop(next(iter(self._full_accept_counters)))
            skip = set(known_full)
        positions, found = self._take_positions(key, "accept", quota, random.Random(), skip, 1, window=ACCEPT_WINDOW)
        with self._accept_lock:
            known_full |= found
        if not positions:
            return AcceptResult(ROUND_CLOSED)  # the goal is reached: this upload is surplus
        position = positions[0]
        shard = quota.shard_of(position)
        t = time.time()
        batch = self._db.batch()
        batch.create(self._marker(key, position), {"assignment_id": assignment_id, "time": t})
        batch.update(self._assignment(key, assignment_id),
                     {"status": AssignmentStatus.UPLOAD_COMPLETED.value, "updated_time": t,
                      UPDATED_BUCKET_FIELD: updated_bucket(t), "accepted_position": position},
                     option=self._db.write_option(last_update_time=version))
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
        if filled < quota.capacity(shard):
            return AcceptResult(ACCEPTED)
        with self._accept_lock:
            known_full.add(shard)
        full = self.acceptance_state(key, quota.total).full
        # Exactly one accept (or void) brings a counter to its capacity: it reports the counter.
        return AcceptResult(ACCEPTED, full, filled_counter=shard if filled == quota.capacity(shard) else None)

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

    def accepted_ids(self, key, positions=None):
        """The round's accepted set (or its ``positions``), final once the round stopped collecting,
        or, for ``positions`` that all hold a marker, while it still collects.

        Reads the markers (one small document per report: no limit on the round's size; for
        ``positions``, only theirs, by key) and first voids every empty position with a
        create-only write, so an upload still in flight for one of them loses its batch:
        every caller sees the same set, whichever slices it reads.
        """
        from google.api_core import exceptions

        round_record = self.get_round(key)
        collecting = round_record is not None and round_record.status == RoundStatus.COLLECTING
        if round_record is None or (collecting and positions is None):
            raise PreconditionFailedError(f"round {key.round_number} of task {key.population}/{key.task_id} is not "
                                          "closed: its accepted set is not final")
        wanted = range(round_record.report_goal) if positions is None else positions
        if positions is None:
            markers = {int(doc.id): doc.to_dict() for doc in self._round(key).collection("accepted").stream()}
        else:
            refs = [self._marker(key, position) for position in wanted]
            markers = {int(snap.id): snap.to_dict() for snap in self._db.get_all(refs) if snap.exists}
        if collecting and any(position not in markers for position in wanted):
            raise PreconditionFailedError(f"round {key.round_number} of task {key.population}/{key.task_id} still "
                                          "collects and these positions are not all filled: not final yet")
        for position in wanted:
            if position in markers:
                continue
            ref = self._marker(key, position)
            try:
                ref.create({"void": True, "reason": f"empty when round {key.round_number} closed",
                            "time": time.time()})
                markers[position] = {"void": True}
            except exceptions.Conflict:
                markers[position] = ref.get().to_dict()  # its upload landed first: it counts
        return sorted(m["assignment_id"] for p, m in markers.items() if p in wanted and not m.get("void"))

    def _shard_plan(self, key: RoundKey):
        return self._round(key).collection("aggregation").document("shards")

    def plan_shards(self, key, shards):
        """Record the round's shard count, create-if-absent; the stored plan wins over ``shards``."""
        from google.api_core import exceptions

        ref = self._shard_plan(key)
        try:
            ref.create({"shards": int(shards), "done": [], "time": time.time()})
            return ShardProgress(int(shards))
        except exceptions.Conflict:
            data = ref.get().to_dict()
            return ShardProgress(int(data["shards"]), frozenset(int(d) for d in data.get("done", [])))

    def finish_shard(self, key, shard):
        """Add ``shard`` to the finished ones (a transaction on the plan: K writers per round)."""
        from google.cloud import firestore

        ref = self._shard_plan(key)

        @firestore.transactional
        def apply(transaction):
            snapshot = ref.get(transaction=transaction)
            if not snapshot.exists:
                raise PreconditionFailedError(f"round {key} has no shard plan")
            data = snapshot.to_dict()
            done = {int(d) for d in data.get("done", [])}
            if shard not in done:
                done.add(int(shard))
                transaction.update(ref, {"done": sorted(done)})
            return ShardProgress(int(data["shards"]), frozenset(done))

        return apply(self._db.transaction())

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


def _assignment_record(snapshot: Any) -> AssignmentRecord | None:
    """The record a snapshot holds, carrying its version (None if the document is absent)."""
    if snapshot is None or not snapshot.exists:
        return None
    return AssignmentRecord.from_dict(snapshot.to_dict()).replace(version=snapshot.update_time)
