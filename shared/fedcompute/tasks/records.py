"""Records stored in Firestore, the domain values around them (`RoundKey`, the accept outcomes)
and the state machines and rules that move them (pure, no I/O).

Firestore layout::

    populations/{pop}                                   population (task id allocation)
    populations/{pop}/tasks/{task_id}                   TaskRecord
    .../tasks/{task_id}/iterations/{n}                  RoundRecord (round n, n >= 1)
    .../iterations/{n}/assignments/{assignment_id}      AssignmentRecord
    .../iterations/{n}/slots/{k}                        live-assignment slot k (over-selection cap)
    .../iterations/{n}/rejections/{event_id}            rejected upload, for operations views
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedcompute.dp import TaskDp
from fedcompute.errors import ConflictError, PreconditionFailedError
from fedcompute.tensor_spec import TensorSpec


class TaskKind(str, enum.Enum):
    TRAINING = "TRAINING"
    EVALUATION = "EVALUATION"


class TaskStatus(str, enum.Enum):
    """ODP task statuses (PROTOCOL.md field numbers live in task_management.proto)."""

    CREATED = "CREATED"
    OPEN = "OPEN"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"

    @property
    def is_active(self) -> bool:
        return self in (TaskStatus.CREATED, TaskStatus.OPEN)


class RoundStatus(str, enum.Enum):
    COLLECTING = "COLLECTING"
    AGGREGATING = "AGGREGATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class AssignmentStatus(str, enum.Enum):
    ASSIGNED = "ASSIGNED"
    LOCAL_COMPLETED = "LOCAL_COMPLETED"
    UPLOAD_COMPLETED = "UPLOAD_COMPLETED"
    LOCAL_FAILED = "LOCAL_FAILED"
    LOCAL_NOT_ELIGIBLE = "LOCAL_NOT_ELIGIBLE"
    LOCAL_FAILED_EXAMPLE_GENERATION = "LOCAL_FAILED_EXAMPLE_GENERATION"
    LOCAL_FAILED_MODEL_COMPUTATION = "LOCAL_FAILED_MODEL_COMPUTATION"
    LOCAL_FAILED_OPS_ERROR = "LOCAL_FAILED_OPS_ERROR"
    LOCAL_TIMEOUT = "LOCAL_TIMEOUT"
    UPLOAD_TIMEOUT = "UPLOAD_TIMEOUT"
    UPLOAD_REJECTED = "UPLOAD_REJECTED"

    @property
    def is_live(self) -> bool:
        """Live assignments hold a slot of the round's over-selection cap."""
        return self in (AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOAD_COMPLETED)

    @property
    def is_failure(self) -> bool:
        return not self.is_live


class ReportedResult(str, enum.Enum):
    """ReportResultRequest.Result values a device may send (UNKNOWN is refused)."""

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    NOT_ELIGIBLE = "NOT_ELIGIBLE"
    FAILED_EXAMPLE_GENERATION = "FAILED_EXAMPLE_GENERATION"
    FAILED_MODEL_COMPUTATION = "FAILED_MODEL_COMPUTATION"
    FAILED_OPS_ERROR = "FAILED_OPS_ERROR"


_RESULT_TO_STATUS = {
    ReportedResult.COMPLETED: AssignmentStatus.LOCAL_COMPLETED,
    ReportedResult.FAILED: AssignmentStatus.LOCAL_FAILED,
    ReportedResult.NOT_ELIGIBLE: AssignmentStatus.LOCAL_NOT_ELIGIBLE,
    ReportedResult.FAILED_EXAMPLE_GENERATION: AssignmentStatus.LOCAL_FAILED_EXAMPLE_GENERATION,
    ReportedResult.FAILED_MODEL_COMPUTATION: AssignmentStatus.LOCAL_FAILED_MODEL_COMPUTATION,
    ReportedResult.FAILED_OPS_ERROR: AssignmentStatus.LOCAL_FAILED_OPS_ERROR,
}


