"""A task record's DP is typed (fedcompute.dp.TaskDp) and its Firestore map reads as before."""
from __future__ import annotations

from fedcompute.dp import DpMechanism, DpParams, TaskDp
from fedcompute.tasks.records import TaskRecord

# A record's ``dp`` map as task management stored it before the field was typed.
STORED_DP = {"type": "FIXED_GAUSSIAN", "noise_multiplier": 1.1, "clip_norm": 0.5, "init_clip_norm": 0.0,
             "target_unclipped_quantile": 0.5, "clip_learning_rate": 0.2, "clipped_count_stddev": None,
             "target_epsilon": 5.0, "delta": 1e-4, "population_size": 10_000}
RECORD = {"population": "p", "task_id": 3, "kind": "TRAINING", "status": "OPEN", "report_goal": 100,
          "over_selection_rate": 0.3, "total_rounds": 10}


def test_stored_dp_map_reads_typed_and_writes_back_unchanged() -> None:
    record = TaskRecord.from_dict({**RECORD, "dp": STORED_DP})
    assert record.dp == TaskDp(DpParams(DpMechanism.FIXED_GAUSSIAN, 1.1, 0.5), 5.0, 1e-4, 10_000)
    assert record.dp.params.mechanism is DpMechanism.FIXED_GAUSSIAN and record.dp.params.init_clip_norm is None
    assert record.to_dict()["dp"] == STORED_DP


def test_tree_restart_fields_round_trip() -> None:
    stored = {**STORED_DP, "type": "TREE_AGGREGATION", "restart_period": 4, "restart_warmup": 2}
    dp = TaskDp.from_dict(stored)
    assert (dp.params.restart_period, dp.params.restart_warmup) == (4, 2)
    assert dp.to_dict() == stored


def test_unopened_task_has_no_dp_stored_as_an_empty_map() -> None:
    record = TaskRecord.from_dict({**RECORD, "status": "CREATED", "dp": {}})
    assert record.dp is None and record.to_dict()["dp"] == {}
    assert TaskRecord.from_dict({**RECORD, "status": "CREATED"}).dp is None


def test_record_never_keeps_a_noise_seed() -> None:
    dp = TaskDp(DpParams(DpMechanism.FIXED_GAUSSIAN, 1.0, 1.0, noise_seed=7), 3.0, 1e-5, 500)
    assert dp.params.noise_seed is None and "noise_seed" not in dp.to_dict()
    assert TaskDp.from_dict({**STORED_DP, "noise_seed": 7}).params.noise_seed is None
