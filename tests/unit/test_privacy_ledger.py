"""The privacy ledger: ε after every round, and the task stops before the budget is exceeded."""
from __future__ import annotations

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.dp import DpParams
from fedcompute.learning.tensor_codec import encode_client_update
from fedcompute.learning.upload_contract import metric_statistics_spec
from fedcompute.plans import ServerPhase
from fedcompute.services import aggregator
from fedcompute.settings import Settings
from fedcompute.taskbuilder.artifacts import artifacts_from_weights, publish_artifacts, weight_specs
from fedcompute.tasks.records import (
    AssignmentRecord,
    AssignmentStatus,
    RoundKey,
    RoundRecord,
    RoundStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
)
from fedcompute.tensor_spec import TensorSpec

SETTINGS = Settings()
GOAL, POPULATION_SIZE, NOISE, ROUNDS = 4, 200, 1.0, 10


def _independent_epsilon(rounds: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(GOAL / POPULATION_SIZE, dp_accounting.GaussianDpEvent(NOISE)), rounds)
    return pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ledger_records_epsilon_and_stops_before_the_target_is_exceeded(store, blobs, events):
    delta = 1.0 / POPULATION_SIZE
    eps2, eps3 = _independent_epsilon(2, delta), _independent_epsilon(3, delta)
    target = (eps2 + eps3) / 2  # round 3 would exceed it
    initial = [np.zeros((3, 2), np.float32)]
    phase = ServerPhase(learning_algo="FED_AVG", server_optimizer="SGD", server_learning_rate=1.0, report_goal=GOAL,
                        over_selection_rate=0.0, total_rounds=ROUNDS, population_size=POPULATION_SIZE,
                        target_epsilon=target, delta=delta,
                        dp=DpParams("FIXED_GAUSSIAN", NOISE, 1.0, noise_seed=1),
                        weights=weight_specs(initial), metrics=("loss",))
    task = store.create_task("p", lambda tid: TaskRecord(
        population="p", task_id=tid, kind=TaskKind.TRAINING, status=TaskStatus.OPEN, report_goal=GOAL,
        over_selection_rate=0.0, total_rounds=ROUNDS, current_round=1, metrics=("loss",),
        update_spec=(TensorSpec("trainable/0", (3, 2), "float32"),), noise_secret="00" * 32))
    publish_artifacts(blobs, SETTINGS, "p", task.task_id, artifacts_from_weights(phase, initial))
    stats = {name: np.ones(shape, np.float64) for name, shape, _ in metric_statistics_spec(("loss",))}
    rounds_run = []
    for n in range(1, ROUNDS + 1):
        key = RoundKey("p", task.task_id, n)
        if store.get_task("p", task.task_id).status != TaskStatus.OPEN:
            break
        store.create_round(RoundRecord("p", task.task_id, n, RoundStatus.COLLECTING, GOAL, GOAL))
        for i in range(GOAL):
            aid = f"a{n}-{i}"
            store.create_assignment(AssignmentRecord(aid, "p", task.task_id, n, AssignmentStatus.UPLOAD_COMPLETED,
                                                     "1", i, 0.0, 0.0))
            blobs.write(SETTINGS.gradient_bucket, layout.gradient_path("p", task.task_id, n, aid),
                        encode_client_update([("trainable/0", np.full((3, 2), 0.1, np.float32))], 5, stats))
        store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
        outcome = aggregator.aggregate_round(store, blobs, events, SETTINGS, key)
        assert outcome.status == "AGGREGATED"
        assert outcome.metrics["server/privacy/epsilon"] == pytest.approx(_independent_epsilon(n, delta), rel=1e-9)
        assert outcome.metrics["server/privacy/delta"] == delta
        rounds_run.append(n)
    final = store.get_task("p", task.task_id)
    assert rounds_run == [1, 2]
    assert final.status == TaskStatus.COMPLETED
    assert "privacy budget reached: round 3 would spend" in final.status_reason
    assert final.epsilon_spent == pytest.approx(eps2, rel=1e-9)
