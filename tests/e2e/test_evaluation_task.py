"""End to end: TRAINING_AND_EVAL on the local stack — evaluation rounds follow training.

The builder creates the task pair; the scheduler (run by every round-completed event
locally) opens an evaluation round on a completed training checkpoint; devices sent there
evaluate it and upload metric statistics only; the aggregator writes
``server/client_work/eval/<metric>`` at the evaluation task's layout. The metric must equal a
central evaluation of that checkpoint on the same examples.
"""
from __future__ import annotations

import json
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
from fedcompute.learning import client_training, metric_stats
from fedcompute.learning.tensor_codec import decode_bundle

pytestmark = pytest.mark.e2e

CONFIG = """
population_name: "{population}"
mode: TRAINING_AND_EVAL
policies {{
  model_release_policy {{ num_max_training_rounds: 2 population_size: 1000 }}
  dataset_policy {{ batch_size: 10 }}
}}
federated_learning {{
  learning_process {{
    type: FED_AVG client_optimizer: SGD client_learning_rate: 0.1 server_optimizer: SGD server_learning_rate: 1
    runtime_config {{ report_goal: 2 }}
    metrics {{ name: "sparse_categorical_accuracy" }}
  }}
  evaluation {{
    checkpoint_selector: "every_1_round"
    evaluation_traffic: 0.5
    report_goal: 2
  }}
}}
differential_privacy {{ type: FIXED_GAUSSIAN noise_multiplier: 0 clip_norm: 1000 }}
"""


def _model():
    import tensorflow as tf

    return tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(8, 8, 1)), tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(10, activation="softmax")])


def test_eval_rounds_evaluate_training_checkpoints(local_stack, tmp_path: Path) -> None:
    import tensorflow as tf

    from fedcompute.models.functional import save_functional_model

    model_dir = tmp_path / "model"
    save_functional_model(_model, (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None, 1], tf.int64)),
                          tf.keras.losses.SparseCategoricalCrossentropy(), str(model_dir))
    population = f"evaltask_{int(time.time() * 1000)}"
    (tmp_path / "task.pbtxt").write_text(CONFIG.format(population=population))
    build = subprocess.run([str(Path(sys.executable).parent / "task_builder_client"),
                            f"--task_builder_server={local_stack.urls['task_builder']}", f"--saved_model={model_dir}",
                            f"--task_config={tmp_path / 'task.pbtxt'}", "--skip_flex_ops_check", "--skip_dp_check"],
                           capture_output=True, text=True, env={**local_stack.env(), "PATH": "/usr/bin:/bin"})
    assert build.returncode == 0, build.stderr
    settings = local_stack.settings
    management = TaskManagementClient(settings.task_management_url)
    tasks = {t.info.WhichOneof("info"): t for t in management.list_tasks(population)}
    training, evaluation = tasks["training_info"], tasks["evaluation_info"]
    assert evaluation.info.evaluation_info.training_task_id == training.task_id

    images, labels = load_digits()
    x, y = images[:30], labels[:30].reshape(-1, 1)  # every device holds the same examples
    devices = [SimulatedDevice(i, ArrayApp(x, y), rng=random.Random(i)) for i in range(6)]
    blobs = GcsBlobStore(local_stack.clients.storage)
    eval_metrics = layout.metrics_path(population, evaluation.task_id, 1)
    fleet = Fleet(devices, DeviceHttpClient(settings.task_assignment_url), population, workers=2,
                  interval=TrainingInterval(minimum_interval_s=1.0), time_scale=0.01)
    stats = fleet.run(lambda _: blobs.exists(settings.model_bucket, eval_metrics), timeout_s=300)
    assert stats.outcomes["UPLOADED"] >= 4, stats

    metrics = json.loads(blobs.read(settings.model_bucket, eval_metrics))
    evaluated = int(metrics["server/evaluation/training_round"])
    assert evaluated >= 1
    named, _ = decode_bundle(blobs.read(settings.model_bucket,
                                        layout.client_checkpoint_path(population, training.task_id, evaluated)))
    model = client_training.load_model(model_dir)
    central = client_training.evaluate_on_device(model, [np.asarray(a) for _, a in named],
                                                 client_training.batches_from_arrays(x, y, 10),
                                                 ["sparse_categorical_accuracy"])
    expected = metric_stats.finalize("sparse_categorical_accuracy", central["sparse_categorical_accuracy"])
    assert metrics["server/client_work/eval/sparse_categorical_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert not blobs.exists(settings.model_bucket, layout.checkpoint_path(population, evaluation.task_id, 1))
