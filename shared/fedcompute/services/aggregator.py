"""The aggregator service: I/O around one server round (the round itself is learning/server_round).

Triggered by ``round-ready``: read the task, server phase, checkpoint and the round's frozen
accepted uploads; call :func:`fedcompute.learning.server_round.server_round`; write the
checkpoint, client checkpoint and metrics; finish the round (open the next one or complete
the task, as :func:`~fedcompute.learning.server_round.next_step` decides); publish
``round-completed``. No learning logic lives here.

Sharded (:mod:`fedcompute.learning.sharding` picks K > 1 for a big round): the first
round-ready records K and publishes K ``aggregation-shard`` messages; each
(:func:`aggregate_shard`) clips and sums its slice of accept positions into a create-only
partial aggregate in the aggregate bucket and marks itself finished in the store; the shard
that finishes the set publishes round-ready again, whose run merges the K partials
(:func:`~fedcompute.learning.accumulator.merge_accumulators`), releases the DP mean once
(:func:`~fedcompute.learning.server_round.finish_round`) and completes the round as the
single job does. A round-ready for a sharded round that is not finished re-sends only the
unfinished shards (the scheduler's stuck-round repair goes through it). Streamed (the
default for a round of several accept counters, :func:`~fedcompute.learning.sharding.streamed_shards`):
K is the number of accept counters, and ingestion publishes each counter's shard as soon as
the counter fills, so the partial sums run while the round collects and the close finds
most shards finished. Idempotent: a redelivered message for a COMPLETED round does
nothing, and a run killed midway re-runs to the same checkpoint (the accepted set is frozen
once the round is AGGREGATING, updates stream in assignment-id order, the noise seed is
derived from the task's server-side secret and the round, and outputs are create-only).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcompute import layout, strict_json
from fedcompute.errors import (
    InvalidRequestError,
    InvariantError,
    NotFoundError,
    PreconditionFailedError,
    TransientError,
)
from fedcompute.learning import sharding
from fedcompute.learning.accumulator import (
    RoundAccumulator,
    decode_partial_with_extra,
    encode_partial,
    merge_accumulators,
)
from fedcompute.learning.server_round import METRICS_OVERFLOWED, MISSING_UPDATES, valid_metric_sums
from fedcompute.learning.tensor_codec import ClientUpdate, spec_nbytes
from fedcompute.learning.upload_contract import decode_upload
from fedcompute.plans import ServerPhase
from fedcompute.ports import BlobStore, RoundEvents, TaskStore
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    RoundKey,
    RoundRecord,
    RoundStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

if TYPE_CHECKING:
    from fedcompute.learning.dp_core import DpAggregator
    from fedcompute.learning.server_optimizer import ServerOptimizer
    from fedcompute.learning.server_round import NextStep, RoundConfig, RoundResult, ServerState

log = logging.getLogger(__name__)

# (stored bytes, assignment id) -> the ClientUpdate bytes (fedcompute.crypto.hpke.upload_unsealer).
Unsealer = Callable[[bytes, str], bytes]
# Updates read ahead of the one being summed (parallel reads; memory: this many updates).
READ_AHEAD = 16

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
    unseal: Unsealer | None = None,
) -> AggregationOutcome:
    """Aggregate round ``key`` if it is AGGREGATING; see the module docstring.

    ``unseal(stored bytes, assignment id)`` opens HPKE-sealed uploads (as ingestion did).
    """
    from fedcompute.learning import server_round

    round_record = store.get_round(key)
    if round_record is None:
        log.warning("round-ready for unknown round %s: dropped", key)
        return AggregationOutcome("UNKNOWN_ROUND")
    if round_record.status in (RoundStatus.COMPLETED, RoundStatus.FAILED, RoundStatus.CANCELED):
        log.info("round %s already %s: redelivery ignored", key, round_record.status.value)
        return AggregationOutcome("ALREADY_DONE")
    if round_record.status != RoundStatus.AGGREGATING:
        log.warning("round %s is %s, not AGGREGATING: ignored", key, round_record.status.value)
        return AggregationOutcome("NOT_READY")
    task = store.get_task(key.population, key.task_id)
    assert task is not None
    if task.status != TaskStatus.OPEN:  # canceled (or failed) while the round was collecting
        try:
            store.update_round(key, {"status": RoundStatus.CANCELED, "completed_time": now(),
                                         "status_reason": f"task {task.status.value}"},
                                   expected=[RoundStatus.AGGREGATING])
        except PreconditionFailedError:
            pass
        log.info("round %s not aggregated: task is %s", key, task.status.value)
        return AggregationOutcome("TASK_NOT_OPEN", task_status=task.status.value)
    if task.kind == TaskKind.EVALUATION:
        return _aggregate_evaluation(store, blobs, events, settings, key, task, round_record, now, unseal)
    inputs = _round_inputs(blobs, settings, key)
    shards = sharding.shard_count(task.report_goal, spec_nbytes(inputs.previous.spec),
                                  shard_bytes=settings.aggregation_shard_bytes,
                                  max_shards=settings.max_aggregation_shards, forced=settings.aggregation_shards,
                                  streaming=settings.aggregation_streaming)
    if shards > 1:
        # The first round-ready fixes the round's shard count (create-only); later ones reuse it.
        progress = store.plan_shards(key, shards)
        if not progress.complete:
            for shard in progress.pending():  # a re-delivery re-sends the unfinished shards only
                events.aggregation_shard(key, shard, progress.shards)
            log.info("round %s: %d of %d shards to aggregate", key, len(progress.pending()), progress.shards)
            return AggregationOutcome("SHARDS_PUBLISHED", task_status=task.status.value)
        return _combine_shards(store, blobs, events, settings, key, task, inputs, progress.shards, now)

    faults = _new_faults()
    started = time.monotonic()
    accepted = sorted(store.accepted_ids(key))  # the round's frozen accepted set, in a stable order
    read_set = time.monotonic()
    config = _round_config(task, key, inputs, faults)
    updates = decoded_updates(blobs, settings, key, task, accepted, faults, unseal)
    new_state, result, raw_metrics = server_round.server_round(inputs.previous, updates, config)
    summed = time.monotonic()
    outcome = _finish_training_round(store, blobs, events, settings, key, task, inputs, new_state, result,
                                     raw_metrics, faults, now)
    log.info("round %s stages: accepted set %.2f s, %d updates read and summed %.2f s, outputs %.2f s", key,
             read_set - started, len(accepted), summed - read_set, time.monotonic() - summed)
    return outcome


def aggregate_shard(
    store: TaskStore,
    blobs: BlobStore,
    events: RoundEvents,
    settings: Settings,
    key: RoundKey,
    shard: int,
    shards: int,
    *,
    unseal: Unsealer | None = None,
) -> AggregationOutcome:
    """Aggregate one shard of round ``key``: clip and sum the updates at its accept positions
    into a create-only partial aggregate, mark the shard finished, and, when that completes
    the round's shards, publish round-ready again: the combine (see :func:`aggregate_round`).

    Streamed (the round still COLLECTING, the shard published by the accept that filled its
    positions): the shard records the round's plan itself (create-if-absent, the same K the
    close computes) and runs only if every one of its positions is filled; otherwise it does
    nothing and the close publishes it again.

    Idempotent: a re-delivered (or duplicated, or killed and re-run) shard finds its partial
    written, marks itself finished again and re-publishes round-ready only if every shard is
    finished (the combine is idempotent too); a shard of a round no longer collecting or
    aggregating does nothing.
    """
    round_record = store.get_round(key)
    live = (RoundStatus.AGGREGATING, RoundStatus.COLLECTING)
    if round_record is None or round_record.status not in live:
        log.info("shard %d/%d of round %s: round is %s, nothing to do", shard, shards, key,
                 "unknown" if round_record is None else round_record.status.value)
        return AggregationOutcome("ALREADY_DONE" if round_record is not None else "UNKNOWN_ROUND")
    task = store.get_task(key.population, key.task_id)
    if task is None or task.status != TaskStatus.OPEN:
        return AggregationOutcome("TASK_NOT_OPEN", task_status=task.status.value if task else "")
    positions = sharding.shard_positions(task.report_goal, shards, shard)
    if round_record.status == RoundStatus.COLLECTING:
        planned = store.plan_shards(key, shards).shards
        if planned != shards:
            log.warning("shard %d/%d of round %s: the round is planned in %d shards; ignored", shard, shards, key,
                        planned)
            return AggregationOutcome("NOT_READY")
    path = layout.partial_aggregate_path(key.population, key.task_id, key.round_number, shards, shard)
    if not blobs.exists(settings.aggregate_bucket, path):
        try:
            accepted = store.accepted_ids(key, positions)
        except PreconditionFailedError:  # still collecting and not all filled: the close re-sends it
            log.info("shard %d/%d of round %s: positions not all filled yet; left to the close", shard, shards, key)
            return AggregationOutcome("NOT_READY")
        inputs = _round_inputs(blobs, settings, key)
        faults = _new_faults()
        acc = inputs.dp.start(inputs.previous.spec, inputs.previous.dp_state)
        for update in decoded_updates(blobs, settings, key, task, sorted(accepted), faults, unseal):
            acc = inputs.dp.add(acc, update)
            del update  # hold one update at a time
        blobs.write(settings.aggregate_bucket, path, encode_partial(acc, {MISSING_UPDATES: faults[MISSING_UPDATES]}),
                    create_only=True)
        log.info("shard %d/%d of round %s: %d updates summed", shard, shards, key, acc.accepted)
    try:
        progress = store.finish_shard(key, shard)
    except PreconditionFailedError as error:  # a shard message ahead of its round-ready's plan
        raise TransientError(f"shard {shard}/{shards} of round {key} has no shard plan yet", hint="retried") from error
    if progress.shards != shards:
        raise InvariantError(f"round {key} is planned in {progress.shards} shards, the message says {shards}")
    if progress.complete:
        events.round_ready(key)  # the last shard to finish triggers the combine
        return AggregationOutcome("SHARD_DONE_COMBINE_PUBLISHED")
    return AggregationOutcome("SHARD_DONE")


@dataclass(frozen=True)
class _RoundInputs:
    phase: ServerPhase
    previous: ServerState
    optimizer: ServerOptimizer
    dp: DpAggregator


def _round_inputs(blobs: BlobStore, settings: Settings, key: RoundKey) -> _RoundInputs:
    """The server phase, the previous checkpoint and the round machinery they name."""
    from fedcompute.learning import checkpoint, server_round

    phase = ServerPhase.from_json(blobs.read(settings.model_bucket, layout.server_phase_path(key.population, key.task_id)))
    previous = checkpoint.decode_checkpoint(
        blobs.read(settings.model_bucket, layout.checkpoint_path(key.population, key.task_id, key.round_number - 1)))
    optimizer, dp = server_round.build_round_machinery(phase)
    return _RoundInputs(phase, previous, optimizer, dp)


def _new_faults() -> dict[str, int]:
    return {MISSING_UPDATES: 0, METRICS_OVERFLOWED: 0}


def _round_config(task: TaskRecord, key: RoundKey, inputs: _RoundInputs, faults: dict[str, int]) -> RoundConfig:
    from fedcompute.learning import server_round

    finalize_task_metrics = server_round.task_metrics_finalizer(task.metrics)
    return server_round.RoundConfig(
        report_goal=task.report_goal, optimizer=inputs.optimizer, dp=inputs.dp,
        noise_seed=server_round.round_noise_seed(inputs.phase, task.noise_secret, key.population, key.task_id,
                                                 key.round_number),
        metrics_finalizer=lambda sums: finalize_task_metrics(valid_metric_sums(task.metrics, sums, faults)))


def decoded_updates(blobs: BlobStore, settings: Settings, key: RoundKey, task: TaskRecord, accepted: Iterable[str],
                    faults: dict[str, int], unseal: Unsealer | None) -> Iterator[ClientUpdate]:
    """The accepted updates, read ahead in parallel and decoded in ``accepted`` order.

    An accepted update missing from storage (deleted by hand, a lifecycle rule, a storage
    fault) is left out and counted in ``faults``: the round goes on without it rather than
    failing on every redelivery. The divisor rule is the aggregator's usual one: with DP the
    report goal (a fixed denominator, so sensitivity and accounting are unchanged), without
    DP the number of updates summed.
    """
    names = {layout.gradient_path(key.population, key.task_id, key.round_number, aid): aid for aid in accepted}
    for name, data in read_ahead(blobs, settings.gradient_bucket, names):
        if data is None:
            faults[MISSING_UPDATES] += 1
            log.error("accepted update %s is missing from storage: aggregated without it", name)
            continue
        try:
            yield decode_upload(unseal(data, names[name]) if unseal else data, task)
        except InvalidRequestError as error:  # ingestion checked it; never trust twice-read bytes blindly
            log.error("skipping %s: %s", name, error)


def _combine_shards(store: TaskStore, blobs: BlobStore, events: RoundEvents, settings: Settings, key: RoundKey,
                    task: TaskRecord, inputs: _RoundInputs, shards: int,
                    now: Callable[[], float]) -> AggregationOutcome:
    """Merge the round's K partial aggregates, release the DP mean once, finish the round."""
    from fedcompute.learning import server_round

    faults = _new_faults()
    names = [layout.partial_aggregate_path(key.population, key.task_id, key.round_number, shards, shard)
             for shard in range(shards)]
    merged: RoundAccumulator | None = None
    for shard, (name, data) in enumerate(read_ahead(blobs, settings.aggregate_bucket, names, window=4)):
        if data is None:  # finished, then lost: aggregate that shard again (it re-triggers the combine)
            log.error("partial aggregate %s is missing: shard %d is aggregated again", name, shard)
            events.aggregation_shard(key, shard, shards)
            return AggregationOutcome("SHARD_REPUBLISHED", task_status=task.status.value)
        partial, extra = decode_partial_with_extra(data, inputs.previous.spec)
        faults[MISSING_UPDATES] += extra.get(MISSING_UPDATES, 0)
        merged = partial if merged is None else merge_accumulators(merged, partial)
    assert merged is not None
    config = _round_config(task, key, inputs, faults)
    new_state, result, raw_metrics = server_round.finish_round(inputs.previous, merged, config)
    outcome = _finish_training_round(store, blobs, events, settings, key, task, inputs, new_state, result, raw_metrics,
                                     faults, now)
    if outcome.status == "AGGREGATED":  # later shard messages find the round COMPLETED and stop there
        for name in names:
            with contextlib.suppress(NotFoundError):
                blobs.delete(settings.aggregate_bucket, name)
    return outcome


