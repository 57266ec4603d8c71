"""One device's upload is checked against what an honest device can produce (issue 13, High 3 / Medium)."""
from __future__ import annotations

import numpy as np
import pytest

from fedcompute.errors import InvalidRequestError
from fedcompute.learning import metric_stats
from fedcompute.learning.contribution_bounds import (
    DEFAULT_MAX_DEVICE_EXAMPLES,
    check_device_contribution,
    max_examples_per_device,
)
from fedcompute.learning.tensor_codec import encode_client_update
from fedcompute.learning.upload_contract import make_upload_validator
from fedcompute.tasks.records import TaskKind, TaskRecord, TaskStatus
from fedcompute.tensor_spec import TensorSpec

METRICS = ("accuracy", "auc-roc")
SPEC = (TensorSpec("dense/kernel", (2, 2), "float32"),)


def _task(max_examples: int = 0) -> TaskRecord:
    return TaskRecord(population="p", task_id=1, kind=TaskKind.TRAINING, status=TaskStatus.OPEN, report_goal=2,
                      over_selection_rate=0.0, total_rounds=1, update_spec=SPEC, metrics=METRICS,
                      max_device_examples=max_examples)


def _honest_stats(n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(n, 1))
    p = rng.random((n, 1)).astype(np.float32)
    stats = metric_stats.compute_all((*METRICS, "loss", "num_examples"), y, p, batch_loss=0.7)
    return metric_stats.flatten_stats(stats)


def _upload(num_examples: int = 8, **overrides: object) -> bytes:
    stats = _honest_stats()
    stats.update({k.replace("__", "/"): np.asarray(v, np.float64) for k, v in overrides.items()})
    return encode_client_update([("dense/kernel", np.zeros((2, 2), np.float32))], num_examples, stats)


VALIDATE = make_upload_validator()


def test_an_honest_upload_passes() -> None:
    VALIDATE(_upload(), _task())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss__sum": 1.7e308}, "loss"),  # the overflow that stalled a round
        ({"loss__sum": float("inf")}, "not finite"),
        ({"accuracy__count": -1.0}, "non-negative integer"),
        ({"accuracy__count": 2.5}, "non-negative integer"),
        ({"accuracy__correct": 9.0, "accuracy__count": 8.0}, "correct 9 exceeds count 8"),
        ({"accuracy__correct": 1e9, "accuracy__count": 1e9}, "exceeds num_examples"),  # sets accuracy alone
        ({"num_examples__count": 1e9}, "exceeds num_examples"),
        ({"auc-roc__tp": np.arange(200, dtype=np.float64)}, "cumulative"),
    ],
)
def test_statistics_no_honest_device_produces_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        VALIDATE(_upload(**overrides), _task())


def test_example_count_is_capped_by_the_task_or_the_default() -> None:
    with pytest.raises(InvalidRequestError, match="outside 1..100"):
        VALIDATE(_upload(num_examples=101), _task(max_examples=100))
    with pytest.raises(InvalidRequestError, match=f"outside 1..{DEFAULT_MAX_DEVICE_EXAMPLES}"):
        check_device_contribution(DEFAULT_MAX_DEVICE_EXAMPLES + 1, {})


def test_task_cap_follows_the_dataset_policy() -> None:
    assert max_examples_per_device(32, 10, 3, "FED_AVG") == 960
    assert max_examples_per_device(32, 10, 3, "FED_SGD") == 320
    assert max_examples_per_device(32, 0, 3, "FED_AVG") == 0  # no cap configured: the default applies
