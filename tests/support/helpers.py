"""Small helpers shared by the integration and e2e tests."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import requests


def unique(prefix: str, sep: str = "-", length: int = 10) -> str:
    """A name no other test uses (populations, topics): ``prefix`` + random hex."""
    return f"{prefix}{sep}{uuid.uuid4().hex[:length]}"


def http() -> requests.Session:
    """A session that ignores proxy settings: every request stays on loopback."""
    session = requests.Session()
    session.trust_env = False
    return session


LOG_SEVERITIES = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})


def function_log_entries(log: Path) -> list[dict[str, Any]]:
    """Every line of a function's log parsed as strict JSON (raises on a plain-text line).

    The first line the stack writes itself (``# <time> $ <command>``) is skipped.
    """
    from fedcompute import strict_json

    entries = []
    for text in log.read_text().splitlines():
        if text.startswith("# ") and " $ " in text:
            continue
        entry = strict_json.loads(text)
        assert entry["severity"] in LOG_SEVERITIES, text
        assert "FutureWarning" not in entry["message"], text
        entries.append(entry)
    return entries
