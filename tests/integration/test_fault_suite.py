"""Audit findings of issue 13 that had only unit tests, reproduced through the public
interfaces of the live local stack (device HTTP, GCS uploads, Pub/Sub-driven aggregation):

- DP type NONE had no clip: one 1e30 update destroyed the model (Medium);
- ε accounting at noise 0.01 ran > 10 min with a 5 GiB worker inside the aggregator (Medium).
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedcompute.dp import DpParams
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.learning.dp_gaussian import DEFAULT_CLIP_NORM
from support.helpers import unique
from support.tasks import create_numpy_task, make_update, random_delta, run_device

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration


def test_with_dp_none_one_huge_update_moves_the_model_by_at_most_the_default_clip(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("noclip"), report_goal=2, over_selection_rate=0.5, rounds=1)
    assert task.phase.dp.mechanism is None or task.phase.dp.mechanism.value == "NONE"  # type: ignore[union-attr]
    client, rng = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30), np.random.default_rng(5)
    huge = [np.full(w.shape, 1e30, np.float32) for w in task.initial]
    honest = random_delta(task, rng)
    for delta in (huge, honest):
        run = run_device(client, task.population, make_update(task, delta, seed=1)[0])
        assert run.upload_status == 200
    task.wait_round(1)
    after = task.checkpoint_weights(1)
    assert all(np.isfinite(w).all() for w in after)
    moved = math.sqrt(sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(after, task.initial)))
    honest_norm = math.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in honest))
    # FedAvg over the report goal: (clip(huge) + honest) / 2, the huge update clipped to norm 10.
    assert moved <= (DEFAULT_CLIP_NORM + honest_norm) / 2 + 1e-3


def test_epsilon_at_noise_0_01_is_accounted_by_the_aggregator_within_seconds(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("lownoise"), report_goal=2, over_selection_rate=0.5, rounds=1,
                             dp=DpParams(mechanism="FIXED_GAUSSIAN", noise_multiplier=0.01, clip_norm=1.0),
                             target_epsilon=1e9)
    client, rng = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30), np.random.default_rng(6)
    for seed in range(2):
        assert run_device(client, task.population, make_update(task, random_delta(task, rng), seed=seed)[0]
                          ).upload_status == 200
    started = time.monotonic()
    task.wait_round(1, timeout_s=120)  # the PLD accountant took > 10 min here
    assert time.monotonic() - started < 120
    epsilon = task.record().epsilon_spent
    assert math.isfinite(epsilon) and epsilon > 0
