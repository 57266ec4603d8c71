"""The scheduler tick: timeouts, stuck rounds (light, no TF).

Runs on every ``scheduler-tick`` message (Cloud Scheduler in the cloud, a timer thread of
the local stack). Every action is a conditional write, so overlapping ticks are harmless.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedcompute.adapters.events import RoundEvents
from fedcompute.errors import PreconditionFailedError
from fedcompute.services.ingestion import publish_pending_round_ready
from fedcompute.tasks.records import AssignmentStatus, IterationStatus, TaskStatus
from fedcompute.tasks.store import RoundKey, TaskStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ODP signs upload URLs for 15 minutes; devices get as long to train."""

    local_training: float = 15 * 60
    upload: float = 15 * 60
    aggregation: float = 30 * 60

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Timeouts":
        """Overrides from FEDCOMPUTE_{LOCAL_TRAINING,UPLOAD,AGGREGATION}_TIMEOUT_S."""
        import os

        e = os.environ if env is None else env
        default = cls()
        return cls(
            local_training=float(e.get("FEDCOMPUTE_LOCAL_TRAINING_TIMEOUT_S", default.local_training)),
            upload=float(e.get("FEDCOMPUTE_UPLOAD_TIMEOUT_S", default.upload)),
            aggregation=float(e.get("FEDCOMPUTE_AGGREGATION_TIMEOUT_S", default.aggregation)),
        )


@dataclass
class TickReport:
    local_timeouts: int = 0
    upload_timeouts: int = 0
    republished: list[RoundKey] = field(default_factory=list)


def tick(
    store: TaskStore,
    events: RoundEvents,
    *,
    timeouts: Timeouts = Timeouts(),
    now: Callable[[], float] = time.time,
) -> TickReport:
    """One pass over every open task's current round."""
    report = TickReport()
    t = now()
    for task in store.list_tasks():
        if task.status != TaskStatus.OPEN or task.current_round < 1:
            continue
        key = RoundKey(task.population, task.task_id, task.current_round)
        iteration = store.get_iteration(key.population, key.task_id, key.round_number)
        if iteration is None:
            continue
        if iteration.status == IterationStatus.COLLECTING:
            _expire(store, key, AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_TIMEOUT,
                    t - timeouts.local_training, report, "local_timeouts")
            _expire(store, key, AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOAD_TIMEOUT,
                    t - timeouts.upload, report, "upload_timeouts")
        elif iteration.status == IterationStatus.AGGREGATING:
            if publish_pending_round_ready(store, events, key):
                report.republished.append(key)
            elif iteration.aggregating_time and t - iteration.aggregating_time > timeouts.aggregation:
                # The aggregator is idempotent per round: re-sending the event is safe.
                log.warning("round %s aggregating for %.0f s: re-publishing round-ready", key,
                            t - iteration.aggregating_time)
                events.round_ready(key)
                report.republished.append(key)
    return report


def _expire(store: TaskStore, key: RoundKey, current: AssignmentStatus, timed_out: AssignmentStatus,
            cutoff: float, report: TickReport, counter: str) -> None:
    for assignment in store.list_assignments(key, current):
        if assignment.updated_time > cutoff:
            continue
        try:
            store.transition_assignment(key, assignment.assignment_id, expected=[current], new_status=timed_out,
                                        reason=f"no progress since {assignment.updated_time:.0f}")
        except PreconditionFailedError:
            continue  # the device moved on meanwhile
        store.release_slot(key, assignment.slot, assignment.assignment_id)
        setattr(report, counter, getattr(report, counter) + 1)
