"""``fedcompute metrics plot|export|compare``: a run's model metrics per round, TensorBoard, runs side by side."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Any

ENV_HINT = 'for the local stack run `fedcompute stack up` then `eval "$(fedcompute stack env)"`; for Google Cloud ' \
           "set FEDCOMPUTE_PROJECT and run `gcloud auth application-default login`"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("metrics", help="plot, dump and compare the model metrics of runs")
    sub = parser.add_subparsers(dest="metrics_command", metavar="COMMAND")
    plot = sub.add_parser("plot", help="one figure (or a table) per metric of a task, x = round",
                          description="Reads {pop}/{task}/{n}/s/0/metrics of every round from the model bucket.")
    plot.add_argument("--population", required=True, help="population_name of the task")
    plot.add_argument("--task", type=int, default=None, help="task id (default: the population's latest task)")
    plot.add_argument("--metric", action="append", default=None, metavar="NAME",
                      help="only this metric (full name or suffix such as auc-roc); repeatable")
    plot.add_argument("--out", default=None, help="output directory (png default: out/metrics; "
                                                  "csv/json default: standard output)")
    plot.add_argument("--format", choices=("png", "csv", "json"), default="png")
    plot.set_defaults(func=run_plot)
    export = sub.add_parser("export", help="write a run's metrics as TensorBoard event files",
                            description="One scalar series per metric (step = round), ε included; view with "
                                        "`tensorboard --logdir DIR`. CSV and JSON: `fedcompute metrics plot "
                                        "--format csv|json`.")
    export.add_argument("--population", required=True, help="population_name of the task")
    export.add_argument("--task", type=int, default=None, help="task id (default: the population's latest task)")
    export.add_argument("--tensorboard", required=True, type=Path, metavar="DIR",
                        help="log directory; the events go to DIR/<population>/<task>/")
    export.set_defaults(func=run_export)
    compare = sub.add_parser("compare", help="one figure per metric with one line per run",
                             description="Compare runs; each RUN is POPULATION/TASK_ID. Lines are labelled "
                                         "from the runs' server configs (e.g. noise_multiplier 0.1).")
    compare.add_argument("runs", nargs="+", metavar="RUN")
    compare.add_argument("--metric", action="append", default=None, metavar="NAME")
    compare.add_argument("--out", default="out/compare", help="output directory (default out/compare)")
    compare.set_defaults(func=run_compare)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])


def _reachable(host_port: str) -> bool:
    parsed = urllib.parse.urlsplit(host_port if "://" in host_port else f"//{host_port}")
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 80), timeout=2.0):
            return True
    except OSError:
        return False


def connect() -> tuple[Any, Any, Any]:
    """``(settings, FirestoreTaskStore, GcsBlobStore)`` for the configured stack or project.

    Raises:
        StackError: no environment configured, or the local emulators do not answer.
    """
    from fedcompute.adapters.blobs import GcsBlobStore
    from fedcompute.adapters.clients import emulator_hosts, make_clients
    from fedcompute.adapters.firestore_store import FirestoreTaskStore
    from fedcompute.errors import StackError
    from fedcompute.settings import Settings

    hosts = emulator_hosts()
    if not hosts and not (os.environ.get("FEDCOMPUTE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")):
        raise StackError("no stack configured: FIRESTORE_EMULATOR_HOST, STORAGE_EMULATOR_HOST and "
                         "FEDCOMPUTE_PROJECT are all unset", hint=ENV_HINT)
    down = [f"{name}={value}" for name, value in hosts.items() if not _reachable(value)]
    if down:
        raise StackError(f"the local stack does not answer at {', '.join(down)}",
                         hint='start it with `fedcompute stack up` and re-run `eval "$(fedcompute stack env)"`')
    settings = Settings.from_env()
    clients = make_clients(settings)
    blobs = GcsBlobStore(clients.storage, public_base_url=settings.storage_public_url or None)
    return settings, FirestoreTaskStore(clients.firestore), blobs


def latest_task_id(store: Any, population: str) -> int:
    """The highest task id of ``population`` (NotFoundError when it has none)."""
    from fedcompute.errors import NotFoundError

    tasks = store.list_tasks(population)
    if not tasks:
        raise NotFoundError(f"population {population!r} has no tasks",
                            hint="`fedcompute status` lists the populations and their tasks")
    return max(t.task_id for t in tasks)


def run_plot(args: argparse.Namespace) -> int:
    from fedcompute.monitoring.metrics import load_run
    from fedcompute.monitoring.plots import metric_filename, metrics_table, plot_metrics

    settings, store, blobs = connect()
    task_id = args.task if args.task is not None else latest_task_id(store, args.population)
    run = load_run(blobs, settings.model_bucket, args.population, task_id).select(args.metric)
    if not run.rounds:
        print(f"note: {run.run_id} has no completed round yet", file=sys.stderr)
    if args.format == "png":
        out = Path(args.out or "out/metrics")
        figures = plot_metrics(run, out)
        for figure in figures:
            print(f"{figure.path}  ({figure.title}: {len(figure.lines[0].x)} rounds)")
        print(f"{len(figures)} figures of {run.run_id} ({run.label}) in {out}")
        return 0
    text = metrics_table(run, args.format)
    if args.out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / metric_filename(f"{run.population}_{run.task_id}_metrics", "." + args.format)
    path.write_text(text)
    print(path)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from fedcompute.monitoring.metrics import load_run
    from fedcompute.monitoring.tensorboard import write_tensorboard

    settings, store, blobs = connect()
    task_id = args.task if args.task is not None else latest_task_id(store, args.population)
    run = load_run(blobs, settings.model_bucket, args.population, task_id)
    path = write_tensorboard(run, args.tensorboard)
    print(f"{path}  ({len(run.series)} metrics x {len(run.rounds)} rounds of {run.run_id})")
    print(f"view it: tensorboard --logdir {args.tensorboard}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from fedcompute.monitoring.metrics import load_run, parse_run_ref
    from fedcompute.monitoring.plots import plot_compare

    refs = [parse_run_ref(r) for r in args.runs]
    settings, _, blobs = connect()
    runs = [load_run(blobs, settings.model_bucket, p, t).select(args.metric) for p, t in refs]
    figures = plot_compare(runs, Path(args.out))
    for figure in figures:
        labels = "; ".join(line.label for line in figure.lines)
        print(f"{figure.path}  ({figure.title}: {len(figure.lines)} runs: {labels})")
    return 0
