"""``fedcompute status``, ``fedcompute ops plot`` and ``fedcompute dashboard``: operations views."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from fedcompute import strict_json


def register(subparsers: argparse._SubParsersAction) -> None:
    status = subparsers.add_parser("status", help="tasks: status, current round, epsilon spent, per-round counts")
    status.add_argument("--population", default=None, help="only this population")
    status.add_argument("--task", type=int, default=None, help="only this task id")
    status.add_argument("--no-rounds", action="store_true", help="one line per task, no per-round counts")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run_status)

    ops = subparsers.add_parser("ops", help="operations figures from the stored records")
    sub = ops.add_subparsers(dest="ops_command", metavar="COMMAND")
    plot = sub.add_parser("plot", help="assignments per minute, iteration processing time, iterations over time")
    plot.add_argument("--population", default=None)
    plot.add_argument("--task", type=int, default=None)
    plot.add_argument("--out", default="out/ops", help="output directory (default out/ops)")
    plot.set_defaults(func=run_ops_plot)
    ops.set_defaults(func=lambda args: (ops.print_help(sys.stderr), 2)[1])

    dashboard = subparsers.add_parser("dashboard", help="serve the monitoring dashboard locally")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.set_defaults(func=run_dashboard)


def run_status(args: argparse.Namespace) -> int:
    from fedcompute.cli.metrics_cmd import connect
    from fedcompute.monitoring.ops import format_status_table, load_ops

    _, store, _ = connect()
    ops = load_ops(store, args.population, args.task)
    if args.json:
        print(strict_json.dumps([t.to_dict() for t in ops], indent=2, sort_keys=True))
    else:
        print(format_status_table(ops, rounds=not args.no_rounds))
    if not ops and args.population:
        print(f"population {args.population!r} has no tasks", file=sys.stderr)
        return 1
    return 0


def run_ops_plot(args: argparse.Namespace) -> int:
    from fedcompute.cli.metrics_cmd import connect
    from fedcompute.monitoring.ops import load_ops
    from fedcompute.monitoring.plots import plot_ops

    _, store, _ = connect()
    ops = load_ops(store, args.population, args.task)
    if not ops:
        print("error: no tasks found" + (f" in population {args.population!r}" if args.population else "")
              + " (`fedcompute status` lists them)", file=sys.stderr)
        return 1
    for task in ops:
        for figure in plot_ops(task, Path(args.out)):
            print(f"{figure.path}  ({figure.title})")
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from fedcompute.cli.metrics_cmd import connect
    from fedcompute.stack.local import default_functions_dir, functions_framework_executable

    connect()  # fail early, with the fix, when no stack is configured
    source = default_functions_dir() / "dashboard" / "main.py"
    if not source.is_file():
        print(f"error: {source} not found (run from a checkout or set FEDCOMPUTE_FUNCTIONS_DIR)", file=sys.stderr)
        return 1
    print(f"dashboard on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    command = [str(functions_framework_executable()), "--source", str(source), "--target", "dashboard",
               "--signature-type", "http", "--host", args.host, "--port", str(args.port)]
    process = subprocess.Popen(command)

    def stop(signum: int, frame: object) -> None:  # SIGTERM: stop the server too, never orphan it
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 130
