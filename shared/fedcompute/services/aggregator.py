"""The aggregator: one round's DP FedAvg, checkpoint and metrics, then the next round.

Triggered by ``round-ready``. Idempotent: a redelivered message for a COMPLETED round does
nothing, and a run killed midway re-runs to the same checkpoint (the accepted set is frozen
once the round is AGGREGATING, updates stream in assignment-id order, the noise seed is
derived from the task's server-side secret and the round, and outputs are create-only).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcompute import layout
from fedcompute.adapters.blobs import BlobStore
from fedcompute.adapters.events import RoundEvents
from fedcompute.errors import InvalidRequestError, PreconditionFailedError
from fedcompute.metric_names import NON_FINITE_METRIC, TRAIN_PREFIX
from fedcompute.plans import ServerPhase, dp_params_from_phase
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    IterationRecord,
    IterationStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
    max_live_assignments,
)
from fedcompute.tasks.store import RoundKey, TaskStore

log = logging.getLogger(__name__)

PRIVACY_EPSILON = "server/privacy/epsilon"
PRIVACY_DELTA = "server/privacy/delta"
NUM_REPORTS = "server/aggregator/num_reports"


@dataclass(frozen=True)
class AggregationOutcome:
    status: str  # AGGREGATED | ALREADY_DONE | NOT_READY | UNKNOWN_ROUND
    metrics: dict[str, float] | None = None
    task_status: str = ""


def metric_statistics_spec(metrics: tuple[str, ...]) -> list[tuple[str, tuple[int, ...], str]]:
    """The flat ``metric/stat`` tensors a device upload carries for ``metrics`` (+ loss, count)."""
    from fedcompute.learning import metric_stats

    names = list(dict.fromkeys((*metrics, "loss", "num_examples")))
    flat = metric_stats.flatten_stats({m: metric_stats.zero_stats(m) for m in names})
    return [(name, tuple(array.shape), "float64") for name, array in sorted(flat.items())]


def update_spec(task: TaskRecord) -> list[tuple[str, tuple[int, ...], str]]:
    return [(s.name, s.shape, s.dtype) for s in task.update_spec]


def make_upload_validator(max_bytes: int | None = None) -> Callable[[bytes, TaskRecord], None]:
    """Ingestion's check: the upload decodes as an update of the task's shapes and metrics."""
    from fedcompute.learning.tensor_codec import decode_client_update

    def validate(data: bytes, task: TaskRecord) -> None:
        decode_client_update(data, expected_spec=update_spec(task), max_bytes=max_bytes,
                             expected_metric_spec=metric_statistics_spec(task.metrics))

    return validate


def _noise_seed(task: TaskRecord, phase: ServerPhase, round_number: int) -> int:
    from fedcompute.learning.aggregation import derive_noise_seed

    if phase.dp.noise_seed is not None:  # noqa: SIM108 -- fixed by the config (tests, reproducible runs)
        secret = str(int(phase.dp.noise_seed)).encode()
    else:
        secret = bytes.fromhex(task.noise_secret) if task.noise_secret else b""
    return derive_noise_seed(secret, round_number, label=f"{task.population}/{task.task_id}")


def epsilon_after(phase: ServerPhase, rounds: int) -> float:
    """ε spent after ``rounds`` releases (same accounting as the task builder's DP check)."""
    if phase.dp.type in ("", "NONE") or rounds <= 0:
        return 0.0 if rounds <= 0 else math.inf
    from fedcompute.privacy.accounting import compute_epsilon

    return compute_epsilon(phase.dp.type, noise_multiplier=phase.dp.noise_multiplier, report_goal=phase.report_goal,
                           population_size=phase.population_size, rounds=rounds, delta=phase.delta)


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
    from fedcompute.learning import aggregation, checkpoint, metric_stats, server_optimizer
    from fedcompute.learning.tensor_codec import decode_bundle, decode_client_update, encode_bundle

    iteration = store.get_iteration(key.population, key.task_id, key.round_number)
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

    optimizer = server_optimizer.build_server_optimizer(phase.server_optimizer, phase.server_learning_rate)
    dp = aggregation.build_dp_aggregator(dp_params_from_phase(phase.dp))
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

    def finalize_metrics(sums: Mapping[str, np.ndarray]) -> Mapping[str, float]:
        grouped = metric_stats.unflatten_stats(sums) if sums else {}
        return {m: metric_stats.finalize(m, grouped[m]) for m in task.metrics if m in grouped}

    config = aggregation.RoundConfig(report_goal=task.report_goal, optimizer=optimizer, dp=dp,
                                     noise_seed=_noise_seed(task, phase, key.round_number),
                                     metrics_finalizer=finalize_metrics)
    new_state, result, raw_metrics = aggregation.server_round(previous, updates(), config)

    metrics: dict[str, float] = {TRAIN_PREFIX + m: raw_metrics[TRAIN_PREFIX + m] for m in task.metrics
                                 if TRAIN_PREFIX + m in raw_metrics}
    metrics[NON_FINITE_METRIC] = float(result.non_finite)
    metrics[NUM_REPORTS] = float(result.accepted)
    for name, value in raw_metrics.items():
        if name.startswith("server/aggregator/") or name.startswith("server/finalizer/"):
            metrics.setdefault(name, float(value))
    epsilon = epsilon_after(phase, key.round_number)
    if phase.dp.type not in ("", "NONE"):
        metrics[PRIVACY_EPSILON] = epsilon
        metrics[PRIVACY_DELTA] = phase.delta

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

    task_changes, next_iteration = _next_step(task, phase, key, epsilon, now())
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


EVAL_PREFIX = "server/client_work/eval/"
EVALUATED_ROUND = "server/evaluation/training_round"


def _aggregate_evaluation(store: TaskStore, blobs: BlobStore, events: RoundEvents, settings: Settings, key: RoundKey,
                          task: TaskRecord, iteration: IterationRecord,
                          now: Callable[[], float]) -> AggregationOutcome:
    """An evaluation round: sum the devices' metric statistics, finalize, write the metrics.

    No noise is added to evaluation metrics (like ODP and TFF's federated evaluation); the
    metrics JSON sits at the evaluation task's layout and names the training round evaluated.
    """
    from fedcompute.learning import metric_stats
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
    grouped = metric_stats.unflatten_stats(totals) if totals else {}
    metrics = {EVAL_PREFIX + m: float(metric_stats.finalize(m, grouped[m])) for m in task.metrics if m in grouped}
    metrics[EVALUATED_ROUND] = float(iteration.evaluated_round)
    metrics[NUM_REPORTS] = float(reports)
    metrics["server/aggregator/metrics_non_finite"] = float(excluded)
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


def _next_step(task: TaskRecord, phase: ServerPhase, key: RoundKey, epsilon: float,
               t: float) -> tuple[dict[str, Any], IterationRecord | None]:
    """Task changes after round ``key``: open the next round, or complete the task."""
    changes: dict[str, Any] = {"epsilon_spent": epsilon if math.isfinite(epsilon) else -1.0}
    done_reason = ""
    if key.round_number >= task.total_rounds:
        done_reason = f"completed num_max_training_rounds ({task.total_rounds})"
    elif phase.dp.type not in ("", "NONE") and phase.extra.get("enforce_privacy_budget", True):
        next_epsilon = epsilon_after(phase, key.round_number + 1)
        if next_epsilon > phase.target_epsilon:
            done_reason = (f"privacy budget reached: round {key.round_number + 1} would spend "
                           f"epsilon={next_epsilon:.4g} > dp_target_epsilon={phase.target_epsilon:g} "
                           f"(spent {epsilon:.4g} after {key.round_number} rounds)")
    if done_reason:
        changes.update({"status": TaskStatus.COMPLETED, "status_reason": done_reason, "stop_time": t})
        return changes, None
    changes["current_round"] = key.round_number + 1
    return changes, IterationRecord(
        population=key.population, task_id=key.task_id, round_number=key.round_number + 1,
        status=IterationStatus.COLLECTING, report_goal=task.report_goal,
        max_assignments=max_live_assignments(task.report_goal, task.over_selection_rate), created_time=t,
    )
