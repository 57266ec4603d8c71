"""Rounds of the seed's CNN on the local stack vs TFF's simulation, in the same run.

    .venv/bin/python benchmarks/bench_round.py --devices 10 --examples 600 --repeats 3 \
        --over-selection 0 0.3 [--profile DIR] [--phases]

Starts a private local stack (emulators + functions), builds one task per over-selection
rate with task_builder_client (CNN, Fashion-MNIST IID, EXAMPLES per device, batch 20,
1 epoch, client SGD 0.1, server SGD 1, no noise), and for each repeat, interleaved, times:

* one stack round per over-selection rate: from the moment the N one-time devices start
  (the round is open) to the round COMPLETED with the next round open (the store's
  ``completed_time``, written in the same transaction that opens the next round): check-in,
  plan/checkpoint download, training, report-result, upload, ingestion, close, round-ready,
  aggregation, checkpoint write;
* one round of TFF's ``build_unweighted_fed_avg`` on the same clients' data (``next`` on a
  warm state: TFF's equivalent of "the next round can start") before the first stack round
  and after every stack round; each stack round's ratio is taken against the mean of the two
  TFF rounds around it (the machine is shared and its load drifts).

Round 1 of every task and one TFF round are warm-ups (TensorFlow imports, tracing, the
aggregator's first run), outside the medians. Prints medians, the ratios stack / TFF per
over-selection rate (of the medians, and the median of the bracketed ratios), and the
per-stage split of each stack round (devices done, ingestion closes the round, aggregation).
``--profile DIR`` records py-spy of the functions and of this process (the fleet) during the
measured rounds and prints their top frames. ``--phases`` times the devices' sessions by phase
(check-in, downloads, training, update encoding, report, upload and its sealing), summed over
the device threads, and prints the medians per measured stack round.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

CONFIG = """
population_name: "{population}"
mode: TRAINING_ONLY
policies {{ model_release_policy {{ num_max_training_rounds: {rounds} population_size: 100000 }}
           dataset_policy {{ batch_size: 20 }} }}
federated_learning {{ learning_process {{
  type: FED_AVG client_optimizer: SGD client_learning_rate: 0.1 server_optimizer: SGD server_learning_rate: 1
  runtime_config {{ report_goal: {goal} over_selection_rate: {over_selection} }}
  metrics {{ name: "sparse_categorical_accuracy" }} }} }}
