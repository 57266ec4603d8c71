"""In-memory fakes of the ports (:mod:`fedcompute.ports`) for unit tests and benchmarks.

Not adapters (those are the real I/O edges in :mod:`fedcompute.adapters`): plain dicts behind
a lock, with the same semantics as the cloud implementations.

* :class:`InMemoryTaskStore`: the same conditional-write semantics as
  :class:`~fedcompute.adapters.firestore_store.FirestoreTaskStore`, thread-safe so
  concurrency tests can drive it;
* :class:`InMemoryBlobStore`: create-only writes and write-once upload sessions, as
  :class:`~fedcompute.adapters.blobs.GcsBlobStore`;
* :class:`InMemoryRoundEvents`: records what :class:`~fedcompute.adapters.events.PubSubRoundEvents`
  would publish.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Any

from fedcompute.errors import ConflictError, NotFoundError, PayloadTooLargeError, PreconditionFailedError
from fedcompute.tasks.quota import ShardedQuota
from fedcompute.tasks.records import (
    ACCEPTED,
    DUPLICATE,
    NOT_UPLOADABLE,
    ROUND_CLOSED,
    UNKNOWN_ASSIGNMENT,
    AcceptanceState,
    AcceptResult,
    AssignmentRecord,
    AssignmentStatus,
    RoundKey,
    RoundRecord,
    RoundStatus,
    ShardProgress,
    SlotClaim,
    TaskRecord,
    TaskStatus,
    check_exclusive_training,
    plain_changes,
    updated_bucket,
)


class InMemoryTaskStore:
    """A dict-backed :class:`TaskStore` with the same semantics as the Firestore one."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tasks: dict[tuple[str, int], TaskRecord] = {}
        self._rounds: dict[tuple[str, int, int], RoundRecord] = {}
        self._assignments: dict[tuple[str, int, int, str], AssignmentRecord] = {}
        self._slots: dict[tuple[str, int, int, int], str] = {}
        self._rejections: dict[tuple[str, int, int, str], dict[str, Any]] = {}
        self._shard_plans: dict[tuple[str, int, int], ShardProgress] = {}
        self._accept_order: dict[tuple[str, int, int], list[str]] = {}  # accepted ids, in accept order

    def create_task(self, population, build, *, exclusive_training=True):
        with self._lock:
            existing = [t for (p, _), t in self._tasks.items() if p == population]
            new_id = max((t.task_id for t in existing), default=0) + 1
            record = build(new_id)
            if exclusive_training:
                check_exclusive_training(existing, record)
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
            return [(t, self._rounds.get((population, t.task_id, t.current_round)))
                    for t in self.list_tasks(population) if t.status == TaskStatus.OPEN]

    def update_task(self, population, task_id, changes, *, expected=None):
        with self._lock:
            task = self._tasks.get((population, task_id))
            if task is None:
                raise NotFoundError(f"task {population}/{task_id} does not exist")
            if expected is not None and task.status not in set(expected):
                raise PreconditionFailedError(f"task {population}/{task_id} is {task.status.value}")
            updated = TaskRecord.from_dict({**task.to_dict(), **plain_changes(changes)})
            self._tasks[(population, task_id)] = updated
            return updated

    def delete_task(self, population, task_id):
        with self._lock:
            self._tasks.pop((population, task_id), None)
            stores: tuple[dict[Any, Any], ...] = (self._rounds, self._assignments, self._slots, self._rejections)
            for store in stores:
                for k in [k for k in store if k[0] == population and k[1] == task_id]:
                    del store[k]

    def create_round(self, record):
        with self._lock:
            k = (record.population, record.task_id, record.round_number)
            if k in self._rounds:
                return False
            self._rounds[k] = record
            return True

    def start_round(self, record):
        with self._lock:
            task = self._tasks.get((record.population, record.task_id))
            if task is None or task.status != TaskStatus.OPEN or task.current_round != record.round_number - 1:
                return False
            self._rounds.setdefault((record.population, record.task_id, record.round_number), record)
            self._tasks[(record.population, record.task_id)] = task.replace(current_round=record.round_number)
            return True

    def get_round(self, key):
        with self._lock:
            return self._rounds.get((key.population, key.task_id, key.round_number))

    def list_rounds(self, population, task_id):
        with self._lock:
            return sorted(
                (i for k, i in self._rounds.items() if k[:2] == (population, task_id)),
                key=lambda i: i.round_number,
            )

    def update_round(self, key, changes, *, expected):
        with self._lock:
            k = (key.population, key.task_id, key.round_number)
            it = self._rounds.get(k)
            if it is None:
                raise NotFoundError(f"round {key.round_number} of task {key.population}/{key.task_id} does not exist")
            if it.status not in set(expected):
                raise PreconditionFailedError(f"round {key.round_number} is {it.status.value}")
            updated = RoundRecord.from_dict({**it.to_dict(), **plain_changes(changes)})
            self._rounds[k] = updated
            return updated

    def finish_round(self, key, round_changes, task_changes, next_round_record):
        with self._lock:
            k = (key.population, key.task_id, key.round_number)
            it = self._rounds.get(k)
            if it is None or it.status != RoundStatus.AGGREGATING:
                return False
            self._rounds[k] = RoundRecord.from_dict({**it.to_dict(), **plain_changes(round_changes)})
            task = self._tasks[(key.population, key.task_id)]
            self._tasks[(key.population, key.task_id)] = TaskRecord.from_dict({**task.to_dict(), **plain_changes(task_changes)})
            if next_round_record is not None:
                nk = (next_round_record.population, next_round_record.task_id, next_round_record.round_number)
                self._rounds.setdefault(nk, next_round_record)
            return True

    def claim_assignment(self, record, capacity, *, exhausted=(), rng=None):
        with self._lock:
            rk = (record.population, record.task_id, record.round_number)
            round_record, task = self._rounds.get(rk), self._tasks.get(rk[:2])
            if round_record is None or round_record.status != RoundStatus.COLLECTING or task is None or \
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
                self.get_round(key),
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

    def transition_assignment(self, key, assignment_id, *, expected, new_status, reason="", current=None):
        # ``current`` only saves Firestore a read; here the check under the lock is the same.
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

    def accept_upload(self, key, assignment_id, *, read=None):
        # ``read`` only saves Firestore a read; here everything is checked under the lock.
        with self._lock:
            rk = (key.population, key.task_id, key.round_number)
            it = self._rounds.get(rk)
            rec = self._assignments.get((*rk, assignment_id))
            if rec is None:
                return AcceptResult(UNKNOWN_ASSIGNMENT)
            if rec.status == AssignmentStatus.UPLOAD_COMPLETED:
                return AcceptResult(DUPLICATE)
            accepted = self.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)  # a fake: counting is fine
            if it is None or it.status != RoundStatus.COLLECTING or accepted >= it.report_goal:
                return AcceptResult(ROUND_CLOSED)
            if rec.status != AssignmentStatus.LOCAL_COMPLETED:
                return AcceptResult(NOT_UPLOADABLE)
            self._assignments[(*rk, assignment_id)] = rec.replace(status=AssignmentStatus.UPLOAD_COMPLETED,
                                                                   updated_time=time.time())
            # Positions in acceptance order: the accept counters fill one after another.
            order = self._accept_order.setdefault(rk, [])
            order.append(assignment_id)
            quota = ShardedQuota.for_total(it.report_goal)
            counter = quota.shard_of(accepted)
            filled = accepted + 1 == quota.offset(counter) + quota.capacity(counter)
            return AcceptResult(ACCEPTED, round_full=accepted + 1 == it.report_goal,
                                filled_counter=counter if filled else None)

    def acceptance_state(self, key, report_goal):
        done = self.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) >= report_goal
        return AcceptanceState(issued_all=done, full=done)

    def accepted_ids(self, key, positions=None):
        """Ids of the round's counted uploads (accepts are atomic here: the UPLOAD_COMPLETED ones);
        position p is the p-th accepted by :meth:`accept_upload`, then those made UPLOAD_COMPLETED
        directly, in id order. Like the Firestore store, positions that are all filled are
        final while the round still collects."""
        with self._lock:
            rk = (key.population, key.task_id, key.round_number)
            it = self._rounds.get(rk)
            collecting = it is not None and it.status == RoundStatus.COLLECTING
            done = [a.assignment_id for a in self.list_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)]
            order = self._accept_order.get(rk, [])
            ids = order + sorted(set(done) - set(order))
            if it is None or (collecting and (positions is None or any(p >= len(ids) for p in positions))):
                raise PreconditionFailedError(f"round {key.round_number} is not closed: its accepted set "
                                              "is not final")
            return ids if positions is None else [ids[p] for p in positions if 0 <= p < len(ids)]

    def plan_shards(self, key, shards):
        with self._lock:
            return self._shard_plans.setdefault((key.population, key.task_id, key.round_number),
                                                ShardProgress(int(shards)))

    def finish_shard(self, key, shard):
        with self._lock:
            rk = (key.population, key.task_id, key.round_number)
            plan = self._shard_plans.get(rk)
            if plan is None:
                raise PreconditionFailedError(f"round {key} has no shard plan")
            plan = ShardProgress(plan.shards, plan.done | {int(shard)})
            self._shard_plans[rk] = plan
            return plan

    def expired_assignments(self, key, status, cutoff, limit):
        with self._lock:
            bucket = updated_bucket(cutoff)
            return [a for a in self.list_assignments(key, status) if updated_bucket(a.updated_time) < bucket][:limit]

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


