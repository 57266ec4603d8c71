"""task_builder Cloud Function (HTTP, entry point ``task_builder``).

Validates a task config, runs the DP and flex-ops checks, builds the artifacts (client
plan, initial checkpoint, eval plan), uploads them and creates the task pair through
task management. Serves the seed's task builder API (``localhost:5000`` locally).

Thin entry point: routing only. TensorFlow is imported inside the build handlers, never
at module import, so the function starts fast and ``GET /healthz`` stays cheap.
"""
from __future__ import annotations

import flask
import functions_framework

from fedcompute.adapters.clients import ProcessClients
from fedcompute.web import Router, configure_logging, health_payload, json_response

NAME = "task_builder"

configure_logging()
RUNTIME = ProcessClients()  # settings + clients, created on first use, once per process
ROUTER = Router(NAME)


@ROUTER.route("GET", r"/healthz")
def healthz(request: flask.Request) -> flask.Response:
    """Liveness: answers without touching TensorFlow or the cloud clients."""
    return json_response(health_payload(NAME, clients_ready=RUNTIME.clients_created))


@functions_framework.http
def task_builder(request: flask.Request) -> flask.Response:
    """HTTP entry point."""
    return ROUTER.dispatch(request)
