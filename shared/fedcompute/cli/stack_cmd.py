"""``fedcompute stack up|down|status|env``: the local serverless stack.

``up`` starts the Firestore and Pub/Sub emulators, fake-gcs-server and every Cloud
Function on loopback and prints a table of components, URLs, log files and time to
healthy; the processes keep running after the command returns. ``down`` stops them,
``status`` probes them (exit 1 unless everything is healthy), ``env`` prints the
``export`` lines clients need (``eval "$(fedcompute stack env)"``). No TensorFlow here.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_STATE_DIR = ".fedcompute"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``stack`` command group to the ``fedcompute`` CLI."""
    parser = subparsers.add_parser("stack", help="start, stop and inspect the local serverless stack")
    commands = parser.add_subparsers(dest="stack_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))

    def add_state_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir",
            default=os.environ.get("FEDCOMPUTE_STACK_STATE_DIR", DEFAULT_STATE_DIR),
            help="where the stack keeps stack.json, stack.env and logs/ (default: %(default)s)",
        )

    up = commands.add_parser(
        "up",
        help="start the emulators and every function (idempotent)",
        description="Start the Firestore and Pub/Sub emulators, fake-gcs-server and every Cloud Function "
        "on 127.0.0.1. Returns once everything is healthy; the processes keep running until "
        "`fedcompute stack down`.",
    )
    add_state_dir(up)
    up.add_argument("--task-builder-port", type=int, default=5000,
                    help="port of the task builder (default: %(default)s, as in the ODP guide; 0 = any free port)")
    up.add_argument("--project", default=None, help="project id used with the emulators (default: fedcompute-local)")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for health (default: %(default)s)")
    up.add_argument("--function-host", default="127.0.0.1",
                    help="address the functions listen on (default: %(default)s); any other address needs "
                    "FEDCOMPUTE_API_KEY set, which the task builder, task management and dashboard then require")
    up.set_defaults(func=run_up)

    down = commands.add_parser("down", help="stop everything the stack started")
    add_state_dir(down)
    down.set_defaults(func=run_down)

    status = commands.add_parser("status", help="probe every component (exit 1 unless all healthy)")
    add_state_dir(status)
    status.set_defaults(func=run_status)

    env = commands.add_parser("env", help='print export lines for clients: eval "$(fedcompute stack env)"')
    add_state_dir(env)
    env.set_defaults(func=run_env)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT


def run_up(args: argparse.Namespace) -> int:
    """Handler of ``stack up``."""
    from fedcompute.settings import DEFAULT_PROJECT
    from fedcompute.stack import LocalStack

    if args.task_builder_port < 0 or args.task_builder_port > 65535:
        print(f"error: --task-builder-port {args.task_builder_port} is not a TCP port (0-65535)", file=sys.stderr)
        return EXIT_BAD_INPUT
    stack = LocalStack(
        args.state_dir,
        project=args.project or DEFAULT_PROJECT,
        task_builder_port=args.task_builder_port,
        startup_timeout_s=args.timeout,
        function_host=args.function_host,
    )
    print(f"starting the local stack in {stack.state_dir} ...", file=sys.stderr)
    status = stack.start()
    print(status.table())
    print(f"\nclients: eval \"$(fedcompute stack env --state-dir {shlex.quote(str(args.state_dir))})\""
          f"  (or source {stack.env_file})")
    print("stop:    fedcompute stack down  (or make down)")
    return EXIT_OK if status.healthy else EXIT_FAILURE


def run_down(args: argparse.Namespace) -> int:
    """Handler of ``stack down``."""
    from fedcompute.stack import LocalStack

    stack = LocalStack(args.state_dir)
    stopped = stack.stop()
    if stopped:
        print(f"stopped: {', '.join(stopped)}")
        print(f"data kept in {stack.state_dir} (tasks, checkpoints, metrics): `make up` resumes; "
              "`make clean` deletes it")
    else:
        print(f"no local stack was running from {os.path.abspath(args.state_dir)}")
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    """Handler of ``stack status``."""
    from fedcompute.stack import LocalStack

    status = LocalStack(args.state_dir).status()
    print(status.table())
    return EXIT_OK if status.healthy else EXIT_FAILURE


def run_env(args: argparse.Namespace) -> int:
    """Handler of ``stack env``."""
    from fedcompute.stack import LocalStack

    for key, value in sorted(LocalStack(args.state_dir).env().items()):
        print(f"export {key}={shlex.quote(value)}")
    return EXIT_OK
