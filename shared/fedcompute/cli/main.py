"""Entry point of the ``fedcompute`` command.

Each command group lives in its own module exposing ``register(subparsers)``; the
module sets ``func`` on its parser. Modules must import heavy libraries (TensorFlow,
cloud clients) inside their command functions, not at import time, so that
``fedcompute config validate`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fedcompute import __version__
from fedcompute.errors import FedComputeError
from fedcompute.logs import quiet_third_party_warnings

# Exit codes: 0 ok, 1 runtime failure, 2 bad input (usage or invalid config).
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

COMMAND_MODULES: tuple[str, ...] = (
    "fedcompute.cli.config_cmd",
    "fedcompute.cli.stack_cmd",
    "fedcompute.cli.demo_cmd",
    "fedcompute.cli.fleet_cmd",
    "fedcompute.cli.metrics_cmd",
    "fedcompute.cli.ops_cmd",
    "fedcompute.cli.model_cmd",
    "fedcompute.cli.task_cmd",
    "fedcompute.cli.load_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcompute",
        description="Serverless Federated Compute with central differential privacy.",
    )
    parser.add_argument("--version", action="version", version=f"fedcompute {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()  # google-api-core/google-auth warn about Python and grpcio support dates
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or EXIT_OK)
    except FedComputeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if error.http_status // 100 == 4 else EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
