"""``fedcompute load``: N synthetic devices against a task_assignment URL; a JSON report."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "load", help="run synthetic devices (the ODP protocol, no TensorFlow) and report rates and latencies",
        description="Each device checks in, downloads the plan and checkpoint, reports COMPLETED and uploads a "
                    "valid zero update of the checkpoint's shapes. Prints (or writes) a JSON report.")
    parser.add_argument("--url", default=None,
                        help="task_assignment base URL (default: FEDCOMPUTE_TASK_ASSIGNMENT_URL, which "
                             "`eval \"$(fedcompute stack env)\"` sets for the local stack)")
    parser.add_argument("--population", required=True, help="population_name of an open task")
    parser.add_argument("--devices", type=int, default=1000, help="device sessions to run (default 1000)")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions in flight at once (default 32)")
    parser.add_argument("--protocol", choices=("full", "check-in"), default="full",
                        help="full: check-in to upload (default); check-in: check-ins only")
    parser.add_argument("--metric", action="append", default=None, metavar="NAME",
                        help="a metric the task's devices report (repeatable; default: loss only)")
    parser.add_argument("--version-code", default="341912000", help="ODP module version the devices report")
    parser.add_argument("--out", default=None, help="write the JSON report here (default: standard output)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcompute.errors import InvalidRequestError
    from fedcompute.load import LoadConfig, run_load

    url = args.url or os.environ.get("FEDCOMPUTE_TASK_ASSIGNMENT_URL", "")
    if not url:
        raise InvalidRequestError("no server to load: --url is not given and FEDCOMPUTE_TASK_ASSIGNMENT_URL is unset",
                                  hint="pass --url http://HOST:PORT of task_assignment, or run "
                                       "`eval \"$(fedcompute stack env)\"` for the local stack")
    if args.devices < 1 or args.concurrency < 1:
        raise InvalidRequestError(f"--devices and --concurrency must be >= 1 (got {args.devices}, "
                                  f"{args.concurrency})", hint="e.g. --devices 1000 --concurrency 32")
    config = LoadConfig(url=url, population=args.population, devices=args.devices, concurrency=args.concurrency,
                        protocol=args.protocol, version_code=args.version_code,
                        metrics=tuple(args.metric or ("loss",)))
    step = max(1, args.devices // 20)

    def progress(done: int) -> None:
        if done % step == 0 or done == args.devices:
            print(f"\r{done}/{args.devices} devices", end="", file=sys.stderr, flush=True)

    report = run_load(config, progress=progress)
    print(file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"report written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0
