"""Task management: create, open, get, list, cancel and delete tasks (light, no TF).

A task is created CREATED (its id allocated max+1 per population), its artifacts are then
uploaded by the task builder to the id's paths, and :func:`open_task` reads the server
phase, creates round 1 and marks it OPEN. A build that fails before opening deletes the
CREATED task, so a failed build leaves nothing behind.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from fedcompute import layout, limits
from fedcompute.config.spec import CheckpointSelector, parse_checkpoint_selector
from fedcompute.dp import TaskDp
from fedcompute.errors import ConflictError, InvalidRequestError, NotFoundError, PreconditionFailedError
from fedcompute.plans import ServerPhase
from fedcompute.ports import BlobStore, TaskStore
from fedcompute.proto import eligibility_pb2, task_management_pb2
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    RoundRecord,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

# ODP's TaskInfo.traffic_weight is an integer; fedcompute uses per-mille of check-ins.
TRAFFIC_SCALE = 1000
DEFAULT_MIN_VERSION, DEFAULT_MAX_VERSION = "0", "999999999"

_STATUS_TO_PROTO = {
    TaskStatus.OPEN: task_management_pb2.TaskStatus.OPEN,
    TaskStatus.COMPLETED: task_management_pb2.TaskStatus.COMPLETED,
    TaskStatus.CREATED: task_management_pb2.TaskStatus.CREATED,
    TaskStatus.CANCELED: task_management_pb2.TaskStatus.CANCELED,
    TaskStatus.FAILED: task_management_pb2.TaskStatus.FAILED,
}


@dataclass(frozen=True)
class NewTask:
    """A create-task request, parsed and checked."""

    population: str
    kind: TaskKind
    total_rounds: int
    report_goal: int
    max_aggregation_size: int
    min_client_version: str = DEFAULT_MIN_VERSION
    max_client_version: str = DEFAULT_MAX_VERSION
    traffic_weight: int = TRAFFIC_SCALE
    min_separation: int = 0
    source_population: str = ""
    source_task_id: int = 0
    checkpoint_selector: str = ""
    correlation_id: str = ""


def new_task_from_proto(population: str, task: task_management_pb2.Task) -> NewTask:
    """Check a CreateTaskRequest's Task; errors name the field and the fix."""
    if task.population_name and task.population_name != population:
        raise InvalidRequestError(
            f"task.population_name {task.population_name!r} differs from the URL's population {population!r}",
            hint="leave task.population_name empty or make them equal",
        )
    if task.min_aggregation_size <= 0:
        raise InvalidRequestError("task.min_aggregation_size (the report goal) must be > 0")
    if task.min_aggregation_size > limits.MAX_REPORT_GOAL:
        raise InvalidRequestError(f"task.min_aggregation_size {task.min_aggregation_size} is over the limit "
                                  f"{limits.MAX_REPORT_GOAL}", hint="use a smaller report goal")
    max_size = task.max_aggregation_size or task.min_aggregation_size
    if max_size < task.min_aggregation_size:
        raise InvalidRequestError("task.max_aggregation_size must be >= min_aggregation_size")
    if max_size > limits.MAX_AGGREGATION_SIZE:
        raise InvalidRequestError(f"task.max_aggregation_size {max_size} is over the limit "
                                  f"{limits.MAX_AGGREGATION_SIZE}", hint="use an over-selection rate of at most 1")
    if task.total_iteration <= 0:
        raise InvalidRequestError("task.total_iteration must be > 0")
    if task.total_iteration > limits.MAX_TRAINING_ROUNDS:
        raise InvalidRequestError(f"task.total_iteration {task.total_iteration} is over the limit "
                                  f"{limits.MAX_TRAINING_ROUNDS}", hint="train for fewer rounds")
    min_v = task.min_client_version or DEFAULT_MIN_VERSION
    max_v = task.max_client_version or DEFAULT_MAX_VERSION
    for name, value in (("min_client_version", min_v), ("max_client_version", max_v)):
        if not layout.is_ascii_decimal(value):
            raise InvalidRequestError(f"task.{name} {value[:40]!r} is not a decimal version code (ASCII digits, "
                                      f"at most {layout.MAX_ID_DIGITS})")
    if int(min_v) > int(max_v):
        raise InvalidRequestError("task.min_client_version is above max_client_version")
    info = task.info
    kind = TaskKind.EVALUATION if info.WhichOneof("info") == "evaluation_info" else TaskKind.TRAINING
    min_separation = 0
    selector = ""
    source_population, source_task = "", 0
    if kind == TaskKind.TRAINING:
        for policy in info.training_info.eligibility_task_info.eligibility_policies:
            if policy.WhichOneof("policy_type") == "min_sep_policy":
                min_separation = int(policy.min_sep_policy.minimum_separation)
    else:
        ev = info.evaluation_info
        which = ev.check_point_selector.WhichOneof("selector_type")
        if which == "iteration_selector" and ev.check_point_selector.iteration_selector.size > 0:
            selector = f"every_{ev.check_point_selector.iteration_selector.size}_round"
        elif which == "duration_selector" and ev.check_point_selector.duration_selector.hours > 0:
            selector = f"every_{ev.check_point_selector.duration_selector.hours}_hour"
        else:
            raise InvalidRequestError("task.info.evaluation_info.check_point_selector needs a size or hours > 0")
        if ev.training_task_id <= 0:
            raise InvalidRequestError("task.info.evaluation_info.training_task_id must name the training task")
        source_population = ev.training_population_name or population
        source_task = int(ev.training_task_id)
    weight = int(info.traffic_weight) if info.traffic_weight else TRAFFIC_SCALE
    if not 0 <= weight <= TRAFFIC_SCALE:
        raise InvalidRequestError(f"task.info.traffic_weight must be in [0, {TRAFFIC_SCALE}] (per-mille of check-ins)")
    return NewTask(
        population=population, kind=kind, total_rounds=int(task.total_iteration),
        report_goal=int(task.min_aggregation_size), max_aggregation_size=int(max_size),
        min_client_version=min_v, max_client_version=max_v, traffic_weight=weight,
        min_separation=min_separation, source_population=source_population, source_task_id=source_task,
        checkpoint_selector=selector, correlation_id=task.correlation_id,
    )


