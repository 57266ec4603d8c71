"""``make demo``: the whole seed workflow on one laptop, with progress and a plot.

1. bring up the local stack (emulators + functions), 2. save the seed's EMNIST CNN as a
SavedFunctionalModel, 3. write a task config and build the task with
``task_builder_client`` (the seed's command), 4. run a simulated fleet over a non-IID
Fashion-MNIST partition until the task completes, showing per-round progress and
metrics, 5. evaluate the final checkpoint centrally on the Fashion-MNIST test set, plot
the round metrics and write ``out/demo/summary.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcompute import layout, strict_json
from fedcompute.dp import NO_DP_NAME
from fedcompute.errors import FedComputeError

DP_TYPES = {"fixed": "FIXED_GAUSSIAN", "adaptive": "ADAPTIVE_GAUSSIAN", "tree": "TREE_AGGREGATION",
            "adaptive_tree": "ADAPTIVE_TREE", "none": ""}

CONFIG_TEMPLATE = """\
# Written by `make demo`: the seed's Step 3 config, sized for a laptop fleet.
population_name: "{population}"
mode: {mode}
policies {{
  min_separation_policy {{
    minimum_separation: {min_separation}
  }}
  model_release_policy {{
    num_max_training_rounds: {rounds}
    dp_target_epsilon: {target_epsilon}
    # fedcompute extension: the population the fleet stands in for (DP accounting).
    population_size: {population_size}
  }}
  dataset_policy {{
    batch_size: {batch_size}
    # fedcompute extension: local epochs over each device's examples.
    num_epochs: {epochs}
  }}
}}
federated_learning {{
  learning_process {{
    type: FED_AVG
    client_optimizer: SGD
    client_learning_rate: {client_lr}
    server_optimizer: SGD
    server_learning_rate: {server_lr}
    runtime_config {{
      report_goal: {report_goal}
    }}
    metrics {{
      name: "sparse_categorical_accuracy"
    }}
    metrics {{
      name: "sparse_categorical_crossentropy"
    }}
  }}
{eval_block}}}
{dp_block}"""

EVAL_BLOCK = """  evaluation {{
    checkpoint_selector: "every_1_round"
    evaluation_traffic: {traffic}
    report_goal: {goal}
  }}
