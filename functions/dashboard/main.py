"""dashboard Cloud Function (HTTP, entry point ``dashboard``): the monitoring web page and its API.

* ``GET /``                                     the page (``fedcompute/monitoring/static/index.html``)
* ``GET /static/<file>``                        its script and style sheet
* ``GET /api/tasks[?population=]``              every task: status, current round, epsilon spent, counts
* ``GET /api/metrics?population=&task=``        the task's metrics per round (model and evaluation) and its
                                                privacy ledger (epsilon after and spent in each round)
* ``GET /api/ops?population=&task=``            per-round counts and timings, assignments per minute

Read-only, no TensorFlow: it reads Firestore records and the model bucket's metrics JSON.
The API key (``FEDCOMPUTE_API_KEY``), when set, is required on ``/api/*``.
"""
from __future__ import annotations

import mimetypes

import flask
import functions_framework

from fedcompute import layout
from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.clients import ProcessClients
from fedcompute.adapters.firestore_store import FirestoreTaskStore
from fedcompute.errors import InvalidRequestError, NotFoundError
from fedcompute.monitoring import STATIC_DIR
from fedcompute.monitoring.metrics import load_run
from fedcompute.monitoring.ops import load_ops, load_task_ops
from fedcompute.web import Router, configure_logging, health_payload, json_response, require_api_key

NAME = "dashboard"

configure_logging()
CLIENTS = ProcessClients()  # created on the first API request, once per process
ROUTER = Router(NAME)
NO_CACHE = {"Cache-Control": "no-store"}

# functions-framework's Flask app owns ``/static/<path>`` (Flask's built-in static route,
# which would answer 404 from functions/dashboard/static). It imports this module inside
# the app context: point that route at the package's static files instead.
if flask.has_app_context():
    flask.current_app.static_folder = str(STATIC_DIR)


@ROUTER.route("GET", r"/healthz")
def healthz(request: flask.Request) -> flask.Response:
    return json_response(health_payload(NAME, clients_ready=CLIENTS.clients_created))


def _static(filename: str) -> flask.Response:
    path = STATIC_DIR / filename
    if not path.is_file():
        raise NotFoundError(f"no static file {filename!r} in the dashboard", hint="known: "
                            + ", ".join(sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())))
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type.endswith("javascript"):
        content_type += "; charset=utf-8"
    return flask.Response(path.read_bytes(), content_type=content_type, headers=NO_CACHE)


@ROUTER.route("GET", r"/")
def index(request: flask.Request) -> flask.Response:
    return _static("index.html")


@ROUTER.route("GET", r"/static/(?P<filename>[A-Za-z0-9_\-]+\.[A-Za-z0-9]+)")
def static_file(request: flask.Request, filename: str) -> flask.Response:
    return _static(filename)


def _store_and_blobs(request: flask.Request) -> tuple[FirestoreTaskStore, GcsBlobStore, str]:
    settings = CLIENTS.settings()
    require_api_key(request, settings.api_key)
    clients = CLIENTS.clients()
    blobs = GcsBlobStore(clients.storage, public_base_url=settings.storage_public_url or None)
    return FirestoreTaskStore(clients.firestore), blobs, settings.model_bucket


def _task_args(request: flask.Request) -> tuple[str, int]:
    population = request.args.get("population", "")
    task = request.args.get("task", "")
    if not population or not layout.is_ascii_decimal(task) or layout.population_name_problem(population):
        raise InvalidRequestError("population and task query parameters are required",
                                  hint="e.g. /api/metrics?population=my_new_population&task=1")
    return population, int(task)


@ROUTER.route("GET", r"/api/tasks")
def api_tasks(request: flask.Request) -> flask.Response:
    store, _, _ = _store_and_blobs(request)
    population = request.args.get("population") or None
    return json_response({"tasks": [t.summary() for t in load_ops(store, population)]}, headers=NO_CACHE)


@ROUTER.route("GET", r"/api/metrics")
def api_metrics(request: flask.Request) -> flask.Response:
    population, task_id = _task_args(request)
    _, blobs, bucket = _store_and_blobs(request)
    return json_response(load_run(blobs, bucket, population, task_id).to_dict(), headers=NO_CACHE)


@ROUTER.route("GET", r"/api/ops")
def api_ops(request: flask.Request) -> flask.Response:
    population, task_id = _task_args(request)
    store, _, _ = _store_and_blobs(request)
    task = store.get_task(population, task_id)
    if task is None:
        raise NotFoundError(f"task {population}/{task_id} does not exist", hint="GET /api/tasks lists the tasks")
    return json_response(load_task_ops(store, task).to_dict(), headers=NO_CACHE)


@functions_framework.http
def dashboard(request: flask.Request) -> flask.Response:
    """HTTP entry point."""
    return ROUTER.dispatch(request)
