"""Ports: what the services need from the outside world, as typing Protocols.

The adapters in :mod:`fedcompute.adapters` implement them on Google Cloud (Firestore, Cloud
Storage, Pub/Sub); in-memory fakes with the same semantics serve unit tests. Services take
them as arguments; ``functions/*/main.py`` builds the real ones once per process.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fedcompute.tasks.records import (
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
)


class TaskStore(Protocol):
    """What the services need from the store of tasks, rounds and assignments.

    * creates are create-if-absent (idempotent on ids);
    * status moves are conditional on the current status (lost races raise
      :class:`~fedcompute.errors.PreconditionFailedError`);
    * the hot path (many devices reporting at once) never writes one shared document: each
      assignment and each slot is its own record, counts come from aggregation queries,
      round status moves are optimistic conditional writes, and only completing a round
      (round, task and next round together) runs in a transaction;
    * an upload counts exactly once: :meth:`accept_upload` accepts it while the round
      collects, and :meth:`accepted_ids` freezes the round's accepted set once it closed
      (all of it, or the accept positions of one aggregation shard); a slice whose positions
      are all filled is final earlier and is read while the round still collects
      (``AcceptResult.filled_counter`` says when an accept counter's slice became final);
    * a sharded aggregation records its shard count once (:meth:`plan_shards`, create-if-absent)
      and each finished shard (:meth:`finish_shard`, idempotent): exactly one caller sees the
      set become complete, unless a shard is re-delivered after it;
    * :meth:`expired_assignments` finds assignments in ``status`` not updated since ``cutoff``
      with a bounded query (at most ``limit``), never a listing of the round.

    Implemented by :class:`~fedcompute.adapters.firestore_store.FirestoreTaskStore` and
    :class:`~fedcompute.memory.InMemoryTaskStore`.
    """

    # Tasks
    def create_task(
        self, population: str, build: Callable[[int], TaskRecord], *, exclusive_training: bool = True
    ) -> TaskRecord: ...
    def get_task(self, population: str, task_id: int) -> TaskRecord | None: ...
    def list_tasks(self, population: str | None = None) -> list[TaskRecord]: ...
    def open_rounds(self, population: str) -> list[tuple[TaskRecord, RoundRecord | None]]: ...
    def update_task(
        self, population: str, task_id: int, changes: dict[str, Any], *, expected: Iterable[TaskStatus] | None = None
    ) -> TaskRecord: ...
    def delete_task(self, population: str, task_id: int) -> None: ...

    # Iterations
    def create_round(self, record: RoundRecord) -> bool: ...
    def start_round(self, record: RoundRecord) -> bool:
        """Create the task's next round and point the task at it, in one atomic step: True if
        this call did it; False if the task is not OPEN or already points at this round or later."""
        ...
    def get_round(self, key: RoundKey) -> RoundRecord | None: ...
    def list_rounds(self, population: str, task_id: int) -> list[RoundRecord]: ...
    def update_round(
        self, key: RoundKey, changes: dict[str, Any], *, expected: Iterable[RoundStatus]
    ) -> RoundRecord: ...
    def finish_round(
        self,
        key: RoundKey,
        round_changes: dict[str, Any],
        task_changes: dict[str, Any],
        next_round_record: RoundRecord | None,
    ) -> bool: ...

    # Assignments
    def claim_assignment(
        self, record: AssignmentRecord, capacity: int, *, exhausted: Iterable[int] = (), rng: random.Random | None = None
    ) -> SlotClaim: ...
    def get_upload_context(
        self, key: RoundKey, assignment_id: str
    ) -> tuple[TaskRecord | None, RoundRecord | None, AssignmentRecord | None]: ...
    def release_slot(self, key: RoundKey, slot: int, assignment_id: str) -> None: ...
    def claimed_slots(self, key: RoundKey) -> set[int]: ...
    def create_assignment(self, record: AssignmentRecord) -> None: ...
    def get_assignment(self, key: RoundKey, assignment_id: str) -> AssignmentRecord | None: ...
    def transition_assignment(
        self,
        key: RoundKey,
        assignment_id: str,
        *,
        expected: Iterable[AssignmentStatus],
        new_status: AssignmentStatus,
        reason: str = "",
        current: AssignmentRecord | None = None,
    ) -> AssignmentRecord: ...
    def accept_upload(
        self, key: RoundKey, assignment_id: str, *, read: tuple[RoundRecord, AssignmentRecord] | None = None
    ) -> AcceptResult: ...
    def acceptance_state(self, key: RoundKey, report_goal: int) -> AcceptanceState: ...
    def accepted_ids(self, key: RoundKey, positions: range | None = None) -> list[str]: ...
    def plan_shards(self, key: RoundKey, shards: int) -> ShardProgress: ...
    def finish_shard(self, key: RoundKey, shard: int) -> ShardProgress: ...
    def expired_assignments(
        self, key: RoundKey, status: AssignmentStatus, cutoff: float, limit: int
    ) -> list[AssignmentRecord]: ...
    def count_assignments(self, key: RoundKey, status: AssignmentStatus | None = None) -> int: ...
    def list_assignments(self, key: RoundKey, status: AssignmentStatus | None = None) -> list[AssignmentRecord]: ...
    def record_rejection(self, key: RoundKey, event_id: str, data: dict[str, Any]) -> bool: ...
    def list_rejections(self, key: RoundKey) -> list[dict[str, Any]]: ...


class BlobStore(Protocol):
    """Object storage (GCS). ``create_only`` writes are create-if-absent: a retry never overwrites."""

    def read(self, bucket: str, name: str) -> bytes: ...
    def write(self, bucket: str, name: str, data: bytes, *, create_only: bool = False,
              content_type: str = "application/octet-stream") -> bool: ...
    def exists(self, bucket: str, name: str) -> bool: ...
    def list(self, bucket: str, prefix: str) -> list[str]: ...
    def delete(self, bucket: str, name: str) -> None: ...
    def download_url(self, bucket: str, name: str) -> str: ...
    def create_upload_session(self, bucket: str, name: str, *, gzip: bool = False,
                              max_bytes: int | None = None, first: bool = False) -> tuple[str, dict[str, str]]: ...


class RoundEvents(Protocol):
    """Publishes that a round is ready to aggregate (or to combine its shards), that one shard
    of it is to be aggregated, or that it completed."""

    def round_ready(self, key: RoundKey) -> None: ...
    def aggregation_shard(self, key: RoundKey, shard: int, shards: int) -> None: ...
    def round_completed(self, key: RoundKey, **extra: Any) -> None: ...