def _finish_training_round(store: TaskStore, blobs: BlobStore, events: RoundEvents, settings: Settings,
                           key: RoundKey, task: TaskRecord, inputs: _RoundInputs, new_state: ServerState,
                           result: RoundResult, raw_metrics: dict[str, float], faults: dict[str, int],
                           now: Callable[[], float]) -> AggregationOutcome:
    """Write the checkpoint, client checkpoint and metrics (create-only), then complete the round
    and open the next one or complete the task."""
    from fedcompute.learning import checkpoint, server_round
    from fedcompute.learning.tensor_codec import decode_bundle, encode_bundle

    phase, optimizer = inputs.phase, inputs.optimizer
    metrics = server_round.round_metrics(phase, key.round_number, task.metrics, result, raw_metrics)
    metrics.update({name: float(count) for name, count in faults.items()})

    # Create-only writes: a re-run after a crash finds identical bytes already there. The three
    # objects are independent, so they are written at once and cost the slowest write rather
    # than the sum (~60 ms per 6.6 MB CNN checkpoint on fake-gcs-server); all of them land
    # before the round is completed below.
    ckpt_bytes = checkpoint.encode_checkpoint(new_state, optimizer=optimizer,
                                              metadata={"population": key.population, "task_id": str(key.task_id)})
    with ThreadPoolExecutor(3, thread_name_prefix="round-outputs") as pool:
        writes = [
            pool.submit(blobs.write, settings.model_bucket, layout.checkpoint_path(
                key.population, key.task_id, key.round_number), ckpt_bytes, create_only=True),
            pool.submit(blobs.write, settings.model_bucket, layout.metrics_path(
                key.population, key.task_id, key.round_number), strict_json.dumps(metrics, sort_keys=False).encode(),
                create_only=True, content_type="application/json"),
        ]
        initial_client, _ = decode_bundle(blobs.read(settings.model_bucket,
                                                     layout.client_checkpoint_path(key.population, key.task_id, 0)))
        trained = dict(new_state.named_weights())
        client_weights = [(name, trained.get(name, array)) for name, array in initial_client]
        writes.append(pool.submit(blobs.write, settings.model_bucket, layout.client_checkpoint_path(
            key.population, key.task_id, key.round_number), encode_bundle(client_weights), create_only=True))
        for write in writes:
            write.result()

    task_changes, next_round_record = _task_changes(task, key, server_round.next_step(phase, key.round_number,
                                                                                   task.total_rounds), now())
    finished = store.finish_round(
        key, {"status": RoundStatus.COMPLETED, "completed_time": now()}, task_changes, next_round_record)
    if not finished:
        # A concurrent run (a duplicated round-ready) completed the round first; outputs are
        # create-only and identical, so this run only reports that the work was done.
        log.info("round %s was completed by a concurrent run", key)
        return AggregationOutcome("ALREADY_DONE", metrics)
    events.round_completed(key, task_status=task_changes.get("status", TaskStatus.OPEN).value)
    log.info("round %s aggregated: %d reports, metrics %s", key, result.accepted, metrics)
    return AggregationOutcome("AGGREGATED", metrics, task_changes.get("status", TaskStatus.OPEN).value)


