"""Structured logs for the functions: one JSON object per line on stdout, as Cloud Logging reads them.

Each line has ``severity`` (Cloud Logging's level names), ``message``, ``time``, ``logger``,
and, when known, ``logging.googleapis.com/labels`` (``population``, ``task``, ``round``,
``assignment``) and ``logging.googleapis.com/trace`` (``projects/<project>/traces/<id>``
from the request's ``X-Cloud-Trace-Context`` header). A traceback stays inside the one
line (in ``message``, where Error Reporting finds it). Labels and trace live in a context
variable set per request or event by :func:`log_context` (see ``fedcompute.web``).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import os
import sys
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

LABELS_KEY = "logging.googleapis.com/labels"
TRACE_KEY = "logging.googleapis.com/trace"
SPAN_KEY = "logging.googleapis.com/spanId"
LABEL_NAMES = ("population", "task", "round", "assignment")
_SEVERITY = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL"}

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "fedcompute_log_context", default=types.MappingProxyType({}))


def parse_trace_header(value: str | None, project: str) -> dict[str, str]:
    """``X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=1`` as Cloud Logging's trace fields (empty if absent/bad)."""
    if not value or not project:
        return {}
    trace_id, _, rest = value.partition("/")
    trace_id = trace_id.strip()
    if not trace_id or not all(c in "0123456789abcdefABCDEF" for c in trace_id) or len(trace_id) > 32:
        return {}
    fields = {TRACE_KEY: f"projects/{project}/traces/{trace_id.lower()}"}
    span = rest.split(";", 1)[0].strip()
    if span.isdigit() and int(span) < 2**64:  # the header's span id is decimal; Cloud Logging wants 16 hex digits
        fields[SPAN_KEY] = f"{int(span):016x}"
    return fields


@contextlib.contextmanager
def log_context(*, trace_header: str | None = None, **labels: Any) -> Iterator[None]:
    """Attach labels (population, task, round, assignment) and the trace to every log line inside."""
    project = os.environ.get("FEDCOMPUTE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT") or ""
    current = dict(_context.get())
    current.update(parse_trace_header(trace_header, project))
    current.update({k: str(v) for k, v in labels.items() if k in LABEL_NAMES and v not in (None, "")})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


def add_labels(**labels: Any) -> None:
    """Add labels to the current context (e.g. once a handler has parsed the request)."""
    current = dict(_context.get())
    current.update({k: str(v) for k, v in labels.items() if k in LABEL_NAMES and v not in (None, "")})
    _context.set(current)


class JsonFormatter(logging.Formatter):
    """One strict-JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": message,
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "logger": record.name,
        }
        context = _context.get()
        labels = {k: context[k] for k in LABEL_NAMES if k in context}
        extra = getattr(record, "labels", None)
        if isinstance(extra, Mapping):
            labels.update({k: str(v) for k, v in extra.items()})
        if labels:
            entry[LABELS_KEY] = labels
        for key in (TRACE_KEY, SPAN_KEY):
            if key in context:
                entry[key] = context[key]
        return json.dumps(entry, default=str, allow_nan=False)


def quiet_third_party_warnings() -> None:
    """Drop google-api-core / google-auth FutureWarnings (Python and grpcio support dates): not ours to fix."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\..*")


def configure_json_logging(level: int = logging.INFO) -> None:
    """JSON lines on stdout for the root logger; Python warnings go through it too (idempotent)."""
    quiet_third_party_warnings()
    root = logging.getLogger()
    if getattr(root, "_fedcompute_json", False):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # a warning becomes one JSON line, not two lines of text
    root._fedcompute_json = True  # type: ignore[attr-defined]
