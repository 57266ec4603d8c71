"""Every DP aggregator of the seed's config runs whole rounds on the local stack.

ADAPTIVE_GAUSSIAN, TREE_AGGREGATION and ADAPTIVE_TREE carry their state (clip estimate,
tree buffers) from round to round in the checkpoint; each round is aggregated by the real
aggregator function with noise, and the privacy ledger records ε after every round.
"""
from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

from fedcompute.dp import DpParams
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.tasks.records import TaskStatus
from support.tasks import create_numpy_task, make_update, random_delta, run_device, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("mechanism", ["ADAPTIVE_GAUSSIAN", "TREE_AGGREGATION", "ADAPTIVE_TREE"])
def test_mechanism_runs_three_rounds_with_state_in_the_checkpoint(local_stack, mechanism: str) -> None:
    task = create_numpy_task(
        local_stack, f"dp-{mechanism.lower().replace('_', '-')}-{uuid.uuid4().hex[:8]}", report_goal=2,
        over_selection_rate=0.5, rounds=3, target_epsilon=1e9,
        dp=DpParams(mechanism=mechanism, noise_multiplier=0.05, clip_norm=0.5, init_clip_norm=0.5,
                        target_unclipped_quantile=0.5, clip_learning_rate=0.2),
    )
    client = DeviceHttpClient(local_stack.settings.task_assignment_url)
    rng = np.random.default_rng(3)
    metrics = []
    for round_number in (1, 2, 3):
        for i in range(task.report_goal):
            payload, _ = make_update(task, random_delta(task, rng), seed=10 * round_number + i)
            run = run_device(client, task.population, payload)
            assert run.upload_status == 200, run
        task.wait_round(round_number, timeout_s=180)
        metrics.append(task.round_metrics(round_number))
    wait_until(lambda: task.record().status == TaskStatus.COMPLETED, 60, what="task completed")
    epsilons = [m["server/privacy/epsilon"] for m in metrics]
    assert all(math.isfinite(e) and e > 0 for e in epsilons) and epsilons == sorted(epsilons)
    clips = [m["server/aggregator/clip_norm"] for m in metrics]
    if mechanism == "ADAPTIVE_GAUSSIAN":
        # Round t clips at the estimate round t-1 produced (stored in the checkpoint).
        assert clips[0] == pytest.approx(0.5)
        assert clips[1:] == [pytest.approx(m["server/aggregator/next_clip_norm"]) for m in metrics[:-1]]
        assert len(set(clips)) == 3
    elif mechanism == "ADAPTIVE_TREE":
        # The tree keeps one clip until its restart (TFF's default period is 1024 rounds).
        assert clips == [pytest.approx(0.5)] * 3
        assert all(0.0 <= m["server/aggregator/unclipped_fraction"] <= 1.0 for m in metrics)
    else:
        assert clips == [pytest.approx(0.5)] * 3
    weights = [task.checkpoint_weights(r) for r in (1, 2, 3)]
    assert all(not np.allclose(a[0], b[0]) for a, b in zip(weights, weights[1:]))