def _aggregate_evaluation(store: TaskStore, blobs: BlobStore, events: RoundEvents, settings: Settings, key: RoundKey,
                          task: TaskRecord, round_record: RoundRecord, now: Callable[[], float],
                          unseal: Unsealer | None = None) -> AggregationOutcome:
    """An evaluation round: sum the devices' metric statistics, finalize, write the metrics.

    No noise is added to evaluation metrics (like ODP and TFF's federated evaluation); the
    metrics JSON sits at the evaluation task's layout and names the training round evaluated.
    """
    from fedcompute.learning.server_round import evaluation_metrics

    faults = _new_faults()
    totals: dict[str, np.ndarray] = {}
    reports = excluded = 0
    accepted = sorted(store.accepted_ids(key))  # the frozen accepted set
    for update in decoded_updates(blobs, settings, key, task, accepted, faults, unseal):
        if not update.metrics_finite():
            excluded += 1
            continue
        reports += 1
        for stat, value in update.metric_statistics.items():
            totals[stat] = totals.get(stat, 0.0) + np.asarray(value, np.float64)
    metrics = evaluation_metrics(task.metrics, valid_metric_sums(task.metrics, totals, faults),
                                 evaluated_round=round_record.evaluated_round, reports=reports, excluded=excluded)
    metrics.update({name: float(count) for name, count in faults.items()})
    blobs.write(settings.model_bucket, layout.metrics_path(key.population, key.task_id, key.round_number),
                strict_json.dumps(metrics).encode(), create_only=True, content_type="application/json")
    if store.finish_round(key, {"status": RoundStatus.COMPLETED, "completed_time": now()}, {}, None):
        events.round_completed(key, task_status=task.status.value)
    delete_round_updates(blobs, settings, key)
    return AggregationOutcome("AGGREGATED", metrics, task.status.value)


