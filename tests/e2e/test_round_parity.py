"""End to end: one round through the whole local stack equals one round of TFF FedAvg.

Task built by the real ``task_builder_client``, devices of the fleet simulator check in
over the ODP protocol, train, upload; ingestion closes the round; the aggregator writes the
checkpoint. With DP noise 0 and a clip that never binds, the new weights must equal TFF's
``build_unweighted_fed_avg`` (client SGD, server SGD 1.0) on the same initial weights and
the same per-device examples in the same order.
"""
from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.data.digits import load_digits
from fedcompute.fleet.device import ArrayApp, SimulatedDevice
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.fleet.runner import Fleet, TrainingInterval
from fedcompute.learning.tensor_codec import decode_bundle

pytestmark = pytest.mark.e2e

NUM_DEVICES = 4
EXAMPLES_PER_DEVICE = 30
BATCH = 10
CLIENT_LR = 0.1

CONFIG = """
population_name: "{population}"
mode: TRAINING_ONLY
policies {{
  model_release_policy {{ num_max_training_rounds: 1 population_size: 1000 }}
  dataset_policy {{ batch_size: {batch} }}
}}
federated_learning {{
  learning_process {{
    type: FED_AVG
    client_optimizer: SGD
    client_learning_rate: {lr}
    server_optimizer: SGD
    server_learning_rate: 1
    runtime_config {{ report_goal: {goal} over_selection_rate: 0 }}
    metrics {{ name: "sparse_categorical_accuracy" }}
  }}
}}
differential_privacy {{ type: FIXED_GAUSSIAN noise_multiplier: 0 clip_norm: 1000000 }}
"""


def _dense_model():
    import tensorflow as tf

    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(8, 8, 1)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(16, activation="relu", kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1)),
        tf.keras.layers.Dense(10, activation="softmax", kernel_initializer=tf.keras.initializers.GlorotUniform(seed=2)),
    ])


def _input_spec():
    import tensorflow as tf

    return (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None, 1], tf.int64))


def test_one_round_matches_tff_fed_avg(local_stack, tmp_path: Path) -> None:
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedcompute.models.functional import save_functional_model

    model_dir = tmp_path / "model"
    save_functional_model(_dense_model, _input_spec(), tf.keras.losses.SparseCategoricalCrossentropy(), str(model_dir))
    population = f"parity_{int(time.time() * 1000)}"
    config = tmp_path / "task.pbtxt"
    config.write_text(CONFIG.format(population=population, batch=BATCH, lr=CLIENT_LR, goal=NUM_DEVICES))
    build = subprocess.run(
        [str(Path(sys.executable).parent / "task_builder_client"),
         f"--task_builder_server={local_stack.urls['task_builder']}", f"--saved_model={model_dir}",
         f"--task_config={config}", "--skip_flex_ops_check", "--skip_dp_check=true"],
        capture_output=True, text=True, env={**local_stack.env(), "PATH": "/usr/bin:/bin"},
    )
    assert build.returncode == 0, build.stderr
    assert "Success! Tasks are built" in build.stdout

    images, labels = load_digits()
    rng = np.random.default_rng(7)
    order = rng.permutation(len(labels))[: NUM_DEVICES * EXAMPLES_PER_DEVICE]
    shards = [order[i * EXAMPLES_PER_DEVICE:(i + 1) * EXAMPLES_PER_DEVICE] for i in range(NUM_DEVICES)]
    devices = [SimulatedDevice(i, ArrayApp(images[s], labels[s].reshape(-1, 1)), rng=random.Random(i))
               for i, s in enumerate(shards)]
    settings = local_stack.settings
    management = TaskManagementClient(settings.task_management_url)
    task = management.list_tasks(population)[0]
    fleet = Fleet(devices, DeviceHttpClient(settings.task_assignment_url), population, workers=2,
                  interval=TrainingInterval(minimum_interval_s=1.0, scheduling_mode=1), time_scale=0.001)
    stats = fleet.run(lambda _: management.get_task(population, task.task_id).status == 2, timeout_s=240)
    assert stats.outcomes["UPLOADED"] == NUM_DEVICES, stats
    deadline = time.monotonic() + 120  # one-time devices are done; the aggregator may still run
    while management.get_task(population, task.task_id).status != 2:
        assert time.monotonic() < deadline, "the round was not aggregated within 120 s"
        time.sleep(0.5)

    blobs = GcsBlobStore(local_stack.clients.storage)
    named, _ = decode_bundle(blobs.read(settings.model_bucket,
                                        layout.client_checkpoint_path(population, task.task_id, 1)))
    ours = [np.asarray(a) for _, a in named]

    # The same round in TFF's own simulation.
    from fedcompute.models.functional import load_functional_model

    functional = load_functional_model(str(model_dir))  # re-wrapped: TFF's loader lacks metric state
    process = tff.learning.algorithms.build_unweighted_fed_avg(
        functional,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(CLIENT_LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
    )
    datasets = [tf.data.Dataset.from_tensor_slices((images[s], labels[s].reshape(-1, 1))).batch(BATCH)
                for s in shards]
    state = process.initialize()
    initial = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    start = decode_bundle(blobs.read(settings.model_bucket, layout.client_checkpoint_path(population, task.task_id, 0)))[0]
    for a, (_, b) in zip(initial, start):  # both start from the saved model's initial weights
        np.testing.assert_array_equal(a, np.asarray(b))
    state = process.next(state, datasets).state
    theirs = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    assert len(ours) == len(theirs)
    max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
    assert max_diff < 1e-5, f"fedcompute and TFF differ by {max_diff}"
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(initial, theirs)) > 1e-3  # the round did train
