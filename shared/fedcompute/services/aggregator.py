"""The aggregator service: I/O around one server round (the round itself is learning/server_round).

Triggered by ``round-ready``: read the task, server phase, checkpoint and the round's frozen
accepted uploads; call :func:`fedcompute.learning.server_round.server_round`; write the
checkpoint, client checkpoint and metrics; finish the round (open the next one or complete
the task, as :func:`~fedcompute.learning.server_round.next_step` decides); publish
``round-completed``. No learning logic lives here. Idempotent: a redelivered message for a COMPLETED round does
nothing, and a run killed midway re-runs to the same checkpoint (the accepted set is frozen
once the round is AGGREGATING, updates stream in assignment-id order, the noise seed is
derived from the task's server-side secret and the round, and outputs are create-only).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcompute import layout
from fedcompute.errors import InvalidRequestError, PreconditionFailedError
from fedcompute.learning.upload_contract import metric_statistics_spec, update_spec
from fedcompute.plans import ServerPhase
from fedcompute.ports import BlobStore, RoundEvents, TaskStore
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    IterationRecord,
    IterationStatus,
    RoundKey,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

if TYPE_CHECKING:
    from fedcompute.learning.server_round import NextStep

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class AggregationOutcome:
    status: str  # AGGREGATED | ALREADY_DONE | NOT_READY | UNKNOWN_ROUND
    metrics: dict[str, float] | None = None
    task_status: str = ""


def aggregate_round(
    store: TaskStore,
    blobs: BlobStore,
    events: RoundEvents,
    settings: Settings,
    key: RoundKey,
    *,
    now: Callable[[], float] = time.time,
) -> AggregationOutcome:
    """Aggregate round ``key`` if it is AGGREGATING; see the module docstring."""
    from fedcompute.learning import checkpoint, server_round
    from fedcompute.learning.tensor_codec import decode_bundle, decode_client_update, encode_bundle

    iteration = store.get_iteration(key)
    if iteration is None:
        log.warning("round-ready for unknown round %s: dropped", key)
        return AggregationOutcome("UNKNOWN_ROUND")
    if iteration.status in (IterationStatus.COMPLETED, IterationStatus.FAILED, IterationStatus.CANCELED):
        log.info("round %s already %s: redelivery ignored", key, iteration.status.value)
        return AggregationOutcome("ALREADY_DONE")
    if iteration.status != IterationStatus.AGGREGATING:
        log.warning("round %s is %s, not AGGREGATING: ignored", key, iteration.status.value)
        return AggregationOutcome("NOT_READY")
    task = store.get_task(key.population, key.task_id)
    assert task is not None
    if task.status != TaskStatus.OPEN:  # canceled (or failed) while the round was collecting
        try:
            store.update_iteration(key, {"status": IterationStatus.CANCELED, "completed_time": now(),
                                         "status_reason": f"task {task.status.value}"},
                                   expected=[IterationStatus.AGGREGATING])
        except PreconditionFailedError:
            pass
        log.info("round %s not aggregated: task is %s", key, task.status.value)
        return AggregationOutcome("TASK_NOT_OPEN", task_status=task.status.value)
    if task.kind == TaskKind.EVALUATION:
        return _aggregate_evaluation(store, blobs, events, settings, key, task, iteration, now)
    phase = ServerPhase.from_json(blobs.read(settings.model_bucket, layout.server_phase_path(key.population, key.task_id)))
    previous = checkpoint.decode_checkpoint(
        blobs.read(settings.model_bucket, layout.checkpoint_path(key.population, key.task_id, key.round_number - 1)))
    optimizer, dp = server_round.build_round_machinery(phase)
    accepted = sorted(store.accepted_ids(key))  # the round's frozen accepted set, in a stable order
    spec = update_spec(task)
    metric_spec = metric_statistics_spec(task.metrics)

    def updates() -> Iterator[Any]:
        for assignment_id in accepted:
            name = layout.gradient_path(key.population, key.task_id, key.round_number, assignment_id)
            data = blobs.read(settings.gradient_bucket, name)
            try:
                yield decode_client_update(data, expected_spec=spec, expected_metric_spec=metric_spec)
            except InvalidRequestError as error:  # ingestion checked it; never trust twice-read bytes blindly
                log.error("skipping %s: %s", name, error)

    config = server_round.RoundConfig(
        report_goal=task.report_goal, optimizer=optimizer, dp=dp,
        noise_seed=server_round.round_noise_seed(phase, task.noise_secret, key.population, key.task_id,
                                                 key.round_number),
        metrics_finalizer=server_round.task_metrics_finalizer(task.metrics))
    new_state, result, raw_metrics = server_round.server_round(previous, updates(), config)
    metrics = server_round.round_metrics(phase, key.round_number, task.metrics, result, raw_metrics)

    # Create-only writes: a re-run after a crash finds identical bytes already there.
    ckpt_bytes = checkpoint.encode_checkpoint(new_state, optimizer=optimizer,
                                              metadata={"population": key.population, "task_id": str(key.task_id)})
    blobs.write(settings.model_bucket, layout.checkpoint_path(key.population, key.task_id, key.round_number),
                ckpt_bytes, create_only=True)
    initial_client, _ = decode_bundle(blobs.read(settings.model_bucket,
                                                 layout.client_checkpoint_path(key.population, key.task_id, 0)))
    trained = dict(new_state.named_weights())
    client_weights = [(name, trained.get(name, array)) for name, array in initial_client]
    blobs.write(settings.model_bucket, layout.client_checkpoint_path(key.population, key.task_id, key.round_number),
                encode_bundle(client_weights), create_only=True)
    blobs.write(settings.model_bucket, layout.metrics_path(key.population, key.task_id, key.round_number),
                json.dumps(metrics, sort_keys=False).encode(), create_only=True, content_type="application/json")

    task_changes, next_iteration = _task_changes(task, key, server_round.next_step(phase, key.round_number,
                                                                                   task.total_rounds), now())
    finished = store.finish_round(
        key, {"status": IterationStatus.COMPLETED, "completed_time": now()}, task_changes, next_iteration)
    if not finished:
        # A concurrent run (a duplicated round-ready) completed the round first; outputs are
        # create-only and identical, so this run only reports that the work was done.
        log.info("round %s was completed by a concurrent run", key)
        return AggregationOutcome("ALREADY_DONE", metrics)
    events.round_completed(key, task_status=task_changes.get("status", TaskStatus.OPEN).value)
    log.info("round %s aggregated: %d reports, metrics %s", key, result.accepted, metrics)
    return AggregationOutcome("AGGREGATED", metrics, task_changes.get("status", TaskStatus.OPEN).value)


def _aggregate_evaluation(store: TaskStore, blobs: BlobStore, events: RoundEvents, settings: Settings, key: RoundKey,
                          task: TaskRecord, iteration: IterationRecord,
                          now: Callable[[], float]) -> AggregationOutcome:
    """An evaluation round: sum the devices' metric statistics, finalize, write the metrics.

    No noise is added to evaluation metrics (like ODP and TFF's federated evaluation); the
    metrics JSON sits at the evaluation task's layout and names the training round evaluated.
    """
    from fedcompute.learning.server_round import evaluation_metrics
    from fedcompute.learning.tensor_codec import decode_client_update

    metric_spec = metric_statistics_spec(task.metrics)
    totals: dict[str, np.ndarray] = {}
    reports = excluded = 0
    for assignment_id in sorted(store.accepted_ids(key)):  # the frozen accepted set
        name = layout.gradient_path(key.population, key.task_id, key.round_number, assignment_id)
        try:
            update = decode_client_update(blobs.read(settings.gradient_bucket, name), expected_spec=[],
                                          expected_metric_spec=metric_spec)
        except InvalidRequestError as error:
            log.error("skipping %s: %s", name, error)
            continue
        if not update.metrics_finite():
            excluded += 1
            continue
        reports += 1
        for stat, value in update.metric_statistics.items():
            totals[stat] = totals.get(stat, 0.0) + np.asarray(value, np.float64)
    metrics = evaluation_metrics(task.metrics, totals, evaluated_round=iteration.evaluated_round, reports=reports,
                                 excluded=excluded)
    blobs.write(settings.model_bucket, layout.metrics_path(key.population, key.task_id, key.round_number),
                json.dumps(metrics).encode(), create_only=True, content_type="application/json")
    if store.finish_round(key, {"status": IterationStatus.COMPLETED, "completed_time": now()}, {}, None):
        events.round_completed(key, task_status=task.status.value)
    delete_round_updates(blobs, settings, key)
    return AggregationOutcome("AGGREGATED", metrics, task.status.value)


def delete_round_updates(blobs: BlobStore, settings: Settings, key: RoundKey) -> int:
    """Delete the round's device updates from the gradient bucket; returns how many."""
    prefix = f"{key.population}/{key.task_id}/{key.round_number}/d/"
    names = blobs.list(settings.gradient_bucket, prefix)
    for name in names:
        blobs.delete(settings.gradient_bucket, name)
    return len(names)


def _task_changes(task: TaskRecord, key: RoundKey, step: NextStep, t: float) -> tuple[dict[str, Any], IterationRecord | None]:
    """The store changes for ``step``: the task's ε, and the next round opened or the task completed."""
    changes: dict[str, Any] = {"epsilon_spent": step.epsilon_spent}
    if step.next_round is None:
        changes.update({"status": TaskStatus.COMPLETED, "status_reason": step.done_reason, "stop_time": t})
        return changes, None
    changes["current_round"] = step.next_round
    return changes, IterationRecord.opening(task, step.next_round, t)
