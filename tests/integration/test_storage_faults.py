"""Failing storage and oversized uploads against the live local stack (issue 13, Medium):

- an upload larger than the task's largest honest update is rejected, deleted and counted
  nowhere (fake-gcs-server cannot bound the session itself; in the cloud the session's
  ``x-goog-content-length-range`` refuses it);
- the Firestore emulator paused (SIGSTOP) during a check-in and a task creation: both answer
  503 with ``Retry-After`` within their deadline, never 500 nor a hang; after SIGCONT the same
  device completes its round and is counted exactly once;
- fake-gcs-server's filesystem backend: object and bucket names with ``..`` cannot write
  outside the stack's GCS data directory.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import urllib.parse
from typing import TYPE_CHECKING

import numpy as np
import psutil
import pytest
import requests

from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.deadlines import operator_deadline_s, storage_deadline_s
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.identity import DeviceKey, sign_message
from fedcompute.learning import upload_contract
from fedcompute.proto import common_pb2, task_assignment_pb2, task_management_pb2
from fedcompute.stack.local import LocalStack
from fedcompute.tasks.records import AssignmentStatus, RoundStatus
from support.helpers import unique
from support.tasks import COMPLETED, create_numpy_task, gradient_object, make_update, random_delta, wait_until

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration
PREFIX = "/taskassignment/v1"


def _verdict(stack: StackHandle, bucket: str, name: str) -> str:
    needle = f"ingestion of gs://{bucket}/{name}: "
    line = stack.wait_for_log("result_ingestion", needle, 60)
    return line.split(needle, 1)[1].split(" ", 1)[0]


def test_an_upload_over_the_tasks_update_size_is_rejected_deleted_and_counted_nowhere(
        local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("bounded"), report_goal=1, over_selection_rate=1.0, rounds=1)
    client = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=30)
    assignment = client.create_task_assignment(task.population, "1")
    assert isinstance(assignment, task_assignment_pb2.TaskAssignment)
    instruction = client.report_result(assignment.self_uri, COMPLETED)
    assert isinstance(instruction, task_assignment_pb2.UploadInstruction)
    bound = upload_contract.max_upload_bytes(task.record())
    assert bound < 64 * 1024  # a tiny model: its sealed update is a few KiB, not the 64 MiB server ceiling
    response = requests.put(instruction.upload_location, data=os.urandom(bound + 1),
                            headers=dict(instruction.extra_request_headers), timeout=30)
    assert response.status_code == 200  # fake-gcs-server stores it (GCS would refuse the range)
    name = gradient_object(task, 1, assignment.assignment_id)
    bucket = local_stack.settings.gradient_bucket
    assert _verdict(local_stack, bucket, name) == "INVALID_UPLOAD"
    blobs = GcsBlobStore(local_stack.clients.storage)
    wait_until(lambda: not blobs.exists(bucket, name), 30)
    (rejection,) = task.store.list_rejections(task.key(1))
    assert f"maximum update size of {bound} bytes" in rejection["reason"]
    assert task.store.get_assignment(task.key(1), assignment.assignment_id).status == AssignmentStatus.UPLOAD_REJECTED
    assert task.count(1) == 0
    # The freed slot goes to an honest device, whose update (sealed, within the bound) counts.
    honest = client.create_task_assignment(task.population, "1")
    assert isinstance(honest, task_assignment_pb2.TaskAssignment)
    upload = client.report_result(honest.self_uri, COMPLETED)
    assert isinstance(upload, task_assignment_pb2.UploadInstruction)
    assert client.upload(upload, make_update(task, random_delta(task, np.random.default_rng(1)))[0]) == 200
    task.wait_round(1)
    assert task.count(1) == 1


# --------------------------------------------------------------------------- Firestore paused


def _emulator_processes(stack: StackHandle, name: str) -> list[psutil.Process]:
    state = stack.stack._require_state()
    (component,) = [c for c in LocalStack._components(state) if c.name == name]
    leader = psutil.Process(component.pid)
    return [leader, *leader.children(recursive=True)]


def _signed_check_in(stack: StackHandle, population: str, key: DeviceKey) -> tuple[requests.Response, float]:
    message = task_assignment_pb2.CreateTaskAssignmentRequest(
        client_version=common_pb2.ClientVersion(version_code="1"),
        resource_capabilities=common_pb2.ResourceCapabilities(
            supported_compression_formats=[common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP]))
    path = f"{PREFIX}/population/{population}:create-task-assignment"
    sign_message(key, message, "POST", path)
    started = time.monotonic()
    response = requests.post(stack.settings.task_assignment_url + path, data=message.SerializeToString(),
                             headers={"content-type": "application/x-protobuf"}, timeout=120)
    return response, time.monotonic() - started


def _create_task(stack: StackHandle, population: str) -> tuple[requests.Response, float]:
    task = task_management_pb2.Task(total_iteration=1, min_aggregation_size=1, max_aggregation_size=2)
    headers = {"content-type": "application/x-protobuf"}
    if stack.settings.api_key:
        headers["x-api-key"] = stack.settings.api_key
    started = time.monotonic()
    response = requests.post(f"{stack.settings.task_management_url}/taskmanagement/v1/population/{population}"
                             ":create-task", data=task_management_pb2.CreateTaskRequest(task=task).SerializeToString(),
                             headers=headers, timeout=180)
    return response, time.monotonic() - started


def test_a_paused_firestore_gives_fast_503s_and_the_device_is_counted_once_after(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("outage"), report_goal=2, over_selection_rate=0.5, rounds=1)
    device, other = DeviceKey.generate(), DeviceKey.generate()
    new_population = unique("outage_create")
    frozen = _emulator_processes(local_stack, "firestore")
    for process in frozen:
        process.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            check_in = pool.submit(_signed_check_in, local_stack, task.population, device)
            create = pool.submit(_create_task, local_stack, new_population)
            (check_in_response, check_in_s), (create_response, create_s) = check_in.result(), create.result()
    finally:
        for process in frozen:
            process.send_signal(signal.SIGCONT)
    assert check_in_response.status_code == 503, check_in_response.text[:300]
    assert check_in_response.headers["Retry-After"].isdigit()
    assert check_in_s < storage_deadline_s() + 5
    assert create_response.status_code == 503, create_response.text[:300]
    assert create_response.headers["Retry-After"].isdigit()
    assert create_s < operator_deadline_s() + 5

    # Storage is back: the same device checks in again, trains, uploads, and counts once.
    client = DeviceHttpClient(local_stack.settings.task_assignment_url, timeout=60)

    def assigned(key: DeviceKey) -> task_assignment_pb2.TaskAssignment | None:
        result = client.create_task_assignment(task.population, "1", key=key)
        return result if isinstance(result, task_assignment_pb2.TaskAssignment) else None

    rng = np.random.default_rng(3)
    for key in (device, other):
        assignment = wait_until(lambda key=key: assigned(key), 60, interval_s=2.0)
        instruction = client.report_result(assignment.self_uri, COMPLETED, key=key)
        assert isinstance(instruction, task_assignment_pb2.UploadInstruction)
        assert client.upload(instruction, make_update(task, random_delta(task, rng))[0]) == 200
    finished = task.wait_round(1)
    assert finished.status == RoundStatus.COMPLETED
    assert task.count(1) == 2  # exactly the two devices' updates
    holders = [a.device_id for a in task.store.list_assignments(task.key(1))]
    assert sorted(holders) == sorted({*holders}) and len(holders) == 2  # no orphan assignment of the device

    # Nothing half-written by the refused task creation: no task, or one that reads back whole.
    tasks = list(task.store.list_tasks(new_population))
    assert len(tasks) <= 1
    for created in tasks:
        assert created.population == new_population and created.report_goal == 1


# --------------------------------------------------------------------------- fake-gcs path names


@pytest.mark.parametrize("bucket, name", [
    ("%2E%2E", "escaped-through-bucket"),  # bucket ".." = the data directory's parent
    ("%2E%2E", "..%2F..%2Fescaped-two-up"),
    ("{gradient}", "../../escaped-object"),
    ("{gradient}", "/../../escaped-absolute"),
])
def test_names_with_dot_dot_cannot_write_or_read_outside_the_gcs_data_dir(local_stack: StackHandle, bucket: str,
                                                                          name: str) -> None:
    data_dir = local_stack.stack.gcs_data_dir.resolve()
    state_dir = local_stack.stack.state_dir.resolve()
    leaf = urllib.parse.unquote(name).rsplit("/", 1)[-1]
    gcs = local_stack.urls["gcs"]
    bucket = bucket.format(gradient=local_stack.settings.gradient_bucket)
    response = requests.post(f"{gcs}/upload/storage/v1/b/{bucket}/o",
                             params={"uploadType": "media", "name": urllib.parse.unquote(name)}, data=b"planted",
                             timeout=30)
    escaped = [p for p in state_dir.parent.rglob(leaf) if not p.resolve().is_relative_to(data_dir)]
    assert escaped == [], f"HTTP {response.status_code}: {name!r} in bucket {bucket!r} landed outside {data_dir}"
    # Reading through the same trick cannot reach the stack's own files (stack.json is beside gcs-data).
    for trick_bucket, trick_name in (("%2E%2E", local_stack.stack.state_file.name),
                                     (local_stack.settings.gradient_bucket, f"../../{local_stack.stack.state_file.name}")):
        quoted = urllib.parse.quote(trick_name, safe="")
        read = requests.get(f"{gcs}/storage/v1/b/{trick_bucket}/o/{quoted}", params={"alt": "media"}, timeout=30)
        assert read.status_code != 200 or read.content != local_stack.stack.state_file.read_bytes()


def test_the_gcs_emulator_says_it_is_confined(local_stack: StackHandle) -> None:
    log = local_stack.log_path("gcs").read_text(errors="replace")
    assert f"fake-gcs-server confined to {local_stack.stack.gcs_data_dir}" in log
