"""Durable local state: stop the stack mid-task, start it again, and the fleet finishes the task.

A private stack (its own state dir); the task is built through the ``fedcompute.client`` API.
After round 1 the fleet stops and the stack goes down (Firestore exported to the state dir,
objects already on disk under fake-gcs-server's filesystem root); the restarted stack has
the task, its round-1 checkpoint and metrics, and a new fleet completes the remaining rounds.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from fedcompute import layout
from fedcompute.client import Client
from fedcompute.data.digits import load_digits
from fedcompute.fleet import ArrayApp, DeviceHttpClient, Fleet, SimulatedDevice, TrainingInterval
from fedcompute.stack import LocalStack
from support.helpers import function_log_entries

ROUNDS = 3
CONFIG = """
population_name: "durable"
mode: TRAINING_ONLY
policies {{
  model_release_policy {{ num_max_training_rounds: {rounds} population_size: 1000 }}
  dataset_policy {{ batch_size: 10 }}
}}
federated_learning {{
  learning_process {{
    type: FED_AVG client_optimizer: SGD client_learning_rate: 0.1 server_optimizer: SGD server_learning_rate: 1
    runtime_config {{ report_goal: 2 }}
    metrics {{ name: "sparse_categorical_accuracy" }}
  }}
}}
"""


def _fleet(client: Client, population: str) -> Fleet:
    images, labels = load_digits()
    x, y = images[:30], labels[:30].reshape(-1, 1)
    devices = [SimulatedDevice(i, ArrayApp(x, y), rng=random.Random(i)) for i in range(4)]
    return Fleet(devices, DeviceHttpClient(client.settings.task_assignment_url), population, workers=2,
                 interval=TrainingInterval(minimum_interval_s=1.0), time_scale=0.01)


def _start(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Client:
    stack.start()
    for key, value in stack.env().items():  # the clients read the emulator hosts from the environment
        monkeypatch.setenv(key, value)
    return Client(stack.settings_for_clients())


def test_stack_restarted_mid_task_keeps_its_state_and_the_fleet_finishes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    import tensorflow as tf

    from fedcompute.models.functional import save_functional_model

    save_functional_model(lambda: tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(8, 8, 1)),
                                                       tf.keras.layers.Flatten(),
                                                       tf.keras.layers.Dense(10, activation="softmax")]),
                          (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None, 1], tf.int64)),
                          tf.keras.losses.SparseCategoricalCrossentropy(), str(tmp_path / "model"))
    (tmp_path / "task.pbtxt").write_text(CONFIG.format(rounds=ROUNDS))
    stack = LocalStack(tmp_path / "state", task_builder_port=0)
    try:
        client = _start(stack, monkeypatch)
        built = client.build_task(tmp_path / "model", tmp_path / "task.pbtxt", skip_flex_ops_check=True,
                                  skip_dp_check=True)
        population, task_id = built.population, built.training_task_id
        bucket = client.settings.model_bucket
        with _fleet(client, population) as fleet:  # until round 1 is done and round 2 open
            fleet.run(lambda _: client.get_task(population, task_id).current_round >= 2, timeout_s=300)
        before = client.get_task(population, task_id)
        assert 2 <= before.current_round <= ROUNDS and before.status == 1  # OPEN, mid-task
        metrics_1 = client.round_metrics(population, task_id, 1)
        # A build and a TensorFlow round ran: the heavy functions' logs are JSON lines too.
        for name in stack.functions:  # every line parses (raises otherwise) ...
            function_log_entries(stack.log_path(name))
        for name in ("task_builder", "aggregator", "result_ingestion"):  # ... and these logged the work
            assert function_log_entries(stack.log_path(name)), name

        stack.stop()
        assert stack.leftover_processes() == []
        assert stack.latest_firestore_export() is not None

        with caplog.at_level(logging.INFO, logger="fedcompute.stack.local"):
            client = _start(stack, monkeypatch)  # new ports, same data
        # The start waited until the emulator had loaded the saved documents (it loads them on
        # the first read, which otherwise hangs the first request for as long as that takes).
        assert any("Firestore data loaded" in r.getMessage() for r in caplog.records)
        after = client.get_task(population, task_id)
        # Uploads in flight when the fleet stopped may still close the current round before the
        # stack stops: the task resumes where it was, or one round on; never behind.
        assert (after.status, after.total_iteration) == (1, ROUNDS)
        assert before.current_round <= after.current_round <= min(before.current_round + 1, ROUNDS)
        assert client.round_metrics(population, task_id, 1) == metrics_1
        assert client.blobs.exists(bucket, layout.checkpoint_path(population, task_id, 1))

        def finished(_: object) -> bool:
            return client.get_task(population, task_id).status != 1

        with _fleet(client, population) as fleet:
            stats = fleet.run(finished, timeout_s=300)
        done = client.get_task(population, task_id)
        assert done.status == 2, (done, stats)  # COMPLETED
        assert client.metrics(population, task_id).rounds == tuple(range(1, ROUNDS + 1))
        assert client.blobs.exists(bucket, layout.client_checkpoint_path(population, task_id, ROUNDS))
    finally:
        stack.stop()
        assert stack.leftover_processes() == []
