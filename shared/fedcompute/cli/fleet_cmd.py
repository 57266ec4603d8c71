"""``fedcompute fleet run``: simulated devices checking in to a population."""
from __future__ import annotations

import argparse
import sys


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
    run.add_argument("--workers", type=int, default=2, help="devices computing at once")
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
    if args.dataset == "digits":
        from fedcompute.data.digits import load_digits

        images, labels = load_digits(image_size=28)
    else:
        from fedcompute.data.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
    devices = make_devices(images, labels, args.devices, args.partition, alpha=args.alpha, seed=args.seed,
                           version_code=args.version_code)
    fleet = Fleet(devices, DeviceHttpClient(settings.task_assignment_url), args.population, workers=args.workers,
                  interval=TrainingInterval(args.min_interval, 1 if args.one_time else 2), time_scale=args.time_scale)
    management = TaskManagementClient(settings.task_management_url, api_key=settings.api_key) \
        if settings.task_management_url else None
    bar = tqdm(desc="uploads", unit="upload", dynamic_ncols=True)

    def on_session(outcome, stats) -> None:
        if outcome.status == "UPLOADED":
            bar.update(1)
        bar.set_postfix(dict(stats.outcomes.items()), refresh=False)

    def until(stats) -> bool:
        if args.sessions and stats.outcomes["UPLOADED"] >= args.sessions:
            return True
        if management is None:
            return False
        tasks = management.list_tasks(args.population)
        return bool(tasks) and all(t.status != 1 for t in tasks)  # nothing OPEN any more

    stats = fleet.run(until, timeout_s=args.timeout, on_session=on_session, poll_s=2.0)
    bar.close()
    print(f"sessions: {dict(stats.outcomes)}; uploads per (task, round): {dict(stats.uploads)}")
    return 0
