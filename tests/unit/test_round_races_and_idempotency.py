"""The round lifecycle under races, redelivery and partial state, on in-memory adapters.

A concurrent run that loses a conditional write reports the work as done; check-in near a
full round, upload sessions for objects already written, and opening a task without its
artifacts each behave as the protocol says.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.dp import DpParams
from fedcompute.errors import PreconditionFailedError
from fedcompute.learning import server_round, upload_contract
from fedcompute.learning.tensor_codec import decode_bundle, encode_client_update
from fedcompute.memory import InMemoryBlobStore, InMemoryTaskStore
from fedcompute.plans import ServerPhase
from fedcompute.services import aggregator, ingestion
from fedcompute.services import assignment as svc
from fedcompute.services import task_management as tm
from fedcompute.settings import Settings
from fedcompute.taskbuilder.artifacts import artifacts_from_weights, publish_artifacts, weight_specs
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, ReportedResult, RoundKey, RoundStatus, TaskKind

SETTINGS = Settings()
POP = "fixes"


def _open(store: InMemoryTaskStore, blobs: InMemoryBlobStore, *, report_goal: int = 2, max_size: int = 3):
    task = tm.create_task(store, tm.NewTask(population=POP, kind=TaskKind.TRAINING, total_rounds=2,
                                            report_goal=report_goal, max_aggregation_size=max_size))
    weights = [np.ones((4, 3), np.float32), np.zeros(3, np.float32)]
    phase = ServerPhase("FED_AVG", "SGD", 1.0, report_goal, max_size / report_goal - 1, 2, 100, 10.0, 1e-6,
                        DpParams(), weight_specs(weights), ("loss",))
    publish_artifacts(blobs, SETTINGS, POP, task.task_id, artifacts_from_weights(phase, weights))
    tm.open_task(store, blobs, SETTINGS, POP, task.task_id)
    return task, weights


def _stats() -> dict[str, np.ndarray]:
    return {name: np.ones(shape) for name, shape, _ in upload_contract.metric_statistics_spec(("loss",))}


def _uploaded_round(store: InMemoryTaskStore, blobs: InMemoryBlobStore, task_id: int, n: int = 2) -> RoundKey:
    key = RoundKey(POP, task_id, 1)
    for i in range(n):
        aid = f"a{i}"
        store.create_assignment(AssignmentRecord(aid, POP, task_id, 1, AssignmentStatus.UPLOAD_COMPLETED, "1", i, 0, 0))
        delta = [("trainable/0", np.full((4, 3), i + 1, np.float32)), ("trainable/1", np.ones(3, np.float32))]
        blobs.write(SETTINGS.gradient_bucket, layout.gradient_path(POP, task_id, 1, aid),
                    encode_client_update(delta, 5, _stats()))
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    return key


def test_aggregator_writes_the_client_checkpoint_from_the_decoded_bundle(store, blobs, events):
    # decode_bundle returns (named arrays, metadata): the aggregator iterated the tuple.
    task, weights = _open(store, blobs)
    key = _uploaded_round(store, blobs, task.task_id)
    assert aggregator.aggregate_round(store, blobs, events, SETTINGS, key).status == "AGGREGATED"
    named, _ = decode_bundle(blobs.read(SETTINGS.model_bucket, layout.client_checkpoint_path(POP, task.task_id, 1)))
    assert [n for n, _ in named] == ["trainable/0", "trainable/1"]
    np.testing.assert_allclose(named[0][1], weights[0] + 1.5)  # mean of deltas 1 and 2
    assert json.loads(blobs.read(SETTINGS.model_bucket, layout.metrics_path(POP, task.task_id, 1)))[
        "server/aggregator/num_reports"] == 2.0


def test_aggregator_run_that_loses_the_finish_reports_already_done(store, blobs, events):
    # Two round-ready deliveries aggregating at once: only the one that completes the round
    # may report AGGREGATED (and publish round-completed).
    task, _ = _open(store, blobs)
    key = _uploaded_round(store, blobs, task.task_id)

    class LosesTheRace:
        def finish_round(self, *args, **kwargs):
            return False

        def __getattr__(self, name):
            return getattr(store, name)

    assert aggregator.aggregate_round(LosesTheRace(), blobs, events, SETTINGS, key).status == "ALREADY_DONE"
    assert events.completed == []


def test_check_in_filling_a_round_never_lists_claimed_slots(store, blobs):
    _open(store, blobs, report_goal=20, max_size=20)
    listings = []
    original = store.claimed_slots
    store.claimed_slots = lambda key: listings.append(key) or original(key)  # type: ignore[method-assign]
    rng = random.Random(0)
    for _ in range(20):
        assert isinstance(svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), rng=rng),
                          svc.Assignment)
    assert listings == []  # slots come from counters (it was one listing per slot, then one per check-in)
    assert isinstance(svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), rng=rng),
                      svc.Rejection)


def test_no_new_upload_session_for_an_object_already_written(store, blobs):
    _open(store, blobs)
    a = svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"))
    key = RoundKey(POP, a.task_id, 1)
    first = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    assert blobs.complete_upload(first.upload_location, b"update")
    with pytest.raises(PreconditionFailedError, match="already uploaded"):
        svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)


def test_opening_a_task_without_artifacts_is_a_precondition_failure(store, blobs):
    task = tm.create_task(store, tm.NewTask(population=POP, kind=TaskKind.TRAINING, total_rounds=1, report_goal=1,
                                            max_aggregation_size=1))
    with pytest.raises(PreconditionFailedError, match="upload the task's artifacts first"):
        tm.open_task(store, blobs, SETTINGS, POP, task.task_id)


def test_ingestion_that_loses_the_close_leaves_round_ready_to_the_winner(store, blobs, events):
    _open(store, blobs, report_goal=1, max_size=2)
    a = svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"))
    key = RoundKey(POP, a.task_id, 1)
    instruction = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    blobs.complete_upload(instruction.upload_location, b"update")
    count = store.count_assignments

    def count_then_lose_the_flip(k, status=None):
        n = count(k, status)  # a concurrent winner closes the round right after our count
        store.update_round(k, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
        store.count_assignments = count  # type: ignore[method-assign]
        return n

    store.count_assignments = count_then_lose_the_flip  # type: ignore[method-assign]
    event = ingestion.ObjectFinalized("e1", SETTINGS.gradient_bucket, instruction.object_name, 6)
    result = ingestion.ingest_upload(store, blobs, events, SETTINGS, event, validate=lambda data, task: None)
    assert result.outcome == "ACCEPTED" and events.ready == []  # the winner publishes, not us
    # If the winner crashed before publishing, the redelivered event repairs it.
    again = ingestion.ingest_upload(store, blobs, events, SETTINGS, event, validate=lambda data, task: None)
    assert again.outcome == "DUPLICATE" and events.ready == [key]


def test_aggregator_completes_a_round_with_a_missing_update_and_a_hostile_metric_statistic(store, blobs, events):
    task, weights = _open(store, blobs, report_goal=2, max_size=3)
    key = RoundKey(POP, task.task_id, 1)
    for i in range(3):
        aid = f"a{i}"
        store.create_assignment(AssignmentRecord(aid, POP, task.task_id, 1, AssignmentStatus.UPLOAD_COMPLETED, "1", i,
                                                 0, 0))
        delta = [("trainable/0", np.full((4, 3), i + 1, np.float32)), ("trainable/1", np.ones(3, np.float32))]
        # a1's loss statistics (1e308) are more than one device can produce: the aggregator
        # re-checks the contribution bounds and skips it, so the round's sum cannot overflow.
        stats = {name: np.full_like(value, 1e308) for name, value in _stats().items()} if i == 1 else _stats()
        if i < 2:  # a2 was accepted but its object is gone
            blobs.write(SETTINGS.gradient_bucket, layout.gradient_path(POP, task.task_id, 1, aid),
                        encode_client_update(delta, 5, stats))
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    outcome = aggregator.aggregate_round(store, blobs, events, SETTINGS, key)
    assert outcome.status == "AGGREGATED"
    assert outcome.metrics["server/aggregator/missing_updates"] == 1.0
    assert outcome.metrics["server/aggregator/metrics_overflowed"] == 0.0
    assert outcome.metrics["server/client_work/train/loss"] == pytest.approx(1.0)  # a0's alone
    assert store.get_round(key).status == RoundStatus.COMPLETED


def test_a_metric_whose_round_sum_overflows_is_left_out_and_counted():
    """Defence in depth behind the contribution bounds: an overflowed sum drops that metric
    from the round's metrics (counted) instead of failing the round."""
    huge = {name: np.full_like(value, 1e308) for name, value in _stats().items()}
    with np.errstate(over="ignore"):
        sums = {name: value + value for name, value in huge.items()}
    faults = {server_round.MISSING_UPDATES: 0, server_round.METRICS_OVERFLOWED: 0}
    assert server_round.valid_metric_sums(("loss",), sums, faults) == {}
    assert faults[server_round.METRICS_OVERFLOWED] == 1
    assert set(server_round.valid_metric_sums(("loss",), _stats(), faults)) == {"loss/count", "loss/sum"}
    assert faults[server_round.METRICS_OVERFLOWED] == 1
