"""Operations views from the stored records: tasks, rounds, assignments and rejected uploads.

Pure summaries (:func:`summarize_round`, :func:`summarize_task`, :func:`assignments_per_minute`,
:func:`iterations_over_time`) over plain records; :func:`load_ops` reads them from a
``TaskStore`` (Firestore, or the in-memory fake). These feed the seed's three operations
figures: assignments per minute, iteration processing time, iterations over time.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fedcompute.privacy.disclosure import redact_dp
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundKey, RoundRecord, RoundStatus, TaskRecord

FAILED_STATUSES = frozenset({
    AssignmentStatus.LOCAL_FAILED,
    AssignmentStatus.LOCAL_FAILED_EXAMPLE_GENERATION,
    AssignmentStatus.LOCAL_FAILED_MODEL_COMPUTATION,
    AssignmentStatus.LOCAL_FAILED_OPS_ERROR,
})
TIMEOUT_STATUSES = frozenset({AssignmentStatus.LOCAL_TIMEOUT, AssignmentStatus.UPLOAD_TIMEOUT})
IN_PROGRESS_STATUSES = frozenset({AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_COMPLETED})
# Per-round count columns, in display order.
COUNT_COLUMNS: tuple[str, ...] = ("assigned", "in_progress", "completed", "failed", "not_eligible", "timed_out",
                                  "rejected_uploads")


class RecordSource(Protocol):
    def list_tasks(self, population: str | None = None) -> list[TaskRecord]: ...
    def list_rounds(self, population: str, task_id: int) -> list[RoundRecord]: ...
    def list_assignments(self, key: RoundKey, status: AssignmentStatus | None = None) -> list[AssignmentRecord]: ...
    def list_rejections(self, key: RoundKey) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class RoundOps:
    """One round: its timing and what its devices did.

    ``assigned`` counts every assignment handed out; the other counts split them by
    status (``completed`` = upload accepted). ``rejected_uploads`` counts the stored
    rejections (invalid or late uploads), whether or not they had an assignment.
    """

    round_number: int
    status: str
    created_time: float
    aggregating_time: float
    completed_time: float
    assigned: int = 0
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    not_eligible: int = 0
    timed_out: int = 0
    rejected_uploads: int = 0

    @property
    def collecting_s(self) -> float | None:
        """Seconds from the round opening to reaching its goal (None while collecting)."""
        return self.aggregating_time - self.created_time if self.aggregating_time and self.created_time else None

    @property
    def aggregating_s(self) -> float | None:
        """Seconds from reaching the goal to the checkpoint written and the round completed."""
        return self.completed_time - self.aggregating_time if self.completed_time and self.aggregating_time else None

    def counts(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in COUNT_COLUMNS}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "collecting_s": self.collecting_s, "aggregating_s": self.aggregating_s}


@dataclass(frozen=True)
class TaskOps:
    """A task, its rounds, and the creation times of all its assignments."""

    task: TaskRecord
    rounds: tuple[RoundOps, ...]
    assignment_times: tuple[float, ...] = field(default=())

    @property
    def run_id(self) -> str:
        return f"{self.task.population}/{self.task.task_id}"

    def totals(self) -> dict[str, int]:
        return {c: sum(getattr(r, c) for r in self.rounds) for c in COUNT_COLUMNS}

    def summary(self) -> dict[str, Any]:
        """The task fields a status table or the dashboard shows."""
        t = self.task
        return {
            "run": self.run_id, "population": t.population, "task_id": t.task_id, "kind": t.kind.value,
            "status": t.status.value, "status_reason": t.status_reason, "current_round": t.current_round,
            "total_rounds": t.total_rounds, "completed_rounds": sum(r.status == RoundStatus.COMPLETED.value
                                                                    for r in self.rounds),
            "epsilon_spent": t.epsilon_spent, "dp": redact_dp(t.dp.to_dict() if t.dp is not None else None), "report_goal": t.report_goal,
            "created_time": t.created_time, "started_time": t.started_time, "stop_time": t.stop_time,
            "totals": self.totals(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.summary(),
            "rounds": [r.to_dict() for r in self.rounds],
            "assignments_per_minute": [{"minute": m, "count": c} for m, c in assignments_per_minute(self.assignment_times)],
            "iterations_over_time": [{"time": t, "completed": n} for t, n in iterations_over_time(self.rounds)],
        }


def summarize_round(round_record: RoundRecord, assignments: Iterable[AssignmentRecord],
                    rejections: Sequence[Mapping[str, Any]] = ()) -> RoundOps:
    """Counts of one round's assignments by outcome (pure)."""
    statuses = Counter(a.status for a in assignments)
    return RoundOps(
        round_number=round_record.round_number,
        status=round_record.status.value,
        created_time=round_record.created_time,
        aggregating_time=round_record.aggregating_time,
        completed_time=round_record.completed_time,
        assigned=sum(statuses.values()),
        in_progress=sum(statuses[s] for s in IN_PROGRESS_STATUSES),
        completed=statuses[AssignmentStatus.UPLOAD_COMPLETED],
        failed=sum(statuses[s] for s in FAILED_STATUSES),
        not_eligible=statuses[AssignmentStatus.LOCAL_NOT_ELIGIBLE],
        timed_out=sum(statuses[s] for s in TIMEOUT_STATUSES),
        rejected_uploads=len(rejections),
    )


