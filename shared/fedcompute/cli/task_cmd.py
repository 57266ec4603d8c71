"""``fedcompute task list|get|cancel``: the task management API from the command line (text or ``--json``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("task", help="list, inspect and cancel tasks (task management API)")
    sub = parser.add_subparsers(dest="task_command", metavar="COMMAND")
    listing = sub.add_parser("list", help="one line per task (every population unless --population)")
    listing.add_argument("--population", default=None, help="only this population's tasks")
    get = sub.add_parser("get", help="one task's fields")
    cancel = sub.add_parser("cancel", help="cancel a task: no new rounds or assignments")
    for command in (get, cancel):
        command.add_argument("--population", required=True, help="population_name of the task")
        command.add_argument("--task", type=int, required=True, help="task id")
    cancel.add_argument("--reason", default="", help="recorded as the task's status_reason")
    for command, func in ((listing, run_list), (get, run_get), (cancel, run_cancel)):
        command.add_argument("--json", action="store_true", help="print JSON instead of text")
        command.set_defaults(func=func)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])


def _client() -> Any:
    from fedcompute.client import Client
    from fedcompute.errors import StackError

    client = Client.from_env()
    if not client.settings.task_management_url:
        raise StackError("FEDCOMPUTE_TASK_MANAGEMENT_URL is not set",
                         hint='for the local stack run `eval "$(fedcompute stack env)"`; for Google Cloud set it '
                              "to the task_management function's URL (terraform output)")
    return client


def _print_tasks(tasks: list[Any], as_json: bool) -> None:
    from fedcompute.client import task_summary, task_to_dict

    if as_json:
        print(json.dumps([task_to_dict(t) for t in tasks], indent=2, sort_keys=True))
        return
    for task in tasks:
        print(task_summary(task))


def run_list(args: argparse.Namespace) -> int:
    tasks = _client().list_tasks(args.population)
    _print_tasks(sorted(tasks, key=lambda t: (t.population_name, t.task_id)), args.json)
    if not tasks and not args.json:
        print("no tasks", file=sys.stderr)
    return 0


def run_get(args: argparse.Namespace) -> int:
    task = _client().get_task(args.population, args.task)
    if args.json:
        from fedcompute.client import task_to_dict

        print(json.dumps(task_to_dict(task), indent=2, sort_keys=True))
    else:
        from google.protobuf import text_format

        sys.stdout.write(text_format.MessageToString(task))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    task = _client().cancel_task(args.population, args.task, args.reason)
    if args.json:
        from fedcompute.client import task_to_dict

        print(json.dumps(task_to_dict(task), indent=2, sort_keys=True))
    else:
        from fedcompute.client import task_summary

        print(task_summary(task))
    return 0