differential_privacy {{ type: FIXED_GAUSSIAN noise_multiplier: 0 clip_norm: 100 }}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--over-selection", type=float, nargs="+", default=[0.0, 0.3],
                        help="over-selection rates to measure (0.3 is the config default)")
    parser.add_argument("--workers", type=int, default=2, help="device threads in the fleet")
    parser.add_argument("--profile", default="", help="directory for py-spy profiles of the measured rounds")
    parser.add_argument("--phases", action="store_true",
                        help="time the device sessions by phase (thread-seconds per round)")
    args = parser.parse_args()

    import numpy as np
    from bench_load import Profiler, function_pids

    from fedcompute.adapters.clients import make_clients
    from fedcompute.adapters.firestore_store import FirestoreTaskStore
    from fedcompute.adapters.task_management_client import TaskManagementClient
    from fedcompute.data.fashion_mnist import load_fashion_mnist
    from fedcompute.fleet.device import ArrayApp, PlanCache, SimulatedDevice
    from fedcompute.fleet.protocol import DeviceHttpClient
    from fedcompute.fleet.runner import Fleet, TrainingInterval
    from fedcompute.models.emnist_cnn import create_original_fedavg_cnn_model, input_spec_type1, loss
    from fedcompute.models.functional import load_functional_model, save_functional_model
    from fedcompute.settings import Settings
    from fedcompute.stack import LocalStack
    from fedcompute.tasks.records import RoundKey, RoundStatus

    work = Path(tempfile.mkdtemp(prefix="bench-round-"))
    images, labels = load_fashion_mnist("train")
    parts = [np.arange(i * args.examples, (i + 1) * args.examples) for i in range(args.devices)]
    model_dir = work / "model"
    save_functional_model(lambda: create_original_fedavg_cnn_model(seed=0), input_spec_type1(), loss(), str(model_dir))
    rates = list(args.over_selection)
    rounds = args.repeats + 1
    stack = LocalStack(work / "stack", task_builder_port=0)
    stack.start()
    profiler = Profiler(Path(args.profile) if args.profile else None)
    phases = DevicePhases() if args.phases else None
    phase_rounds: list[dict[str, float]] = []
    stack_s: dict[float, list[float]] = {rate: [] for rate in rates}
    stages: dict[float, list[dict[str, float]]] = {rate: [] for rate in rates}
    tff_s: list[float] = []
    ratios: dict[float, list[float]] = {rate: [] for rate in rates}
    try:
        os.environ.update(stack.env())
        settings = Settings.from_env()
        store = FirestoreTaskStore(make_clients(settings).firestore)
        management = TaskManagementClient(settings.task_management_url)
        client = DeviceHttpClient(settings.task_assignment_url)
        tasks: dict[float, tuple[str, int]] = {}
        devices: dict[float, list[SimulatedDevice]] = {}
        for i, rate in enumerate(rates):
            population = f"bench_round_os{i}"
            (work / f"task{i}.pbtxt").write_text(CONFIG.format(population=population, rounds=rounds,
                                                               goal=args.devices, over_selection=rate))
            subprocess.run([str(Path(sys.executable).parent / "task_builder_client"),
                            f"--task_builder_server={stack.urls['task_builder']}", f"--saved_model={model_dir}",
                            f"--task_config={work / f'task{i}.pbtxt'}", "--skip_flex_ops_check", "--skip_dp_check"],
                           check=True, capture_output=True)
            tasks[rate] = (population, management.list_tasks(population)[0].task_id)
            devices[rate] = [SimulatedDevice(d, ArrayApp(images[p], labels[p].reshape(-1, 1)), rng=random.Random(d))
                             for d, p in enumerate(parts)]
        cache = PlanCache()

        def stack_round(rate: float, round_number: int) -> tuple[float, dict[str, float]]:
            population, task_id = tasks[rate]
            key = RoundKey(population, task_id, round_number)
            while (record := store.get_round(key)) is None or record.status != RoundStatus.COLLECTING:
                time.sleep(0.05)
            done: list[float] = []
            if phases is not None:
                phases.reset()
            fleet = Fleet(devices[rate], client, population, workers=args.workers, cache=cache,
                          interval=TrainingInterval(scheduling_mode=1), time_scale=0.01)
            started = time.time()
            stats = fleet.run(lambda _: False, timeout_s=1800,
                              on_session=lambda outcome, _: done.append(time.time()), poll_s=0.05)
            while (record := store.get_round(key)) is None or record.status != RoundStatus.COMPLETED:
                time.sleep(0.02)
            uploads = stats.outcomes["UPLOADED"]
            if phases is not None and round_number > 1:
                phase_rounds.append(phases.snapshot())
            split = {"devices_done": max(done) - started, "closed": record.aggregating_time - started,
                     "completed": record.completed_time - started, "uploads": uploads,
                     "sessions": stats.sessions}
            return record.completed_time - started, split

        import tensorflow as tf
        import tensorflow_federated as tff

        functional = load_functional_model(str(model_dir))
        process = tff.learning.algorithms.build_unweighted_fed_avg(
            functional, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))
        datasets = [tf.data.Dataset.from_tensor_slices((images[p], labels[p].reshape(-1, 1))).batch(20)
                    for p in parts]
        state: Any = process.initialize()

        def tff_round() -> float:
            nonlocal state
            started = time.perf_counter()
            state = process.next(state, datasets).state
            return time.perf_counter() - started

        # Warm-ups: round 1 of each task, one TFF round.
        for rate in rates:
            stack_round(rate, 1)
        tff_round()
        if args.profile:
            for name, pid in function_pids(stack).items():
                profiler.start(name, pid)
            profiler.start("fleet", os.getpid())
        # Every stack round is bracketed by TFF rounds, and its ratio is taken against their mean:
        # the machine is shared, so its load drifts within a repeat.
        tff_s.append(tff_round())
        for repeat in range(args.repeats):
            for rate in rates:
                seconds, split = stack_round(rate, repeat + 2)
                tff_s.append(tff_round())
                ratio = seconds / ((tff_s[-2] + tff_s[-1]) / 2)
                stack_s[rate].append(seconds)
                ratios[rate].append(ratio)
                stages[rate].append(split)
                print(f"  repeat {repeat + 1}, over-selection {rate}: stack {seconds:.2f} s, TFF before/after "
                      f"{tff_s[-2]:.2f}/{tff_s[-1]:.2f} s, ratio {ratio:.2f}x  {_fmt(split)}", flush=True)
        profiles = profiler.stop(top=15) if args.profile else {}
        cache.close()
    finally:
        stack.stop()
        from fedcompute.models.functional import kill_tff_worker_children

        kill_tff_worker_children()

    tff_median = statistics.median(tff_s)
    print(f"\nrounds of the 1,663,370-parameter CNN, {args.devices} devices x {args.examples} examples, batch 20, "
          f"1 epoch; medians of {args.repeats} interleaved repeats")
    print(f"  TFF simulation (build_unweighted_fed_avg, same clients): {tff_median:.2f} s  "
          f"(all: {', '.join(f'{s:.2f}' for s in tff_s)})")
    for rate in rates:
        median = statistics.median(stack_s[rate])
        split = {k: statistics.median(s[k] for s in stages[rate]) for k in stages[rate][0]}
        print(f"  local stack, over-selection {rate}: {median:.2f} s  (all: "
              f"{', '.join(f'{s:.2f}' for s in stack_s[rate])})  ratio of medians {median / tff_median:.2f}x, "
              f"median of bracketed ratios {statistics.median(ratios[rate]):.2f}x "
              f"(all: {', '.join(f'{r:.2f}' for r in ratios[rate])})")
        print(f"    median split from the devices' start: {_fmt(split)}")
    if phase_rounds:
        medians = {name: statistics.median(r.get(name, 0.0) for r in phase_rounds) for name in phase_rounds[0]}
        print(f"\ndevice sessions by phase, thread-seconds per round summed over {args.workers} device threads "
              f"(medians of {len(phase_rounds)} measured rounds): "
              + ", ".join(f"{name} {seconds:.2f}" for name, seconds in medians.items()))
    for name, top in profiles.items():
        print(f"\npy-spy {name}: {top}")
    print(f"\nload average: {os.getloadavg()}")
    print("rerun: .venv/bin/python benchmarks/bench_round.py --devices", args.devices, "--examples", args.examples,
          "--repeats", args.repeats, "--over-selection", *rates)
    return 0


