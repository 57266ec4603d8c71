"""``fedcompute config validate FILE``: check a task config the way the task builder will.

Exit 0 and print the normalized config (defaults explicit) on stdout, warnings on stderr;
exit 2 and print every error, one per line (``file:line: field.path: problem (fix: ...)``),
on stderr. ``FILE`` may be ``-`` for stdin. No TensorFlow is imported.
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``config`` command group to the ``fedcompute`` CLI."""
    parser = subparsers.add_parser("config", help="check and normalize task configs")
    commands = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))

    validate = commands.add_parser(
        "validate",
        help="validate a task config (text format or JSON) and print it normalized",
        description="Validate a task config (protobuf text format as in the ODP guide, or JSON; "
        "auto-detected). Prints the normalized config on success (exit 0); prints every "
        "error with its line and a fix on failure (exit 2).",
    )
    validate.add_argument("file", metavar="FILE", help="task config file, or - for stdin")
    validate.add_argument("--format", choices=("text", "json"), default="text",
                          help="output format of the normalized config (default: text)")
    validate.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    validate.set_defaults(func=run_validate)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT


def run_validate(args: argparse.Namespace) -> int:
    """Handler of ``config validate``; returns the exit code."""
    from fedcompute.config import (
        ConfigSyntaxError,
        ConfigValidationError,
        load_config_document,
        parse_config_document,
        to_json,
        to_text,
        validate_task_config,
    )
    from fedcompute.errors import ConfigError

    try:
        document = parse_config_document(sys.stdin.read(), source="<stdin>") if args.file == "-" else load_config_document(args.file)
        validated = validate_task_config(document)
    except ConfigValidationError as err:
        for issue in err.issues:
            print(f"error: {issue}", file=sys.stderr)
        count = len(err.issues)
        print(f"{count} error{'s' if count != 1 else ''} in {err.source}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConfigSyntaxError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    for warning in validated.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        sys.stdout.write(to_json(validated.config) if args.format == "json" else to_text(validated.config))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the ``config`` command group alone: ``python -m fedcompute.cli.config_cmd validate FILE``."""
    parser = argparse.ArgumentParser(prog="fedcompute")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["config", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
