"""Figures (matplotlib, Agg backend) and table dumps of runs and operations.

Every plot function returns what it drew, read back from the matplotlib artists, so
callers and tests can check the figure's data, not only that a file exists.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedcompute import strict_json
from fedcompute.monitoring.metrics import RunMetrics, compare_labels
from fedcompute.monitoring.ops import TaskOps, assignments_per_minute, iterations_over_time


@dataclass(frozen=True)
class Line:
    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]


@dataclass(frozen=True)
class Figure:
    """One saved figure and the lines (or bars) drawn on it."""

    path: Path
    title: str
    lines: tuple[Line, ...]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window
    import matplotlib.pyplot as plt

    return plt


def metric_filename(name: str, suffix: str = ".png") -> str:
    """``server/client_work/train/auc-roc`` -> ``server_client_work_train_auc-roc.png``."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") + suffix


def _drawn(line) -> Line:
    return Line(str(line.get_label()), tuple(float(v) for v in line.get_xdata()),
                tuple(float(v) for v in line.get_ydata()))


def plot_metrics(run: RunMetrics, out_dir: Path) -> list[Figure]:
    """One PNG per metric of ``run``: x = round, y = value (the seed's AUC-ROC figure)."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, values in run.series.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        (line,) = ax.plot(run.rounds, values, marker="o", label=run.label)
        ax.set_xlabel("round")
        ax.set_ylabel(name.rsplit("/", 1)[-1])
        ax.set_title(f"{name} — {run.run_id}")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        path = out_dir / metric_filename(name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        figures.append(Figure(path, name, (_drawn(line),)))
        plt.close(fig)
    return figures


def plot_compare(runs: Sequence[RunMetrics], out_dir: Path) -> list[Figure]:
    """One PNG per metric present in any run, one line per run, labelled from the runs' configs."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = compare_labels(runs)
    names: list[str] = []
    for run in runs:
        names.extend(n for n in run.series if n not in names)
    figures = []
    for name in names:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        lines = []
        for run, label in zip(runs, labels):
            if name in run.series:
                (line,) = ax.plot(run.rounds, run.series[name], marker="o", label=label)
                lines.append(_drawn(line))
        ax.set_xlabel("round")
        ax.set_ylabel(name.rsplit("/", 1)[-1])
        ax.set_title(f"{name}: {len(lines)} runs")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / ("compare_" + metric_filename(name))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        figures.append(Figure(path, name, tuple(lines)))
        plt.close(fig)
    return figures


def metrics_table(run: RunMetrics, fmt: str) -> str:
    """The run's metrics as ``csv`` (one row per round) or ``json`` (:meth:`RunMetrics.to_dict`)."""
    if fmt == "json":
        return strict_json.dumps(run.to_dict(), indent=2, sort_keys=True)
    if fmt != "csv":
        raise ValueError(f"unknown table format {fmt!r}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["round", *run.series], lineterminator="\n")
    writer.writeheader()
    for row in run.rows():
        writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _times(values: Sequence[float]) -> list[datetime]:
    return [datetime.fromtimestamp(v, tz=UTC) for v in values]


def plot_ops(task: TaskOps, out_dir: Path) -> list[Figure]:
    """The seed's three operations figures for one task.

    ``assignments_per_minute.png`` (bars: assignments created per minute),
    ``iteration_processing_time.png`` (stacked bars per round: collecting, then aggregating
    seconds) and ``iterations_over_time.png`` (completed rounds against wall time).
    Lines carry epoch seconds (x) for the time axes.
    """
    plt = _pyplot()
    import matplotlib.dates as mdates

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{task.task.population}_{task.task.task_id}_"
    figures = []

    per_minute = assignments_per_minute(task.assignment_times)
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    xs = [m for m, _ in per_minute]
    ys = [c for _, c in per_minute]
    if per_minute:
        ax.bar(_times(xs), ys, width=1 / (24 * 60) * 0.9, align="edge")
        ax.set_xlim(_times([xs[0] - 60.0, xs[-1] + 120.0]))  # a lone minute must not fill the axis
    _time_axis(ax, mdates)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("assignments")
    ax.set_title(f"Assignments per minute — {task.run_id}")
    ax.grid(alpha=0.3)
    figures.append(_save(plt, fig, out_dir / f"{prefix}assignments_per_minute.png", ax.get_title(),
                         (Line("assignments", tuple(xs), tuple(float(y) for y in ys)),), dates=True))

    rounds = [r for r in task.rounds if r.collecting_s is not None]
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    numbers = [r.round_number for r in rounds]
    collecting = [r.collecting_s or 0.0 for r in rounds]
    aggregating = [r.aggregating_s if r.aggregating_s is not None else math.nan for r in rounds]
    ax.bar(numbers, collecting, label="collecting")
    ax.bar(numbers, [0.0 if math.isnan(a) else a for a in aggregating], bottom=collecting, label="aggregating")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_title(f"Iteration processing time — {task.run_id}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    figures.append(_save(plt, fig, out_dir / f"{prefix}iteration_processing_time.png", ax.get_title(), (
        Line("collecting", tuple(float(n) for n in numbers), tuple(collecting)),
        Line("aggregating", tuple(float(n) for n in numbers), tuple(aggregating)),
    )))

    over_time = iterations_over_time(task.rounds)
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    tx = [t for t, _ in over_time]
    ty = [n for _, n in over_time]
    if over_time:
        ax.step(_times(tx), ty, where="post", marker="o")
    ax.set_ylim(bottom=0)
    ax.yaxis.get_major_locator().set_params(integer=True)
    _time_axis(ax, mdates)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("completed rounds")
    ax.set_title(f"Iterations over time — {task.run_id}")
    ax.grid(alpha=0.3)
    figures.append(_save(plt, fig, out_dir / f"{prefix}iterations_over_time.png", ax.get_title(),
                         (Line("completed rounds", tuple(tx), tuple(float(y) for y in ty)),), dates=True))
    return figures


def _time_axis(ax, mdates) -> None:
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _save(plt, fig, path: Path, title: str, lines: tuple[Line, ...], *, dates: bool = False) -> Figure:
    if dates:
        fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Figure(path, title, lines)
