"""Device check-in (create-task-assignment) and report-result: the ODP protocol's logic.

Light: no TensorFlow, no protobuf-building here (the function's ``main.py`` converts to
and from the wire messages).
"""
from __future__ import annotations

import enum
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fedcompute import layout
from fedcompute.errors import InvalidRequestError, NotFoundError, PreconditionFailedError
from fedcompute.ports import BlobStore, TaskStore
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    AssignmentRecord,
    AssignmentStatus,
    IterationRecord,
    IterationStatus,
    ReportedResult,
    RoundKey,
    TaskKind,
    TaskRecord,
    TaskStatus,
    client_version_allowed,
    status_after_report,
)

HOUR, DAY = 3600, 86400


class RejectionReason(str, enum.Enum):
    NO_TASK_AVAILABLE = "NO_TASK_AVAILABLE"
    CLIENT_VERSION_MISMATCH = "CLIENT_VERSION_MISMATCH"
    NO_ACTIVE_TASK_EXISTS = "NO_ACTIVE_TASK_EXISTS"


# ODP's retry windows (seconds).
RETRY_WINDOWS: dict[RejectionReason, tuple[int, int]] = {
    RejectionReason.NO_TASK_AVAILABLE: (60, 300),
    RejectionReason.CLIENT_VERSION_MISMATCH: (DAY, 2 * DAY),
    RejectionReason.NO_ACTIVE_TASK_EXISTS: (DAY, 2 * DAY),
}

# How many random free slots a check-in tries before listing the claimed ones.
_SLOT_PROBES = 6


@dataclass(frozen=True)
class CheckIn:
    population: str
    client_version: str


@dataclass(frozen=True)
class Rejection:
    reason: RejectionReason
    detail: str = ""

    @property
    def retry_window(self) -> tuple[int, int]:
        return RETRY_WINDOWS[self.reason]


@dataclass(frozen=True)
class Assignment:
    population: str
    task_id: int
    round_number: int
    assignment_id: str
    kind: TaskKind
    plan_url: str
    checkpoint_url: str
    min_separation: int

    @property
    def task_name(self) -> str:
        return f"/population/{self.population}/task/{self.task_id}"

    @property
    def self_uri(self) -> str:
        return f"{self.task_name}/aggregation/{self.round_number}/task-assignment/{self.assignment_id}"


@dataclass(frozen=True)
class UploadInstruction:
    upload_location: str
    extra_request_headers: dict[str, str]
    object_name: str


def validate_version_code(version: str) -> str:
    """Version codes are decimal integers (ODP compares them numerically)."""
    if not layout.is_ascii_decimal(version):
        raise InvalidRequestError(
            f"client_version.version_code {version[:40]!r} is not a decimal version code (ASCII digits 0-9, "
            f"at most {layout.MAX_ID_DIGITS})",
            hint="send the OnDevicePersonalization module version, e.g. \"341912000\"",
        )
    return version


def create_task_assignment(
    store: TaskStore,
    blobs: BlobStore,
    settings: Settings,
    request: CheckIn,
    *,
    rng: random.Random | None = None,
    now: Callable[[], float] = time.time,
) -> Assignment | Rejection:
    """Assign a device to an open round of the population, or say why not."""
    rng = rng or random.Random()
    validate_version_code(request.client_version)
    tasks = [t for t in store.list_tasks(request.population) if t.status == TaskStatus.OPEN]
    if not tasks:
        return Rejection(RejectionReason.NO_ACTIVE_TASK_EXISTS, f"population {request.population!r} has no open task")
    eligible = [t for t in tasks if client_version_allowed(request.client_version, t.min_client_version, t.max_client_version)]
    if not eligible:
        return Rejection(
            RejectionReason.CLIENT_VERSION_MISMATCH,
            f"version {request.client_version} is outside every open task's range",
        )
    candidates: list[tuple[TaskRecord, IterationRecord]] = []
    for task in eligible:
        iteration = store.get_iteration(RoundKey(task.population, task.task_id, task.current_round))
        if iteration is not None and iteration.status == IterationStatus.COLLECTING and task.traffic_weight > 0:
            candidates.append((task, iteration))
    if not candidates:
        return Rejection(RejectionReason.NO_TASK_AVAILABLE, "no round is collecting right now")
    # ODP's traffic split: one weighted pick among the open rounds; a full round rejects.
    task, iteration = rng.choices(candidates, weights=[t.traffic_weight for t, _ in candidates], k=1)[0]
    key = RoundKey(task.population, task.task_id, iteration.round_number)
    assignment_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    slot = _claim_slot(store, key, iteration.max_assignments, assignment_id, rng)
    if slot is None:
        return Rejection(RejectionReason.NO_TASK_AVAILABLE, f"round {iteration.round_number} is full")
    t = now()
    store.create_assignment(
        AssignmentRecord(
            assignment_id=assignment_id,
            population=task.population,
            task_id=task.task_id,
            round_number=iteration.round_number,
            status=AssignmentStatus.ASSIGNED,
            client_version=request.client_version,
            slot=slot,
            created_time=t,
            updated_time=t,
        )
    )
    return Assignment(
        population=task.population,
        task_id=task.task_id,
        round_number=iteration.round_number,
        assignment_id=assignment_id,
        kind=task.kind,
        plan_url=blobs.download_url(settings.model_bucket, _plan_object(task)),
        checkpoint_url=blobs.download_url(settings.model_bucket, _checkpoint_object(task, iteration)),
        min_separation=task.min_separation,
    )


