"""task_builder Cloud Function (HTTP, entry point ``task_builder``).

Validates a task config, runs the DP and flex-ops checks, builds the artifacts (client
plan, initial checkpoint, eval plan), uploads them and creates the task pair through
task management. Serves the seed's task builder API (``localhost:5000`` locally):

* ``POST /taskbuilder/v1:build-task-group`` (BuildTaskRequest → BuildTaskResponse)
* ``POST /taskbuilder/v1:build-artifacts`` (same, creates no task)

Thin entry point: routing only. TensorFlow is imported inside the build (by the
library), never at module import, so the function starts fast and ``GET /healthz``
stays cheap. An API key is required when ``FEDCOMPUTE_API_KEY`` is set.
"""
from __future__ import annotations

import logging
import threading
import time

import flask
import functions_framework

from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.proto import task_builder_pb2
from fedcompute.runtime import Runtime
from fedcompute.taskbuilder import service
from fedcompute.web import Router, configure_logging, health_payload, json_response, message_response, parse_message, require_api_key

NAME = "task_builder"
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # Cloud Functions' limit; models above it go through gs://

configure_logging()
RUNTIME = Runtime()  # settings, clients and adapters, created on first use, once per process
ROUTER = Router(NAME)
# TensorFlow graph building is not safe to interleave within one process; builds are rare.
BUILD_LOCK = threading.Lock()
log = logging.getLogger(NAME)


@ROUTER.route("GET", r"/healthz")
def healthz(request: flask.Request) -> flask.Response:
    """Liveness: answers without touching the cloud clients."""
    return json_response(health_payload(NAME, clients_ready=RUNTIME.clients_created))


def _build(request: flask.Request, artifacts_only: bool) -> flask.Response:
    deps = RUNTIME.deps()
    require_api_key(request, deps.settings.api_key)
    body = parse_message(request, task_builder_pb2.BuildTaskRequest, max_bytes=MAX_REQUEST_BYTES)
    task_management: service.TaskManagementPort
    if deps.settings.task_management_url:
        task_management = TaskManagementClient(deps.settings.task_management_url, api_key=deps.settings.api_key)
    else:
        task_management = service.InProcessTaskManagement(deps.store, deps.blobs, deps.settings)
    with BUILD_LOCK:
        started = time.perf_counter()
        outcome = service.build_task_group(body, blobs=deps.blobs, settings=deps.settings,
                                           task_management=task_management, artifacts_only=artifacts_only)
        elapsed = time.perf_counter() - started
    result = outcome.response.WhichOneof("result") or "task_group"
    if result == "error_info":
        result = task_builder_pb2.ErrorType.Enum.Name(outcome.response.error_info.error_type)
    # One line per build with the per-step timings (the first build of a process also
    # pays the TensorFlow import, inside load_model).
    log.info("%s %r: %s in %.2f s, steps %s", "build-artifacts" if artifacts_only else "build-task-group",
             body.task_config.population_name, result, elapsed, outcome.timings)
    return message_response(outcome.response, service.http_status_for_response(outcome.response), request)


@ROUTER.route("POST", r"/taskbuilder/v1:build-task-group")
def build_task_group(request: flask.Request) -> flask.Response:
    return _build(request, artifacts_only=False)


@ROUTER.route("POST", r"/taskbuilder/v1:build-artifacts")
def build_artifacts(request: flask.Request) -> flask.Response:
    return _build(request, artifacts_only=True)


@functions_framework.http
def task_builder(request: flask.Request) -> flask.Response:
    """HTTP entry point."""
    return ROUTER.dispatch(request)
