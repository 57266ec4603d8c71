"""Evaluation tasks: checkpoint selection, eval rounds, traffic split, eval metrics (in-memory)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.learning import metric_stats
from fedcompute.learning.tensor_codec import encode_client_update
from fedcompute.learning.upload_contract import metric_statistics_spec
from fedcompute.memory import InMemoryTaskStore
from fedcompute.services import aggregator, assignment, scheduler
from fedcompute.settings import Settings
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundKey, RoundRecord, RoundStatus, TaskKind, TaskRecord, TaskStatus

SETTINGS = Settings()
HOUR = 3600.0


def _completed(rounds, times=None):
    return [RoundRecord("p", 1, r, RoundStatus.COMPLETED, 2, 2,
                            completed_time=(times or {}).get(r, 0.0)) for r in rounds]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_k_round_picks_only_from_the_past_k_rounds(k):
    completed = _completed(range(1, 8))
    picks = {scheduler.pick_checkpoint(f"every_{k}_round", completed, 0, 0.0, 0.0, random.Random(s)) for s in range(50)}
    assert picks == set(range(8 - k, 8))
    # Not before k new rounds have completed since the last evaluated one.
    assert scheduler.pick_checkpoint(f"every_{k}_round", completed, 7, 0.0, 0.0, random.Random(0)) is None
    if k > 1:
        assert scheduler.pick_checkpoint(f"every_{k}_round", completed, 8 - k, 0.0, 0.0, random.Random(0)) is None


def test_every_k_hour_waits_k_hours_and_picks_recent_checkpoints():
    now = 100 * HOUR
    completed = _completed(range(1, 6), {1: now - 5 * HOUR, 2: now - 3 * HOUR, 3: now - 1.5 * HOUR,
                                         4: now - 0.5 * HOUR, 5: now - 0.1 * HOUR})
    picks = {scheduler.pick_checkpoint("every_2_hour", completed, 0, 0.0, now, random.Random(s)) for s in range(50)}
    assert picks == {3, 4, 5}  # completed within the past 2 hours
    assert scheduler.pick_checkpoint("every_2_hour", completed, 0, now - HOUR, now, random.Random(0)) is None
    assert scheduler.pick_checkpoint("every_2_hour", completed, 5, 0.0, now, random.Random(0)) is None
    with pytest.raises(ValueError, match="every_<k>_round"):
        scheduler.pick_checkpoint("every_round", completed, 0, 0.0, now, random.Random(0))


def _training_and_eval(store: InMemoryTaskStore, *, eval_weight=0.25, selector="every_1_round"):
    training = store.create_task("p", lambda tid: TaskRecord(
        population="p", task_id=tid, kind=TaskKind.TRAINING, status=TaskStatus.OPEN, report_goal=2,
        over_selection_rate=100.0, total_rounds=5, current_round=1, traffic_weight=1 - eval_weight))
    store.create_round(RoundRecord("p", training.task_id, 1, RoundStatus.COLLECTING, 2, 1000))
    evaluation = store.create_task("p", lambda tid: TaskRecord(
        population="p", task_id=tid, kind=TaskKind.EVALUATION, status=TaskStatus.OPEN, report_goal=2,
        over_selection_rate=500.0, total_rounds=5, traffic_weight=eval_weight, source_population="p",
        source_task_id=training.task_id, checkpoint_selector=selector, metrics=("sparse_categorical_accuracy",)),
        exclusive_training=False)
    return training, evaluation


def _complete_training_round(store, training, n):
    key = RoundKey("p", training.task_id, n)
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    store.update_round(key, {"status": RoundStatus.COMPLETED, "completed_time": float(n)},
                           expected=[RoundStatus.AGGREGATING])
    store.update_task("p", training.task_id, {"current_round": n + 1})
    store.create_round(RoundRecord("p", training.task_id, n + 1, RoundStatus.COLLECTING, 2, 1000))


def test_scheduler_opens_eval_rounds_one_at_a_time_and_devices_get_that_checkpoint(store, blobs, events):
    training, evaluation = _training_and_eval(store)
    assert scheduler.tick(store, events, now=lambda: 10.0).evaluations_opened == []  # nothing trained yet
    _complete_training_round(store, training, 1)
    report = scheduler.tick(store, events, now=lambda: 10.0, rng=random.Random(0))
    assert report.evaluations_opened == [RoundKey("p", evaluation.task_id, 1)]
    it = store.get_round(RoundKey("p", evaluation.task_id, 1))
    assert it.status == RoundStatus.COLLECTING and it.evaluated_round == 1
    _complete_training_round(store, training, 2)
    assert scheduler.tick(store, events, now=lambda: 11.0).evaluations_opened == []  # round 1 still collecting
    # A device sent to evaluation downloads the eval plan and the evaluated training checkpoint.
    for seed in range(40):
        a = assignment.create_task_assignment(store, blobs, SETTINGS, assignment.CheckIn("p", "1"),
                                              rng=random.Random(seed))
        if a.kind == TaskKind.EVALUATION:
            assert a.plan_url.endswith(layout.eval_plan_path("p", evaluation.task_id))
            assert a.checkpoint_url.endswith(layout.client_checkpoint_path("p", training.task_id, 1))
            break
    else:
        pytest.fail("no check-in was sent to evaluation")


def test_a_tick_that_crashed_after_creating_the_eval_round_is_finished_by_the_next(store, events):
    """The round and the task's pointer to it are one step: a round left behind by a crash
    (created, task not yet pointing at it) is taken up by the next tick, not skipped forever."""
    training, evaluation = _training_and_eval(store)
    _complete_training_round(store, training, 1)
    store.create_round(RoundRecord.opening(store.get_task("p", evaluation.task_id), 1, 5.0, evaluated_round=1))
    assert store.get_task("p", evaluation.task_id).current_round == 0  # the crashed tick's state
    report = scheduler.tick(store, events, now=lambda: 10.0, rng=random.Random(0))
    assert report.evaluations_opened == [RoundKey("p", evaluation.task_id, 1)]
    assert store.get_task("p", evaluation.task_id).current_round == 1
    assert store.get_round(RoundKey("p", evaluation.task_id, 1)).created_time == 5.0  # the crashed tick's round
    assert scheduler.tick(store, events, now=lambda: 11.0).evaluations_opened == []  # and only once


def test_start_round_refuses_a_stopped_task_or_a_round_already_started(store):
    _, evaluation = _training_and_eval(store)
    first = RoundRecord.opening(evaluation, 1, 1.0, evaluated_round=1)
    assert store.start_round(first) is True
    assert store.start_round(first) is False  # a duplicate tick
    assert store.start_round(RoundRecord.opening(evaluation, 3, 1.0, evaluated_round=1)) is False  # skips round 2
    store.update_task("p", evaluation.task_id, {"status": TaskStatus.CANCELED})
    assert store.start_round(RoundRecord.opening(evaluation, 2, 1.0, evaluated_round=1)) is False
    assert store.get_round(RoundKey("p", evaluation.task_id, 2)) is None


def test_eval_traffic_share_is_within_the_binomial_interval(store, blobs, events):
    training, evaluation = _training_and_eval(store, eval_weight=0.1)
    _complete_training_round(store, training, 1)
    scheduler.tick(store, events, now=lambda: 10.0, rng=random.Random(0))
    n = 600
    kinds = [assignment.create_task_assignment(store, blobs, SETTINGS, assignment.CheckIn("p", "1"),
                                               rng=random.Random(1000 + i)).kind for i in range(n)]
    share = kinds.count(TaskKind.EVALUATION) / n
    half_width = 2.576 * math.sqrt(0.1 * 0.9 / n)  # 99% normal interval of a binomial proportion
    assert abs(share - 0.1) <= half_width, share


def test_eval_round_metrics_equal_central_evaluation_and_name_the_training_round(store, blobs, events):
    training, evaluation = _training_and_eval(store)
    _complete_training_round(store, training, 1)
    scheduler.tick(store, events, now=lambda: 10.0, rng=random.Random(0))
    key = RoundKey("p", evaluation.task_id, 1)
    rng = np.random.default_rng(0)
    labels, predictions = [], []
    for i in range(3):
        y = rng.integers(0, 3, size=(7 + i, 1))
        p = rng.dirichlet(np.ones(3), size=7 + i)
        labels.append(y)
        predictions.append(p)
        stats = metric_stats.flatten_stats(metric_stats.compute_all(("sparse_categorical_accuracy", "loss",
                                                                     "num_examples"), y, p, batch_loss=0.5))
        spec = {n: s for n, s, _ in metric_statistics_spec(evaluation.metrics)}
        stats = {n: stats.get(n, np.zeros(s)) for n, s in spec.items()}
        aid = f"e{i}"
        store.create_assignment(AssignmentRecord(aid, "p", evaluation.task_id, 1, AssignmentStatus.UPLOAD_COMPLETED,
                                                 "1", i, 0.0, 0.0))
        blobs.write(SETTINGS.gradient_bucket, layout.gradient_path("p", evaluation.task_id, 1, aid),
                    encode_client_update([], len(y), stats))
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    outcome = aggregator.aggregate_round(store, blobs, events, SETTINGS, key)
    central = metric_stats.finalize("sparse_categorical_accuracy", metric_stats.compute_stats(
        "sparse_categorical_accuracy", np.concatenate(labels), np.concatenate(predictions)))
    assert outcome.metrics["server/client_work/eval/sparse_categorical_accuracy"] == pytest.approx(central, abs=1e-12)
    assert outcome.metrics["server/evaluation/training_round"] == 1.0
    assert store.get_round(RoundKey("p", evaluation.task_id, 1)).status == RoundStatus.COMPLETED
    assert not any(blobs.exists(SETTINGS.model_bucket, layout.checkpoint_path("p", evaluation.task_id, 1)) for _ in [0])


def test_eval_task_completes_after_the_training_task_and_its_last_round(store, events):
    training, evaluation = _training_and_eval(store)
    _complete_training_round(store, training, 1)
    scheduler.tick(store, events, now=lambda: 10.0, rng=random.Random(0))
    key = RoundKey("p", evaluation.task_id, 1)
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    store.finish_round(key, {"status": RoundStatus.COMPLETED}, {}, None)
    store.update_task("p", training.task_id, {"status": TaskStatus.COMPLETED})
    report = scheduler.tick(store, events, now=lambda: 20.0)
    assert report.evaluations_completed == [("p", evaluation.task_id)]
    final = store.get_task("p", evaluation.task_id)
    assert final.status == TaskStatus.COMPLETED and "last evaluated round 1" in final.status_reason
