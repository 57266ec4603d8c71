"""Shared fixtures of the unit tier: fresh in-memory fakes of the project's ports per test.

``store``, ``blobs`` and ``events`` have the semantics of the Firestore, GCS and Pub/Sub
adapters (conditional writes, create-only objects, recorded events) without emulators.
Open a task on them with :func:`support.tasks.open_task_in_memory`. ``assignment_server``
runs the task_assignment function in-process on them (signed device requests).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import flask
import pytest

from fedcompute.identity import DeviceKey, sign_message
from fedcompute.memory import InMemoryBlobStore, InMemoryRoundEvents, InMemoryTaskStore
from fedcompute.proto import common_pb2, task_assignment_pb2
from fedcompute.runtime import Deps
from fedcompute.settings import Settings
from fedcompute.tasks.records import RoundKey, RoundRecord, RoundStatus, TaskKind, TaskRecord, TaskStatus


@pytest.fixture
def store() -> InMemoryTaskStore:
    return InMemoryTaskStore()


@pytest.fixture
def blobs() -> InMemoryBlobStore:
    return InMemoryBlobStore()


@pytest.fixture
def events() -> InMemoryRoundEvents:
    return InMemoryRoundEvents()


TASK_ASSIGNMENT = Path(__file__).resolve().parents[2] / "functions" / "task_assignment" / "main.py"
PREFIX = "/taskassignment/v1"


class AssignmentServer:
    """The task_assignment function in-process, on an in-memory store with one open round
    (goal 3, 4 slots). Requests are the protobuf bodies a device sends."""

    population = "identity_pop"

    def __init__(self, module: ModuleType, store: InMemoryTaskStore, task_id: int) -> None:
        self.module, self.store = module, store
        self.key = RoundKey(self.population, task_id, 1)
        self.app = flask.Flask("task_assignment")

    def call(self, method: str, path: str, message: object) -> flask.Response:
        body = message.SerializeToString()  # type: ignore[attr-defined]
        with self.app.test_request_context(f"{PREFIX}{path}", method=method, data=body,
                                           headers={"Content-Type": "application/x-protobuf"}):
            return self.app.make_response(self.module.task_assignment(flask.request))

    def check_in_response(self, key: DeviceKey | None) -> flask.Response:
        request = task_assignment_pb2.CreateTaskAssignmentRequest(
            client_version=common_pb2.ClientVersion(version_code="341912000"))
        path = f"/population/{self.population}:create-task-assignment"
        if key is not None:
            sign_message(key, request, "POST", PREFIX + path)
        return self.call("POST", path, request)

    def check_in(self, key: DeviceKey | None) -> tuple[int, task_assignment_pb2.CreateTaskAssignmentResponse]:
        response = self.check_in_response(key)
        parsed = task_assignment_pb2.CreateTaskAssignmentResponse()
        if response.status_code < 300:
            parsed.ParseFromString(response.get_data())
        return response.status_code, parsed

    def report(self, self_uri: str, key: DeviceKey) -> int:
        request = task_assignment_pb2.ReportResultRequest(result=task_assignment_pb2.ReportResultRequest.COMPLETED)
        sign_message(key, request, "PUT", f"{PREFIX}{self_uri}:report-result")
        return self.call("PUT", f"{self_uri}:report-result", request).status_code


@pytest.fixture()
def assignment_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[AssignmentServer]:
    spec = importlib.util.spec_from_file_location("fn_task_assignment_in_process", TASK_ASSIGNMENT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    store, settings = InMemoryTaskStore(), Settings(checkins_per_minute=600)
    deps = Deps(settings=settings, store=store, blobs=InMemoryBlobStore(),  # type: ignore[arg-type]
                events=InMemoryRoundEvents())
    monkeypatch.setattr(module.RUNTIME, "deps", lambda: deps)
    monkeypatch.setattr(module.RUNTIME, "settings", lambda: settings)
    pop = AssignmentServer.population
    task = store.create_task(pop, lambda tid: TaskRecord(
        population=pop, task_id=tid, kind=TaskKind.TRAINING, status=TaskStatus.OPEN, report_goal=3,
        over_selection_rate=0.34, total_rounds=2, current_round=1, noise_secret="ab" * 32))
    store.create_round(RoundRecord(population=pop, task_id=task.task_id, round_number=1,
                                           status=RoundStatus.COLLECTING, report_goal=3,
                                           max_assignments=task.max_assignments))
    yield AssignmentServer(module, store, task.task_id)
