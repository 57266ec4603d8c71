"""Monitoring on a real run of the local stack: metric figures and tables, run comparison,
operations counts and figures, ``fedcompute status`` and the dashboard API.

Two runs are driven through every round with known device statistics (no TensorFlow):
A (no DP, 3 rounds, round 1 also has a NOT_ELIGIBLE and a FAILED device) and B (fixed
Gaussian DP, noise_multiplier 1.0, 2 rounds). Every check compares what the monitoring code
shows with the metrics JSON in the bucket, the records in Firestore, and the values the
test itself computed from the devices' statistics.
"""
from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from fedcompute.dp import DpParams
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.monitoring.metrics import load_run
from fedcompute.monitoring.ops import load_ops
from fedcompute.monitoring.plots import metric_filename, plot_compare, plot_metrics, plot_ops
from fedcompute.proto import task_assignment_pb2
from fedcompute.tasks.records import AssignmentStatus, RoundStatus, TaskStatus
from support.stack_plugin import StackHandle, running_stack
from support.tasks import (
    NumpyTask,
    central_metrics,
    check_in,
    create_numpy_task,
    make_update,
    random_delta,
    run_device,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

TRAIN = "server/client_work/train/"
Result = task_assignment_pb2.ReportResultRequest


@dataclass
class DrivenRun:
    task: NumpyTask
    expected: dict[int, dict[str, float]]  # round -> metric -> value computed from the devices' statistics

    @property
    def run_id(self) -> str:
        return f"{self.task.population}/{self.task.task_id}"


def drive_round(task: NumpyTask, client: DeviceHttpClient, round_number: int, rng: np.random.Generator,
                failures: tuple[int, ...] = ()) -> dict[str, float]:
    """Devices that report ``failures`` first, then ``report_goal`` devices that upload; wait for the round."""
    for result in failures:
        assignment = check_in(client, task.population)
        assert client.report_result(assignment.self_uri, result) is None
    stats = []
    for i in range(task.report_goal):
        payload, flat = make_update(task, random_delta(task, rng), num_examples=4 + i, seed=int(rng.integers(1 << 30)))
        run = run_device(client, task.population, payload)
        assert run.upload_status == 200, run
        stats.append(flat)
    task.wait_round(round_number, timeout_s=120)
    return central_metrics(task, stats)


def build_run(stack: StackHandle, prefix: str, rounds: int, dp: DpParams | None = None,
              first_round_failures: tuple[int, ...] = ()) -> DrivenRun:
    task = create_numpy_task(stack, f"{prefix}-{uuid.uuid4().hex[:8]}", report_goal=2, over_selection_rate=0.5,
                             rounds=rounds, dp=dp)
    client = DeviceHttpClient(stack.settings.task_assignment_url, timeout=30)
    rng = np.random.default_rng(sum(map(ord, prefix)))  # runs differ
    expected = {r: drive_round(task, client, r, rng, first_round_failures if r == 1 else ()) for r in range(1, rounds + 1)}
    assert task.record().status == TaskStatus.COMPLETED
    return DrivenRun(task, expected)


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    """A stack of this module's own: the ops and status views count every record they find."""
    yield from running_stack(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(local_stack: StackHandle) -> tuple[DrivenRun, DrivenRun]:
    a = build_run(local_stack, "mon-a", 3, first_round_failures=(Result.NOT_ELIGIBLE, Result.FAILED))
    b = build_run(local_stack, "mon-b", 2, dp=DpParams(mechanism="FIXED_GAUSSIAN", noise_multiplier=1.0, clip_norm=1.0))
    return a, b


def stored_metrics(run: DrivenRun) -> dict[int, dict[str, float]]:
    return {r: run.task.round_metrics(r) for r in range(1, run.task.phase.total_rounds + 1)}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedcompute.cli.main", *args], capture_output=True, text=True,
                          timeout=180, env=env if env is not None else dict(os.environ))


def test_metric_figures_and_tables_show_every_round(local_stack: StackHandle, runs, tmp_path: Path) -> None:
    a, _ = runs
    stored = stored_metrics(a)
    names = list(stored[1])
    assert {TRAIN + m for m in a.task.metrics} <= set(names)
    # Stored values are the central metrics of the devices' statistics (so the plots below show the truth).
    for r, values in a.expected.items():
        for metric, value in values.items():
            assert stored[r][TRAIN + metric] == pytest.approx(value, rel=1e-9)

    result = cli("metrics", "plot", "--population", a.task.population, "--task", str(a.task.task_id),
                 "--out", str(tmp_path / "png"))
    assert result.returncode == 0, result.stderr
    for name in names:
        png = tmp_path / "png" / metric_filename(name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    assert f"{len(names)} figures of {a.run_id}" in result.stdout

    # What the figures draw: x = rounds 1..3, y = the stored value of each round.
    run = load_run(a.task.blobs, local_stack.settings.model_bucket, a.task.population, a.task.task_id)
    assert run.rounds == (1, 2, 3) and run.label == "no DP"
    figures = plot_metrics(run, tmp_path / "inproc")
    assert {f.title for f in figures} == set(names)
    for figure in figures:
        (line,) = figure.lines
        assert line.x == (1.0, 2.0, 3.0)
        assert line.y == pytest.approx([stored[r][figure.title] for r in (1, 2, 3)], rel=1e-12)

    as_json = cli("metrics", "plot", "--population", a.task.population, "--format", "json")  # latest task by default
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["rounds"] == [1, 2, 3] and data["run"] == a.run_id
    for name in names:
        assert data["series"][name] == pytest.approx([stored[r][name] for r in (1, 2, 3)], rel=1e-12)

    one = "sparse_categorical_accuracy"
    as_csv = cli("metrics", "plot", "--population", a.task.population, "--task", str(a.task.task_id),
                 "--metric", one, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [int(row["round"]) for row in rows] == [1, 2, 3]
    assert list(rows[0]) == ["round", TRAIN + one]
    assert [float(row[TRAIN + one]) for row in rows] == pytest.approx([a.expected[r][one] for r in (1, 2, 3)])

    missing = cli("metrics", "plot", "--population", a.task.population, "--metric", "no-such-metric")
    assert missing.returncode == 2 and "no metric 'no-such-metric'" in missing.stderr and TRAIN in missing.stderr


def test_compare_draws_one_line_per_run_labelled_from_configs(local_stack: StackHandle, runs,
                                                               tmp_path: Path) -> None:
    a, b = runs
    result = cli("metrics", "compare", a.run_id, b.run_id, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    bucket = local_stack.settings.model_bucket
    loaded = [load_run(r.task.blobs, bucket, r.task.population, r.task.task_id) for r in (a, b)]
    figures = plot_compare(loaded, tmp_path / "inproc")
    common = set(stored_metrics(a)[1]) & set(stored_metrics(b)[1])
    assert {TRAIN + m for m in a.task.metrics} <= common
    for figure in figures:
        if figure.title not in common:
            continue
        assert [line.label for line in figure.lines] == ["no DP", "noise_multiplier 1"]
        for line, run in zip(figure.lines, (a, b)):
            rounds = sorted(run.expected)
            assert line.x == tuple(float(r) for r in rounds)
            assert line.y == pytest.approx([stored_metrics(run)[r][figure.title] for r in rounds], rel=1e-12)
        png = tmp_path / ("compare_" + metric_filename(figure.title))
        assert png.stat().st_size > 5000 and f"{png}  ({figure.title}: 2 runs: no DP; noise_multiplier 1)" in result.stdout
    bad = cli("metrics", "compare", "not-a-run")
    assert bad.returncode == 2 and "POPULATION/TASK_ID" in bad.stderr


def test_ops_counts_match_the_stored_records(local_stack: StackHandle, runs, tmp_path: Path) -> None:
    a, _ = runs
    (ops,) = load_ops(a.task.store, a.task.population)
    assert [r.round_number for r in ops.rounds] == [1, 2, 3]
    # What the test did: round 1 had a NOT_ELIGIBLE and a FAILED device before the two uploads.
    assert ops.rounds[0].counts() == {"assigned": 4, "in_progress": 0, "completed": 2, "failed": 1,
                                      "not_eligible": 1, "timed_out": 0, "rejected_uploads": 0}
    for r in ops.rounds[1:]:
        assert (r.assigned, r.completed, r.failed, r.not_eligible) == (2, 2, 0, 0)
    # And what Firestore holds, counted independently.
    for r in ops.rounds:
        key = a.task.key(r.round_number)
        assert r.assigned == a.task.store.count_assignments(key)
        assert r.completed == a.task.store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)
        assert r.not_eligible == a.task.store.count_assignments(key, AssignmentStatus.LOCAL_NOT_ELIGIBLE)
        assert r.rejected_uploads == len(a.task.store.list_rejections(key))
        it = a.task.round_record(r.round_number)
        assert r.status == RoundStatus.COMPLETED.value
        assert r.collecting_s == pytest.approx(it.aggregating_time - it.created_time)
        assert r.aggregating_s == pytest.approx(it.completed_time - it.aggregating_time) and r.aggregating_s > 0
    assert len(ops.assignment_times) == 8

    figures = plot_ops(ops, tmp_path)
    by_name = {f.path.name.removeprefix(f"{a.task.population}_{a.task.task_id}_"): f for f in figures}
    assert set(by_name) == {"assignments_per_minute.png", "iteration_processing_time.png", "iterations_over_time.png"}
    assert sum(by_name["assignments_per_minute.png"].lines[0].y) == 8
    collecting, aggregating = by_name["iteration_processing_time.png"].lines
    assert collecting.x == (1.0, 2.0, 3.0) and aggregating.y == pytest.approx([r.aggregating_s for r in ops.rounds])
    over_time = by_name["iterations_over_time.png"].lines[0]
    assert over_time.y == (1.0, 2.0, 3.0)
    assert over_time.x == pytest.approx([a.task.round_record(n).completed_time for n in (1, 2, 3)])

    result = cli("ops", "plot", "--population", a.task.population, "--out", str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(
        f"{a.task.population}_{a.task.task_id}_{n}" for n in by_name)


def test_status_lists_tasks_with_round_counts(runs) -> None:
    a, b = runs
    result = cli("status", "--population", a.task.population)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.startswith(a.run_id))
    assert row.split()[1:4] == ["TRAINING", "COMPLETED", "3/3"] and "completed num_max_training_rounds (3)" in row
    first_round = next(line for line in lines if line.split()[:2] == ["1", "COMPLETED"])
    assert first_round.split()[2:9] == ["4", "0", "2", "1", "1", "0", "0"]

    as_json = json.loads(cli("status", "--population", b.task.population, "--json").stdout)
    (task,) = as_json
    assert task["task"]["epsilon_spent"] == pytest.approx(b.task.record().epsilon_spent) and task["task"]["epsilon_spent"] > 0
    assert task["task"]["dp"] == b.task.record().dp.to_dict()

    everything = cli("status", "--no-rounds")
    assert a.run_id in everything.stdout and b.run_id in everything.stdout
    unknown = cli("status", "--population", "no-such-population-" + uuid.uuid4().hex[:6])
    assert unknown.returncode == 1 and "has no tasks" in unknown.stderr


def test_commands_explain_a_missing_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_EMULATOR_HOST") and k not in ("FEDCOMPUTE_PROJECT", "GOOGLE_CLOUD_PROJECT")}
    for args in (("status",), ("metrics", "plot", "--population", "p"), ("ops", "plot")):
        result = cli(*args, env=env)
        assert result.returncode == 1 and 'eval "$(fedcompute stack env)"' in result.stderr, (args, result.stderr)
    down = {**env, "FIRESTORE_EMULATOR_HOST": "127.0.0.1:9", "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
    result = cli("status", env=down)
    assert result.returncode == 1 and "does not answer at" in result.stderr and "fedcompute stack up" in result.stderr


def test_dashboard_api_serves_the_stored_data(local_stack: StackHandle, runs) -> None:
    a, b = runs
    base = local_stack.urls["dashboard"]
    page = requests.get(base + "/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/static/dashboard.js" in page.text
    script = requests.get(base + "/static/dashboard.js", timeout=30)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"] and "data-value" in script.text
    assert requests.get(base + "/static/nope.js", timeout=30).status_code == 404

    tasks = requests.get(base + "/api/tasks", timeout=30).json()["tasks"]
    by_run = {t["run"]: t for t in tasks}
    for run in (a, b):
        record = run.task.record()
        row = by_run[run.run_id]
        assert (row["status"], row["current_round"], row["epsilon_spent"]) == (
            record.status.value, record.current_round, record.epsilon_spent)
    assert by_run[a.run_id]["totals"]["assigned"] == 8

    q = {"population": a.task.population, "task": a.task.task_id}
    metrics = requests.get(base + "/api/metrics", params=q, timeout=30).json()
    stored = stored_metrics(a)
    assert metrics["rounds"] == [1, 2, 3] and metrics["label"] == "no DP"
    for name, values in metrics["series"].items():
        assert values == pytest.approx([stored[r][name] for r in (1, 2, 3)], rel=1e-12)
    ops = requests.get(base + "/api/ops", params=q, timeout=30).json()
    assert [r["assigned"] for r in ops["rounds"]] == [4, 2, 2]
    assert [r["not_eligible"] for r in ops["rounds"]] == [1, 0, 0]
    assert sum(m["count"] for m in ops["assignments_per_minute"]) == 8
    assert [p["completed"] for p in ops["iterations_over_time"]] == [1, 2, 3]

    missing = requests.get(base + "/api/metrics", params={"population": a.task.population}, timeout=30)
    assert missing.status_code == 400 and "task" in missing.json()["error"]["message"]
    unknown = requests.get(base + "/api/ops", params={"population": "nobody", "task": 1}, timeout=30)
    assert unknown.status_code == 404
    assert requests.get(base + "/api/metrics", params={"population": "nobody", "task": 1}, timeout=30).status_code == 404


def test_dashboard_command_serves_the_page_locally(runs) -> None:
    a, _ = runs
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "fedcompute.cli.main", "dashboard", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return requests.get(base + "/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                assert process.poll() is None, process.stdout.read()
                return False

        wait_until(healthy, 60, 0.3, what="fedcompute dashboard healthy")
        tasks = requests.get(base + "/api/tasks", params={"population": a.task.population}, timeout=30).json()["tasks"]
        assert [t["run"] for t in tasks] == [a.run_id]
        assert "fedcompute dashboard" in requests.get(base + "/", timeout=30).text
    finally:
        process.terminate()  # the command stops its functions-framework server on SIGTERM
        output = process.communicate(timeout=30)[0]
    assert f"dashboard on {base}/" in output
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/healthz", timeout=2)


def test_dashboard_entry_point_does_not_load_tensorflow() -> None:
    source = Path(__file__).resolve().parents[2] / "functions" / "dashboard" / "main.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('main', {str(source)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import fedcompute.monitoring.metrics, fedcompute.monitoring.ops, fedcompute.monitoring.plots\n"
        "import fedcompute.cli.metrics_cmd, fedcompute.cli.ops_cmd\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_federated'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
