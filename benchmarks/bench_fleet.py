"""The fleet at scale: device round trips per second for the small model, and where the CPU goes.

    .venv/bin/python benchmarks/bench_fleet.py [--devices 2000] [--report-goal 200] [--rounds 3]
        [--processes 2] [--threads 6] [--noise 1.0]

Starts a private local stack, saves the small model (logistic regression, 7,850
parameters), builds a FIXED_GAUSSIAN task (population_size = --devices, 6 Fashion-MNIST
examples per device) and runs a :class:`~fedcompute.fleet.runner.ProcessFleet` until the
task's rounds are done. Prints, from that one run:

* device sessions/s and round trips/s (sessions that checked in, trained, reported and
  uploaded), rounds per minute;
* mean wall milliseconds per session: check-in, download (cache misses only), report,
  upload, training, whole session;
* CPU: the fleet worker processes' total CPU time (``getrusage(RUSAGE_CHILDREN)`` around the
  run), the part spent training (thread CPU inside the device's training call), the share
  outside training; and the local stack's CPU (emulators + functions) in the same interval.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import own_cpu_s, tree_cpu_s  # noqa: E402


def _stack_cpu_s() -> float:
    """CPU seconds of every process this one started (the stack and the fleet's workers)."""
    return tree_cpu_s(os.getpid()) - own_cpu_s()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--report-goal", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from fedcompute import private_demo as demo

    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    options = demo.PrivateDemoOptions(
        devices=args.devices, report_goal=args.report_goal, rounds=args.rounds, noise=args.noise,
        target_epsilon=1e3, processes=args.processes, threads=args.threads, out_dir=work, state_dir=work / "stack",
        task_builder_port=0, keep_stack=False)
    stack = demo._Stack(options)
    try:
        model_dir = demo.save_model(work / "model", 0)
        population = f"bench_fleet_{int(time.time())}"
        config = demo.write_config(work / "config.pbtxt", options, population, args.noise)
        task_id, _ = demo.build_task(stack, model_dir, config, population, skip_dp_check=True)
        stack_before = _stack_cpu_s()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Started after the build so that RUSAGE_CHILDREN holds the workers' whole life.
        fleet = demo.train(stack, options, demo.make_fleet(stack, options, population, "bench"), population, task_id,
                           "bench")
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stack_cpu = _stack_cpu_s() - stack_before
    finally:
        stack.local.stop()
    workers_cpu = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime
                                                                          + children_before.ru_stime)
    wall = fleet["wall_time_s"]
    sessions = sum(fleet["sessions"].values())
    per = fleet["per_session_ms"]
    training_cpu = fleet["training_cpu_s"]
    result = {
        "devices": args.devices, "report_goal": args.report_goal, "rounds": args.rounds,
        "processes": args.processes, "threads": args.threads, "wall_s": wall, "sessions": fleet["sessions"],
        "sessions_per_s": round(sessions / wall, 1), "round_trips_per_s": fleet["uploads_per_s"],
        "rounds_per_min": round(60 * args.rounds / wall, 2), "per_session_ms": per,
        "worker_cpu_s": round(workers_cpu, 1), "training_cpu_s": round(training_cpu, 1),
        "worker_cpu_share_outside_training": round(1 - training_cpu / workers_cpu, 3) if workers_cpu else None,
        "session_thread_cpu_share_outside_training": fleet["cpu_share_outside_training"],
        "stack_cpu_s": round(stack_cpu, 1), "origin_downloads": fleet["origin_downloads"],
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
