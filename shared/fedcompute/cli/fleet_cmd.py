"""``fedcompute fleet run``: simulated devices checking in to a population."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fleet", help="run simulated devices against a server")
    sub = parser.add_subparsers(dest="fleet_command", metavar="COMMAND")
    run = sub.add_parser("run", help="devices train on a dataset partition until the task completes",
                         description="Simulated ODP devices: check in, train per the plan, upload.")
    run.add_argument("--population", required=True, help="population_name of the task")
    run.add_argument("--devices", type=int, default=100)
    run.add_argument("--dataset", choices=("fashion_mnist", "digits"), default="fashion_mnist")
    run.add_argument("--partition", choices=("dirichlet", "shards", "iid"), default="dirichlet")
    run.add_argument("--alpha", type=float, default=0.5)
    run.add_argument("--version-code", default="341912000", help="ODP module version the devices report")
    run.add_argument("--runtime", choices=("auto", "tflite", "tensorflow"), default="auto",
                     help="how devices execute the plan: its TFLite model (tflite), its SavedModel in full "
                          "TensorFlow (tensorflow), or auto: TFLite when the plan's Flex ops are in the flex-ops table")
    run.add_argument("--workers", type=int, default=2, help="devices computing at once (threads, one process)")
    run.add_argument("--processes", type=int, default=0,
                     help="worker processes, each loading the model once and serving many devices "
                          "(0: threads in this process); for thousands of devices")
    run.add_argument("--threads", type=int, default=6, help="sessions at once per worker process (--processes)")
    run.add_argument("--examples-per-device", type=int, default=0,
                     help="exactly this many examples per device (IID; 0: split the whole dataset)")
    run.add_argument("--time-scale", type=float, default=0.05, help="simulated seconds -> real seconds")
    run.add_argument("--min-interval", type=float, default=60.0, help="TrainingInterval minimum interval (s)")
    run.add_argument("--one-time", action="store_true", help="scheduling mode 1: each device trains once")
    run.add_argument("--sessions", type=int, default=0, help="stop after this many uploads (0: until done)")
    run.add_argument("--timeout", type=float, default=3600.0)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=run_fleet)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])


def run_fleet(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedcompute.adapters.task_management_client import TaskManagementClient
    from fedcompute.fleet.population import make_devices
    from fedcompute.fleet.protocol import DeviceHttpClient
    from fedcompute.fleet.runner import Fleet, TrainingInterval
    from fedcompute.settings import Settings

    settings = Settings.from_env()
    if not settings.task_assignment_url:
        print("error: FEDCOMPUTE_TASK_ASSIGNMENT_URL is not set (run `eval \"$(fedcompute stack env)\"` "
              "for the local stack)", file=sys.stderr)
        return 2
    if args.processes > 0:
        return _run_processes(args, settings)
    if args.dataset == "digits":
        from fedcompute.data.digits import load_digits

        images, labels = load_digits(image_size=28)
    else:
        from fedcompute.data.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
    devices = make_devices(images, labels, args.devices, args.partition, alpha=args.alpha, seed=args.seed,
                           version_code=args.version_code, runtime=args.runtime)
    fleet = Fleet(devices, DeviceHttpClient(settings.task_assignment_url), args.population, workers=args.workers,
                  interval=TrainingInterval(args.min_interval, 1 if args.one_time else 2), time_scale=args.time_scale)
    management = TaskManagementClient(settings.task_management_url, api_key=settings.api_key) \
        if settings.task_management_url else None
    bar = tqdm(desc="uploads", unit="upload", dynamic_ncols=True)

    def on_session(outcome, stats) -> None:
        if outcome.status == "UPLOADED":
            bar.update(1)
        bar.set_postfix(dict(stats.outcomes.items()), refresh=False)

    with fleet:
        stats = fleet.run(_until(args, management), timeout_s=args.timeout, on_session=on_session, poll_s=2.0)
    bar.close()
    print(f"sessions: {dict(stats.outcomes)}; uploads per (task, round): {dict(stats.uploads)}")
    return 0


def _run_processes(args: argparse.Namespace, settings) -> int:
    """The worker-process fleet: the devices' data is rebuilt in each worker from a PopulationSpec."""
    from fedcompute.adapters.task_management_client import TaskManagementClient
    from fedcompute.fleet.population import PopulationSpec
    from fedcompute.fleet.runner import ProcessFleet, TrainingInterval
    from fedcompute.fleet.workers import HttpRunnerFactory

    spec = PopulationSpec(num_devices=args.devices, dataset=args.dataset, partition=args.partition, alpha=args.alpha,
                          seed=args.seed, examples_per_device=args.examples_per_device,
                          version_code=args.version_code)
    fleet = ProcessFleet(args.devices, HttpRunnerFactory(settings.task_assignment_url, args.population, spec),
                         processes=args.processes, threads=args.threads,
                         interval=TrainingInterval(args.min_interval, 1 if args.one_time else 2),
                         time_scale=args.time_scale, seed=args.seed, progress="devices")
    management = TaskManagementClient(settings.task_management_url, api_key=settings.api_key) \
        if settings.task_management_url else None
    stats = fleet.run(_until(args, management), timeout_s=args.timeout, poll_s=2.0)
    cost = fleet.cost
    print(f"sessions: {dict(stats.outcomes)}; uploads per (task, round): {dict(stats.uploads)}")
    print("per session (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in cost.per_session_ms().items())
          + f"; CPU share outside training {cost.cpu_share_outside_training:.0%}")
    return 0


def _until(args: argparse.Namespace, management: Any) -> Callable[[Any], bool]:
    """Stop after --sessions uploads, or when the population has no OPEN task any more."""

    def until(stats: Any) -> bool:
        if args.sessions and stats.outcomes["UPLOADED"] >= args.sessions:
            return True
        if management is None:
            return False
        tasks = management.list_tasks(args.population)
        return bool(tasks) and all(t.status != 1 for t in tasks)  # nothing OPEN any more

    return until
