"""task_management Cloud Function (HTTP, entry point ``task_management``).

Operator- and task-builder-facing (API key when ``FEDCOMPUTE_API_KEY`` is set):

* ``POST /taskmanagement/v1/population/{pop}:create-task`` (CreateTaskRequest → 201 CreateTaskResponse)
* ``GET  /taskmanagement/v1/population/{pop}/tasks/{id}:get`` (GetTaskByIdResponse)
* ``GET  /taskmanagement/v1/population/{pop}/tasks`` and ``GET /taskmanagement/v1/tasks`` (JSON list)
* ``POST .../tasks/{id}:open`` (artifacts uploaded → round 1 opens), ``POST .../tasks/{id}:cancel``
* ``DELETE .../tasks/{id}`` (only a CREATED task: rolls back a failed build)

Thin entry point: routing only; the logic lives in :mod:`fedcompute.services.task_management`.
"""
from __future__ import annotations

import flask
import functions_framework
from google.protobuf import json_format

from fedcompute import layout
from fedcompute.deadlines import call_with_deadline, operator_deadline_s
from fedcompute.proto import task_management_pb2
from fedcompute.runtime import Runtime
from fedcompute.services import task_management as service
from fedcompute.web import (
    Router,
    configure_logging,
    health_payload,
    json_response,
    message_response,
    parse_message,
    require_api_key,
)

NAME = "task_management"

configure_logging()
RUNTIME = Runtime()  # settings, clients and adapters, created on first use, once per process
ROUTER = Router(NAME)
POP = rf"(?P<population>{layout.POPULATION_PATTERN})"
TASK = r"(?P<task_id>[0-9]+)"


@ROUTER.route("GET", r"/healthz")
def healthz(request: flask.Request) -> flask.Response:
    """Liveness: answers without touching the cloud clients."""
    return json_response(health_payload(NAME, clients_ready=RUNTIME.clients_created))


def _authorized(request: flask.Request):
    deps = RUNTIME.deps()
    require_api_key(request, deps.settings.api_key)
    return deps


@ROUTER.route("POST", rf"/taskmanagement/v1/population/{POP}:create-task")
def create_task(request: flask.Request, population: str) -> flask.Response:
    deps = _authorized(request)
    body = parse_message(request, task_management_pb2.CreateTaskRequest, max_bytes=1024 * 1024)
    record = call_with_deadline(service.create_task, deps.store, service.new_task_from_proto(population, body.task),
                                deadline_s=operator_deadline_s())
    return message_response(task_management_pb2.CreateTaskResponse(task=service.task_to_proto(record)), 201, request)


@ROUTER.route("GET", rf"/taskmanagement/v1/population/{POP}/tasks/{TASK}:get")
def get_task(request: flask.Request, population: str, task_id: str) -> flask.Response:
    deps = _authorized(request)
    record = call_with_deadline(service.get_task, deps.store, population, int(task_id), deadline_s=operator_deadline_s())
    return message_response(task_management_pb2.GetTaskByIdResponse(task=service.task_to_proto(record)), 200, request)


def _task_list(records) -> flask.Response:
    tasks = [json_format.MessageToDict(service.task_to_proto(r), preserving_proto_field_name=True) for r in records]
    return json_response({"tasks": tasks})


@ROUTER.route("GET", rf"/taskmanagement/v1/population/{POP}/tasks")
def list_population_tasks(request: flask.Request, population: str) -> flask.Response:
    deps = _authorized(request)
    return _task_list(deps.store.list_tasks(population))


@ROUTER.route("GET", r"/taskmanagement/v1/tasks")
def list_tasks(request: flask.Request) -> flask.Response:
    deps = _authorized(request)
    return _task_list(deps.store.list_tasks())


@ROUTER.route("POST", rf"/taskmanagement/v1/population/{POP}/tasks/{TASK}:open")
def open_task(request: flask.Request, population: str, task_id: str) -> flask.Response:
    deps = _authorized(request)
    record = service.open_task(deps.store, deps.blobs, deps.settings, population, int(task_id))
    return message_response(task_management_pb2.GetTaskByIdResponse(task=service.task_to_proto(record)), 200, request)


@ROUTER.route("POST", rf"/taskmanagement/v1/population/{POP}/tasks/{TASK}:cancel")
def cancel_task(request: flask.Request, population: str, task_id: str) -> flask.Response:
    deps = _authorized(request)
    reason = request.args.get("reason", "canceled by the operator")
    record = service.cancel_task(deps.store, population, int(task_id), reason)
    return message_response(task_management_pb2.GetTaskByIdResponse(task=service.task_to_proto(record)), 200, request)


@ROUTER.route("DELETE", rf"/taskmanagement/v1/population/{POP}/tasks/{TASK}")
def delete_task(request: flask.Request, population: str, task_id: str) -> flask.Response:
    deps = _authorized(request)
    service.delete_unopened_task(deps.store, deps.blobs, deps.settings, population, int(task_id))
    return json_response({"deleted": f"{population}/{task_id}"})


@functions_framework.http
def task_management(request: flask.Request) -> flask.Response:
    """HTTP entry point."""
    return ROUTER.dispatch(request)