def status_after_report(current: AssignmentStatus, result: ReportedResult) -> AssignmentStatus:
    """New assignment status when a device reports ``result``.

    Only an ASSIGNED assignment accepts a report. A repeated COMPLETED report on a
    LOCAL_COMPLETED assignment is a client retry and keeps the status (the caller hands
    out a fresh upload session for the same, write-once object).
    """
    target = _RESULT_TO_STATUS[result]
    if current == AssignmentStatus.ASSIGNED:
        return target
    if current == AssignmentStatus.LOCAL_COMPLETED and result == ReportedResult.COMPLETED:
        return current
    raise PreconditionFailedError(
        f"assignment is {current.value}; a {result.value} report is only accepted for an ASSIGNED assignment",
        hint="check in again with create-task-assignment to get a new assignment",
    )


def max_live_assignments(report_goal: int, over_selection_rate: float) -> int:
    """ODP's cap on live assignments: floor(report_goal × (1 + over_selection_rate))."""
    from fedcompute.config.spec import max_aggregation_size

    return max_aggregation_size(report_goal, over_selection_rate)


@dataclass(frozen=True)
class TaskRecord:
    """One task (training or evaluation) of a population."""

    population: str
    task_id: int
    kind: TaskKind
    status: TaskStatus
    report_goal: int
    over_selection_rate: float
    total_rounds: int
    min_client_version: str = "0"
    max_client_version: str = "999999999"
    traffic_weight: float = 1.0
    min_separation: int = 0
    current_round: int = 0
    status_reason: str = ""
    created_time: float = 0.0
    started_time: float = 0.0
    stop_time: float = 0.0
    client_plan_uri: str = ""
    server_phase_uri: str = ""
    init_checkpoint_uri: str = ""
    # Evaluation tasks: which training task, and how checkpoints are picked.
    source_population: str = ""
    source_task_id: int = 0
    checkpoint_selector: str = ""
    # Weight tensors of a training update, to validate uploads before counting them.
    update_spec: tuple[TensorSpec, ...] = ()
    # Metric names the devices report (sufficient statistics).
    metrics: tuple[str, ...] = ()
    # The most examples one device may report per round (0: the server's default cap).
    max_device_examples: int = 0
    # Privacy ledger: ε spent so far and the task's DP (None until the task opens; stored as {}).
    epsilon_spent: float = 0.0
    dp: TaskDp | None = None
    # Server-private secret from which per-round noise seeds are derived (never published).
    noise_secret: str = ""
    correlation_id: str = ""

    @property
    def max_assignments(self) -> int:
        return max_live_assignments(self.report_goal, self.over_selection_rate)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kind"] = self.kind.value
        data["status"] = self.status.value
        data["update_spec"] = [spec.to_dict() for spec in self.update_spec]
        data["metrics"] = list(self.metrics)
        data["dp"] = self.dp.to_dict() if self.dp is not None else {}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["kind"] = TaskKind(values["kind"])
        values["status"] = TaskStatus(values["status"])
        values["update_spec"] = tuple(TensorSpec.from_dict(s) for s in values.get("update_spec", ()))
        values["metrics"] = tuple(values.get("metrics", ()))
        stored_dp = values.get("dp")
        values["dp"] = TaskDp.from_dict(stored_dp) if stored_dp else None
        return cls(**values)

    def replace(self, **changes: Any) -> TaskRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RoundRecord:
    """One round of a task."""

    population: str
    task_id: int
    round_number: int
    status: RoundStatus
    report_goal: int
    max_assignments: int
    created_time: float = 0.0
    aggregating_time: float = 0.0
    completed_time: float = 0.0
    round_ready_published: bool = False
    # When the scheduler first saw every accept position handed out but not all filled.
    stalled_time: float = 0.0
    # Evaluation rounds: which training round's checkpoint they evaluate.
    evaluated_round: int = 0
    status_reason: str = ""

    @classmethod
    def opening(cls, task: TaskRecord, round_number: int, created_time: float,
                evaluated_round: int = 0) -> RoundRecord:
        """Round ``round_number`` of ``task``, open for uploads (COLLECTING): the one place a round opens."""
        return cls(
            population=task.population, task_id=task.task_id, round_number=round_number,
            status=RoundStatus.COLLECTING, report_goal=task.report_goal,
            max_assignments=max_live_assignments(task.report_goal, task.over_selection_rate),
            created_time=created_time, evaluated_round=evaluated_round,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = RoundStatus(values["status"])
        return cls(**values)

    def replace(self, **changes: Any) -> RoundRecord:
        return dataclasses.replace(self, **changes)


# The scheduler finds expired assignments with a bounded query on (status, updated_bucket)
# instead of listing a round's live assignments. A coarse bucket, not the timestamp itself:
# index entries of one bucket are ordered by the (random, HMAC-derived) assignment id, so a
# burst of writes spreads over the bucket's key range instead of hitting its end, and
# `updated_time` itself stays unindexed (infra/modules/firestore).
UPDATED_BUCKET_FIELD = "updated_bucket"
UPDATED_BUCKET_S = 10.0


def updated_bucket(updated_time: float) -> int:
    """The bucket of ``updated_time``: every time in a bucket < ``b`` is <= ``b * UPDATED_BUCKET_S``."""
    return int(updated_time // UPDATED_BUCKET_S)


@dataclass(frozen=True)
class AssignmentRecord:
    """One device's assignment to one round."""

    assignment_id: str
    population: str
    task_id: int
    round_number: int
    status: AssignmentStatus
    client_version: str
    slot: int
    created_time: float
    updated_time: float
    status_reason: str = ""
    # The identity (fedcompute.identity.device_id_for) that checked in; "" when unsigned.
    device_id: str = ""
    # The most bytes this device may store through its upload session (the task's largest
    # honest update, sealed; 0 = the server's default cap). Set at check-in from the task.
    max_upload_bytes: int = 0
    # Not stored: the store's version of the document this record was read from (Firestore's
    # update time), so a transition can be conditional on it without reading it again.
    version: Any = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["version"]
        data["status"] = self.status.value
        data[UPDATED_BUCKET_FIELD] = updated_bucket(self.updated_time)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AssignmentRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = AssignmentStatus(values["status"])
        return cls(**values)

    def replace(self, **changes: Any) -> AssignmentRecord:
        return dataclasses.replace(self, **changes)


def compare_versions(a: str, b: str) -> int:
    """Compare ODP version codes numerically: -1, 0 or 1."""
    ia, ib = int(a), int(b)
    return (ia > ib) - (ia < ib)


def client_version_allowed(version_code: str, min_version: str, max_version: str) -> bool:
    """True when min <= version <= max (all decimal integers)."""
    return compare_versions(version_code, min_version) >= 0 and compare_versions(version_code, max_version) <= 0


@dataclass(frozen=True)
class RoundKey:
    """One round of one task: the key of every per-round record and event."""

    population: str
    task_id: int
    round_number: int


class AcceptOutcome(str):
    """Result of :meth:`TaskStore.accept_upload` (a string constant)."""


ACCEPTED = AcceptOutcome("ACCEPTED")
DUPLICATE = AcceptOutcome("DUPLICATE")  # already UPLOAD_COMPLETED
ROUND_CLOSED = AcceptOutcome("ROUND_CLOSED")  # round no longer COLLECTING
NOT_UPLOADABLE = AcceptOutcome("NOT_UPLOADABLE")  # assignment not LOCAL_COMPLETED
UNKNOWN_ASSIGNMENT = AcceptOutcome("UNKNOWN_ASSIGNMENT")


def check_exclusive_training(existing: Iterable[TaskRecord], new: TaskRecord) -> None:
    """Refuse a second active training task in a population (a ConflictError with a fix)."""
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


def plain_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Enum values to strings, so changes merge into ``to_dict()`` output."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in changes.items()}


@dataclass(frozen=True)
class AcceptResult:
    """What ``TaskStore.accept_upload`` decided; ``round_full``: this call filled the last position;
    ``filled_counter``: the accept counter whose last position this call filled (its slice of
    the accepted set is then final), else None."""

    outcome: AcceptOutcome
    round_full: bool = False
    filled_counter: int | None = None


@dataclass(frozen=True)
class ShardProgress:
    """A round aggregated in ``shards`` shards: the shards whose partial aggregate is written."""

    shards: int
    done: frozenset[int] = frozenset()

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.shards

    def pending(self) -> list[int]:
        return [shard for shard in range(self.shards) if shard not in self.done]


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
