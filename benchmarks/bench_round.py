"""One training round of the seed's CNN at N devices/round: local stack vs TFF simulation.

    .venv/bin/python benchmarks/bench_round.py [--devices 100] [--examples 100]

Starts a private local stack (emulators + functions), builds the task with
task_builder_client, runs N one-time devices (Fashion-MNIST, IID, EXAMPLES each, batch
20, 1 epoch, client SGD 0.1) through check-in, training, upload, ingestion and DP-free
aggregation, and times first check-in -> round COMPLETED. Then runs one round of TFF's
``build_unweighted_fed_avg`` on the same clients' data in the same process and prints both
wall times and their ratio.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CONFIG = """
population_name: "bench_round"
mode: TRAINING_ONLY
policies {{ model_release_policy {{ num_max_training_rounds: 1 population_size: 100000 }}
           dataset_policy {{ batch_size: 20 }} }}
federated_learning {{ learning_process {{
  type: FED_AVG client_optimizer: SGD client_learning_rate: 0.1 server_optimizer: SGD server_learning_rate: 1
  runtime_config {{ report_goal: {goal} over_selection_rate: 0 }}
  metrics {{ name: "sparse_categorical_accuracy" }} }} }}
differential_privacy {{ type: FIXED_GAUSSIAN noise_multiplier: 0 clip_norm: 100 }}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import numpy as np

    from fedcompute.adapters.task_management_client import TaskManagementClient
    from fedcompute.data.fashion_mnist import load_fashion_mnist
    from fedcompute.fleet.device import ArrayApp, SimulatedDevice
    from fedcompute.fleet.protocol import DeviceHttpClient
    from fedcompute.fleet.runner import Fleet, TrainingInterval
    from fedcompute.models.emnist_cnn import create_original_fedavg_cnn_model, input_spec_type1, loss
    from fedcompute.models.functional import load_functional_model, save_functional_model
    from fedcompute.settings import Settings
    from fedcompute.stack import LocalStack

    work = Path(tempfile.mkdtemp(prefix="bench-round-"))
    images, labels = load_fashion_mnist("train")
    parts = [np.arange(i * args.examples, (i + 1) * args.examples) for i in range(args.devices)]
    model_dir = work / "model"
    save_functional_model(lambda: create_original_fedavg_cnn_model(seed=0), input_spec_type1(), loss(), str(model_dir))
    stack = LocalStack(work / "stack", task_builder_port=0)
    stack.start()
    try:
        os.environ.update(stack.env())
        settings = Settings.from_env()
        (work / "task.pbtxt").write_text(CONFIG.format(goal=args.devices))
        subprocess.run([str(Path(sys.executable).parent / "task_builder_client"),
                        f"--task_builder_server={stack.urls['task_builder']}", f"--saved_model={model_dir}",
                        f"--task_config={work / 'task.pbtxt'}", "--skip_flex_ops_check", "--skip_dp_check"],
                       check=True, capture_output=True)
        management = TaskManagementClient(settings.task_management_url)
        task = management.list_tasks("bench_round")[0]
        devices = [SimulatedDevice(i, ArrayApp(images[p], labels[p].reshape(-1, 1)), rng=random.Random(i))
                   for i, p in enumerate(parts)]
        fleet = Fleet(devices, DeviceHttpClient(settings.task_assignment_url), "bench_round", workers=args.workers,
                      interval=TrainingInterval(scheduling_mode=1), time_scale=0.01)
        # Warm the device side (TF import, model load, tracing) outside the timed round.
        from fedcompute.learning import client_training

        client_training.load_model(model_dir)
        started = time.perf_counter()
        fleet.run(lambda _: False, timeout_s=1800)
        while management.get_task("bench_round", task.task_id).status != 2:
            time.sleep(0.2)
        stack_s = time.perf_counter() - started
    finally:
        stack.stop()

    import tensorflow as tf
    import tensorflow_federated as tff

    functional = load_functional_model(str(model_dir))
    process = tff.learning.algorithms.build_unweighted_fed_avg(
        functional, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))
    datasets = [tf.data.Dataset.from_tensor_slices((images[p], labels[p].reshape(-1, 1))).batch(20) for p in parts]
    state = process.initialize()
    process.next(state, datasets[:2])  # warm-up (tracing), like the stack's warmed device side
    started = time.perf_counter()
    process.next(state, datasets)
    tff_s = time.perf_counter() - started
    from fedcompute.models.functional import kill_tff_worker_children

    kill_tff_worker_children()
    print(f"one round, {args.devices} devices x {args.examples} examples, 1,663,370-parameter CNN")
    print(f"  local stack (check-in -> upload -> ingestion -> aggregation): {stack_s:.1f} s")
    print(f"  TFF simulation (build_unweighted_fed_avg, same clients):     {tff_s:.1f} s")
    print(f"  ratio stack / TFF: {stack_s / tff_s:.2f}x")
    print("rerun: .venv/bin/python benchmarks/bench_round.py --devices", args.devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