"""

DP_BLOCK = """differential_privacy {{
  type: {dp_type}
  noise_multiplier: {noise}
  clip_norm: {clip}
}}
"""


@dataclass
class DemoOptions:
    rounds: int = 12
    devices: int = 200
    report_goal: int = 50
    noise: float = 0.0
    dp: str = "fixed"
    clip_norm: float = 10.0
    client_lr: float = 0.1
    server_lr: float = 1.0
    batch_size: int = 10
    epochs: int = 2
    min_separation: int = 0
    population_size: int = 3_000_000
    target_epsilon: float = 10.0
    partition: str = "dirichlet"
    alpha: float = 0.5
    workers: int = 2
    seed: int = 0
    out_dir: Path = Path("out/demo")
    state_dir: Path = Path(".fedcompute")
    task_builder_port: int = 5000  # the seed's localhost:5000; 0 picks a free port
    keep_stack: bool = True
    evaluation: bool = False  # TRAINING_AND_EVAL: an evaluation task next to the training task
    runtime: str = "auto"  # device runtime: auto | tflite | tensorflow (fedcompute.fleet.runtimes)
    timeout_s: float = 1800.0


@dataclass
class DemoSummary:
    population: str
    task_id: int
    rounds: int
    devices: int
    report_goal: int
    dp_type: str
    noise_multiplier: float
    epsilon: float | None
    delta: float | None
    final_test_accuracy: float
    final_test_loss: float
    round_wall_times_s: list[float] = field(default_factory=list)
    total_wall_time_s: float = 0.0
    fleet_sessions: dict[str, int] = field(default_factory=dict)
    metrics_per_round: list[dict[str, float]] = field(default_factory=list)
    plot: str = ""
    build_time_s: float = 0.0
    device_runtime: str = ""
    device_runtime_reason: str = ""


def _say(message: str) -> None:
    print(message, flush=True)


def run_demo(options: DemoOptions) -> DemoSummary:
    """Run the demo end to end; returns (and writes) the summary."""
    from tqdm import tqdm

    from fedcompute.adapters.blobs import GcsBlobStore
    from fedcompute.adapters.clients import make_clients
    from fedcompute.adapters.task_management_client import TaskManagementClient
    from fedcompute.cli.model_cmd import load_hint
    from fedcompute.settings import Settings
    from fedcompute.stack import LocalStack

    if options.dp not in DP_TYPES:
        raise FedComputeError(f"unknown DP={options.dp!r}", hint=f"use one of {', '.join(DP_TYPES)}")
    started = time.monotonic()
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)

    _say("== 1/5  local stack (Firestore + Pub/Sub emulators, fake-gcs-server, Cloud Functions)")
    stack = LocalStack(options.state_dir, task_builder_port=options.task_builder_port)
    status = stack.start()
    os.environ.update(stack.env())
    _say(f"   healthy in {status.time_to_healthy_s or 0:.1f} s; task builder at {stack.urls['task_builder']}")
    settings = Settings.from_env()
    clients = make_clients(settings)
    blobs = GcsBlobStore(clients.storage)
    management = TaskManagementClient(settings.task_management_url, api_key=settings.api_key)

    _say("== 2/5  SavedFunctionalModel: the seed's EMNIST CNN (1,663,370 parameters)")
    model_dir = out / "emnist_cnn"
    _save_model(model_dir, options.seed)

    population = f"fashion_mnist_{time.strftime('%Y%m%d_%H%M%S')}"
    config_path = out / "task_config.pbtxt"
    dp_type = DP_TYPES[options.dp]
    dp_block = DP_BLOCK.format(dp_type=dp_type, noise=options.noise, clip=options.clip_norm) \
        if dp_type else ""
    config_path.write_text(CONFIG_TEMPLATE.format(
        population=population, rounds=options.rounds, report_goal=options.report_goal, client_lr=options.client_lr,
        server_lr=options.server_lr, batch_size=options.batch_size, epochs=options.epochs, min_separation=options.min_separation,
        population_size=options.population_size, target_epsilon=options.target_epsilon, dp_block=dp_block,
        mode="TRAINING_AND_EVAL" if options.evaluation else "TRAINING_ONLY",
        eval_block=EVAL_BLOCK.format(traffic=0.2, goal=max(2, options.report_goal // 5)) if options.evaluation else ""))
    _say(f"== 3/5  task_builder_client --task_config={config_path} (the seed's step 4)")
    build_started = time.monotonic()
    command = [str(Path(sys.executable).parent / "task_builder_client"),
               f"--task_builder_server={stack.urls['task_builder']}", f"--saved_model={model_dir}",
               f"--task_config={config_path}", "--skip_flex_ops_check=True"]
    if options.noise == 0.0 or not dp_type:
        command.append("--skip_dp_check=True")  # noise 0: no privacy to check; the report still shows epsilon
    result = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        raise FedComputeError(f"the task build failed: {result.stderr.strip()}")
    build_time = time.monotonic() - build_started
    task = next(t for t in management.list_tasks(population) if t.info.WhichOneof("info") == "training_info")
    _say(f"   task {population}/{task.task_id} built in {build_time:.1f} s")
    runtime = _device_runtime(blobs, settings, population, task.task_id, options.runtime, out)
    _say(f"   devices run the {runtime.name} runtime: {runtime.reason}")

    _say(f"== 4/5  fleet: {options.devices} simulated devices, Fashion-MNIST "
         f"({options.partition}{' α=' + str(options.alpha) if options.partition == 'dirichlet' else ''})")
    fleet = _make_fleet(options, settings, population)
    round_times: list[float] = []
    bar = tqdm(total=options.rounds, desc="rounds", unit="round", dynamic_ncols=True)
    state = {"round": 1, "t": time.monotonic(), "done": False}
    lock = threading.Lock()

    def until(_stats: Any) -> bool:
        if not lock.acquire(blocking=False):
            return False  # another thread is checking right now
        try:
            return _check()
        finally:
            lock.release()

    def _check() -> bool:
        current = management.get_task(population, task.task_id)
        completed = current.current_round - 1 if current.status == 1 else current.current_round
        while state["round"] <= completed:
            round_times.append(time.monotonic() - state["t"])
            state["t"] = time.monotonic()
            metrics = _read_metrics(blobs, settings, population, task.task_id, int(state["round"]))
            acc = metrics.get("server/client_work/train/sparse_categorical_accuracy", float("nan"))
            bar.set_postfix(train_acc=f"{acc:.3f}", last_round=f"{round_times[-1]:.1f}s")
            bar.update(1)
            state["round"] += 1
        return current.status != 1  # no longer OPEN

    with fleet:
        stats = fleet.run(until, timeout_s=options.timeout_s, poll_s=1.0)
    bar.close()
    final = management.get_task(population, task.task_id)
    _say(f"   task {final.status_reason or 'finished'}; sessions: {dict(stats.outcomes)}")

    _say("== 5/5  central evaluation of the final checkpoint on the Fashion-MNIST test set")
    last_round = final.current_round if final.status != 1 else final.current_round - 1
    metrics_rows = [_read_metrics(blobs, settings, population, task.task_id, r) for r in range(1, last_round + 1)]
    accuracy, loss = _evaluate(model_dir, blobs, settings, population, task.task_id, last_round)
    epsilon = metrics_rows[-1].get("server/privacy/epsilon") if metrics_rows else None
    delta = metrics_rows[-1].get("server/privacy/delta") if metrics_rows else None
    plot = out / "metrics.png"
    _plot(metrics_rows, plot, f"{population} (noise {options.noise}, {dp_type or 'no DP'})")
    summary = DemoSummary(
        population=population, task_id=task.task_id, rounds=last_round, devices=options.devices,
        report_goal=options.report_goal, dp_type=dp_type or NO_DP_NAME, noise_multiplier=options.noise,
        epsilon=epsilon, delta=delta, final_test_accuracy=accuracy, final_test_loss=loss,
        round_wall_times_s=[round(t, 2) for t in round_times], total_wall_time_s=round(time.monotonic() - started, 1),
        fleet_sessions=dict(stats.outcomes), metrics_per_round=metrics_rows, plot=str(plot),
        build_time_s=round(build_time, 1), device_runtime=runtime.name, device_runtime_reason=runtime.reason,
    )
    (out / "summary.json").write_text(strict_json.dumps(asdict(summary), indent=2))
    figures = _monitoring_figures(blobs, clients, settings, population, task.task_id, out)
    exported = _export_model(blobs, clients, settings, population, task.task_id, last_round, out / "model")
    eps_text = "inf (noise_multiplier 0: no formal privacy)" if epsilon is None or not np.isfinite(epsilon) \
        else f"{epsilon:.4g} (delta {delta:.3g})"
    _say(f"\nfinal test accuracy: {accuracy:.4f}   test loss: {loss:.4f}")
    _say(f"epsilon after {last_round} rounds: {eps_text}")
    _say(f"metrics plot: {plot}\nsummary: {out / 'summary.json'}")
    _say(f"per-metric and operations figures ({len(figures)}): {out / 'metrics'}/, {out / 'ops'}/")
    _say(f"trained model ({len(exported)} formats) in {out / 'model'}/; " + load_hint(exported[0], "keras"))
    _say(f"TensorBoard: fedcompute metrics export --population {population} --task {task.task_id} "
         f"--tensorboard {out / 'tensorboard'} && tensorboard --logdir {out / 'tensorboard'}")
    if "dashboard" in stack.urls:
        _say(f"dashboard: {stack.urls['dashboard']}/?population={population}&task={task.task_id}")
    _say(f"metrics objects: gs://{settings.model_bucket}/{population}/{task.task_id}/<round>/s/0/metrics "
         f"(rounds 1..{last_round})")
    if options.keep_stack:
        _say(f"total wall time {summary.total_wall_time_s:.0f} s; the stack keeps running (make down to stop it)")
    else:
        stack.stop()
        _say(f"total wall time {summary.total_wall_time_s:.0f} s; stack stopped")
    return summary


def _monitoring_figures(blobs: Any, clients: Any, settings: Any, population: str, task_id: int,
                        out: Path) -> list[Path]:
    """The seed's monitoring figures: one PNG per metric, and the three operations graphs."""
    from fedcompute.adapters.firestore_store import FirestoreTaskStore
    from fedcompute.monitoring import metrics as run_metrics
    from fedcompute.monitoring import ops, plots

    run = run_metrics.load_run(blobs, settings.model_bucket, population, task_id)
    figures = plots.plot_metrics(run, out / "metrics")
    for task_ops in ops.load_ops(FirestoreTaskStore(clients.firestore), population, task_id):
        figures += plots.plot_ops(task_ops, out / "ops")
    return [f.path for f in figures]