def assignments_per_minute(times: Iterable[float]) -> list[tuple[float, int]]:
    """``(minute start, assignments created in it)`` for every minute from the first to the last (pure)."""
    minutes = Counter(math.floor(t / 60.0) for t in times if t)
    if not minutes:
        return []
    first, last = min(minutes), max(minutes)
    return [(m * 60.0, minutes.get(m, 0)) for m in range(first, last + 1)]


def iterations_over_time(rounds: Iterable[RoundOps]) -> list[tuple[float, int]]:
    """``(time, completed rounds so far)`` at each round completion, in time order (pure)."""
    done = sorted(r.completed_time for r in rounds if r.status == RoundStatus.COMPLETED.value and r.completed_time)
    return [(t, i + 1) for i, t in enumerate(done)]


def load_task_ops(store: RecordSource, task: TaskRecord) -> TaskOps:
    """Read the rounds, assignments and rejections of ``task``."""
    rounds: list[RoundOps] = []
    times: list[float] = []
    for round_record in store.list_rounds(task.population, task.task_id):
        key = RoundKey(task.population, task.task_id, round_record.round_number)
        assignments = store.list_assignments(key)
        times.extend(a.created_time for a in assignments)
        rounds.append(summarize_round(round_record, assignments, store.list_rejections(key)))
    return TaskOps(task, tuple(rounds), tuple(sorted(times)))


def load_ops(store: RecordSource, population: str | None = None, task_id: int | None = None) -> list[TaskOps]:
    """Operations views of every task (of ``population``, of ``task_id``), sorted by population and id."""
    tasks = store.list_tasks(population)
    if task_id is not None:
        tasks = [t for t in tasks if t.task_id == task_id]
    return [load_task_ops(store, t) for t in tasks]


def format_status_table(ops: Sequence[TaskOps], *, rounds: bool = True) -> str:
    """The ``fedcompute status`` table: one line per task, then (optionally) one per round."""
    header = f"{'TASK':<28} {'KIND':<10} {'STATUS':<10} {'ROUND':>9} {'EPSILON':>9}  REASON"
    lines = [header]
    for t in ops:
        s = t.summary()
        # The aggregator stores -1 for an infinite epsilon (no DP noise).
        eps = "inf" if s["epsilon_spent"] < 0 else f"{s['epsilon_spent']:.4g}"
        lines.append(f"{s['run']:<28} {s['kind']:<10} {s['status']:<10} "
                     f"{str(s['current_round']) + '/' + str(s['total_rounds']):>9} {eps:>9}  {s['status_reason']}")
        if rounds and t.rounds:
            lines.append("    " + f"{'round':>5} {'status':<11} " + " ".join(f"{c:>12}" for c in COUNT_COLUMNS)
                         + f" {'collect_s':>9} {'aggregate_s':>11}")
            for r in t.rounds:
                lines.append("    " + f"{r.round_number:>5} {r.status:<11} "
                             + " ".join(f"{v:>12}" for v in r.counts().values())
                             + f" {_secs(r.collecting_s):>9} {_secs(r.aggregating_s):>11}")
    if not ops:
        lines.append("(no tasks)")
    return "\n".join(lines)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