def read_ahead(blobs: BlobStore, bucket: str, names: Iterable[str],
               window: int = READ_AHEAD) -> Iterator[tuple[str, bytes | None]]:
    """``(name, bytes)`` in ``names`` order, read up to ``window`` objects ahead in threads;
    None for an object that does not exist. The order (hence the float sum) is unchanged."""
    pending: list[tuple[str, Any]] = []

    def read(name: str) -> bytes | None:
        try:
            return blobs.read(bucket, name)
        except NotFoundError:
            return None

    with ThreadPoolExecutor(window, thread_name_prefix="read-ahead") as pool:
        for name in names:
            pending.append((name, pool.submit(read, name)))
            if len(pending) >= window:
                first, future = pending.pop(0)
                yield first, future.result()
        for name, future in pending:
            yield name, future.result()


def delete_round_updates(blobs: BlobStore, settings: Settings, key: RoundKey) -> int:
    """Delete the round's device updates from the gradient bucket; returns how many."""
    prefix = f"{key.population}/{key.task_id}/{key.round_number}/d/"
    names = blobs.list(settings.gradient_bucket, prefix)
    for name in names:
        blobs.delete(settings.gradient_bucket, name)
    return len(names)


def _task_changes(task: TaskRecord, key: RoundKey, step: NextStep, t: float) -> tuple[dict[str, Any], RoundRecord | None]:
    """The store changes for ``step``: the task's ε, and the next round opened or the task completed."""
    changes: dict[str, Any] = {"epsilon_spent": step.epsilon_spent}
    if step.next_round is None:
        changes.update({"status": TaskStatus.COMPLETED, "status_reason": step.done_reason, "stop_time": t})
        return changes, None
    changes["current_round"] = step.next_round
    return changes, RoundRecord.opening(task, step.next_round, t)