def _export_model(blobs: Any, clients: Any, settings: Any, population: str, task_id: int, round_number: int,
                  out: Path) -> list[Path]:
    """The final checkpoint as model.keras, saved_model/ and model.tflite under ``out`` (each verified)."""
    import tempfile

    from fedcompute.adapters.firestore_store import FirestoreTaskStore
    from fedcompute.cli.model_cmd import export_trained_model, load_trained_model

    with tempfile.TemporaryDirectory(prefix="fedcompute-export-") as work:
        trained = load_trained_model(FirestoreTaskStore(clients.firestore), blobs, settings.model_bucket, population,
                                     task_id, round_number, Path(work))
        return [export_trained_model(trained, fmt, out).path for fmt in ("keras", "saved_model", "tflite")]


def _save_model(model_dir: Path, seed: int) -> None:
    if (model_dir / "saved_model.pb").exists():
        return
    from fedcompute.models.emnist_cnn import create_original_fedavg_cnn_model, input_spec_type1, loss
    from fedcompute.models.functional import save_functional_model

    save_functional_model(lambda: create_original_fedavg_cnn_model(only_digits=True, seed=seed), input_spec_type1(),
                          loss(), str(model_dir))


def _device_runtime(blobs: Any, settings: Any, population: str, task_id: int, requested: str, out: Path) -> Any:
    """Which runtime the devices use for this task's plan, and why."""
    from fedcompute import layout
    from fedcompute.fleet.runtimes import choose_runtime
    from fedcompute.plans import unpack_client_plan

    plan = blobs.read(settings.model_bucket, layout.client_plan_path(population, task_id))
    return choose_runtime(requested, unpack_client_plan(plan, out / "client_plan"))