def _plan_object(task: TaskRecord) -> str:
    if task.kind == TaskKind.EVALUATION:
        return layout.eval_plan_path(task.population, task.task_id)
    return layout.client_plan_path(task.population, task.task_id)


def _checkpoint_object(task: TaskRecord, iteration: IterationRecord) -> str:
    if task.kind == TaskKind.EVALUATION:
        return layout.client_checkpoint_path(task.source_population, task.source_task_id, iteration.evaluated_round)
    return layout.client_checkpoint_path(task.population, task.task_id, iteration.round_number - 1)


def _claim_slot(store: TaskStore, key: RoundKey, capacity: int, assignment_id: str, rng: random.Random) -> int | None:
    """Claim one of ``capacity`` slot documents with create-if-absent; None when full."""
    if capacity <= 0:
        return None
    for slot in rng.sample(range(capacity), k=min(_SLOT_PROBES, capacity)):
        if store.claim_slot(key, slot, assignment_id):
            return slot
    claimed = store.claimed_slots(key)  # one listing (not one per slot)
    free = [s for s in range(capacity) if s not in claimed]
    rng.shuffle(free)
    for slot in free:
        if store.claim_slot(key, slot, assignment_id):
            return slot
    return None


def report_result(
    store: TaskStore,
    blobs: BlobStore,
    settings: Settings,
    key: RoundKey,
    assignment_id: str,
    result: ReportedResult,
) -> UploadInstruction | Rejection | None:
    """Record a device's result; on COMPLETED return where to upload its update.

    Returns a :class:`Rejection` when the round stopped collecting (the device should drop
    its update), None for a failure report.
    """
    assignment = store.get_assignment(key, assignment_id)
    if assignment is None:
        raise NotFoundError(
            f"no assignment {assignment_id} in round {key.round_number} of task {key.population}/{key.task_id}",
            hint="use the self_uri of the TaskAssignment you were given",
        )
    new_status = status_after_report(assignment.status, result)
    if result != ReportedResult.COMPLETED:
        store.transition_assignment(key, assignment_id, expected=[AssignmentStatus.ASSIGNED], new_status=new_status,
                                    reason=f"device reported {result.value}")
        store.release_slot(key, assignment.slot, assignment_id)
        return None
    iteration = store.get_iteration(key)
    if iteration is None or iteration.status != IterationStatus.COLLECTING:
        return Rejection(RejectionReason.NO_TASK_AVAILABLE, f"round {key.round_number} is no longer collecting")
    if assignment.status == AssignmentStatus.ASSIGNED:
        try:
            store.transition_assignment(key, assignment_id, expected=[AssignmentStatus.ASSIGNED],
                                        new_status=AssignmentStatus.LOCAL_COMPLETED)
        except PreconditionFailedError:
            # A concurrent retry of the same report won; it is LOCAL_COMPLETED now.
            current = store.get_assignment(key, assignment_id)
            if current is None or current.status != AssignmentStatus.LOCAL_COMPLETED:
                raise
    object_name = layout.gradient_path(key.population, key.task_id, key.round_number, assignment_id)
    url, headers = blobs.create_upload_session(settings.gradient_bucket, object_name)
    return UploadInstruction(upload_location=url, extra_request_headers=headers, object_name=object_name)