def create_task(store: TaskStore, request: NewTask, *, now: Callable[[], float] = time.time) -> TaskRecord:
    """Allocate an id and store the task as CREATED (a second active training task -> 409)."""
    if request.kind == TaskKind.EVALUATION:
        source = store.get_task(request.source_population, request.source_task_id)
        if source is None or source.kind != TaskKind.TRAINING:
            raise NotFoundError(
                f"evaluation source training task {request.source_population}/{request.source_task_id} does not exist",
                hint="set evaluation.source_training_task_id to an existing training task",
            )
    over_selection = request.max_aggregation_size / request.report_goal - 1.0

    def build(task_id: int) -> TaskRecord:
        return TaskRecord(
            population=request.population, task_id=task_id, kind=request.kind, status=TaskStatus.CREATED,
            report_goal=request.report_goal, over_selection_rate=over_selection, total_rounds=request.total_rounds,
            min_client_version=request.min_client_version, max_client_version=request.max_client_version,
            traffic_weight=request.traffic_weight / TRAFFIC_SCALE, min_separation=request.min_separation,
            created_time=now(), source_population=request.source_population, source_task_id=request.source_task_id,
            checkpoint_selector=request.checkpoint_selector, correlation_id=request.correlation_id,
            noise_secret=secrets.token_hex(32),
        )

    return store.create_task(request.population, build, exclusive_training=True)


def open_task(
    store: TaskStore, blobs: BlobStore, settings: Settings, population: str, task_id: int,
    *, now: Callable[[], float] = time.time,
) -> TaskRecord:
    """Read the uploaded server phase, create the first round and mark the task OPEN (idempotent)."""
    task = get_task(store, population, task_id)
    if task.status == TaskStatus.OPEN:
        return task
    if task.status != TaskStatus.CREATED:
        raise ConflictError(f"task {population}/{task_id} is {task.status.value}; only CREATED tasks can be opened")
    phase_path = layout.server_phase_path(population, task_id)
    try:
        phase = ServerPhase.from_json(blobs.read(settings.model_bucket, phase_path))
    except NotFoundError as error:
        raise PreconditionFailedError(
            f"task {population}/{task_id} cannot open: gs://{settings.model_bucket}/{phase_path} does not exist",
            hint="upload the task's artifacts first (the task builder does), then open it",
        ) from error
    changes = {
        "status": TaskStatus.OPEN,
        "started_time": now(),
        "client_plan_uri": f"gs://{settings.model_bucket}/{layout.client_plan_path(population, task_id)}",
        "server_phase_uri": f"gs://{settings.model_bucket}/{layout.server_phase_path(population, task_id)}",
        "init_checkpoint_uri": f"gs://{settings.model_bucket}/{layout.checkpoint_path(population, task_id, 0)}",
        # Evaluation devices upload metric statistics only, no model delta.
        "update_spec": [] if task.kind == TaskKind.EVALUATION else
        [w.to_dict() for w in phase.update_spec],
        "metrics": list(phase.metrics),
        "max_device_examples": int(phase.extra.get("max_device_examples", 0) or 0),
        # Never the noise seed: the task record's fields reach the dashboard.
        "dp": TaskDp(phase.dp, phase.target_epsilon, phase.delta, phase.population_size).to_dict(),
    }
    if task.kind == TaskKind.TRAINING:
        changes["current_round"] = 1
        store.create_round(RoundRecord.opening(task, 1, now()))
    return store.update_task(population, task_id, changes, expected=[TaskStatus.CREATED])