def _make_fleet(options: DemoOptions, settings: Any, population: str):
    from fedcompute.data.fashion_mnist import load_fashion_mnist
    from fedcompute.fleet.population import make_devices
    from fedcompute.fleet.protocol import DeviceHttpClient
    from fedcompute.fleet.runner import Fleet, TrainingInterval

    images, labels = load_fashion_mnist("train")
    devices = make_devices(images, labels, options.devices, options.partition, alpha=options.alpha, seed=options.seed,
                           runtime=options.runtime)
    return Fleet(devices, DeviceHttpClient(settings.task_assignment_url), population, workers=options.workers,
                 interval=TrainingInterval(minimum_interval_s=60.0), time_scale=0.05)


def _read_metrics(blobs: Any, settings: Any, population: str, task_id: int, round_number: int) -> dict[str, float]:
    return json.loads(blobs.read(settings.model_bucket, layout.metrics_path(population, task_id, round_number)))


def _evaluate(model_dir: Path, blobs: Any, settings: Any, population: str, task_id: int,
              round_number: int) -> tuple[float, float]:
    from fedcompute.data.fashion_mnist import load_fashion_mnist
    from fedcompute.learning import client_training, metric_stats
    from fedcompute.learning.tensor_codec import decode_bundle

    named, _ = decode_bundle(blobs.read(settings.model_bucket,
                                        layout.client_checkpoint_path(population, task_id, round_number)))
    weights = [np.asarray(a) for _, a in named]
    model = client_training.load_model(model_dir)
    x, y = load_fashion_mnist("test")
    batches = client_training.batches_from_arrays(x, y.reshape(-1, 1), 500)
    stats = client_training.evaluate_on_device(model, weights, batches, ["sparse_categorical_accuracy"])
    accuracy = metric_stats.finalize("sparse_categorical_accuracy", stats["sparse_categorical_accuracy"])
    loss = metric_stats.finalize("loss", stats["loss"])
    return accuracy, loss


def _plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in (rows[0] if rows else {}) if n.startswith("server/client_work/")]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(range(1, len(rows) + 1), [r.get(name, float("nan")) for r in rows], marker="o")
        ax.set_xlabel("round")
        ax.set_title(name.split("/")[-1])
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\ntraining metrics, summed over the round's devices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
