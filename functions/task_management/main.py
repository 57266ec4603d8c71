"""task_management Cloud Function (HTTP, entry point ``task_management``).

Creates, gets, lists and cancels tasks (used by the task builder and by operators):
``POST /taskmanagement/v1/population/{pop}:create-task``,
``GET /taskmanagement/v1/population/{pop}/tasks/{id}:get``.

Thin entry point: routing only; the logic lives in the ``fedcompute`` library.
"""
from __future__ import annotations

import flask
import functions_framework

from fedcompute.adapters.clients import ProcessClients
from fedcompute.web import Router, configure_logging, health_payload, json_response

NAME = "task_management"

configure_logging()
RUNTIME = ProcessClients()  # settings + clients, created on first use, once per process
ROUTER = Router(NAME)


@ROUTER.route("GET", r"/healthz")
def healthz(request: flask.Request) -> flask.Response:
    """Liveness: answers without touching the cloud clients."""
    return json_response(health_payload(NAME, clients_ready=RUNTIME.clients_created))


@functions_framework.http
def task_management(request: flask.Request) -> flask.Response:
    """HTTP entry point."""
    return ROUTER.dispatch(request)
