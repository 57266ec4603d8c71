"""The one tensor-spec type: stored maps stay as they were, specs unpack like triples."""
from __future__ import annotations

import numpy as np

from fedcompute.learning.tensor_codec import normalize_spec, spec_of
from fedcompute.tasks.records import TaskKind, TaskRecord, TaskStatus
from fedcompute.tensor_spec import TensorSpec


def test_update_spec_map_has_no_trainable_and_reads_back() -> None:
    spec = TensorSpec("dense/kernel", (4, 2), "float32")
    assert spec.to_dict() == {"name": "dense/kernel", "shape": [4, 2], "dtype": "float32"}
    assert TensorSpec.from_dict(spec.to_dict()) == spec


def test_weight_maps_carry_trainable_when_asked_or_false() -> None:
    frozen = TensorSpec("bn/moving_mean", (2,), "float32", trainable=False)
    assert frozen.to_dict()["trainable"] is False
    assert TensorSpec("w", (1,), "float32").to_dict(with_trainable=True)["trainable"] is True
    assert TensorSpec.from_dict(frozen.to_dict(with_trainable=True)) == frozen
    # Maps written by the earlier plan type (always with trainable) read back the same.
    assert TensorSpec.from_dict({"name": "w", "shape": [3], "dtype": "float32", "trainable": True}) == \
        TensorSpec("w", (3,), "float32")


def test_task_record_stores_the_update_spec_as_before() -> None:
    stored = {"population": "p", "task_id": 1, "kind": "TRAINING", "status": "OPEN", "report_goal": 2,
              "over_selection_rate": 0.0, "total_rounds": 1,
              "update_spec": [{"name": "dense/kernel", "shape": [4, 2], "dtype": "float32"}]}
    record = TaskRecord.from_dict(stored)
    assert record.kind is TaskKind.TRAINING and record.status is TaskStatus.OPEN
    assert record.update_spec == (TensorSpec("dense/kernel", (4, 2), "float32"),)
    assert record.to_dict()["update_spec"] == stored["update_spec"]


def test_spec_unpacks_like_a_triple_and_the_codec_returns_the_same_type() -> None:
    name, shape, dtype = TensorSpec("a", (2, 3), "float64")
    assert (name, shape, dtype) == ("a", (2, 3), "float64")
    assert normalize_spec([("a", [2, 3], np.float64)]) == (TensorSpec("a", (2, 3), "float64"),)
    assert spec_of({"a": np.zeros((2, 3))}) == normalize_spec([TensorSpec("a", (2, 3), "float64")])
