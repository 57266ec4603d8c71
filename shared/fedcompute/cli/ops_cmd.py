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
    replay = sub.add_parser("replay", help="publish dead-lettered upload notifications and round-ready messages again")
    replay.add_argument("--max-messages", type=int, default=100, help="per topic (default 100)")
    replay.set_defaults(func=run_ops_replay)
    rotate = sub.add_parser("rotate-upload-key",
                            help="new HPKE upload key for check-ins; older keys still open in-flight uploads")
    rotate.add_argument("--key-dir", default=None,
                        help="where the key ring lives (default: <$FEDCOMPUTE_STACK_STATE_DIR>/keys, the local "
                        "stack's); for the cloud, a private folder passed to Terraform as upload_keys_dir")
    rotate.set_defaults(func=run_rotate_upload_key)
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


def run_ops_replay(args: argparse.Namespace) -> int:
    from fedcompute.adapters.clients import make_clients
    from fedcompute.adapters.deadletters import replay_dead_letters, replayable_topics
    from fedcompute.cli.metrics_cmd import connect

    if args.max_messages < 1:
        print("error: --max-messages must be >= 1", file=sys.stderr)
        return 2
    settings, _, _ = connect()
    clients = make_clients(settings)
    report = replay_dead_letters(clients.subscriber, clients.publisher, settings.project,
                                 replayable_topics(settings.topics), max_messages=args.max_messages)
    for topic in replayable_topics(settings.topics):
        print(f"{topic}: {report.replayed.get(topic, 0)} replayed, "
              f"{report.left_for_operator.get(topic, 0)} left (replayed too often already)")
    return 0


def run_rotate_upload_key(args: argparse.Namespace) -> int:
    import os

    from fedcompute.crypto.hpke import KEY_DIR_NAME, describe, rotate_key_files

    state_dir = os.environ.get("FEDCOMPUTE_STACK_STATE_DIR")
    if not args.key_dir and not state_dir:
        print("error: no key dir: pass --key-dir DIR, or run `eval \"$(fedcompute stack env)\"` for the local "
              "stack's", file=sys.stderr)
        return 2
    key_dir = Path(args.key_dir) if args.key_dir else Path(str(state_dir)) / KEY_DIR_NAME
    ring = rotate_key_files(key_dir)
    print(f"key ring in {key_dir} (upload_keys.json is private: keep it out of version control)", file=sys.stderr)
    print(strict_json.dumps(describe(ring), indent=2))
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
