"""The functions' main.py entry points, loaded in-process (no emulators), and import weight."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import flask
import pytest
from cloudevents.http import CloudEvent

from fedcompute import web
from fedcompute.stack import ALL_FUNCTIONS, FUNCTION_SPECS
from support.functions import load_function

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
HTTP = [n for n in ALL_FUNCTIONS if FUNCTION_SPECS[n].signature_type == "http"]
CLOUDEVENT = [n for n in ALL_FUNCTIONS if FUNCTION_SPECS[n].signature_type == "cloudevent"]


def load(name: str) -> ModuleType:
    return load_function(name)


def test_every_function_has_an_entry_point_named_after_it() -> None:
    for name in ALL_FUNCTIONS:
        module = load(name)
        assert callable(getattr(module, FUNCTION_SPECS[name].entry_point)), name
        assert name == module.NAME


@pytest.mark.parametrize("name", HTTP)
def test_http_function_health_and_unknown_route(name: str) -> None:
    module = load(name)
    app = flask.Flask(name)
    entry = getattr(module, name)
    with app.test_request_context("/healthz", method="GET"):
        response = app.make_response(entry(flask.request))
    body = json.loads(response.get_data())
    assert response.status_code == 200 and body["status"] == "ok" and body["function"] == name
    assert body["clients_ready"] is False  # health never creates cloud clients
    with app.test_request_context("/no/such/route", method="GET"):
        response = app.make_response(entry(flask.request))
    assert response.status_code == 404
    assert name in json.loads(response.get_data())["error"]["message"]


@pytest.mark.parametrize("name", CLOUDEVENT)
def test_cloudevent_function_answers_health_probe_without_handler(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load(name)

    def fail(event: object) -> None:
        raise AssertionError("the handler must not run for a health probe")

    monkeypatch.setattr(module, "handle_event", fail)
    event = CloudEvent({"type": web.HEALTH_EVENT_TYPE, "source": web.HEALTH_EVENT_SOURCE, "id": "probe-1"}, {})
    assert getattr(module, name)(event) is None


def test_light_modules_do_not_import_tensorflow() -> None:
    """Functions, web helpers, the stack manager and the stack CLI stay TensorFlow-free."""
    code = (
        "import sys, importlib.util\n"
        "import fedcompute.web, fedcompute.stack, fedcompute.adapters.clients, fedcompute.cli.stack_cmd\n"
        f"for name in {list(ALL_FUNCTIONS)!r}:\n"
        f"    spec = importlib.util.spec_from_file_location('fn_' + name, {str(FUNCTIONS_DIR)!r} + '/' + name + '/main.py')\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_federated', 'jax'))\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