class DevicePhases:
    """Wall time of the simulated devices' session phases, summed over threads: wraps the
    fleet's protocol client, runtime and encoders in place for the rest of the process."""

    def __init__(self) -> None:
        from fedcompute.fleet import protocol, runtimes
        from fedcompute.fleet.device import SimulatedDevice
        from fedcompute.learning import tensor_codec

        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        targets = [(SimulatedDevice, "run_session", "session"),
                   (protocol.DeviceHttpClient, "create_task_assignment", "check-in"),
                   (protocol.DeviceHttpClient, "download", "downloads"),
                   (runtimes.TensorflowRuntime, "train", "training"),
                   (tensor_codec, "encode_client_update", "update encoding"),
                   (protocol.DeviceHttpClient, "report_result", "report"),
                   (protocol.DeviceHttpClient, "upload", "upload"),
                   (protocol, "seal_update", "of which sealing")]
        for owner, attribute, name in targets:
            self._seconds[name] = 0.0
            setattr(owner, attribute, self._timed(getattr(owner, attribute), name))

    def _timed(self, fn: Any, name: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._seconds[name] += time.perf_counter() - started
        return timed

    def reset(self) -> None:
        with self._lock:
            self._seconds = dict.fromkeys(self._seconds, 0.0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


def _fmt(split: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in split.items())


if __name__ == "__main__":
    sys.exit(main())
