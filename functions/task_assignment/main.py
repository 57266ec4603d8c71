"""task_assignment Cloud Function (HTTP, entry point ``task_assignment``).

Device check-in and result reporting (the ODP Federated Compute protocol):
``POST /taskassignment/v1/population/{pop}:create-task-assignment`` (eligibility,
assignment record, plan + checkpoint URLs) and
``PUT .../task-assignment/{id}:report-result`` (status + upload instruction).

Thin entry point: routing only; the logic lives in the ``fedcompute`` library. No
TensorFlow: its cold start is part of every device's check-in latency.
"""
from __future__ import annotations

import flask
import functions_framework

from fedcompute.adapters.clients import ProcessClients
from fedcompute.web import Router, configure_logging, health_payload, json_response

NAME = "task_assignment"

configure_logging()
RUNTIME = ProcessClients()  # settings + clients, created on first use, once per process
ROUTER = Router(NAME)


@ROUTER.route("GET", r"/healthz")
def healthz(request: flask.Request) -> flask.Response:
    """Liveness: answers without touching the cloud clients."""
    return json_response(health_payload(NAME, clients_ready=RUNTIME.clients_created))


@functions_framework.http
def task_assignment(request: flask.Request) -> flask.Response:
    """HTTP entry point."""
    return ROUTER.dispatch(request)
