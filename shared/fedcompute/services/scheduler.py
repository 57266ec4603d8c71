"""The scheduler tick: timeouts, stuck rounds (light, no TF).

Runs on every ``scheduler-tick`` message (Cloud Scheduler in the cloud, a timer thread of
the local stack). Every action is a conditional write, so overlapping ticks are harmless.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedcompute.config.spec import parse_checkpoint_selector
from fedcompute.errors import InvariantError, PreconditionFailedError
from fedcompute.ports import RoundEvents, TaskStore
from fedcompute.services.ingestion import close_round, publish_pending_round_ready
from fedcompute.tasks.records import (
    AssignmentStatus,
    RoundKey,
    RoundRecord,
    RoundStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ODP signs upload URLs for 15 minutes; devices get as long to train.

    ``aggregation``: a round AGGREGATING longer than this gets round-ready again. 10 minutes
    = the aggregator's ack deadline (a live run is never duplicated before Pub/Sub itself
    would redeliver); the ε accounting is bounded so a run fits in it.
    """

    local_training: float = 15 * 60
    upload: float = 15 * 60
    aggregation: float = 10 * 60
    # How long every accept position may stay handed out but unfilled (an ingestion that
    # crashed holding one) before the round closes without it: the ingestion timeout.
    ingestion: float = 10 * 60

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Timeouts:
        """Overrides from FEDCOMPUTE_{LOCAL_TRAINING,UPLOAD,AGGREGATION,INGESTION}_TIMEOUT_S."""
        import os

        e = os.environ if env is None else env
        default = cls()
        return cls(
            local_training=float(e.get("FEDCOMPUTE_LOCAL_TRAINING_TIMEOUT_S", default.local_training)),
            upload=float(e.get("FEDCOMPUTE_UPLOAD_TIMEOUT_S", default.upload)),
            aggregation=float(e.get("FEDCOMPUTE_AGGREGATION_TIMEOUT_S", default.aggregation)),
            ingestion=float(e.get("FEDCOMPUTE_INGESTION_TIMEOUT_S", default.ingestion)),
        )


@dataclass
class TickReport:
    local_timeouts: int = 0
    upload_timeouts: int = 0
    republished: list[RoundKey] = field(default_factory=list)
    closed: list[RoundKey] = field(default_factory=list)
    evaluations_opened: list[RoundKey] = field(default_factory=list)
    evaluations_completed: list[tuple[str, int]] = field(default_factory=list)