def get_task(store: TaskStore, population: str, task_id: int) -> TaskRecord:
    task = store.get_task(population, task_id)
    if task is None:
        raise NotFoundError(f"task {task_id} does not exist in population {population!r}",
                            hint="list tasks with fedcompute status")
    return task


def cancel_task(store: TaskStore, population: str, task_id: int, reason: str, *,
                now: Callable[[], float] = time.time) -> TaskRecord:
    """Stop an active task; devices are no longer assigned to it."""
    get_task(store, population, task_id)
    return store.update_task(population, task_id, {"status": TaskStatus.CANCELED, "status_reason": reason,
                                                   "stop_time": now()},
                             expected=[TaskStatus.CREATED, TaskStatus.OPEN])


def delete_unopened_task(store: TaskStore, blobs: BlobStore, settings: Settings, population: str,
                         task_id: int) -> None:
    """Roll back a build: remove a CREATED task and any artifact uploaded under its prefix."""
    task = store.get_task(population, task_id)
    if task is None:
        return
    if task.status != TaskStatus.CREATED:
        raise ConflictError(f"task {population}/{task_id} is {task.status.value}; only CREATED tasks can be deleted")
    for name in blobs.list(settings.model_bucket, layout.task_prefix(population, task_id)):
        blobs.delete(settings.model_bucket, name)
    store.delete_task(population, task_id)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def task_to_proto(task: TaskRecord) -> task_management_pb2.Task:
    """The ODP wire view of a task record (plus fedcompute's status fields)."""
    proto = task_management_pb2.Task(
        population_name=task.population, task_id=task.task_id, total_iteration=task.total_rounds,
        min_aggregation_size=task.report_goal, max_aggregation_size=task.max_assignments,
        status=_STATUS_TO_PROTO[task.status], min_client_version=task.min_client_version,
        max_client_version=task.max_client_version, correlation_id=task.correlation_id,
        status_reason=task.status_reason, current_round=task.current_round, epsilon_spent=task.epsilon_spent,
        population_size=task.dp.population_size if task.dp is not None else 0,
    )
    for field_name, seconds in (("created_time", task.created_time), ("started_time", task.started_time),
                                ("stop_time", task.stop_time)):
        if seconds:
            getattr(proto, field_name).CopyFrom(_timestamp(seconds))
    if task.client_plan_uri:
        proto.client_only_plan_url.append(task.client_plan_uri)
    if task.server_phase_uri:
        proto.server_phase_url.append(task.server_phase_uri)
    if task.init_checkpoint_uri:
        proto.init_checkpoint_url.append(task.init_checkpoint_uri)
    proto.info.traffic_weight = int(round(task.traffic_weight * TRAFFIC_SCALE))
    if task.kind == TaskKind.EVALUATION:
        ev = proto.info.evaluation_info
        ev.training_population_name = task.source_population
        ev.training_task_id = task.source_task_id
        selector = parse_checkpoint_selector(task.checkpoint_selector) or CheckpointSelector("round", 1)
        if selector.kind == "hour":
            ev.check_point_selector.duration_selector.hours = selector.k
        else:
            ev.check_point_selector.iteration_selector.size = selector.k
    else:
        info = proto.info.training_info.eligibility_task_info
        spec = info.eligibility_policies.add(name="min_separation", min_version=0)
        spec.min_sep_policy.CopyFrom(eligibility_pb2.MinimumSeparationPolicy(
            current_index=task.current_round, minimum_separation=task.min_separation))
    return proto
