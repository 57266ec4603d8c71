"""JSON log lines for Cloud Logging: severity, labels, trace, one line per record."""
from __future__ import annotations

import io
import logging
import warnings

import pytest

from fedcompute import strict_json
from fedcompute.logs import JsonFormatter, add_labels, log_context, parse_trace_header, quiet_third_party_warnings


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> tuple[logging.Logger, io.StringIO]:
    monkeypatch.setenv("FEDCOMPUTE_PROJECT", "proj")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logs")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.removeHandler(handler)


def _entries(stream: io.StringIO) -> list[dict]:
    return [strict_json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_line_with_severity_and_context(captured) -> None:
    logger, stream = captured
    with log_context(trace_header="4bf92f3577b34da6a3ce929d0e0e4736/1;o=1", population="pop", task=3):
        add_labels(round=2, assignment="a-1")
        logger.warning("round %s closed", 2)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    logger.info("outside")
    first, second, third = _entries(stream)
    assert first["severity"] == "WARNING" and first["message"] == "round 2 closed" and first["logger"] == "test.logs"
    assert first["logging.googleapis.com/labels"] == {"population": "pop", "task": "3", "round": "2",
                                                      "assignment": "a-1"}
    assert first["logging.googleapis.com/trace"] == "projects/proj/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    assert first["logging.googleapis.com/spanId"] == "0000000000000001"
    assert second["severity"] == "ERROR" and "ValueError: boom" in second["message"]  # traceback inside the line
    assert "logging.googleapis.com/labels" not in third and "logging.googleapis.com/trace" not in third


@pytest.mark.parametrize("header", [None, "", "not-hex/1", "zz/1;o=1", "a" * 33])
def test_a_missing_or_malformed_trace_header_adds_no_trace(header: str | None) -> None:
    assert parse_trace_header(header, "proj") == {}


def test_non_finite_values_in_a_message_keep_the_line_strict_json(captured) -> None:
    logger, stream = captured
    logger.info("epsilon %s", float("inf"))
    assert _entries(stream)[0]["message"] == "epsilon inf"


def test_google_future_warnings_are_filtered_others_are_not() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        warnings.warn_explicit("support ends", FutureWarning, "x.py", 1, module="google.api_core._python_version")
        warnings.warn_explicit("ours", FutureWarning, "y.py", 1, module="fedcompute.thing")
    assert [str(w.message) for w in seen] == ["ours"]