class InMemoryBlobStore:
    """Dict-backed :class:`BlobStore` for unit tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.objects: dict[tuple[str, str], bytes] = {}
        self.sessions: dict[str, tuple[str, str]] = {}
        self.session_limits: dict[str, int | None] = {}

    def read(self, bucket, name):
        with self._lock:
            try:
                return self.objects[(bucket, name)]
            except KeyError:
                raise NotFoundError(f"gs://{bucket}/{name} does not exist") from None

    def write(self, bucket, name, data, *, create_only=False, content_type="application/octet-stream"):
        with self._lock:
            if create_only and (bucket, name) in self.objects:
                return False
            self.objects[(bucket, name)] = bytes(data)
            return True

    def exists(self, bucket, name):
        with self._lock:
            return (bucket, name) in self.objects

    def list(self, bucket, prefix):
        with self._lock:
            return sorted(n for (b, n) in self.objects if b == bucket and n.startswith(prefix))

    def delete(self, bucket, name):
        with self._lock:
            self.objects.pop((bucket, name), None)

    def download_url(self, bucket, name):
        return f"memory://{bucket}/{name}"

    def create_upload_session(self, bucket, name, *, gzip=False, max_bytes=None, first=False):
        url = f"memory-upload://{bucket}/{name}#{len(self.sessions)}"
        with self._lock:
            if (bucket, name) in self.objects:
                raise PreconditionFailedError(f"gs://{bucket}/{name} was already uploaded; an update is written once")
            self.sessions[url] = (bucket, name)
            self.session_limits[url] = max_bytes
        return url, {"content-type": "application/octet-stream"}

    def complete_upload(self, url: str, data: bytes) -> bool:
        """What a device PUT to the session does: write once, within the session's size range."""
        bucket, name = self.sessions[url]
        limit = self.session_limits.get(url)
        if limit is not None and len(data) > limit:
            raise PayloadTooLargeError(f"{len(data)} bytes is outside the session's range 0-{limit}")
        return self.write(bucket, name, data, create_only=True)


class InMemoryRoundEvents:
    """Records published events (unit tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ready: list[RoundKey] = []
        self.shards: list[tuple[RoundKey, int, int]] = []
        self.completed: list[tuple[RoundKey, dict[str, Any]]] = []

    def round_ready(self, key: RoundKey) -> None:
        with self._lock:
            self.ready.append(key)

    def aggregation_shard(self, key: RoundKey, shard: int, shards: int) -> None:
        with self._lock:
            self.shards.append((key, shard, shards))

    def round_completed(self, key: RoundKey, **extra: Any) -> None:
        with self._lock:
            self.completed.append((key, extra))
