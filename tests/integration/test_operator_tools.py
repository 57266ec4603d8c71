"""Operator tools on the running local stack: `fedcompute task ...` and the `fedcompute.client` API."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from fedcompute import strict_json
from fedcompute.client import Client, task_summary
from fedcompute.errors import NotFoundError
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.metric_names import TRAIN_PREFIX
from support.helpers import function_log_entries, http, unique
from support.stack_plugin import StackHandle
from support.tasks import create_numpy_task, make_update, random_delta, run_device


def cli(stack: StackHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedcompute.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **stack.env()}, timeout=120)


def test_task_cli_lists_gets_and_cancels_a_task(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("cli"), rounds=3)
    listed = cli(local_stack, "task", "list", "--population", task.population)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(f"{task.population}/{task.task_id}  training    OPEN       round 1/3")

    canceled = cli(local_stack, "task", "cancel", "--population", task.population, "--task", str(task.task_id),
                   "--reason", "operator stop", "--json")
    assert canceled.returncode == 0, canceled.stderr
    body = strict_json.loads(canceled.stdout)
    assert (body["status"], body["status_reason"]) == ("CANCELED", "operator stop")
    assert task.record().status.value == "CANCELED"  # the store agrees, not only the response

    got = cli(local_stack, "task", "get", "--population", task.population, "--task", str(task.task_id), "--json")
    assert strict_json.loads(got.stdout)["status"] == "CANCELED"
    everything = strict_json.loads(cli(local_stack, "task", "list", "--json").stdout)
    assert {(t["population_name"], int(t["task_id"])) for t in everything} >= {(task.population, task.task_id)}


def test_task_cli_names_a_missing_task_and_exits_2(local_stack: StackHandle) -> None:
    run = cli(local_stack, "task", "get", "--population", unique("nobody"), "--task", "7")
    assert run.returncode == 2
    assert run.stderr.startswith("error: task management:") and "7" in run.stderr


def test_python_client_reads_a_rounds_metrics_and_cancels(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("sdk"), report_goal=2, rounds=2)
    client = Client.from_env()
    with pytest.raises(NotFoundError, match="no metrics yet"):
        client.round_metrics(task.population, task.task_id, 1)
    devices = DeviceHttpClient(local_stack.settings.task_assignment_url)
    rng = np.random.default_rng(1)
    for i in range(2):
        payload, _ = make_update(task, random_delta(task, rng), seed=i)
        assert run_device(devices, task.population, payload).upload_status == 200
    task.wait_round(1)
    metrics = client.round_metrics(task.population, task.task_id, 1)
    assert metrics == task.round_metrics(1)
    assert {k for k in metrics if k.startswith(TRAIN_PREFIX)} == {TRAIN_PREFIX + m for m in task.metrics}
    assert client.metrics(task.population, task.task_id).rounds == (1,)
    assert client.get_task(task.population, task.task_id).current_round == 2
    canceled = client.cancel_task(task.population, task.task_id, reason="sdk")
    assert task_summary(canceled).startswith(f"{task.population}/{task.task_id}  training    CANCELED")
    assert [t.task_id for t in client.list_tasks(task.population)] == [task.task_id]


def test_every_function_log_line_is_json_with_severity_labels_and_trace(local_stack: StackHandle) -> None:
    population, trace_id = unique("logs"), uuid.uuid4().hex
    url = f"{local_stack.settings.task_management_url}/taskmanagement/v1/population/{population}/tasks/9:get"
    assert http().get(url, headers={"X-Cloud-Trace-Context": f"{trace_id}/123;o=1"}).status_code == 404
    line = local_stack.wait_for_log("task_management", trace_id)
    entry = strict_json.loads(line)
    assert entry["severity"] == "INFO" and "request rejected (404)" in entry["message"]
    assert entry["logging.googleapis.com/trace"] == f"projects/{local_stack.settings.project}/traces/{trace_id}"
    assert entry["logging.googleapis.com/spanId"] == f"{123:016x}"
    assert entry["logging.googleapis.com/labels"] == {"population": population, "task": "9"}

    for name in local_stack.stack.functions:  # every function logged its health events at least
        assert function_log_entries(local_stack.log_path(name)), name