def tick(
    store: TaskStore,
    events: RoundEvents,
    *,
    timeouts: Timeouts = Timeouts(),
    now: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> TickReport:
    """One pass over every open task's current round."""
    report = TickReport()
    t = now()
    rng = rng or random.Random()
    for task in store.list_tasks():
        if task.status == TaskStatus.OPEN and task.kind == TaskKind.EVALUATION:
            schedule_evaluation(store, task, report, rng=rng, now=t)
            task = store.get_task(task.population, task.task_id) or task
        if task.status != TaskStatus.OPEN or task.current_round < 1:
            continue
        key = RoundKey(task.population, task.task_id, task.current_round)
        round_record = store.get_round(key)
        if round_record is None:
            continue
        if round_record.status == RoundStatus.COLLECTING:
            _expire(store, key, AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_TIMEOUT,
                    t - timeouts.local_training, report, "local_timeouts")
            _expire(store, key, AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOAD_TIMEOUT,
                    t - timeouts.upload, report, "upload_timeouts")
            if _close_full_or_stalled(store, events, key, round_record, timeouts, t):
                report.closed.append(key)
        elif round_record.status == RoundStatus.AGGREGATING:
            if publish_pending_round_ready(store, events, key):
                report.republished.append(key)
            elif round_record.aggregating_time and t - round_record.aggregating_time > timeouts.aggregation:
                # The aggregator is idempotent per round: re-sending the event is safe. The
                # clock restarts first, so the next tick does not start yet another run of a
                # round whose re-run is under way (one re-publish per timeout, not per tick).
                try:
                    store.update_round(key, {"aggregating_time": t}, expected=[RoundStatus.AGGREGATING])
                except PreconditionFailedError:
                    continue  # it completed meanwhile
                log.warning("round %s aggregating for %.0f s: re-publishing round-ready", key,
                            t - round_record.aggregating_time)
                events.round_ready(key)
                report.republished.append(key)
    return report


def _close_full_or_stalled(store: TaskStore, events: RoundEvents, key: RoundKey, round_record: RoundRecord,
                           timeouts: Timeouts, t: float) -> bool:
    """Repair a collecting round ingestion left behind (one read of its accept counters).

    Full (every position filled) but still collecting: the closer crashed, close it now.
    Every position handed out but some never filled for ``timeouts.ingestion``: an
    ingestion crashed holding one; close the round, the accepted set voids the empty ones.
    """
    state = store.acceptance_state(key, round_record.report_goal)
    if state.full:
        return close_round(store, events, key, lambda: t)
    if not state.issued_all:
        return False
    if not round_record.stalled_time:
        try:
            store.update_round(key, {"stalled_time": t}, expected=[RoundStatus.COLLECTING])
        except PreconditionFailedError:
            pass
        return False
    if t - round_record.stalled_time < timeouts.ingestion:
        return False
    log.warning("round %s: accept positions unfilled for %.0f s: closing without them", key,
                t - round_record.stalled_time)
    return close_round(store, events, key, lambda: t, reason="closed with accept positions left empty by "
                       "crashed ingestions")


# The tick reads at most EXPIRY_PAGE_SIZE x EXPIRY_PAGES assignments per status and round;
# a backlog beyond that is expired by the next ticks.
EXPIRY_PAGE_SIZE = 500
EXPIRY_PAGES = 10


def _expire(store: TaskStore, key: RoundKey, current: AssignmentStatus, timed_out: AssignmentStatus,
            cutoff: float, report: TickReport, counter: str) -> None:
    """Time out the round's assignments in ``current`` not updated since ``cutoff``.

    A bounded query of the expired ones only (Firestore: (status, updated_bucket) index, page
    by page), never a listing of the round's live assignments: an expired assignment leaves
    ``current`` as it is handled, so the next page starts where this one ended.
    """
    for _ in range(EXPIRY_PAGES):
        expired = store.expired_assignments(key, current, cutoff, EXPIRY_PAGE_SIZE)
        for assignment in expired:
            try:
                store.transition_assignment(key, assignment.assignment_id, expected=[current], new_status=timed_out,
                                            reason=f"no progress since {assignment.updated_time:.0f}")
            except PreconditionFailedError:
                continue  # the device moved on meanwhile
            store.release_slot(key, assignment.slot, assignment.assignment_id)
            setattr(report, counter, getattr(report, counter) + 1)
        if len(expired) < EXPIRY_PAGE_SIZE:
            return


def pick_checkpoint(selector: str, completed: list[RoundRecord], last_evaluated: int, last_opened_time: float,
                    now: float, rng: random.Random) -> int | None:
    """The training round an evaluation round should evaluate now, or None (pure).

    ``every_<k>_round``: once a round at least k past the last evaluated one has completed,
    pick one checkpoint at random among the past k completed rounds (the seed's wording).
    ``every_<k>_hour``: at most once every k hours, pick one at random among the checkpoints
    completed in the past k hours. Rounds already evaluated or older are never picked again.
    """
    parsed = parse_checkpoint_selector(selector)
    if parsed is None:
        raise InvariantError(f"checkpoint_selector {selector!r} is not every_<k>_round or every_<k>_hour")
    k, unit = parsed.k, parsed.kind
    newer = sorted((it for it in completed if it.round_number > last_evaluated), key=lambda it: it.round_number)
    if not newer:
        return None
    if unit == "round":
        latest = newer[-1].round_number
        if latest < last_evaluated + k:
            return None
        window = [it.round_number for it in newer if it.round_number > latest - k]
    else:
        if last_opened_time and now - last_opened_time < k * 3600:
            return None
        window = [it.round_number for it in newer if it.completed_time >= now - k * 3600]
        if not window:
            return None
    return rng.choice(window)


def schedule_evaluation(store: TaskStore, task: TaskRecord, report: TickReport, *, rng: random.Random,
                        now: float) -> None:
    """Open the evaluation task's next round when its selector allows, or complete it."""
    source = store.get_task(task.source_population, task.source_task_id)
    if source is None:
        return
    current = store.get_round(RoundKey(task.population, task.task_id, task.current_round)) if task.current_round else None
    if current is not None and current.status in (RoundStatus.COLLECTING, RoundStatus.AGGREGATING):
        return
    completed = [it for it in store.list_rounds(source.population, source.task_id)
                 if it.status == RoundStatus.COMPLETED]
    last_evaluated = current.evaluated_round if current is not None else 0
    pick = pick_checkpoint(task.checkpoint_selector or "every_1_round", completed, last_evaluated,
                           current.created_time if current is not None else 0.0, now, rng)
    if pick is None:
        if not source.status.is_active and all(it.round_number <= last_evaluated for it in completed):
            try:
                store.update_task(task.population, task.task_id, {
                    "status": TaskStatus.COMPLETED, "stop_time": now,
                    "status_reason": f"source training task {source.task_id} is {source.status.value}; "
                                     f"last evaluated round {last_evaluated}"}, expected=[TaskStatus.OPEN])
                report.evaluations_completed.append((task.population, task.task_id))
            except PreconditionFailedError:
                pass
        return
    number = task.current_round + 1
    if not store.start_round(RoundRecord.opening(task, number, now, evaluated_round=pick)):
        return  # another tick opened it, or the task stopped
    report.evaluations_opened.append(RoundKey(task.population, task.task_id, number))
    log.info("evaluation round %s/%s/%d opened on training round %d", task.population, task.task_id, number, pick)
